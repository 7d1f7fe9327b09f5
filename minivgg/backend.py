"""The one place that knows about devices.

Ops never ask "is this a CuPy array?". They ask this module for

* `array_module(a)`: `numpy` or `cupy`, the "xp" that does ordinary array math on `a`;
* `kernels_for(a)`: the kernel table for `a`'s device, `minivgg.kernels.cpu` or
  `minivgg.kernels.gpu`, which offer the same entry points (`kernels/common.py`).

Both come from one registry, {array type: Backend}, so a new backend (or another kernel
table for a device) is one `register` call. CuPy is optional: its entry is added when CuPy
imports and sees a GPU. Without it everything runs on the CPU, and asking for "cuda" raises
a `RuntimeError` that says what is missing.
"""

import importlib
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


@dataclass
class Backend:
    """One device: its name, array module, kernel table (a module name, imported on first
    use) and how arrays get there from the host."""
    name: str
    xp: Any
    kernels_module: str
    from_host: Callable
    to_host: Callable
    _kernels: Any = None

    def kernels(self):
        if self._kernels is None:
            self._kernels = importlib.import_module(self.kernels_module)
        return self._kernels


_BACKENDS = {}  # array type -> Backend
_BY_NAME = {}  # device name -> Backend


def register(array_type, backend):
    """Make `backend` the one for arrays of `array_type` and for the device `backend.name`."""
    _BACKENDS[array_type] = backend
    _BY_NAME[backend.name] = backend


register(np.ndarray, Backend("cpu", np, "minivgg.kernels.cpu", np.asarray, np.asarray))


# ----------------------------------------------------------------------------------------
# CuPy: imported when asked for, or when the caller hands us CuPy arrays
# ----------------------------------------------------------------------------------------

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
        register(cupy.ndarray, Backend("cuda", cupy, "minivgg.kernels.gpu", cupy.asarray,
                                       cupy.asnumpy))
    except Exception as e:  # ImportError, CUDARuntimeError, driver errors...
        _cupy_error = f"{type(e).__name__}: {e}"
        return None
    # NOTE: outside the `except` above, which would turn any mistake here into "no GPU".
    _check_tf32_support(cupy)
    return _cupy


def cuda_available():
    """True when CuPy imports and sees at least one GPU."""
    return _import_cupy() is not None


def cuda_unavailable_reason():
    """Why `cuda_available()` is False (the import or driver error), or None when it is True."""
    _import_cupy()
    return _cupy_error


def require_cuda():
    cp = _import_cupy()
    if cp is None:
        raise RuntimeError(
            "device 'cuda' was asked for, but it is not available here "
            f"({_cupy_error}). Install the GPU extra (pip install 'minivgg[cuda]', which "
            "brings cupy-cuda13x) on a machine with an NVIDIA GPU, or use device 'cpu'.")
    return cp


