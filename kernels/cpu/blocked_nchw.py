"""The blocked direct convolution (kernels/cpu/blocked.py, blocked_grad.py) with NCHW arrays
in and out: the CPU's `blocked_conv2d_forward` and `blocked_conv2d_backward`, which
`CpuPrimitives` gives the conv entry points for the algorithm "blocked" (3×3/s1/p1).

    blocked_conv2d_forward(x, W, b)              -> y (N, OC, H, W)
    blocked_conv2d_backward(x, W, gy, need_gx)   -> (gx or None, gW, gb)

The layers around a convolution (ReLU, pooling, LRN, the FC layers) and `Tensor` keep NCHW,
and so does the blocked kernel at its edges: it broadcasts x's values one at a time from a
zero-bordered copy of each image's channel planes, made by the thread that uses it
(`blocked._pad_image`, plain row copies), and writes y's rows from its registers
(`blocked.conv2d_nchw`); the input gradient is the same kernel on gy with the rotated
filters. What remains of the layout conversions is in the weight gradient, which needs gy
as vectors of 16 output channels per pixel (16×16 blocks turned in registers,
`_turn_block`: by the input gradient's pass as it copies each image, or `_to_blocked`
without one), in a workspace (`runtime.workspace`) reused from call to call.
x needs no copy: no tap of the weight tiles reads its border (`blocked_grad.weight_grad_nchw`;
a zero-bordered copy, `blocked.pad_images`, only where C is not a multiple of 8), and
conv1_1's weight gradient reads gy as it is (`blocked_grad_rgb.py`). The measurements below
are from before those changes.

Measured (CPU time of one thread, batch 32, best of 15, shared 2-core machine, so rough),
the conversions per forward + backward, before (2026-12-05 07:16 UTC, load average 2.6:
x and gy to nChw16c, y and gx back, x's bordered copy in nChw16c) and now (07:48 and 07:50
UTC, load average 1.9: gy to nChw16c and x's bordered copy, plus the in-kernel image copies
of x and gy):

    16 -> 32 channels @ 32×32:     2.08 ms  ->  0.50 + 0.23
    32 -> 64 channels @ 16×16:     0.96     ->  0.27 + 0.13
    64 -> 64 channels @ 16×16:     1.44     ->  0.36 + 0.18
    64 -> 128 channels @ 8×8:      0.48     ->  0.15 + 0.07
    128 -> 128 channels @ 8×8:     0.78     ->  0.21 + 0.09
    128 -> 128 channels @ 4×4:     0.23     ->  0.06 + 0.05

against 8.0, 6.9, 12.8, 6.3, 13.2 and 3.6 ms for the whole layer's forward + backward
now (benchmarks/bench_blocked_parts.py, 07:58 UTC, load average 1.0). Keeping the conv
stack blocked end to end (ReLU, pooling and LRN on nChw16c, converting once at the input
and before fc6) would save at most gy's conversion (0.31 ms of the 0.50 on 16 -> 32
channels; the bordered copies stay), for a blocked twin of every other layer's kernels:
not worth it. The filters are blocked
at every call for the same reason (`block_filters`, one pass: 0.05 ms and 0.08 ms for the
rotated ones on 128 -> 128 channels, under 1% of the layer), so nothing is cached between
forward and backward (W changes at every step anyway).

Bias and ReLU: the bias is added in the kernel's epilogue; ReLU stays a layer of its own,
although the kernel can apply it (`relu=`). In a small-recipe training step (one thread,
CPU time, 18:50 UTC) ReLU's forward and backward took 13.6 ms of 134: the most that fusing
it into the convolution (and its mask into the next gradient) could save, at the price of
a device contract with an activation and of models without their relu layers (whose
outputs `activations` returns).
"""

import numpy as np

from minivgg.kernels.cpu.blocked import (BLOCK, _block_planes, _blocks, _float,
                                         avx512_reason, block_bias, block_filters, conv2d_nchw)
from minivgg.kernels.cpu.blocked_grad import weight_grad_nchw
from minivgg.kernels.cpu.blocked_grad_rgb import MAX_CHANNELS, weight_grad_few_channels
from minivgg.kernels.cpu.runtime import map_ranges, workspace


def _to_blocked(x, dtype, name, turn=None, sums=None):
    """x (N, C, H, W) -> (N, CB, H, W, 16) in the workspace buffer `name`; `turn` as in
    `_block_planes` (None: when the AVX-512 kernels run, float32); `sums` (N, CB·16)
    float64 to fill with each plane's sum (`_block_planes`), or None."""
    N, C, H, W = x.shape
    out = workspace(name, (N, _blocks(C), H, W, BLOCK), dtype)
    if turn is None:
        turn = dtype == np.float32 and not avx512_reason()
    if sums is None:
        sums = np.empty((0, 0), np.float64)
    x = np.ascontiguousarray(x, dtype=dtype).reshape(N, C, H * W)
    flat = out.reshape(N, out.shape[1], H * W, BLOCK)
    map_ranges(lambda t0, t1: _block_planes(x, flat, t0, t1, turn, sums), N * out.shape[1],
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
    N, _, H, Wd = gy.shape
    dtype = _float(x.dtype)
    vector = dtype == np.float32 and not avx512_reason()
    gy = np.ascontiguousarray(gy, dtype=dtype)
    if need_gx:  # the input gradient: the forward kernel on gy, with the rotated filters
        wr, no_bias = block_filters(np.asarray(W, dtype), rotate=True), block_bias(None, C, dtype)
    if C <= MAX_CHANNELS and vector:
        # conv1_1: gW and gb from gy where it lies, no blocked copy (blocked_grad_rgb.py)
        gx = conv2d_nchw(gy, wr, no_bias, C) if need_gx else None
        return (gx, *weight_grad_few_channels(np.asarray(x, dtype), gy))
    # NOTE: the bias gradient comes from the pass that blocks gy, as plane sums summed over
    # the images in order: a pass of its own over gy, on one thread, took 0.58 ms of the
    # small recipe's conv1_1 backward (2.05 ms on 2 threads; AMD EPYC, 2026-12-05).
    sums = np.empty((N, _blocks(OC) * BLOCK), np.float64)
    if need_gx and vector:
        # NOTE: the input gradient blocks gy for the weight gradient as it copies each
        # image: a pass over gy of its own took 0.37 ms of the 16 -> 32 channels' (32×32,
        # batch 32) 3.5 ms backward on 2 threads (AMD EPYC, 2026-12-05)
        gyb = workspace("blocked_gy", (N, _blocks(OC), H, Wd, BLOCK), dtype)
        flat = gyb.reshape(N, _blocks(OC), H * Wd, BLOCK)
        gx = conv2d_nchw(gy, wr, no_bias, C, blocked_out=(flat, sums))
    else:
        gx = conv2d_nchw(gy, wr, no_bias, C) if need_gx else None
        gyb = _to_blocked(gy, dtype, "blocked_gy", sums=sums)
    gW, gb = weight_grad_nchw(np.asarray(x, dtype), gyb, C, OC, plane_sums=sums)
    return gx, gW, gb
