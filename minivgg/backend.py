"""The one place that knows about devices.

Ops never ask "is this a CuPy array?". They ask this module for

* `array_module(a)`: `numpy` or `cupy`, the "xp" that does ordinary array math on `a`;
* `kernels_for(a)`: the kernel table for `a`'s device, `minivgg.kernels.cpu` or
  `minivgg.kernels.cuda`, whose functions have identical signatures.

CuPy is optional. Without it (or without a GPU) everything runs on the CPU, and asking for
"cuda" raises a `RuntimeError` that says what is missing.
"""

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
    except Exception as e:  # ImportError, CUDARuntimeError, driver errors...
        _cupy_error = f"{type(e).__name__}: {e}"
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


def is_array(a):
    if isinstance(a, np.ndarray):
        return True
    return _cupy is not None and isinstance(a, _cupy.ndarray)


def device_of(a):
    return "cpu" if isinstance(a, np.ndarray) or not is_array(a) else "cuda"


def array_module(a):
    """`numpy` for host arrays, `cupy` for device arrays."""
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return _cupy
    return np


def kernels_for(a):
    """The kernel table (module) for the device that holds `a`."""
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        from minivgg.kernels import cuda
        return cuda
    from minivgg.kernels import cpu
    return cpu


def to_numpy(a):
    if _cupy is not None and isinstance(a, _cupy.ndarray):
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
    """The host `numpy.random.Generator` used for initialisation and CPU dropout."""
    return _rng


def get_rng_state():
    """The host generator's state as a JSON-able dict (stored in checkpoints)."""
    return _rng.bit_generator.state


def set_rng_state(state):
    _rng.bit_generator.state = state
