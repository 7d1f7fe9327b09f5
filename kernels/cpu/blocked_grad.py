"""The backward pass of the blocked direct convolution (kernels/cpu/blocked.py), fp32,
3×3/s1/p1 (float64 through the loops only, as in the forward pass). `blocked_nchw.py`
gives them the conv entry points, NCHW in and out.

    conv2d_input_grad_blocked(gyb, W, vector=None)            -> gxb (N, CB, H, W, 16)
    conv2d_weight_grad_blocked(xb, gyb, C, OC, vector=None)   -> gW (OC, C, 3, 3), gb (OC,)
    weight_grad_from_padded(p, gyb, C, OC, vector=None)       the same, from x's zero-bordered
                                                              copy p (N, CB·16, H+2, W+2)
    weight_grad_nchw(x, gyb, C, OC)                           the same, from x (N, C, H, W)

The input gradient is a forward convolution: gy convolved with the filters turned by 180°
and with their channel axes swapped (`block_filters(W, rotate=True)`), so the forward
micro-kernel serves it unchanged, NCHW gy in and NCHW gx out (`conv2d_nchw`), with gy's
OCB blocks as its input blocks and x's CB blocks as its outputs; the blocked API above
wraps it in `from_blocked` / `to_blocked`.

The weight gradient has a micro-kernel of its own (`_weight_tile`). For one (pair of
output-channel blocks ob, ob+1, input-channel block cb, tap ky, kx, half of the 16 input
channels) it keeps 8 ic × 2 blocks of gW[·, cb, ky, kx] in 16 `<16 x float>` accumulators,
each holding 16 output channels, and sums over every image, row and pixel in that order:

    for n in range(N): for oy in range(H): for ox in range(W):        (loops in the IR)
        g[k] = gy[n, ob+k, oy, ox, :] for k = 0, 1                     (two 64-byte loads)
        for ic in half:                                                (unrolled, 8)
            v = broadcast(x[n, 16cb + ic, oy+ky-1, ox+kx-1])
            acc[k][ic] = fma(v, g[k], acc[k][ic]) for k = 0, 1

Each broadcast feeds two FMAs (the one-block, 16-ic tile it replaced: one), and the 18
items of one (pair, cb) take turns on a few rows of one image at a time, so x and gy come
from L1 (`GW_CHUNK_BYTES`): 16 -> 32 @ 32×32 went from 3.5 to 2.5 ms, 64 -> 64 @ 16×16
from 6.0 to 4.1, 128 -> 128 @ 8×8 from 5.5 to 4.3 (batch 32, one thread, CPU time, best
of 15, 2026-12-04 20:02 UTC; /tmp script timing `weight_grad_from_padded`).
The tile is stored as block_filters lays filters out, wb[ob, cb, ky, kx, ic, :], and
unblocked into W's layout by the thread that summed it (or, with the images in parts,
after the parts are added). One (ob, cb, tap) item is one thread's whole sum, so the result does
not depend on the thread count. As in the forward pass, the IR is emitted from a Numba
intrinsic (plain Numba loops keep the accumulators in memory and do not fuse), and on
AVX-512 each multiply-add becomes `vfmadd231ps zmm, zmm, dword ptr [...]{1to16}`;
without it `_weight_tiles_loops` adds the same products in the same order (multiply, then
add). gy comes in nChw16c (a vector of 16 output channels per pixel); x is only broadcast,
so it stays NCHW. Each tap sums only the pixels whose input lies inside the image, so the
AVX-512 tiles read x where it lies (`weight_grad_nchw`, C a multiple of 8); otherwise,
and for the loops, x is copied once into a zero-bordered (N, CB·16, H+2, W+2) array
(`blocked.pad_images`, plain row copies).
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from minivgg.kernels.cpu.blocked import (BLOCK, _float, avx512_reason, block_bias,
                                         block_filters, conv2d_nchw, from_blocked,
                                         pad_images, to_blocked)
from minivgg.kernels.cpu.blocked_ir import (_I64, _V16, _float_pointer, _fma, _splat,
                                            _vector_pointer)
from minivgg.kernels.cpu.runtime import JIT, map_ranges, workspace


# ----------------------------------------------------------------------------------------
# Input gradient: the forward kernel with the rotated filters
# ----------------------------------------------------------------------------------------

def conv2d_input_grad_blocked(gyb, W, vector=None):
    """gxb (N, CB, H, W, 16) = the gradient with respect to x of conv(x, W), 3×3/s1/p1.

    gyb (N, OCB, H, W, 16) from `to_blocked`; W (OC, C, 3, 3) the layer's filters. The
    rotated filters (C, OC, 3, 3) take gy's OC channels in and give x's C channels out; the
    padded channels of gxb are zeros. `vector` as in `conv2d_forward_blocked`."""
    C, dtype = W.shape[1], _float(gyb.dtype)
    wb = block_filters(np.asarray(W, dtype), rotate=True)
    CB, OCB = wb.shape[:2]
    assert OCB == gyb.shape[1], "gyb's channel blocks do not match W's OC"
    gx = conv2d_nchw(from_blocked(gyb, OCB * BLOCK), wb, block_bias(None, C, dtype),
                     CB * BLOCK, vector=vector)
    return to_blocked(gx)


# Bytes of x and gy (one block of x, two of gy) the 18 items of one (pair, cb) take turns
# on: rows of one image at a time, about L1's size. Measured 2026-12-04 20:02 UTC (one
# thread, CPU time, best of 15, `weight_grad_from_padded`, batch 32): 32 KiB against whole
# images (1 MiB): 2.49 vs 2.95 ms on 16 -> 32 @ 32×32, 4.11 vs 4.75 on 64 -> 64 @ 16×16,
# 4.32 vs 4.21 on 128 -> 128 @ 8×8 (the old one-block 16-ic tile: 3.5, 6.0, 5.5).
GW_CHUNK_BYTES = 1 << 15

# ----------------------------------------------------------------------------------------
# Weight gradient: the AVX-512 micro-kernel, as LLVM IR emitted from Numba
# ----------------------------------------------------------------------------------------

def _emit_pixel(builder, fma, acc, xq, xchan, gq, gstep):
    """acc[k][i] += x[i] · g_k[:] for the input channels i of one pixel, x[i] = xq[i·xchan]
    (one plane per channel), and each output-channel block k (unrolled), whose gy lies
    `gstep` floats after block k-1's."""
    g = [builder.load(_vector_pointer(builder, builder.gep(gq, [builder.mul(
        gstep, ir.Constant(_I64, k))])), align=4) for k in range(len(acc))]
    values = [[builder.load(a) for a in row] for row in acc]
    for i in range(len(acc[0])):
        xi = builder.gep(xq, [builder.mul(xchan, ir.Constant(_I64, i))])
        x = _splat(builder, builder.load(xi, align=4))
        for k in range(len(acc)):
            values[k][i] = builder.call(fma, [x, g[k], values[k][i]])
    for row, vrow in zip(acc, values):
        for a, v in zip(row, vrow):
            builder.store(v, a)


