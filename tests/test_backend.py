"""minivgg.backend: the registry of devices, device names, and the TF32 switch.

The CUDA cases run on the stand-in cupy of the emulation tests (tests/support/standin_cupy.py: a
device array type of its own), given here a device count, a current device and a compute
capability, so no GPU is needed.
"""

import os
import subprocess
import sys
import types

import numpy as np
import pytest

import standin_cupy as standin
from conftest import REPO
from minivgg import backend
from minivgg.kernels import cpu

DeviceArray = standin.ndarray  # the stand-in's device array


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so a test may add entries."""
    monkeypatch.setattr(backend, "_BACKENDS", dict(backend._BACKENDS))
    monkeypatch.setattr(backend, "_BY_NAME", dict(backend._BY_NAME))


def stand_in_cupy(monkeypatch, devices=2, current=0, capability="80"):
    """Install the stand-in cupy with `devices` GPUs of `capability`; returns it."""
    standin.install(monkeypatch)
    runtime = types.SimpleNamespace(getDeviceCount=lambda: devices, getDevice=lambda: current)
    monkeypatch.setattr(standin.cuda, "runtime", runtime)
    monkeypatch.setattr(standin.Device, "compute_capability", capability)
    monkeypatch.setattr(backend, "_cupy", None)
    monkeypatch.setattr(backend, "_cupy_error", None)
    monkeypatch.setattr(backend, "_tf32", False)
    monkeypatch.setattr(backend, "_tf32_supported", None)
    assert backend.cuda_available()
    return standin


def _float32_compute_type(fake):
    """The cuBLAS compute type of a float32 fc-layer product made now on the stand-in."""
    from cuda_host_emulator import load_emulated_cuda_kernels
    gpu = load_emulated_cuda_kernels()  # kernels/gpu.py on the stand-in; no kernel compiled
    fake.cublas_calls.clear()
    gpu.fc_matmul(fake.ones((4, 3), np.float32), fake.ones((3, 2), np.float32))
    return {68: "default", 77: "tf32"}[fake.cublas_calls[-1][5]]


def test_a_new_backend_is_one_registry_entry(registry):
    class OtherArray(np.ndarray):
        pass

    backend.register(OtherArray, backend.Backend("other", np, "minivgg.kernels.cpu",
                                                 lambda a: a.view(OtherArray), np.asarray))
    a = np.zeros(3).view(OtherArray)
    assert backend.device_of(a) == "other" and backend.is_array(a)
    assert backend.array_module(a) is np and backend.kernels_for(a) is cpu
    assert backend.device_of(np.zeros(3)) == "cpu"


def test_cuda_arrays_go_to_the_cuda_table_through_the_registry(monkeypatch, registry):
    stand_in_cupy(monkeypatch)
    x = backend.to_device(np.ones((2, 3)), "cuda")
    assert type(x) is DeviceArray and backend.device_of(x) == "cuda"
    assert backend.array_module(x) is sys.modules["cupy"]
    assert backend._backend_of(x).kernels_module == "minivgg.kernels.gpu"
    assert type(backend.to_numpy(x)) is np.ndarray
    assert backend.to_device(x, "cuda") is x


def test_cuda_device_index_is_the_current_gpu_or_a_clear_error(monkeypatch, registry):
    stand_in_cupy(monkeypatch, devices=2, current=0)
    assert backend.check_device("cuda:0") == "cuda"
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES=1"):
        backend.check_device("cuda:1")  # would silently run on GPU 0
    with pytest.raises(ValueError, match=r"only 2 GPU\(s\) visible"):
        backend.check_device("cuda:2")
    with pytest.raises(ValueError, match="unknown device"):
        backend.check_device("cuda:x")


def test_a_cupy_without_its_private_modules_is_still_a_gpu(monkeypatch, registry):
    """Issue 22, defect 1: TF32 was set through `cupy._core._routines_linalg` inside the
    import's catch-all `except`, so a CuPy that moved it reported no GPU at all. minivgg
    now touches no private CuPy module (the stand-in has none, and a trap catches a look)."""
    fake = stand_in_cupy(monkeypatch, capability="90")

    class Trap(types.ModuleType):
        def __getattr__(self, name):
            raise AssertionError(f"minivgg reached for cupy._core.{name}")

    monkeypatch.setitem(sys.modules, "cupy._core", Trap("cupy._core"))
    monkeypatch.setattr(fake, "_core", Trap("cupy._core"), raising=False)
    monkeypatch.setattr(backend, "_cupy", None)
    assert backend.cuda_available(), backend.cuda_unavailable_reason()
    backend.set_tf32(True)
    assert backend.tf32_enabled() and _float32_compute_type(fake) == "tf32"
    backend.set_tf32(False)


def test_tf32_on_a_gpu_without_it_warns_and_reports_fp32(monkeypatch, registry):
    fake = stand_in_cupy(monkeypatch, capability="75")  # Turing: no TF32
    with pytest.warns(RuntimeWarning, match="compute capability 8.0"):
        backend.set_tf32(True)
    assert not backend.tf32_enabled()
    assert _float32_compute_type(fake) == "default"


def test_tf32_on_an_ampere_gpu_is_on_and_off_as_asked(monkeypatch, registry):
    fake = stand_in_cupy(monkeypatch, capability="80")
    backend.set_tf32(True)
    assert backend.tf32_enabled() and _float32_compute_type(fake) == "tf32"
    backend.set_tf32(False)
    assert not backend.tf32_enabled() and _float32_compute_type(fake) == "default"


def test_a_fresh_process_starts_with_the_auto_conv_algorithm():
    """The library default is "auto" (the tests' fixture pins im2col, so ask a new process)."""
    done = subprocess.run(
        [sys.executable, "-c", "from minivgg import backend; print(backend.get_conv_algorithm())"],
        env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO, capture_output=True, text=True,
        timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "auto"
