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
as vectors of 16 output channels per pixel (`_to_blocked`: 16×16 blocks turned in
registers, `_turn_block`) and a zero-bordered copy of x (`blocked.pad_images`); both live
in workspaces (`runtime.workspace`), reused from call to call.

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
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from minivgg.kernels.cpu.blocked import (BLOCK, _blocks, _float, avx512_reason, block_bias,
                                         block_filters, conv2d_nchw)
from minivgg.kernels.cpu.blocked_grad import weight_grad_nchw
from minivgg.kernels.cpu.blocked_grad_rgb import MAX_CHANNELS, weight_grad_few_channels
from minivgg.kernels.cpu.blocked_ir import (_I64, _float_pointer, _vector_pointer,
                                            emit_transpose)
from minivgg.kernels.cpu.runtime import JIT, map_ranges, workspace


@intrinsic
def _turn_block(typingctx, x, x0, xstride, out, o0):
    """out.flat[o0 + 16q + c] = x.flat[x0 + c·xstride + q] for c, q < 16: 16 channels × 16
    pixels turned in registers (16 loads, `emit_transpose`'s 64 shuffles, 16 stores)."""
    def codegen(context, builder, sig, args):
        x_, x0_, xs_, out_, o0_ = args
        src = _float_pointer(context, builder, sig.args[0], x_, x0_)
        dst = _float_pointer(context, builder, sig.args[3], out_, o0_)
        vectors = [builder.load(_vector_pointer(builder, builder.gep(
            src, [builder.mul(xs_, ir.Constant(_I64, c))])), align=4) for c in range(BLOCK)]
        vectors, lanes = emit_transpose(builder, vectors)
        for v, lane in zip(vectors, lanes):
            at = builder.gep(dst, [ir.Constant(_I64, BLOCK * lane[0][1])])
            builder.store(v, _vector_pointer(builder, at), align=4)
        return context.get_dummy_value()

    i = types.intp
    return types.void(x, i, i, out, i), codegen


@njit(**JIT)
def _block_planes(x, out, t0, t1, turn, sums):
    """out[n, cb, q, c] = x[n, 16·cb + c, q] (q a pixel of the flattened plane), zeros for
    channels past C, for the items t = (n, cb) in t0..t1-1. With `turn`, whole blocks go 16
    pixels at a time through `_turn_block`; else (and for what is left) one 64-byte pixel
    is written at a time from 16 rows read side by side. With `sums` (N, CB·16) float64,
    not empty: sums[n, 16·cb + c] = the sum over q, in order, of the block just written
    (read back while it is in cache, 16 channels side by side: the bias gradient's part)."""
    C, HW, CB = x.shape[1], x.shape[2], out.shape[1]
    acc = np.empty(BLOCK, np.float64)
    for t in range(t0, t1):
        n, cb = t // CB, t % CB
        real = min(BLOCK, C - cb * BLOCK)
        q0 = 0
        if turn and real == BLOCK:
            while q0 + BLOCK <= HW:
                _turn_block(x, (n * C + cb * BLOCK) * HW + q0, HW, out,
                            ((n * CB + cb) * HW + q0) * BLOCK)
                q0 += BLOCK
        for q in range(q0, HW):
            for c in range(real):
                out[n, cb, q, c] = x[n, cb * BLOCK + c, q]
            for c in range(real, BLOCK):
                out[n, cb, q, c] = 0.0
        if sums.shape[0] > 0:
            acc[:] = 0.0
            for q in range(HW):
                for c in range(BLOCK):
                    acc[c] += out[n, cb, q, c]
            sums[n, cb * BLOCK:(cb + 1) * BLOCK] = acc


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
    N = x.shape[0]
    dtype = _float(x.dtype)
    gx = None
    if need_gx:  # the forward kernel on gy, with the rotated filters
        gx = conv2d_nchw(np.asarray(gy, dtype), block_filters(np.asarray(W, dtype), rotate=True),
                         block_bias(None, C, dtype), C)
    if C <= MAX_CHANNELS and dtype == np.float32 and not avx512_reason():
        # conv1_1: gW and gb from gy where it lies, no blocked copy (blocked_grad_rgb.py)
        return (gx, *weight_grad_few_channels(np.asarray(x, dtype), gy))
    # NOTE: the bias gradient comes from the pass that blocks gy, as plane sums summed over
    # the images in order: a pass of its own over gy, on one thread, took 0.58 ms of the
    # small recipe's conv1_1 backward (2.05 ms on 2 threads; AMD EPYC, 2026-12-05).
    sums = np.empty((N, _blocks(OC) * BLOCK), np.float64)
    gyb = _to_blocked(gy, dtype, "blocked_gy", sums=sums)
    gW, gb = weight_grad_nchw(np.asarray(x, dtype), gyb, C, OC, plane_sums=sums)
    return gx, gW, gb
