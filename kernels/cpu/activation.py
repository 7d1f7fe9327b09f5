"""ReLU (Sec. 2.1: every hidden layer) and the dropout mask (Sec. 3.1) on the CPU, the twin of
`cuda/activation.cu`."""

import numpy as np
from numba import njit

from minivgg.kernels.cpu.runtime import JIT, map_ranges


def relu_forward(x, y=None):
    """max(x, 0) -> a new array, or into `y` (which may be x itself: in place).

    NOTE: NumPy's maximum: vectorised, and it keeps NaN as NaN, as PyTorch does (a Numba
    `max(x, 0)` would not). The pool runs it on one range per thread. In place on a
    convolution's fresh output (`minivgg.fused.Conv2dReLU`) it saves a new array."""
    x = np.ascontiguousarray(x)
    y = np.empty_like(x) if y is None else check_out(y, x, "relu_forward")
    xf, yf = x.reshape(-1), y.reshape(-1)
    map_ranges(lambda t0, t1: np.maximum(xf[t0:t1], 0, out=yf[t0:t1]), x.size, elements=x.size)
    return y


def check_out(out, x, where):
    """An output array `out` must be C-contiguous, with x's shape and dtype -> out."""
    if not (isinstance(out, np.ndarray) and out.flags.c_contiguous and out.shape == x.shape
            and out.dtype == x.dtype):
        raise ValueError(f"{where}: the output must be a C-contiguous {x.dtype} array of "
                         f"shape {x.shape}, got {getattr(out, 'dtype', type(out).__name__)} "
                         f"{getattr(out, 'shape', '')}")
    return out


@njit(**JIT)
def _relu_backward_kernel(y, gy, gx):
    """gx = gy * (1 if y > 0 else 0) over 1-D slices, one pass, no mask array.

    NOTE: a product, not a choice, so a NaN or infinite gy stays NaN where y <= 0 (and a
    negative gy gives -0.0), bit for bit what NumPy's `gy * (y > 0)` gave before. The loop
    runs over range(gx.size), an index Numba knows is never negative: with range(t0, t1)
    it checks each index for Python's negative wraparound and LLVM does not vectorise the
    loop (2.6x slower, measured on 4M floats)."""
    one, zero = gy.dtype.type(1), gy.dtype.type(0)
    for i in range(gx.size):
        gx[i] = gy[i] * (one if y[i] > zero else zero)


def relu_backward(y, gy):
    """NOTE: the gradient at exactly 0 is 0 (a dead unit), as in PyTorch; we test y > 0."""
    y, gy = np.ascontiguousarray(y), np.ascontiguousarray(gy)
    gx = np.empty_like(gy)
    yf, gyf, gxf = y.reshape(-1), gy.reshape(-1), gx.reshape(-1)
    map_ranges(lambda t0, t1: _relu_backward_kernel(yf[t0:t1], gyf[t0:t1], gxf[t0:t1]),
               y.size, elements=y.size)
    return gx


def dropout_mask(shape, p, dtype, rng):
    """Inverted dropout mask: 0 with probability p, 1/(1-p) otherwise."""
    keep = rng.random(shape, dtype=np.float32) >= p
    return keep.astype(dtype) * dtype.type(1.0 / (1.0 - p))