def _emit_pixels(builder, acc, x_at, g_at, sizes, x_strides, g_strides):
    """The loops n, oy, ox around `_emit_pixel`; x_at/g_at point at image 0, row 0, pixel 0,
    sizes = (N, H, W); x_strides = (image, row, channel) strides in floats (a pixel is 1),
    g_strides = (image, row, block) (a pixel is 16)."""
    fma = _fma(builder)
    N, H, W = sizes
    with cgutils.for_range(builder, N) as n:
        xn = builder.gep(x_at, [builder.mul(n.index, x_strides[0])])
        gn = builder.gep(g_at, [builder.mul(n.index, g_strides[0])])
        with cgutils.for_range(builder, H) as oy:
            xr = builder.gep(xn, [builder.mul(oy.index, x_strides[1])])
            gr = builder.gep(gn, [builder.mul(oy.index, g_strides[1])])
            with cgutils.for_range(builder, W) as ox:
                step = builder.mul(ox.index, ir.Constant(_I64, BLOCK))
                _emit_pixel(builder, fma, acc, builder.gep(xr, [ox.index]), x_strides[2],
                            builder.gep(gr, [step]), g_strides[2])


@intrinsic(prefer_literal=True)
def _weight_tile(typingctx, p, x0, ximg, xrow, xchan, gy, g0, gimg, grow, gstep, N, H, W, gw,
                 w0, wstep, resume, nic, nob):
    """For k < `nob` output-channel blocks and i < `nic` input channels (both literals):
    gw.flat[w0 + k·wstep + 16i : +16] = (its value if `resume`, else 0) + the sum over
    (n, oy, ox) of p.flat[x0 + n·ximg + i·xchan + oy·xrow + ox] · gy.flat[g0 + k·gstep +
    n·gimg + oy·grow + 16ox : +16]. A tile summed over images 0..k-1, then resumed over
    k..N-1, has the bits of one sum over 0..N-1 (the accumulators round-trip through memory
    exactly)."""
    if not (isinstance(nic, types.IntegerLiteral) and isinstance(nob, types.IntegerLiteral)):
        return None
    i = types.intp

    def codegen(context, builder, sig, args):
        (p_, x0_, ximg_, xrow_, xchan_, gy_, g0_, gimg_, grow_, gstep_, N_, H_, W_, gw_, w0_,
         wstep_, resume_, _, _) = args
        ta = sig.args
        acc = [[cgutils.alloca_once(builder, _V16) for _ in range(nic.literal_value)]
               for _ in range(nob.literal_value)]
        x_at = _float_pointer(context, builder, ta[0], p_, x0_)
        g_at = _float_pointer(context, builder, ta[5], gy_, g0_)
        tile = [[_vector_pointer(builder, _float_pointer(context, builder, ta[13], gw_,
                 builder.add(w0_, builder.add(builder.mul(wstep_, ir.Constant(_I64, k)),
                                              ir.Constant(_I64, ic * BLOCK)))))
                 for ic in range(nic.literal_value)] for k in range(nob.literal_value)]
        zero = ir.Constant(_V16, [0.0] * BLOCK)
        for a, ptr in zip(sum(acc, []), sum(tile, [])):
            builder.store(builder.select(resume_, builder.load(ptr, align=4), zero), a)
        _emit_pixels(builder, acc, x_at, g_at, (N_, H_, W_), (ximg_, xrow_, xchan_),
                     (gimg_, grow_, gstep_))
        for a, ptr in zip(sum(acc, []), sum(tile, [])):
            builder.store(builder.load(a), ptr, align=4)
        return context.get_dummy_value()

    return (types.void(p, i, i, i, i, gy, i, i, i, i, i, i, i, gw, i, i, types.boolean, nic,
                       nob),
            codegen)


