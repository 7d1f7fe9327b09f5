"""Local response normalisation across channels on the CPU (AlexNet Sec. 3.3; VGG Sec. 2.1,
A-LRN), the twin of `cuda/lrn.cu`."""

import numpy as np
from numba import njit

from minivgg.kernels.cpu.runtime import JIT, map_ranges


# Both passes walk the channels of one pixel with a running window sum, so each costs O(C)
# per pixel whatever the window size. One task per (n, row h).

@njit(**JIT)
def _lrn_forward_kernel(x, size, alpha, beta, k, y, scale, t0, t1):
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    before = size // 2  # the window of c is c - before ... c - before + size - 1
    after = size - 1 - before
    for task in range(t0, t1):
        n, h = task // H, task % H
        for w in range(W):
            s = 0.0  # float64 sum of x^2 over the window of channel c, kept as c moves up
            for c in range(min(after, C)):
                s += x[n, c, h, w] * x[n, c, h, w]
            for c in range(C):
                if c + after < C:
                    s += x[n, c + after, h, w] * x[n, c + after, h, w]
                if c - before - 1 >= 0:
                    s -= x[n, c - before - 1, h, w] * x[n, c - before - 1, h, w]
                sc = k + alpha * s
                scale[n, c, h, w] = sc
                y[n, c, h, w] = x[n, c, h, w] * sc ** -beta


def lrn_forward(x, size, alpha, beta, k):
    """b_c = a_c / (k + alpha * sum_{c' near c} a_c'^2)^beta  ->  (y, scale).

    The window covers channels c - size//2 ... c + (size-1)//2. `alpha` here is the
    coefficient of the plain sum; `functional.local_response_norm` divides it by `size`
    first when the Caffe/PyTorch convention is asked for.
    NOTE: the running window sum adds and subtracts squares; it is kept in float64, so the
    cancellation costs nothing visible in float32 (the tests compare with the direct sum).
    """
    x = np.ascontiguousarray(x)
    y, scale = np.empty_like(x), np.empty_like(x)
    map_ranges(lambda t0, t1: _lrn_forward_kernel(x, size, alpha, beta, k, y, scale, t0, t1),
               x.shape[0] * x.shape[2])
    return y, scale


@njit(**JIT)
def _lrn_backward_kernel(x, y, scale, gy, size, alpha, beta, gx, t0, t1):
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    # c lies in window(c') exactly when c' lies in c - after ... c + before
    before = size // 2
    after = size - 1 - before
    for task in range(t0, t1):
        n, h = task // H, task % H
        for w in range(W):
            t = 0.0  # sum over c' with c in window(c') of gy_c' y_c' / scale_c'
            for c in range(min(before, C)):
                t += gy[n, c, h, w] * y[n, c, h, w] / scale[n, c, h, w]
            for c in range(C):
                if c + before < C:
                    cc = c + before
                    t += gy[n, cc, h, w] * y[n, cc, h, w] / scale[n, cc, h, w]
                if c - after - 1 >= 0:
                    cc = c - after - 1
                    t -= gy[n, cc, h, w] * y[n, cc, h, w] / scale[n, cc, h, w]
                gx[n, c, h, w] = (gy[n, c, h, w] * scale[n, c, h, w] ** -beta
                                  - 2.0 * alpha * beta * x[n, c, h, w] * t)


def lrn_backward(x, y, scale, gy, size, alpha, beta):
    """gx_c = gy_c s_c^-b - 2 alpha b x_c sum_{c': c in window(c')} gy_c' y_c' / s_c'."""
    x, y, scale, gy = (np.ascontiguousarray(a) for a in (x, y, scale, gy))
    gx = np.empty_like(x)
    map_ranges(lambda t0, t1: _lrn_backward_kernel(x, y, scale, gy, size, alpha, beta, gx,
                                                   t0, t1), x.shape[0] * x.shape[2])
    return gx