def check_device(device):
    """Validate a device name ("cpu", "cuda" or "cuda:N") and return its canonical form.

    NOTE: minivgg runs on one GPU, CuPy's current device (the first visible one unless the
    caller selects another). "cuda:N" is accepted only for that device, since kernels,
    cuBLAS handles and the memory pool all follow the current device; choose another GPU
    with CUDA_VISIBLE_DEVICES=N.
    """
    device = str(device)
    if device == "cpu":
        return "cpu"
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise ValueError(f"unknown device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    cp = require_cuda()
    if match.group(1) is not None:
        index, current = int(match.group(1)), cp.cuda.runtime.getDevice()
        count = cp.cuda.runtime.getDeviceCount()
        if index >= count:
            raise ValueError(f"device {device!r}: only {count} GPU(s) visible "
                             f"(cuda:0 ... cuda:{count - 1})")
        if index != current:
            raise ValueError(f"device {device!r}: minivgg runs on one GPU, the current one "
                             f"(cuda:{current}); to use GPU {index}, run with "
                             f"CUDA_VISIBLE_DEVICES={index} and device 'cuda'")
    return "cuda"


def _backend_of(a):
    """The registered Backend of `a`'s array type, or None for anything else."""
    found = _BACKENDS.get(type(a))
    if found is None:
        if _cupy is None and _cupy_error is None and "cupy" in sys.modules:
            _import_cupy()  # the caller imported CuPy: its arrays may be coming
        found = next((b for t, b in _BACKENDS.items() if isinstance(a, t)), None)
    return found


def is_array(a):
    return _backend_of(a) is not None


def device_of(a):
    """"cpu", "cuda", ...: the device that holds `a` (a host array for anything else)."""
    found = _backend_of(a)
    return "cpu" if found is None else found.name


def array_module(a):
    """`numpy` for host arrays, `cupy` for device arrays."""
    found = _backend_of(a)
    return np if found is None else found.xp


def kernels_for(a):
    """The kernel table (module) for the device that holds `a`."""
    found = _backend_of(a) or _BY_NAME["cpu"]
    if _precision != "fp32" and found.name != "cpu":
        raise RuntimeError(f"precision {_precision!r} runs on the CPU only (AMX tiles); the GPU "
                           f"keeps fp32 (or TF32, set_tf32): call set_precision('fp32') "
                           f"before using {found.name!r} arrays")
    return found.kernels()


def to_numpy(a):
    found = _backend_of(a)
    return np.asarray(a) if found is None else found.to_host(a)


def to_device(a, device):
    """`a` on `device`; the same object when it is already there."""
    device = check_device(device)
    if device_of(a) == device:
        return a if device != "cpu" else np.asarray(a)
    return _BY_NAME[device].from_host(to_numpy(a))


def as_array_like(a, like):
    """`a` as an array on the device of `like`, with `like`'s dtype."""
    xp = array_module(like)
    if xp is np:
        return np.asarray(to_numpy(a), dtype=like.dtype)
    return xp.asarray(a, dtype=like.dtype)


# ----------------------------------------------------------------------------------------
# Convolution algorithm: im2col + GEMM, or for 3×3/s1/p1 Winograd (kernels/winograd.py) or
# direct convolution (kernels/direct.py)
# ----------------------------------------------------------------------------------------

# "im2col": every conv by im2col + GEMM (section 3 of the walkthrough).
# "winograd", "winograd4": Winograd F(2×2,3×3) / F(4×4,3×3) for every 3×3/s1/p1 conv.
# "direct": the 3×3 sum written out, no im2col matrix, for every 3×3/s1/p1 conv.
# "blocked": the same sum with channels in blocks of 16 and a register-blocked micro-kernel
#            (kernels/cpu/blocked.py), for every 3×3/s1/p1 conv.
# "auto": per layer, by a fixed rule of the shapes (`kernels/winograd.py: auto_algorithm`),
#         the default.
# Convolutions the others cannot run (config C's 1×1, strides, other paddings) use im2col.
CONV_ALGORITHMS = ("auto", "im2col", "winograd", "winograd4", "direct", "blocked")

_conv_algorithm = "auto"


def set_conv_algorithm(name):
    """Choose how convolutions run from now on: one of `CONV_ALGORITHMS`.

    Every choice gives the same results up to float rounding (benchmarks/
    winograd_accuracy.md); "auto" depends only on the layer shapes, never on a timing, so
    a run and its resume make the same choices and stay bit-identical (with the same
    thread count, which, as for im2col, sets how the weight gradient's sums are split, and
    the same minivgg: a change of the rule, such as conv1_1 moving from im2col to direct
    convolution, changes the rounding of a run resumed across it). The rule picks "blocked"
    only for float32 on a CPU with AVX-512 (under bf16: for every 3×3/s1/p1 layer on a CPU
    with AMX), so a run resumed on a CPU without it takes another algorithm from there on.
    "auto" is the default.
    """
    global _conv_algorithm
    if name not in CONV_ALGORITHMS:
        raise ValueError(f"unknown conv algorithm {name!r}: expected one of "
                         f"{', '.join(CONV_ALGORITHMS)}")
    _conv_algorithm = name


def get_conv_algorithm():
    return _conv_algorithm


def conv_algorithm_for(x, W, stride, padding):
    """The algorithm that runs conv(x, W): "im2col", "winograd", "winograd4", "direct" or
    "blocked"."""
    from minivgg.kernels import shapes, winograd
    if _conv_algorithm == "im2col" or not shapes.is_3x3_same(W.shape, stride, padding):
        return "im2col"
    if _conv_algorithm == "auto":
        N, C, H, Wd = x.shape
        device = device_of(x)
        if device == "cpu" and _amx_is_fast(x):
            return "blocked"
        picked = winograd.auto_algorithm(device, N, C, H, Wd,
                                         blocked=device == "cpu" and _blocked_is_fast(x))
        # NOTE: under bf16 without AMX, im2col where the rule picks Winograd: F(4×4,3×3)
        # with bf16 operands errs 20× more than im2col (benchmarks/bf16_accuracy.md),
        # F(2×2,3×3) 1.5×. "direct" and "blocked" stay, on bf16-rounded operands.
        return "im2col" if _precision == "bf16" and picked.startswith("winograd") else picked
    return _conv_algorithm


def _amx_is_fast(x):
    """Whether "auto" runs every 3×3/s1/p1 layer as "blocked": under bf16, float32 x, on a
    CPU with AMX (`amx_isa.amx_available`), where "blocked" is the AMX direct convolution
    (kernels/cpu/blocked_amx.py). NOTE: measured against bf16 im2col, the rounded fp32
    kernels and direct (C = 3), one thread, CPU time (benchmarks/bench_blocked_amx.py,
    2026-12-05, shared machine, load average 4.5-13, two runs): its forward + backward was
    the fastest on every layer of the small recipe (2-5× im2col's) and of VGG-16 at batch 2
    (1.1-4.4×; conv1_1, forward + weight gradient: 21-23 ms against direct's 26 and
    im2col's 25-26); the closest, conv5 at 14×14 with 2 images (19-20 ms against im2col's
    21-22), only gains with the batch. So under bf16 with AMX the rule is one algorithm,
    whatever the shape."""
    if _precision != "bf16" or x.dtype != np.float32:
        return False
    from minivgg.kernels.cpu.amx_isa import amx_available
    return amx_available()[0]


def _blocked_is_fast(x):
    """Whether the CPU's "blocked" conv runs its AVX-512 micro-kernel on x (float32 on a CPU
    with AVX-512; elsewhere it runs plain loops, far slower than the other algorithms)."""
    from minivgg.kernels.cpu import blocked
    return x.dtype == np.float32 and not blocked.avx512_reason()


# ----------------------------------------------------------------------------------------
# Precision of the CPU's GEMMs: fp32, or bf16 operands with fp32 sums on AMX tiles
# ----------------------------------------------------------------------------------------

PRECISIONS = ("fp32", "bf16")

_precision = "fp32"


def set_precision(name):
    """Run the CPU's conv and fc GEMMs in `name`, one of `PRECISIONS`, from now on.

    "bf16": every GEMM (im2col's three, Winograd's per-point products, the fc layers) takes
    bf16-rounded operands and sums in fp32 on the AMX tiles (kernels/cpu/matmul.py);
    "blocked" runs as a direct convolution on the AMX tiles (kernels/cpu/blocked_amx.py),
    which "auto" then picks for every 3×3 layer; "direct" multiplies bf16-rounded operands
    (and so does "blocked" without AMX). Everything else stays fp32.
    Without AMX the same rounded operands go through the fp32 GEMMs, with one warning that
    names the missing CPU feature. CPU only: ops on CUDA arrays raise while "bf16" is set
    (the GPU keeps fp32, or TF32 with `set_tf32`). "fp32" gives the same bits as never
    having switched.
    """
    global _precision
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}: expected one of {', '.join(PRECISIONS)}")
    importlib.import_module("minivgg.kernels.cpu.matmul").set_precision(name)
    _precision = name


