"""ReLU (Sec. 2.1: every hidden layer) and the dropout mask (Sec. 3.1) on the CPU, the twin of
`cuda/activation.cu`."""

import numpy as np

from minivgg.kernels.cpu.runtime import map_ranges


def relu_forward(x):
    # NOTE: NumPy's maximum, not a Numba loop: it is vectorised (a Numba loop that stores to
    # one array and loads from another is not, since Numba cannot prove they never alias),
    # and it keeps NaN as NaN, as PyTorch does. The pool runs it on one range per thread.
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    xf, yf = x.reshape(-1), y.reshape(-1)
    map_ranges(lambda t0, t1: np.maximum(xf[t0:t1], 0, out=yf[t0:t1]), x.size, elements=x.size)
    return y


def relu_backward(y, gy):
    """NOTE: the gradient at exactly 0 is 0 (a dead unit), as in PyTorch; we test y > 0."""
    y, gy = np.ascontiguousarray(y), np.ascontiguousarray(gy)
    gx = np.empty_like(gy)
    yf, gyf, gxf = y.reshape(-1), gy.reshape(-1), gx.reshape(-1)
    map_ranges(lambda t0, t1: np.multiply(gyf[t0:t1], yf[t0:t1] > 0, out=gxf[t0:t1]), y.size,
               elements=y.size)
    return gx


def dropout_mask(shape, p, dtype, rng):
    """Inverted dropout mask: 0 with probability p, 1/(1-p) otherwise."""
    keep = rng.random(shape, dtype=np.float32) >= p
    return keep.astype(dtype) * dtype.type(1.0 / (1.0 - p))
