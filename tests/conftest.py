"""Shared test fixtures: the device fixture, one tolerance table, the data folder, a PyTorch
oracle helper.

Every op test takes the `device` fixture, so one test body runs on the CPU and, where CuPy
sees a GPU, on CUDA (those cases carry the `gpu` mark and skip cleanly elsewhere):

    def test_relu_forward_is_max_with_zero(device):
        x = to_device(np.array([-1.0, 0.0, 2.0]), device)
        ...

Test modules import the helpers directly (`from conftest import TOLERANCES, to_device`):
pytest puts this folder on `sys.path`, and this file puts tests/support/ there too, so the
helper modules that are no tests (the stand-in CuPy and NCCL, the CUDA host emulator, the
Caffe file writer, the PyTorch twin, the MPI worker script) import by their plain names.
"""

import importlib.util
import os
import sys

import numpy as np
import pytest

import minivgg
from minivgg import backend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
sys.path.insert(0, os.path.join(REPO, "tests", "support"))


# ----------------------------------------------------------------------------------------
# Scripts: examples/ and benchmarks/ are folders of scripts, not packages
# ----------------------------------------------------------------------------------------

def load_script(path, name=None, register=False):
    """Import the script at `path` (relative to the repository root) as a module.

    `name`: the module's name (default: the file's stem). `register`: also enter it in
    `sys.modules`, for a script whose dataclasses or pickles look their module up there.
    """
    path = os.path.join(REPO, path)
    name = name or os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_example(name):
    """examples/<name>.py as a module."""
    return load_script(os.path.join("examples", f"{name}.py"), f"example_{name}")

# ----------------------------------------------------------------------------------------
# Tolerances: ONE table, per op and dtype, used by every comparison in the suite.
#
# float64 rows compare against an exact-arithmetic oracle (PyTorch in float64, a naive
# loop), so they only allow for summation order. float32 rows compare a float32 result
# against the float64 oracle run on the same (float32-representable) inputs, so they allow
# for float32 rounding accumulated over the reduction (C*KH*KW terms for conv2d, etc.).
# "gradcheck" is the agreement asked of analytic and central-difference gradients
# (float64, eps = 1e-6): the difference error is ~eps^2 * f''' plus ~1e-16 / eps rounding.
# ----------------------------------------------------------------------------------------

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)

TOLERANCES = {
    "conv2d": {F32: dict(rtol=1e-4, atol=1e-4), F64: dict(rtol=1e-10, atol=1e-11)},
    # F(4×4,3×3) rounds 20-30× worse than im2col (benchmarks/winograd_accuracy.md); a GPU
    # run of 2026-12-04 had 3 of 756 weight-gradient entries 1.8e-4 off (relative) under
    # cuBLAS's summation order, against the CPU's within 1e-4.
    "conv2d_winograd4": {F32: dict(rtol=1e-3, atol=1e-3), F64: dict(rtol=1e-9, atol=1e-10)},
    "max_pool2d": {F32: dict(rtol=1e-6, atol=1e-6), F64: dict(rtol=1e-12, atol=1e-12)},
    "relu": {F32: dict(rtol=1e-6, atol=1e-6), F64: dict(rtol=1e-12, atol=1e-12)},
    "local_response_norm": {F32: dict(rtol=1e-4, atol=1e-5),
                            F64: dict(rtol=1e-10, atol=1e-11)},
    "linear": {F32: dict(rtol=1e-4, atol=1e-4), F64: dict(rtol=1e-10, atol=1e-11)},
    "dropout": {F32: dict(rtol=1e-6, atol=1e-6), F64: dict(rtol=1e-12, atol=1e-12)},
    "cross_entropy": {F32: dict(rtol=1e-5, atol=1e-5), F64: dict(rtol=1e-10, atol=1e-12)},
    "elementwise": {F32: dict(rtol=1e-5, atol=1e-6), F64: dict(rtol=1e-12, atol=1e-12)},
    "reduction": {F32: dict(rtol=1e-5, atol=1e-5), F64: dict(rtol=1e-12, atol=1e-12)},
    # exact in float64; in float32 only the output gradient r is rounded
    "reshape": {F32: dict(rtol=1e-6, atol=1e-7), F64: dict(rtol=0, atol=0)},
    # whole networks: many layers of float rounding on top of each other
    "model": {F32: dict(rtol=1e-3, atol=1e-5), F64: dict(rtol=1e-8, atol=1e-11)},
    "sgd": {F32: dict(rtol=1e-6, atol=1e-7), F64: dict(rtol=1e-13, atol=1e-15)},
    "gradcheck": {F64: dict(rtol=1e-5, atol=1e-6)},
    # bf16 GEMM operands (backend.set_precision("bf16")), against float64. NOTE: these apply
    # to results divided by their RMS (tests/test_bf16.py: assert_close_bf16), the measure
    # of benchmarks/bf16_accuracy.md, whose worst max|error| / RMS over VGG-16's shapes was
    # 1.8e-2 for im2col, direct and fc (rounding the operands alone costs as much), 2.7e-2
    # for F(2×2,3×3) and 0.44 for F(4×4,3×3); about 2.5× that here.
    "conv2d_bf16": {F32: dict(rtol=0, atol=5e-2)},
    "conv2d_winograd_bf16": {F32: dict(rtol=0, atol=7e-2)},
    "conv2d_winograd4_bf16": {F32: dict(rtol=0, atol=1.1)},
    "linear_bf16": {F32: dict(rtol=0, atol=5e-2)},
    # the bf16 result against the float64 product of the same bf16-rounded operands: only
    # the fp32 sums differ (amx.py), as for float32 "conv2d"
    "bf16_operands": {F32: dict(rtol=0, atol=1e-5)},
}


