"""Max-pooling on the CPU (Sec. 2.1: 2×2 windows, stride 2), the twin of `cuda/pool.cu`.

One task per (n, c) plane; `runtime.map_ranges` gives each thread a range of planes.
Window (oy, ox) covers rows oy*SH .. oy*SH+KH-1 and columns ox*SW .. ox*SW+KW-1, clipped
to the input: in floor mode every window is whole and the last (H - KH) % SH rows (and
columns) are covered by none; in ceil mode (Caffe's) the last window may be partial and
every pixel is covered. Which mode is decided only by the output size (OH, OW), computed by
`shapes.pool_output_size`; the kernels just clip.

`relu_max_pool2d_forward` / `_backward` are max-pooling of max(x, 0): a ReLU and the pool
after it (every VGG block ends so) as one op, bit for bit the two. Forward never writes
the ReLU's output, which saves a pass over the block's largest activation and keeping it
for backward; backward takes the ReLU's mask at each winner from the pool's output.
"""

import numpy as np
from numba import njit

from minivgg.kernels.shapes import pool_output_size
from minivgg.kernels.cpu.activation import relu_backward, relu_forward
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
def _relu(v, zero):
    """np.maximum(v, 0) bit for bit: NaN stays the same NaN, -0.0 and below give +0.0."""
    return v if v > zero or v != v else zero


@njit(**JIT)
def _max_pool2x2_forward_kernel(x, y, argmax, relu):
    """The 2×2/s2 windows of whole planes x (P, H, W) -> y, argmax (P, OH, OW), every window
    inside the plane: Sec. 2.1's pooling, the only one VGG has. With `relu`, of max(x, 0).

    The same comparisons in the same order as `_max_pool2d_forward_kernel`, so the same
    results bit for bit (NaN and ties included), 4x faster (measured on the small recipe's
    pool1): the window's four loads are fixed offsets in two row views, and every index
    comes from range(n), which Numba knows is never negative, so it checks none of them
    for Python's negative wraparound. With `relu` each load goes through `_relu` first,
    exactly what pooling `relu_forward(x)` would compare."""
    zero = y.dtype.type(0)
    for p in range(x.shape[0]):
        xp, yp, ap = x[p], y[p], argmax[p]
        for oy in range(yp.shape[0]):
            top, bottom, y_row, a_row = xp[2 * oy], xp[2 * oy + 1], yp[oy], ap[oy]
            for ox in range(y_row.shape[0]):
                v0, v1 = top[2 * ox], top[2 * ox + 1]
                v2, v3 = bottom[2 * ox], bottom[2 * ox + 1]
                if relu:
                    v0, v1, v2, v3 = _relu(v0, zero), _relu(v1, zero), _relu(v2, zero), \
                        _relu(v3, zero)
                best, best_k = v0, 0
                if v1 > best:  # NOTE: strict, as below: the first maximum wins a tie
                    best, best_k = v1, 1
                if v2 > best:
                    best, best_k = v2, 2
                if v3 > best:
                    best, best_k = v3, 3
                y_row[ox] = best
                a_row[ox] = best_k


def _whole_2x2_windows(kernel_size, stride, in_size, out_size):
    """Whether the 2×2/s2 fast kernels apply: those windows, all inside the input."""
    (H, W), (OH, OW) = in_size, out_size
    return tuple(kernel_size) + tuple(stride) == (2, 2, 2, 2) and 2 * OH <= H and 2 * OW <= W


def max_pool2d_forward(x, kernel_size, stride, ceil_mode=False):
    """(N, C, H, W) -> y (N, C, OH, OW) and argmax (N, C, OH, OW), no padding.

    OH = `pool_output_size(H, KH, SH, ceil_mode)` (floor mode by default, Caffe's ceil mode
    on request). argmax (int32) holds the winner's offset ky*KW + kx inside its window.
    """
    return _pool_forward(x, kernel_size, stride, ceil_mode, relu=False)


def relu_max_pool2d_forward(x, kernel_size, stride, ceil_mode=False):
    """`max_pool2d_forward(relu_forward(x), ...)`, bit for bit, in one pass for 2×2/s2
    windows inside the input (relu(x) is not written), else in those two."""
    return _pool_forward(x, kernel_size, stride, ceil_mode, relu=True)


def _pool_forward(x, kernel_size, stride, ceil_mode, relu):
    (KH, KW), (SH, SW) = kernel_size, stride
    N, C, H, W = x.shape
    OH, OW = pool_output_size(H, KH, SH, ceil_mode), pool_output_size(W, KW, SW, ceil_mode)
    y = np.empty((N, C, OH, OW), dtype=x.dtype)
    argmax = np.empty((N, C, OH, OW), dtype=np.int32)
    x = np.ascontiguousarray(x)
    if _whole_2x2_windows(kernel_size, stride, (H, W), (OH, OW)):
        planes = x.reshape(N * C, H, W), y.reshape(N * C, OH, OW), argmax.reshape(N * C, OH, OW)
        map_ranges(lambda t0, t1: _max_pool2x2_forward_kernel(*(a[t0:t1] for a in planes),
                                                              relu),
                   N * C, elements=x.size)
        return y, argmax
    if relu:
        x = relu_forward(x)
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
def _zero_plane(plane):
    """plane[:, :] = 0, row by row over range(n) (a loop LLVM vectorises)."""
    zero = plane.dtype.type(0)
    for r in range(plane.shape[0]):
        row = plane[r]
        for j in range(row.shape[0]):
            row[j] = zero


