"""minivgg.backend: the registry of devices, device names, and the TF32 switch.

The CUDA cases run on the stand-in cupy of the emulation tests (NumPy dressed as CuPy,
cuda_host_emulator._fake_cupy), given here a device array type of its own, a device count,
a current device and a compute capability, so no GPU is needed.
"""

import sys
import types

import numpy as np
import pytest

from cuda_host_emulator import _fake_cupy
from minivgg import backend
from minivgg.kernels import cpu


class DeviceArray(np.ndarray):
    """The stand-in's device array: a NumPy array of a type of its own."""


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so a test may add entries."""
    monkeypatch.setattr(backend, "_BACKENDS", dict(backend._BACKENDS))
    monkeypatch.setattr(backend, "_BY_NAME", dict(backend._BY_NAME))


def stand_in_cupy(monkeypatch, devices=2, current=0, capability="80"):
    """Install the stand-in cupy with `devices` GPUs of `capability`; returns it. Records
    the cuBLAS compute type set for float32 in `fake.compute_types`."""
    fake = _fake_cupy()
    fake.ndarray = DeviceArray
    fake.asarray = lambda a, dtype=None: np.asarray(a, dtype=dtype).view(DeviceArray)
    fake.asnumpy = lambda a: np.asarray(a).view(np.ndarray)
    fake.random = types.SimpleNamespace(seed=lambda seed: None)
    runtime = types.SimpleNamespace(getDeviceCount=lambda: devices, getDevice=lambda: current)
    fake.cuda = types.SimpleNamespace(
        runtime=runtime,
        Device=lambda i=None: types.SimpleNamespace(compute_capability=capability))
    linalg = types.ModuleType("cupy._core._routines_linalg")
    linalg.COMPUTE_TYPE_DEFAULT, linalg.COMPUTE_TYPE_TF32 = "default", "tf32"
    fake.compute_types = []
    core = types.ModuleType("cupy._core")
    core._routines_linalg = linalg
    core.set_compute_type = lambda dtype, t: fake.compute_types.append((np.dtype(dtype), t))
    fake._core = core
    for name, module in (("cupy", fake), ("cupy._core", core),
                         ("cupy._core._routines_linalg", linalg)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(backend, "_cupy", None)
    monkeypatch.setattr(backend, "_cupy_error", None)
    monkeypatch.setattr(backend, "_tf32", False)
    monkeypatch.setattr(backend, "_tf32_supported", None)
    assert backend.cuda_available()
    return fake


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
    assert backend._backend_of(x).kernels_module == "minivgg.kernels.cuda"
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


def test_tf32_on_a_gpu_without_it_warns_and_reports_fp32(monkeypatch, registry):
    fake = stand_in_cupy(monkeypatch, capability="75")  # Turing: no TF32
    with pytest.warns(RuntimeWarning, match="compute capability 8.0"):
        backend.set_tf32(True)
    assert not backend.tf32_enabled()
    assert fake.compute_types[-1] == (np.dtype(np.float32), "default")


def test_tf32_on_an_ampere_gpu_is_on_and_off_as_asked(monkeypatch, registry):
    fake = stand_in_cupy(monkeypatch, capability="80")
    backend.set_tf32(True)
    assert backend.tf32_enabled() and fake.compute_types[-1][1] == "tf32"
    backend.set_tf32(False)
    assert not backend.tf32_enabled() and fake.compute_types[-1][1] == "default"