def tol(op, dtype):
    """The tolerance dict (rtol, atol) for `op` computed in `dtype`."""
    return TOLERANCES[op][np.dtype(dtype)]


def assert_close(actual, expected, op, dtype, what=""):
    """`np.testing.assert_allclose` with the table's tolerance; arrays may live on a GPU."""
    np.testing.assert_allclose(to_numpy(actual), to_numpy(expected), err_msg=what,
                               **tol(op, dtype))


@pytest.fixture(autouse=True)
def _conv_algorithm_restored():
    """Every test starts with im2col convolutions (the library starts in "auto", whose
    choices depend on the CPU; a test asks for another algorithm by name); a test (or a
    training run, which sets its --conv-algo) that changes the process-wide choice cannot
    leak it into the next."""
    backend.set_conv_algorithm("im2col")
    yield
    backend.set_conv_algorithm("im2col")


@pytest.fixture(autouse=True)
def _precision_restored():
    """Every test starts (and leaves) fp32 GEMMs; a bf16 test or run cannot leak it."""
    if backend.get_precision() != "fp32":
        backend.set_precision("fp32")
    yield
    if backend.get_precision() != "fp32":
        backend.set_precision("fp32")


# ----------------------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------------------

@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """"cpu", and "cuda" where CuPy sees a GPU (skipped cleanly elsewhere)."""
    if request.param == "cuda" and not backend.cuda_available():
        pytest.skip("no CUDA GPU visible to CuPy")
    return request.param


def to_device(array, device):
    """A host array (or anything np.asarray takes) as an array on `device`."""
    return backend.to_device(np.asarray(array), device)


def to_numpy(a):
    """A Tensor, NumPy or CuPy array as a host NumPy array."""
    if isinstance(a, minivgg.Tensor):
        a = a.data
    return backend.to_numpy(a)


def tensor(array, device, dtype=None, requires_grad=False):
    """A `minivgg.Tensor` on `device` holding `array` (cast to `dtype` when given)."""
    a = np.asarray(array)
    if dtype is not None:
        a = a.astype(dtype)
    return minivgg.Tensor(to_device(a, device), requires_grad=requires_grad)


@pytest.fixture
def rng():
    """A fresh seeded generator per test, so every test is repeatable on its own."""
    return np.random.default_rng(1234)


# ----------------------------------------------------------------------------------------
# Data on disk
# ----------------------------------------------------------------------------------------

@pytest.fixture
def shared_data():
    """`<repo>/../shared/data`, or a clean skip where this checkout has none beside it."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def imagenette(shared_data):
    """The Imagenette (224 px) folder with train/ and val/, or a clean skip."""
    root = os.path.join(shared_data, "imagenette2-224")
    if not all(os.path.isdir(os.path.join(root, s)) for s in ("train", "val")):
        pytest.skip(f"Imagenette not found at {root}")
    return root


# ----------------------------------------------------------------------------------------
# PyTorch as an independent oracle (a test dependency only)
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def torch():
    """The torch module, or a skip where it is not installed."""
    return pytest.importorskip("torch")


def compare_with_torch(op, mv_fn, torch_fn, arrays, device, dtype, seed=0, what=""):
    """Check forward values and every input gradient of `mv_fn` against `torch_fn`.

    `arrays` are float64 host arrays. minivgg runs on `device` in `dtype`; PyTorch runs on
    the CPU in float64 on the same values (rounded to `dtype` first), so it is the exact
    reference. The output gradient is a fixed random projection r: L = sum(y * r).
    """
    import torch
    arrays = [np.asarray(a, dtype=dtype) for a in arrays]
    xs = [tensor(a, device, requires_grad=True) for a in arrays]
    y = mv_fn(*xs)
    r = np.random.default_rng(seed).normal(size=y.shape)
    y.backward(r)

    ts = [torch.tensor(a.astype(np.float64), requires_grad=True) for a in arrays]
    yt = torch_fn(*ts)
    yt.backward(torch.from_numpy(r))

    assert y.dtype == np.dtype(dtype), f"{op}{what}: output dtype {y.dtype}, input {dtype}"
    assert y.shape == tuple(yt.shape), f"{op}{what}: shape {y.shape} != torch {yt.shape}"
    assert_close(y, yt.detach().numpy(), op, dtype, f"{op}{what}: forward")
    for i, (x, t) in enumerate(zip(xs, ts)):
        assert x.grad is not None, f"{op}{what}: input {i} got no gradient"
        assert x.grad.dtype == np.dtype(dtype), f"{op}{what}: grad {i} dtype {x.grad.dtype}"
        assert_close(x.grad, t.grad.numpy(), op, dtype, f"{op}{what}: gradient of input {i}")