def get_precision():
    """"fp32" or "bf16", as `set_precision` left it."""
    return _precision


# ----------------------------------------------------------------------------------------
# TF32: float32 GEMMs on tensor cores with 10-bit mantissas (Ampere and later)
# ----------------------------------------------------------------------------------------

_tf32 = False  # asked for with set_tf32
_tf32_supported = None  # whether the GPU has TF32 tensor cores; None until CuPy loads


def set_tf32(enabled):
    """Let cuBLAS run float32 GEMMs (conv and fc layers) in TF32 on the GPU, or not.

    Off by default, so GPU results match the CPU's to float32 accuracy. On, GEMMs run several
    times faster on A100/H100 tensor cores with inputs rounded to 10 mantissa bits
    (relative error about 1e-3, harmless for training, as PyTorch's `allow_tf32` assumes).
    Takes effect at once when CuPy is loaded, otherwise when it is. No effect on the CPU.
    A GPU older than Ampere (compute capability 8.0) has no TF32: a warning says so and
    GEMMs stay FP32, as `tf32_enabled()` then reports.
    """
    global _tf32
    _tf32 = bool(enabled)
    if _cupy is not None:
        _check_tf32_support(_cupy)


def tf32_enabled():
    """True when float32 GEMMs run (or, before CuPy loads, are asked to run) in TF32."""
    return _tf32 and _tf32_supported is not False


def _check_tf32_support(cupy):
    """Whether the current GPU has TF32 (compute capability 8.0 or later); warn if TF32 was
    asked for on one without.

    NOTE: nothing is set inside CuPy: every GEMM minivgg issues on the GPU asks cuBLAS for
    its compute type itself (`kernels/gpu.py: gemm`, reading `tf32_enabled()`), so neither
    CuPy's private settings nor its CUPY_TF32 variable are involved.
    """
    global _tf32_supported
    capability = cupy.cuda.Device().compute_capability
    _tf32_supported = int(capability) >= 80
    if _tf32 and not _tf32_supported:
        warnings.warn(f"TF32 needs a GPU of compute capability 8.0 or later; this one is "
                      f"{capability}: float32 GEMMs stay FP32", RuntimeWarning, stacklevel=3)


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
