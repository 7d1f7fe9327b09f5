"""The blocked direct convolution (kernels/cpu/blocked.py, blocked_grad.py) with NCHW arrays
in and out: the CPU's `blocked_conv2d_forward` and `blocked_conv2d_backward`, which
`CpuPrimitives` gives the conv entry points for the algorithm "blocked" (3×3/s1/p1).

    blocked_conv2d_forward(x, W, b)              -> y (N, OC, H, W)
    blocked_conv2d_backward(x, W, gy, need_gx)   -> (gx or None, gW, gb)

The layers around a convolution (ReLU, pooling, LRN, the FC layers) and `Tensor` keep NCHW,
so each call converts its activations into the nChw16c layout and back: x and y in the
forward pass; gy, gx and x (straight into the weight gradient's zero-bordered copy) in the
backward pass. `_block_planes` and `_unblock_planes` do it in one pass each, spread over the
pool by (image, channel block); the blocked inputs live in workspaces (`runtime.workspace`),
reused from call to call.

Why convert at each convolution, not keep the conv stack blocked end to end (ReLU, pooling
and LRN on nChw16c, converting once at the input and before fc6): the conversions are a
small part of the layer. Measured 2026-12-04 18:52 UTC (CPU time of one thread, batch 32,
load average 4.2 on 2 cores, so rough; the two-block kernel), converting x, y, gy, gx and
x's bordered copy against the forward + backward of the whole layer:

    16 -> 32 channels @ 32×32:   2.0 ms of 11.6 (17%)
    64 -> 64 channels @ 16×16:   1.6 ms of 16.9 (9%)
    128 -> 128 channels @ 8×8:   0.8 ms of 15.2 (5%)

Staying blocked would save at most these, for a blocked twin of every other layer's kernels.
The filters are re-blocked at every call for the same reason: `block_filters` and the
rotated filters of the input gradient take 0.01 ms (16 -> 32) to 0.28 ms (128 -> 128), at
most 1.5% of the layer, so they are not cached between forward and backward.

Bias and ReLU: the bias is added in the kernel's epilogue; ReLU stays a layer of its own,
although the kernel can apply it (`relu=`). In a small-recipe training step (one thread,
CPU time, 18:50 UTC) ReLU's forward and backward took 13.6 ms of 134: the most that fusing
it into the convolution (and its mask into the next gradient) could save, at the price of
a device contract with an activation and of models without their relu layers (whose
outputs `activations` returns).
"""

import numpy as np
from numba import njit

from minivgg.kernels.cpu.blocked import (BLOCK, _blocks, _float, block_bias, block_filters,
                                         conv2d_nchw, pad_images)
from minivgg.kernels.cpu.blocked_grad import weight_grad_from_padded
from minivgg.kernels.cpu.runtime import JIT, map_ranges, workspace


@njit(**JIT)
def _block_planes(x, out, t0, t1):
    """out[n, cb, i, j, c] = x[n, 16·cb + c, i, j], zeros for channels past C, for the items
    t = (n, cb) in t0..t1-1. One 64-byte pixel written at a time from 16 rows read side by
    side (2.3× faster than a plane at a time on 16 channels of 32×32, about the same on 64
    and 128)."""
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    CB = out.shape[1]
    for t in range(t0, t1):
        n, cb = t // CB, t % CB
        real = min(BLOCK, C - cb * BLOCK)
        for i in range(H):
            for j in range(W):
                for c in range(real):
                    out[n, cb, i, j, c] = x[n, cb * BLOCK + c, i, j]
                for c in range(real, BLOCK):
                    out[n, cb, i, j, c] = 0.0


def _to_blocked(x, dtype, name):
    """x (N, C, H, W) -> (N, CB, H, W, 16) in the workspace buffer `name`."""
    N, C, H, W = x.shape
    out = workspace(name, (N, _blocks(C), H, W, BLOCK), dtype)
    x = np.ascontiguousarray(x, dtype=dtype)
    map_ranges(lambda t0, t1: _block_planes(x, out, t0, t1), N * out.shape[1],
               elements=out.size)
    return out


def blocked_conv2d_forward(x, W, b):
    """y (N, OC, H, W) = conv(x, W) + b, 3×3/s1/p1, by the blocked kernel (NCHW in and
    out: `conv2d_nchw`)."""
    OC, dtype = W.shape[0], _float(x.dtype)
    return conv2d_nchw(np.asarray(x, dtype), block_filters(np.asarray(W, dtype)),
                       block_bias(b, OC, dtype), OC)


def blocked_conv2d_backward(x, W, gy, need_gx):
    """(gx or None, gW, gb) of `blocked_conv2d_forward`, in x's dtype."""
    OC, C = W.shape[:2]
    N, _, H, Wd = x.shape
    dtype = _float(x.dtype)
    gx = None
    if need_gx:  # the forward kernel on gy, with the rotated filters
        gx = conv2d_nchw(np.asarray(gy, dtype), block_filters(np.asarray(W, dtype), rotate=True),
                         block_bias(None, C, dtype), C)
    gyb = _to_blocked(gy, dtype, "blocked_gy")
    xpad = pad_images(x, workspace("blocked_xpad", (N, _blocks(C) * BLOCK, H + 2, Wd + 2),
                                   dtype))
    gW, gb = weight_grad_from_padded(xpad, gyb, C, OC)
    return gx, gW, gb
