"""The one place that knows about devices.

Ops never ask "is this a CuPy array?". They ask this module for

* `array_module(a)`: `numpy` or `cupy`, the "xp" that does ordinary array math on `a`;
* `kernels_for(a)`: the kernel table for `a`'s device, `minivgg.kernels.cpu` or
  `minivgg.kernels.cuda`, whose functions have identical signatures.

CuPy is optional. Without it (or without a GPU) everything runs on the CPU, and asking for
"cuda" raises a `RuntimeError` that says what is missing.
"""

import sys

import numpy as np

_cupy = None
_cupy_error = None


def _import_cupy():
    """Import CuPy once and check that a GPU is visible; remember why not if it fails."""
    global _cupy, _cupy_error
    if _cupy is not None or _cupy_error is not None:
        return _cupy
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("CuPy found no CUDA device")
        _cupy = cupy
        _apply_tf32(cupy)
    except Exception as e:  # ImportError, CUDARuntimeError, driver errors...
        _cupy_error = f"{type(e).__name__}: {e}"
    return _cupy


def _loaded_cupy():
    """CuPy if it is in use: imported by us, or by the caller who hands us CuPy arrays."""
    if _cupy is None and _cupy_error is None and "cupy" in sys.modules:
        _import_cupy()
    return _cupy


def cuda_available():
    """True when CuPy imports and sees at least one GPU."""
    return _import_cupy() is not None


def require_cuda():
    cp = _import_cupy()
    if cp is None:
        raise RuntimeError(
            "device 'cuda' was asked for, but it is not available here "
            f"({_cupy_error}). Install the GPU extra (pip install 'minivgg[cuda]', which "
            "brings cupy-cuda13x) on a machine with an NVIDIA GPU, or use device 'cpu'.")
    return cp


def check_device(device):
    """Validate a device name ("cpu", "cuda" or "cuda:0") and return its canonical form."""
    device = str(device)
    if device == "cpu":
        return "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        require_cuda()
        return "cuda"
    raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'cuda'")


def _is_device_array(a):
    cp = _loaded_cupy()
    return cp is not None and isinstance(a, cp.ndarray)


def is_array(a):
    return isinstance(a, np.ndarray) or _is_device_array(a)


def device_of(a):
    return "cuda" if _is_device_array(a) else "cpu"


def array_module(a):
    """`numpy` for host arrays, `cupy` for device arrays."""
    return _cupy if _is_device_array(a) else np


def kernels_for(a):
    """The kernel table (module) for the device that holds `a`."""
    if _is_device_array(a):
        from minivgg.kernels import cuda
        return cuda
    from minivgg.kernels import cpu
    return cpu


def to_numpy(a):
    if _is_device_array(a):
        return _cupy.asnumpy(a)
    return np.asarray(a)


def to_device(a, device):
    """`a` on `device`; the same object when it is already there."""
    device = check_device(device)
    if device == "cpu":
        return to_numpy(a)
    cp = require_cuda()
    return a if isinstance(a, cp.ndarray) else cp.asarray(a)


def as_array_like(a, like):
    """`a` as an array on the device of `like`, with `like`'s dtype."""
    xp = array_module(like)
    if xp is np:
        return np.asarray(to_numpy(a), dtype=like.dtype)
    return xp.asarray(a, dtype=like.dtype)


# ----------------------------------------------------------------------------------------
# TF32: float32 GEMMs on tensor cores with 10-bit mantissas (Ampere and later)
# ----------------------------------------------------------------------------------------

_tf32 = False


def set_tf32(enabled):
    """Let cuBLAS run float32 GEMMs (conv and fc layers) in TF32 on the GPU, or not.

    Off by default, so GPU results match the CPU's to float32 accuracy. On, GEMMs run several
    times faster on A100/H100 tensor cores with inputs rounded to 10 mantissa bits
    (relative error about 1e-3, harmless for training, as PyTorch's `allow_tf32` assumes).
    Takes effect at once when CuPy is loaded, otherwise when it is. No effect on the CPU.
    """
    global _tf32
    _tf32 = bool(enabled)
    if _cupy is not None:
        _apply_tf32(_cupy)


def tf32_enabled():
    return _tf32


def _apply_tf32(cupy):
    # CuPy picks the cuBLAS compute type per dtype; TF32 is "COMPUTE_TYPE_TF32" for float32.
    # NOTE: set it explicitly either way, so the CUPY_TF32 environment variable (read once
    # by CuPy) cannot turn TF32 on behind this switch.
    from cupy._core import _routines_linalg as linalg
    compute_type = linalg.COMPUTE_TYPE_TF32 if _tf32 else linalg.COMPUTE_TYPE_DEFAULT
    cupy._core.set_compute_type(np.float32, compute_type)


# ----------------------------------------------------------------------------------------
# Random numbers: one seeded generator per device, so runs are repeatable
# ----------------------------------------------------------------------------------------

_rng = np.random.default_rng(0)


def manual_seed(seed):
    """Seed minivgg's generators (dropout masks, initialisation) on every device."""
    global _rng
    _rng = np.random.default_rng(seed)
    if _cupy is not None:
        _cupy.random.seed(seed)


def rng():
    """The host `numpy.random.Generator` used for initialisation and dropout.

    CPU dropout draws its mask from it; GPU dropout draws one 64-bit seed from it per mask
    for a counter-based generator on the device (kernels/cuda/activation.cu). Either way
    `manual_seed` makes a run repeatable on its device.
    """
    return _rng


def get_rng_state():
    """The host generator's state as a JSON-able dict (stored in checkpoints)."""
    return _rng.bit_generator.state


def set_rng_state(state):
    _rng.bit_generator.state = state