@njit(**JIT)
def _part_tiles_avx512(p, gy, gw, t0, t1, rows, imgs, C, n0, n1, border):
    """Items t0..t1-1 of one part of the images, n0..n1-1, item t = (pair of output-channel
    blocks, cb, tap, half of the input channels) in that order, by `_weight_tile` (an odd
    OCB's last pair is one block). The 18 items of one (pair, cb) share their x and gy: they
    take turns on `rows` rows of one image at a time, or (rows >= H) on `imgs` whole images
    at a time (kept in L1), each resuming its tile where the last chunk left it.
    p (N, CB·16, H+2, W+2): x, zero-bordered, one plane per channel, of which the first C
    are not all zeros: items on channels past C are skipped (their tiles are never read),
    and with C <= 4 (conv1_1) the first half takes tiles of 4 input channels. Each tap sums
    only the rows and pixels whose input lies inside the image: on x's zero border every
    product is a zero. On 128 channels of 4×4 (a tap off the centre reads the border for
    a quarter to a half of its pixels) the weight gradient went from 1.49 to 1.10 ms, on
    8×8 from 5.82 to 5.01 (batch 32, one thread, CPU time, best of 30, AMD EPYC,
    2026-12-05, `bench_blocked_parts.py`); with a finite gy the sums keep their bits.
    Since no tap reads the border, p may also be x itself (border=0: NCHW, (N, C, H, W),
    C a multiple of 8) rather than its zero-bordered copy (border=1)."""
    OCB, H, W = gy.shape[1], gy.shape[2], gy.shape[3]
    CB = -(-p.shape[1] // BLOCK)
    xrow = p.shape[3]
    xchan = p.shape[2] * xrow
    ximg = p.shape[1] * xchan
    gimg, gstep, wstep = OCB * H * W * BLOCK, H * W * BLOCK, CB * 9 * BLOCK * BLOCK
    for group in range(t0 // 18, (t1 + 17) // 18):
        ob, cb = group // CB * 2, group % CB
        for n in range(n0, n1, imgs):
            K = min(imgs, n1 - n)
            for r0 in range(0, H, rows):
                for t in range(max(t0, group * 18), min(t1, group * 18 + 18)):
                    ky, kx, half = t // 6 % 3, t // 2 % 3, t % 2
                    if cb * BLOCK + half * 8 >= C:
                        continue
                    # the rows and pixels whose tap falls inside the image, not on x's
                    # zero border (no product is left out but a zero)
                    y0, y1 = max(r0, 1 - ky), min(r0 + rows, H, H + 1 - ky)
                    x0, x1 = max(0, 1 - kx), min(W, W + 1 - kx)
                    at = (n * ximg + (cb * BLOCK + half * 8) * xchan
                          + (y0 + ky - 1 + border) * xrow + x0 + kx - 1 + border)
                    g0 = n * gimg + ob * gstep + (y0 * W + x0) * BLOCK
                    w0 = (((ob * CB + cb) * 9 + 3 * ky + kx) * BLOCK + half * 8) * BLOCK
                    resume = n > n0 or r0 > 0
                    R, Q = max(0, y1 - y0), x1 - x0
                    if C <= 4 and ob + 1 < OCB:
                        _weight_tile(p, at, ximg, xrow, xchan, gy, g0, gimg, W * BLOCK,
                                     gstep, K, R, Q, gw, w0, wstep, resume, 4, 2)
                    elif C <= 4:
                        _weight_tile(p, at, ximg, xrow, xchan, gy, g0, gimg, W * BLOCK,
                                     gstep, K, R, Q, gw, w0, wstep, resume, 4, 1)
                    elif ob + 1 < OCB:
                        _weight_tile(p, at, ximg, xrow, xchan, gy, g0, gimg, W * BLOCK,
                                     gstep, K, R, Q, gw, w0, wstep, resume, 8, 2)
                    else:
                        _weight_tile(p, at, ximg, xrow, xchan, gy, g0, gimg, W * BLOCK,
                                     gstep, K, R, Q, gw, w0, wstep, resume, 8, 1)


@njit(**JIT)
def _weight_tiles_avx512(p, gy, gw, t0, t1, rows, imgs, C, border, out):
    """Items t0..t1-1 of (part s of the images, then `_part_tiles_avx512`'s items), each
    part's tiles summed into gw[s] (parts, OCB, CB, 3, 3, 16, 16). With one part and `out`
    (OC, C, 3, 3) not empty, each finished tile is also written there, unblocked, by the
    thread that summed it (`_unblock_items`)."""
    N, parts = gy.shape[0], gw.shape[0]
    per = (gy.shape[1] + 1) // 2 * -(-p.shape[1] // BLOCK) * 18
    for s in range(t0 // per, (t1 + per - 1) // per):
        _part_tiles_avx512(p, gy, gw[s], max(t0, s * per) - s * per,
                           min(t1, (s + 1) * per) - s * per, rows, imgs, C, N * s // parts,
                           N * (s + 1) // parts, border)
    if parts == 1 and out.shape[0] > 0:
        _unblock_items(gw[0], out, t0, t1)


@njit(**JIT)
def _unblock_items(gw, out, t0, t1):
    """out[16·(ob+k) + o, 16·cb + 8·half + i, ky, kx] = gw[ob+k, cb, ky, kx, 8·half + i, o]
    for the items t0..t1-1 of `_part_tiles_avx512` (the channels that exist only)."""
    OC, C, OCB, CB = out.shape[0], out.shape[1], gw.shape[0], gw.shape[1]
    for t in range(t0, t1):
        group, ky, kx, half = t // 18, t // 6 % 3, t // 2 % 3, t % 2
        ob, cb = group // CB * 2, group % CB
        c0 = cb * BLOCK + half * 8
        for k in range(min(2, OCB - ob)):
            for o in range(min(BLOCK, OC - (ob + k) * BLOCK)):
                for i in range(min(8, C - c0)):
                    out[(ob + k) * BLOCK + o, c0 + i, ky, kx] = gw[ob + k, cb, ky, kx,
                                                                  half * 8 + i, o]


# ----------------------------------------------------------------------------------------
# The same tiles in plain Numba loops (CPUs without AVX-512)
# ----------------------------------------------------------------------------------------

@njit(**JIT)
def _weight_tiles_loops(p, gy, gw, t0, t1, rows, imgs, C, border, out):
    """`_weight_tiles_avx512`, one multiply-add at a time in the same order (multiply then
    add, so rounded twice where the FMA rounds once). p is x's zero-bordered copy; `rows`,
    `imgs`, `C`, `border` and `out` only keep the signature: chunking changes no sum's
    order."""
    N, OCB, H, W = gy.shape[0], gy.shape[1], gy.shape[2], gy.shape[3]
    CB, parts = p.shape[1] // BLOCK, gw.shape[0]
    acc = np.empty((BLOCK, BLOCK), p.dtype)
    for t in range(t0, t1):
        s, ob, cb, tap = t // (OCB * CB * 9), t // (CB * 9) % OCB, t // 9 % CB, t % 9
        ky, kx = tap // 3, tap % 3
        acc[:, :] = 0.0
        for n in range(N * s // parts, N * (s + 1) // parts):
            for oy in range(H):
                for ox in range(W):
                    for ic in range(BLOCK):
                        xv = p[n, cb * BLOCK + ic, oy + ky, ox + kx]
                        for o in range(BLOCK):
                            acc[ic, o] += xv * gy[n, ob, oy, ox, o]
        gw[s, ob, cb, ky, kx] = acc


@njit(**JIT)
def _bias_grad(gy, gb):
    """gb[16·ob + o] = the sum over (n, i, j), in that order and in float64, of
    gy[n, ob, i, j, o]: 16 lanes side by side (NumPy's gy.sum(axis=(0, 2, 3)) over the
    blocked layout took 1.5 ms on 32 channels of 32×32, batch 32: a third of gW's time)."""
    N, OCB, H, W = gy.shape[0], gy.shape[1], gy.shape[2], gy.shape[3]
    acc = np.empty(BLOCK, np.float64)
    for ob in range(OCB):
        acc[:] = 0.0
        for n in range(N):
            for i in range(H):
                for j in range(W):
                    for o in range(BLOCK):
                        acc[o] += gy[n, ob, i, j, o]
        gb[ob * BLOCK:(ob + 1) * BLOCK] = acc


@njit(**JIT)
def _sum_images(plane_sums, gb):
    """gb[k] = the sum over n, in order, of plane_sums[n, k], in float64."""
    gb[:] = 0.0
    for n in range(plane_sums.shape[0]):
        for k in range(gb.shape[0]):
            gb[k] += plane_sums[n, k]


# ----------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------

# Items a weight gradient is spread over at least, where the images allow: with fewer (the
# tiles of a layer of few channels), the images are cut into parts, each part's tiles
# summed on its own and the parts added in order. NOTE: conv2_1 of the small recipe (16 ->
# 32 channels, 18 items) went from 1.74 to 1.46 ms in 4 parts of 8 images, conv1_1 (3 ->
# 16, 9 live items of 18, split 5 : 4 over 2 threads) from 0.84 to 0.80 ms in 8 parts
# (batch 32, 2 threads, median of 41, AMD EPYC, 2026-12-05).
MIN_ITEMS = 64


def image_parts(N, OCB, CB, C):
    """Parts the N images of a weight gradient are cut into: a function of the shapes only
    (not of the thread count), so the sums are the same on any number of threads."""
    live = (OCB + 1) // 2 * CB * 9 * (1 if C <= 8 else 2)  # tiles of 8 channels (or 4)
    return max(1, min(N, -(-MIN_ITEMS // live)))


def unblock_filters(wb, OC, C):
    """wb (OCB, CB, 3, 3, 16 input, 16 output channels) -> W (OC, C, 3, 3): undoes
    `block_filters`, spread over the pool by output-channel block (NumPy's transpose and
    copy took 0.09 ms of one thread on 128 -> 128 channels)."""
    W = np.empty((OC, C) + wb.shape[2:4], wb.dtype)
    map_ranges(lambda a0, a1: _unblock_filters(wb, W, a0, a1), wb.shape[0], elements=W.size)
    return W


@njit(**JIT)
def _unblock_filters(wb, W, a0, a1):
    """W[16·ob + o, 16·cb + i, ky, kx] = wb[ob, cb, ky, kx, i, o] for ob in a0..a1-1: wb
    read in order, W (OC, C·9 viewed flat) written 16 output channels at a time."""
    OC, C = W.shape[0], W.shape[1]
    taps = W.shape[2] * W.shape[3]
    flat = W.reshape(OC, C * taps)
    for ob in range(a0, a1):
        real_o = min(BLOCK, OC - ob * BLOCK)
        for cb in range(wb.shape[1]):
            real_i = min(BLOCK, C - cb * BLOCK)
            for t in range(taps):
                tile = wb[ob, cb, t // W.shape[3], t % W.shape[3]]
                for i in range(real_i):
                    col = (cb * BLOCK + i) * taps + t
                    for o in range(real_o):
                        flat[ob * BLOCK + o, col] = tile[i, o]


def conv2d_weight_grad_blocked(xb, gyb, C=None, OC=None, vector=None):
    """gW (OC, C, 3, 3), gb (OC,) float32: the gradients of conv(x, W) + b, 3×3/s1/p1.

    xb (N, CB, H, W, 16) and gyb (N, OCB, H, W, 16) from `to_blocked`; C, OC the real
    channel counts (default: every channel of the blocks). `vector` as in
    `conv2d_forward_blocked`. Items (output block, input block, tap) are spread over the
    pool; each 16×16 tile is one thread's sum over (image, row, pixel) in that order."""
    N, CB, H, W, _ = xb.shape
    p = np.empty((N, CB * BLOCK, H + 2, W + 2), xb.dtype)
    return weight_grad_from_padded(pad_images(from_blocked(xb, CB * BLOCK), p), gyb, C, OC,
                                   vector)


def weight_grad_from_padded(p, gyb, C=None, OC=None, vector=None, plane_sums=None):
    """`conv2d_weight_grad_blocked` from x already in its zero-bordered copy, one plane per
    channel, p (N, CB·16, H+2, W+2) (`pad_images`). `plane_sums` (N, OCB·16) float64, the
    sum of each plane of gy (blocked_nchw's `_to_blocked` makes them): gb is their sum over
    the images, in order, instead of a pass over gy."""
    return _weight_grad(p, 1, gyb, C, OC, vector, plane_sums)


def weight_grad_nchw(x, gyb, C, OC, plane_sums=None):
    """`weight_grad_from_padded` from x (N, C, H, W) itself: on AVX-512 with C a multiple
    of 8 the tiles read x where it lies (no tap reads the border: `_part_tiles_avx512`), so
    no zero-bordered copy is made (on 64 -> 128 channels of 8×8, batch 32, that copy took
    0.11 ms of a 2.9 ms backward on 2 threads; AMD EPYC, 2026-12-05); else through the
    copy."""
    N, _, H, W = x.shape
    dtype = _float(x.dtype)
    if C % 8 == 0 and dtype == np.float32 and not avx512_reason():
        x = np.ascontiguousarray(x, dtype=dtype)
        return _weight_grad(x, 0, gyb, C, OC, True, plane_sums)
    xpad = pad_images(x, workspace("blocked_xpad", (N, -(-C // BLOCK) * BLOCK, H + 2, W + 2),
                                   dtype))
    return weight_grad_from_padded(xpad, gyb, C, OC, plane_sums=plane_sums)


def _weight_grad(p, border, gyb, C, OC, vector, plane_sums):
    """`weight_grad_from_padded` on p, x's zero-bordered copy (border=1) or x (border=0,
    AVX-512 only)."""
    N, OCB, H, W = gyb.shape[:4]
    CB = -(-p.shape[1] // BLOCK)
    assert gyb.shape == (N, OCB, H, W, BLOCK)
    assert p.shape == ((N, CB * BLOCK, H + 2, W + 2) if border else (N, C, H, W))
    C = CB * BLOCK if C is None else C
    OC = OCB * BLOCK if OC is None else OC
    dtype = p.dtype  # float32, or float64 (the loops only)
    if vector is None:
        vector = dtype == np.float32 and not avx512_reason()
    tiles = _weight_tiles_avx512 if vector else _weight_tiles_loops
    p = np.ascontiguousarray(p)
    gy = np.ascontiguousarray(gyb, dtype=dtype)
    parts = image_parts(N, OCB, CB, C)
    # zeros where parts are added: the tiles of channels past C are skipped, never written
    gw = (np.zeros if parts > 1 else np.empty)((parts, OCB, CB, 3, 3, BLOCK, BLOCK), dtype)
    # rows per chunk: R+2 rows of x's block and R rows of two gy blocks in GW_CHUNK_BYTES
    row = (W + 2 + 2 * W) * BLOCK * p.itemsize
    rows = max(1, GW_CHUNK_BYTES // row - 2)
    # small maps: as many whole images (H+2 rows of x each) as fit. On 128 -> 128 channels
    # of 4×4 it took the weight gradient from 1.47 to 1.18 ms (batch 32, one thread, CPU
    # time, best of 15, 2026-12-05 07:50 UTC, load average 1.9): in chunks of one image,
    # each tile's 16 accumulators were loaded and stored for 256 multiply-adds.
    imgs = max(1, GW_CHUNK_BYTES // row // (H + 2)) if rows >= H else 1
    items = parts * ((OCB + 1) // 2 * CB * 18 if vector else OCB * CB * 9)
    # one part: the tiles are unblocked into W's layout by the threads that sum them
    fused = parts == 1 and vector
    out = np.empty((OC, C, 3, 3) if fused else (0, 0, 0, 0), dtype)
    map_ranges(lambda t0, t1: tiles(p, gy, gw, t0, t1, rows, imgs, C, border, out), items)
    for k in range(1, parts):  # the parts' tiles summed in order
        gw[0] += gw[k]
    gb = np.empty(OCB * BLOCK, np.float64)
    if plane_sums is None:
        _bias_grad(gy, gb)
    else:
        _sum_images(plane_sums, gb)
    gb = gb[:OC].astype(dtype)
    return (out if fused else unblock_filters(gw[0], OC, C)), gb
