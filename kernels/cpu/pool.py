"""Max-pooling on the CPU (Sec. 2.1: 2×2 windows, stride 2), the twin of `cuda/pool.cu`.

One task per (n, c) plane; `runtime.map_ranges` gives each thread a range of planes.
Window (oy, ox) covers rows oy*SH .. oy*SH+KH-1 and columns ox*SW .. ox*SW+KW-1, clipped
to the input: in floor mode every window is whole and the last (H - KH) % SH rows (and
columns) are covered by none; in ceil mode (Caffe's) the last window may be partial and
every pixel is covered. Which mode is decided only by the output size (OH, OW), computed by
`shapes.pool_output_size`; the kernels just clip.
"""

import numpy as np
from numba import njit

from minivgg.kernels.shapes import pool_output_size
from minivgg.kernels.cpu.runtime import JIT, map_ranges


@njit(**JIT)
def _max_pool2d_forward_kernel(x, KH, KW, SH, SW, y, argmax, t0, t1):
    """Planes t0..t1-1 of the N*C (n, c) planes; argmax gets the winner's ky*KW + kx."""
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    OH, OW = y.shape[2], y.shape[3]
    for task in range(t0, t1):
        n, c = task // C, task % C
        for oy in range(OH):
            for ox in range(OW):
                best = x[n, c, oy * SH, ox * SW]
                best_k = 0
                # NOTE: a ceil-mode window may hang over the bottom/right edge: clip it.
                # In floor mode min() always gives KH (KW), so the loops are the plain ones.
                for ky in range(min(KH, H - oy * SH)):
                    for kx in range(min(KW, W - ox * SW)):
                        v = x[n, c, oy * SH + ky, ox * SW + kx]
                        # NOTE: strict `>`: on a tie the first offset in row-major order
                        # wins, so the gradient goes to exactly one input, as in Caffe and
                        # cuDNN.
                        if v > best:
                            best, best_k = v, ky * KW + kx
                y[n, c, oy, ox] = best
                argmax[n, c, oy, ox] = best_k


@njit(**JIT)
def _max_pool2x2_forward_kernel(x, y, argmax):
    """The 2×2/s2 windows of whole planes x (P, H, W) -> y, argmax (P, OH, OW), every window
    inside the plane: Sec. 2.1's pooling, the only one VGG has.

    The same comparisons in the same order as `_max_pool2d_forward_kernel`, so the same
    results bit for bit (NaN and ties included), 4x faster (measured on the small recipe's
    pool1): the window's four loads are fixed offsets in two row views, and every index
    comes from range(n), which Numba knows is never negative, so it checks none of them
    for Python's negative wraparound."""
    for p in range(x.shape[0]):
        xp, yp, ap = x[p], y[p], argmax[p]
        for oy in range(yp.shape[0]):
            top, bottom, y_row, a_row = xp[2 * oy], xp[2 * oy + 1], yp[oy], ap[oy]
            for ox in range(y_row.shape[0]):
                best, best_k = top[2 * ox], 0
                v = top[2 * ox + 1]
                if v > best:  # NOTE: strict, as below: the first maximum wins a tie
                    best, best_k = v, 1
                v = bottom[2 * ox]
                if v > best:
                    best, best_k = v, 2
                v = bottom[2 * ox + 1]
                if v > best:
                    best, best_k = v, 3
                y_row[ox] = best
                a_row[ox] = best_k


def max_pool2d_forward(x, kernel_size, stride, ceil_mode=False):
    """(N, C, H, W) -> y (N, C, OH, OW) and argmax (N, C, OH, OW), no padding.

    OH = `pool_output_size(H, KH, SH, ceil_mode)` (floor mode by default, Caffe's ceil mode
    on request). argmax (int32) holds the winner's offset ky*KW + kx inside its window.
    """
    (KH, KW), (SH, SW) = kernel_size, stride
    N, C, H, W = x.shape
    OH, OW = pool_output_size(H, KH, SH, ceil_mode), pool_output_size(W, KW, SW, ceil_mode)
    y = np.empty((N, C, OH, OW), dtype=x.dtype)
    argmax = np.empty((N, C, OH, OW), dtype=np.int32)
    x = np.ascontiguousarray(x)
    if (KH, KW, SH, SW) == (2, 2, 2, 2) and 2 * OH <= H and 2 * OW <= W:  # whole windows
        planes = x.reshape(N * C, H, W), y.reshape(N * C, OH, OW), argmax.reshape(N * C, OH, OW)
        map_ranges(lambda t0, t1: _max_pool2x2_forward_kernel(*(a[t0:t1] for a in planes)),
                   N * C, elements=x.size)
        return y, argmax
    map_ranges(lambda t0, t1: _max_pool2d_forward_kernel(x, KH, KW, SH, SW, y, argmax, t0, t1),
               N * C, elements=x.size)
    return y, argmax


@njit(**JIT)
def _max_pool2d_backward_kernel(gy, argmax, KW, SH, SW, gx, t0, t1):
    """Route each output gradient of planes t0..t1-1 to its window's winner.

    gx must start at zero. NOTE: overlapping windows (stride < kernel) can send two
    gradients to one pixel; one task owns a whole (n, c) plane, so those += never race.
    """
    C, OH, OW = gy.shape[1], gy.shape[2], gy.shape[3]
    for task in range(t0, t1):
        n, c = task // C, task % C
        for oy in range(OH):
            for ox in range(OW):
                k = argmax[n, c, oy, ox]
                gx[n, c, oy * SH + k // KW, ox * SW + k % KW] += gy[n, c, oy, ox]


@njit(**JIT)
def _max_pool2x2_backward_kernel(gy, argmax, gx):
    """`_max_pool2d_backward_kernel` for 2×2/s2 windows inside whole planes (P, ...): the
    same additions into a zeroed gx, 2.4x faster (the small recipe's pool1): the winner's
    row is one of two row views, its column 2*ox + (k & 1), and no division by KW."""
    for p in range(gx.shape[0]):
        gp, ap, xp = gy[p], argmax[p], gx[p]
        for oy in range(gp.shape[0]):
            g_row, a_row = gp[oy], ap[oy]
            top, bottom = xp[2 * oy], xp[2 * oy + 1]
            for ox in range(g_row.shape[0]):
                k = a_row[ox]
                row = top if k < 2 else bottom
                row[2 * ox + (k & 1)] += g_row[ox]


def max_pool2d_backward(gy, argmax, x_shape, kernel_size, stride):
    """Route each output gradient to the input that won its window (either mode: the
    argmax offsets of a clipped ceil-mode window always point inside the input)."""
    (KH, KW), (SH, SW) = kernel_size, stride
    gx = np.zeros(x_shape, dtype=gy.dtype)
    N, C = gy.shape[0], gy.shape[1]
    gy, argmax = np.ascontiguousarray(gy), np.ascontiguousarray(argmax)
    (H, W), (OH, OW) = x_shape[2:], gy.shape[2:]
    if (KH, KW, SH, SW) == (2, 2, 2, 2) and 2 * OH <= H and 2 * OW <= W:  # whole windows
        planes = (gy.reshape(N * C, OH, OW), argmax.reshape(N * C, OH, OW),
                  gx.reshape(N * C, H, W))
        map_ranges(lambda t0, t1: _max_pool2x2_backward_kernel(*(a[t0:t1] for a in planes)),
                   N * C, elements=gx.size)
        return gx
    map_ranges(lambda t0, t1: _max_pool2d_backward_kernel(gy, argmax, KW, SH, SW, gx, t0, t1),
               N * C, elements=gx.size)
    return gx