@njit(**JIT)
def _max_pool2x2_backward_kernel(gy, argmax, gx):
    """`_max_pool2d_backward_kernel` for 2×2/s2 windows inside whole planes (P, ...): the
    same sums 0 + g into a gx it zeroes itself, 2.4x faster (the small recipe's pool1): the
    winner's row is one of two row views, its column 2*ox + (k & 1), and no division by KW.

    NOTE: each plane is zeroed just before its gradients go in, while it is in cache, not
    by an np.zeros pass over all of gx first: pool1 at batch 32 took 0.64 ms instead of
    0.78 (1 thread, CPU time, minimum of 15, load average 3-4). Tried: writing all four
    elements of each window (the winner's 0 + g, three zeros), which needs no zeroing:
    2.2 ms, as those selects are not vectorised."""
    zero = gx.dtype.type(0)
    for p in range(gx.shape[0]):
        gp, ap, xp = gy[p], argmax[p], gx[p]
        _zero_plane(xp)
        for oy in range(gp.shape[0]):
            g_row, a_row = gp[oy], ap[oy]
            top, bottom = xp[2 * oy], xp[2 * oy + 1]
            for ox in range(g_row.shape[0]):
                k = a_row[ox]
                row = top if k < 2 else bottom
                row[2 * ox + (k & 1)] = zero + g_row[ox]


@njit(**JIT)
def _max_pool2x2_relu_backward_kernel(gy, argmax, y, gx):
    """`_max_pool2x2_backward_kernel` followed by ReLU's backward, in one pass: y is the
    output of `relu_max_pool2d_forward`, gx the gradient with respect to the ReLU's input.

    Bit for bit the two passes (`relu_backward`'s product by 1 or 0): the winner gets
    (0 + g) * (1 if y > 0 else 0), as the winner's ReLU output is the window's maximum y;
    every other element 0 * (0 or 1), which is 0, as zeroed."""
    zero, one = gx.dtype.type(0), gx.dtype.type(1)
    for p in range(gx.shape[0]):
        gp, ap, xp, yp = gy[p], argmax[p], gx[p], y[p]
        _zero_plane(xp)
        for oy in range(gp.shape[0]):
            g_row, a_row, y_row = gp[oy], ap[oy], yp[oy]
            top, bottom = xp[2 * oy], xp[2 * oy + 1]
            for ox in range(g_row.shape[0]):
                k = a_row[ox]
                row = top if k < 2 else bottom
                row[2 * ox + (k & 1)] = (zero + g_row[ox]) * (one if y_row[ox] > zero else zero)


def max_pool2d_backward(gy, argmax, x_shape, kernel_size, stride):
    """Route each output gradient to the input that won its window (either mode: the
    argmax offsets of a clipped ceil-mode window always point inside the input)."""
    (_, KW), (SH, SW) = kernel_size, stride
    N, C = gy.shape[0], gy.shape[1]
    gy, argmax = np.ascontiguousarray(gy), np.ascontiguousarray(argmax)
    (H, W), (OH, OW) = x_shape[2:], gy.shape[2:]
    if _whole_2x2_windows(kernel_size, stride, (H, W), (OH, OW)):
        gx = np.empty(x_shape, dtype=gy.dtype)  # the kernel zeroes it, plane by plane
        planes = (gy.reshape(N * C, OH, OW), argmax.reshape(N * C, OH, OW),
                  gx.reshape(N * C, H, W))
        map_ranges(lambda t0, t1: _max_pool2x2_backward_kernel(*(a[t0:t1] for a in planes)),
                   N * C, elements=gx.size)
        return gx
    gx = np.zeros(x_shape, dtype=gy.dtype)
    map_ranges(lambda t0, t1: _max_pool2d_backward_kernel(gy, argmax, KW, SH, SW, gx, t0, t1),
               N * C, elements=gx.size)
    return gx


def relu_max_pool2d_backward(gy, argmax, y, x_shape, kernel_size, stride):
    """The gradient with respect to x of `relu_max_pool2d_forward(x)` -> (y, argmax): bit for
    bit `relu_backward(relu_forward(x), max_pool2d_backward(gy, argmax, ...))`.

    2×2/s2 windows inside the input: one pass (`_max_pool2x2_relu_backward_kernel`). Other
    windows: those two passes, with relu_forward(x) > 0 replaced by what it is where the
    pool's gradient can be nonzero: at a winner, its window's y > 0 (routing y > 0 as 1s
    through the pool's backward marks exactly those winners; elsewhere the gradient is 0,
    and 0 times 0 or 1 is 0)."""
    N, C = gy.shape[0], gy.shape[1]
    gy, argmax, y = (np.ascontiguousarray(a) for a in (gy, argmax, y))
    (H, W), (OH, OW) = x_shape[2:], gy.shape[2:]
    if not _whole_2x2_windows(kernel_size, stride, (H, W), (OH, OW)):
        gx = max_pool2d_backward(gy, argmax, x_shape, kernel_size, stride)
        positive = max_pool2d_backward((y > 0).astype(gy.dtype), argmax, x_shape, kernel_size,
                                       stride)
        return relu_backward(positive, gx)
    gx = np.empty(x_shape, dtype=gy.dtype)  # the kernel zeroes it, plane by plane
    planes = (gy.reshape(N * C, OH, OW), argmax.reshape(N * C, OH, OW),
              y.reshape(N * C, OH, OW), gx.reshape(N * C, H, W))
    map_ranges(lambda t0, t1: _max_pool2x2_relu_backward_kernel(*(a[t0:t1] for a in planes)),
               N * C, elements=gx.size)
    return gx
