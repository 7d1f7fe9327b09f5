"""The weight and bias gradients of a 3×3/s1/p1 convolution whose input has few channels
(C <= 4: conv1_1's RGB image), straight from gy in NCHW, fp32 on AVX-512.

    weight_grad_few_channels(x, gy) -> gW (OC, C, 3, 3), gb (OC,)   float32

Why a kernel of its own: the blocked weight gradient (blocked_grad.py) keeps 16 output
channels in a vector and so needs gy turned into nChw16c first. On conv1_1 of the small
recipe (3 -> 16 channels of 64×64, batch 32) that turn alone moves 16 MB (gy read, the
blocked copy written) and took 0.55 ms of the 1.6 ms backward on 2 threads, where
PyTorch's whole weight and bias gradient took 0.88 (AMD EPYC, 2026-12-05). With 3 input
channels there are only 27 products per output channel and pixel, so the reduction over
the pixels is the long axis: here a vector holds 16 neighbouring pixels of one row, and
gy's rows are read where they lie.

One item (part s of the images, group of 8 output channels o, input channel c, tap row
ky) keeps 8 o × 3 kx accumulators of 16 pixel lanes (24 zmm registers) and sums, over the
part's images, rows and 16-pixel segments of each row, in that order:

    g[o]  = gy[n, o, oy, j : j+16]                  (8 loads, one per output channel)
    x[kx] = x_pad[n, c, oy + ky, j + kx : +16]      (3 unaligned loads of the bordered x)
    acc[o][kx] = fma(g[o], x[kx], acc[o][kx])       (24 FMAs for 11 loads)

A segment past the row's end is loaded with a mask (`llvm.masked.load`, zeros past W),
so any width works and nothing outside the arrays is read. One more item per (part,
group) sums gy alone: the bias gradient. The accumulators are stored as they are, 16
lanes each, and `_finish` adds the lanes and then the parts, in float64 and in order: a
fixed-order sum that depends on the shapes only, not on the thread count. The parts
(`parts`) exist so that even a layer of 16 output channels has enough items for the
threads; like everything else they depend on the shapes only.

The IR is emitted from a Numba intrinsic for the same reason as the blocked kernels'
(blocked_ir.py): plain Numba loops keep accumulators in memory. Without AVX-512 the
blocked path (gy blocked, `blocked_grad._weight_tiles_loops`) computes the same sums.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from minivgg.kernels.cpu.blocked import pad_images
from minivgg.kernels.cpu.blocked_ir import (BLOCK, _I32, _I64, _V16, _float_pointer, _fma,
                                            _vector_pointer, tune_scheduling)
from minivgg.kernels.cpu.runtime import JIT, map_ranges, workspace

GROUP = 8  # output channels per item: 8 × 3 accumulators + 3 x vectors + a gy vector
MAX_CHANNELS = 4  # input channels up to which this kernel serves the weight gradient
MIN_ITEMS = 64  # items a gradient is spread over at least, where the images allow


def _masked_load(builder):
    mask = ir.VectorType(ir.IntType(1), BLOCK)
    fnty = ir.FunctionType(_V16, [_V16.as_pointer(), _I32, mask, _V16])
    return cgutils.get_or_insert_function(builder.module, fnty, "llvm.masked.load.v16f32.p0")


def _emit_segment(builder, acc, gq, offsets, xq, mask, bias):
    """One 16-pixel segment: acc[o][kx] += gy_o · x shifted by kx, or (bias) acc[o][0] +=
    gy_o. Output channel o's pixels are at gq + offsets[o]; x's at xq."""
    load, fma = _masked_load(builder), _fma(builder)
    zero = ir.Constant(_V16, [0.0] * BLOCK)
    align = ir.Constant(_I32, 4)

    def get(ptr):
        return builder.call(load, [_vector_pointer(builder, ptr), align, mask, zero])

    xs = [] if bias else [get(builder.gep(xq, [ir.Constant(_I64, kx)])) for kx in range(3)]
    for o, row in enumerate(acc):
        g = get(builder.gep(gq, [offsets[o]]))
        if bias:
            builder.store(builder.fadd(builder.load(row[0]), g), row[0])
            continue
        for a, x in zip(row, xs):
            builder.store(builder.call(fma, [g, x, builder.load(a)]), a)


@intrinsic(prefer_literal=True)
def _grad_item(typingctx, xp, x0, ximg, xrow, gy, g0, gimg, gplane, real, N, H, W, out, o0,
               bias):
    """out.flat[o0 + (3o + kx)·16 : +16] = the sum over (n < N, oy < H, 16-pixel segments
    j of the row) of gy.flat[g0 + n·gimg + min(o, real - 1)·gplane + oy·W + j : +16] ·
    xp.flat[x0 + n·ximg + oy·xrow + j + kx : +16], lanes past the row's end zero, for
    o < 8 and kx < 3 (slots o >= real repeat the last real channel); with `bias` (a
    literal), out.flat[o0 + 3o·16 : +16] = the same sum of gy alone."""
    if not isinstance(bias, types.BooleanLiteral):
        return None
    i = types.intp

    def codegen(context, builder, sig, args):
        xp_, x0_, ximg_, xrow_, gy_, g0_, gimg_, gplane_, real_, N_, H_, W_, out_, o0_, _ = args
        ta = sig.args
        tune_scheduling(builder)
        acc = [[cgutils.alloca_once(builder, _V16) for _ in range(3)] for _ in range(GROUP)]
        zero = ir.Constant(_V16, [0.0] * BLOCK)
        for a in sum(acc, []):
            builder.store(zero, a)
        x_at = _float_pointer(context, builder, ta[0], xp_, x0_)
        g_at = _float_pointer(context, builder, ta[4], gy_, g0_)
        lanes = ir.Constant(ir.VectorType(_I64, BLOCK), list(range(BLOCK)))
        step = ir.Constant(_I64, BLOCK)
        last = builder.sub(real_, ir.Constant(_I64, 1))
        offsets = [builder.mul(gplane_, builder.select(
            builder.icmp_signed("<", ir.Constant(_I64, o), real_), ir.Constant(_I64, o), last))
            for o in range(GROUP)]
        with cgutils.for_range(builder, N_) as n:
            xn = builder.gep(x_at, [builder.mul(n.index, ximg_)])
            gn = builder.gep(g_at, [builder.mul(n.index, gimg_)])
            with cgutils.for_range(builder, H_) as oy:
                xr = builder.gep(xn, [builder.mul(oy.index, xrow_)])
                gr = builder.gep(gn, [builder.mul(oy.index, W_)])
                with cgutils.for_range_slice(builder, ir.Constant(_I64, 0), W_, step) as (j, _):
                    left = _splat_i64(builder, builder.sub(W_, j))
                    mask = builder.icmp_signed("<", lanes, left)
                    _emit_segment(builder, acc, builder.gep(gr, [j]), offsets,
                                  builder.gep(xr, [j]), mask, bias.literal_value)
        out_at = _float_pointer(context, builder, ta[12], out_, o0_)
        for k, a in enumerate(sum(acc, [])):
            at = builder.gep(out_at, [ir.Constant(_I64, k * BLOCK)])
            builder.store(builder.load(a), _vector_pointer(builder, at), align=4)
        return context.get_dummy_value()

    return (types.void(xp, i, i, i, gy, i, i, i, i, i, i, i, out, i, bias), codegen)


def _splat_i64(builder, value):
    vt = ir.VectorType(_I64, BLOCK)
    one = builder.insert_element(ir.Constant(vt, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vt, ir.Undefined),
                                  ir.Constant(ir.VectorType(_I32, BLOCK), [0] * BLOCK))


@njit(**JIT)
def _grad_items(xp, gy, out, t0, t1):
    """Items t0..t1-1, t = (part s, group of 8 output channels, k) in that order, k = 3c + ky
    for an input channel c and tap row ky, or k = 3C for the bias; into out[s, group, k]
    (8, 3, 16). xp (N, C, H+2, W+2) is x zero-bordered; the last group's slots past OC
    repeat its last channel (their sums are never used)."""
    N, OC, H, W = gy.shape
    C, xrow = xp.shape[1], xp.shape[3]
    parts, G, K = out.shape[0], out.shape[1], out.shape[2]
    xchan = xp.shape[2] * xrow
    for t in range(t0, t1):
        s, g, k = t // (G * K), t // K % G, t % K
        n0, n1 = N * s // parts, N * (s + 1) // parts
        c, ky = min(k // 3, C - 1), k % 3
        real = min(GROUP, OC - g * GROUP)
        x0, g0 = (n0 * C + c) * xchan + ky * xrow, (n0 * OC + g * GROUP) * H * W
        o0 = ((s * G + g) * K + k) * GROUP * 3 * BLOCK
        if k == K - 1:
            _grad_item(xp, x0, C * xchan, xrow, gy, g0, OC * H * W, H * W, real, n1 - n0, H,
                       W, out, o0, True)
        else:
            _grad_item(xp, x0, C * xchan, xrow, gy, g0, OC * H * W, H * W, real, n1 - n0, H,
                       W, out, o0, False)


@njit(**JIT)
def _finish(out, gW, gb):
    """gW[oc, c, ky, kx] and gb[oc] from the items' accumulators: each one's 16 lanes, then
    the parts, added in order in float64."""
    OC = gW.shape[0]
    parts, K = out.shape[0], out.shape[2]
    for oc in range(OC):
        g, o = oc // GROUP, oc % GROUP
        for k in range(K):
            for kx in range(3 if k < K - 1 else 1):
                total = 0.0
                for s in range(parts):
                    part = 0.0
                    for lane in range(BLOCK):
                        part += out[s, g, k, o, kx, lane]
                    total += part
                if k < K - 1:
                    gW[oc, k // 3, k % 3, kx] = total
                else:
                    gb[oc] = total


def parts(N, OC, C):
    """Parts the N images are cut into: at least MIN_ITEMS items where the images allow; a
    function of the shapes only, so the sums are the same on any number of threads."""
    items = -(-OC // GROUP) * (3 * C + 1)
    return max(1, min(N, -(-MIN_ITEMS // items)))


def weight_grad_few_channels(x, gy):
    """gW (OC, C, 3, 3), gb (OC,) float32 of conv(x, W) + b, 3×3/s1/p1, for x (N, C, H, W)
    with C <= 4 and gy (N, OC, H, W), both NCHW float32, on AVX-512 (the caller checks
    `blocked.avx512_reason()`)."""
    N, C, H, W = x.shape
    OC = gy.shape[1]
    if C > MAX_CHANNELS or gy.shape != (N, OC, H, W):
        raise ValueError(f"x {x.shape} and gy {gy.shape}: want C <= {MAX_CHANNELS} input "
                         "channels and gy of x's batch and map size")
    xp = pad_images(x, workspace("rgb_grad_xpad", (N, C, H + 2, W + 2), np.float32))
    gy = np.ascontiguousarray(gy, dtype=np.float32)
    S, G, K = parts(N, OC, C), -(-OC // GROUP), 3 * C + 1
    out = workspace("rgb_grad_sums", (S, G, K, GROUP, 3, BLOCK), np.float32)
    map_ranges(lambda t0, t1: _grad_items(xp, gy, out, t0, t1), S * G * K)
    gW, gb = np.empty((OC, C, 3, 3), np.float32), np.empty(OC, np.float32)
    _finish(out, gW, gb)
    return gW, gb
