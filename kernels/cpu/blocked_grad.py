"""The backward pass of the blocked direct convolution (kernels/cpu/blocked.py), fp32,
3×3/s1/p1, on the nChw16c layout (float64 through the loops only, as in the forward pass).
`blocked_nchw.py` gives them the conv entry points, NCHW in and out.

    conv2d_input_grad_blocked(gyb, W, vector=None)            -> gxb (N, CB, H, W, 16)
    conv2d_weight_grad_blocked(xb, gyb, C, OC, vector=None)   -> gW (OC, C, 3, 3), gb (OC,)
    weight_grad_from_padded(p, gyb, C, OC, vector=None)       the same, from x's zero-bordered
                                                              copy p (N, CB, H+2, W+2, 16)

The input gradient is a forward convolution: gy convolved with the filters turned by 180°
and with their channel axes swapped (`rotated_filters`), so the forward micro-kernel serves
it unchanged, with gy's OCB blocks as its input blocks and x's CB blocks as its outputs.

The weight gradient has a micro-kernel of its own (`_weight_tile`). For one (output-channel
block ob, input-channel block cb, tap ky, kx) it keeps the 16×16 tile gW[ob, cb, ky, kx]
in 16 `<16 x float>` accumulators, one per input channel ic, each holding the 16 output
channels, and sums over every image, row and pixel in that fixed order:

    for n in range(N): for oy in range(H): for ox in range(W):        (loops in the IR)
        g = gy[n, ob, oy, ox, :]                                       (one 64-byte load)
        for ic in range(16):                                           (unrolled)
            acc[ic] = fma(broadcast(x[n, cb, oy+ky-1, ox+kx-1, ic]), g, acc[ic])

The tile is stored as block_filters lays filters out, wb[ob, cb, ky, kx, ic, :], and
unblocked at the end. One (ob, cb, tap) item is one thread's whole sum, so the result does
not depend on the thread count. As in the forward pass, the IR is emitted from a Numba
intrinsic (plain Numba loops keep the accumulators in memory and do not fuse), and on
AVX-512 each multiply-add becomes `vfmadd231ps zmm, zmm, dword ptr [...]{1to16}`;
without it `_weight_tile_loops` adds the same products in the same order (multiply, then
add). The input is copied once into a zero-bordered (N, CB, H+2, W+2, 16) array, so no
tap needs an edge test.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from minivgg.kernels.cpu.blocked import (BLOCK, _I64, _V16, _float_pointer, _fma,
                                         _splat, _vector_pointer, avx512_reason,
                                         block_bias, block_filters, conv2d_forward_blocked)
from minivgg.kernels.cpu.runtime import JIT, map_ranges
from minivgg.kernels.direct import rotated_filters


# ----------------------------------------------------------------------------------------
# Input gradient: the forward kernel with the rotated filters
# ----------------------------------------------------------------------------------------

def conv2d_input_grad_blocked(gyb, W, vector=None):
    """gxb (N, CB, H, W, 16) = the gradient with respect to x of conv(x, W), 3×3/s1/p1.

    gyb (N, OCB, H, W, 16) from `to_blocked`; W (OC, C, 3, 3) the layer's filters. The
    rotated filters (C, OC, 3, 3) take gy's OC channels in and give x's C channels out; the
    padded channels of gxb are zeros. `vector` as in `conv2d_forward_blocked`."""
    C = W.shape[1]
    wb = block_filters(rotated_filters(np, np.asarray(W, gyb.dtype)))
    assert wb.shape[1] == gyb.shape[1], "gyb's channel blocks do not match W's OC"
    return conv2d_forward_blocked(gyb, wb, block_bias(None, C, gyb.dtype), vector=vector)


# Bytes of x and gy (one channel block of each) a weight-gradient item sums before the next
# item takes over: half of this CPU's 2 MiB L2 per core. On 16 -> 32 channels at 32×32,
# batch 32 (a block of x and one of gy are 4.4 MB) the tiles took 2.5-2.6 ms against
# 2.8-3.0 swept over the whole batch (one thread, loaded machine); even on smaller maps.
GW_CHUNK_BYTES = 1 << 20

# ----------------------------------------------------------------------------------------
# Weight gradient: the AVX-512 micro-kernel, as LLVM IR emitted from Numba
# ----------------------------------------------------------------------------------------

def _emit_pixel(builder, fma, acc, xq, gq):
    """acc[ic] += x[ic] · g[:] for the 16 input channels ic of one pixel (unrolled)."""
    g = builder.load(_vector_pointer(builder, gq), align=4)
    values = [builder.load(a) for a in acc]
    for ic in range(BLOCK):
        xs = builder.load(builder.gep(xq, [ir.Constant(_I64, ic)]), align=4)
        values[ic] = builder.call(fma, [_splat(builder, xs), g, values[ic]])
    for a, v in zip(acc, values):
        builder.store(v, a)


def _emit_pixels(builder, acc, x_at, g_at, sizes, x_strides, g_strides):
    """The loops n, oy, ox around `_emit_pixel`; x_at/g_at point at image 0, row 0, pixel 0,
    sizes = (N, H, W), *_strides = (image, row) strides in floats (a pixel is 16)."""
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
                _emit_pixel(builder, fma, acc, builder.gep(xr, [step]),
                            builder.gep(gr, [step]))


@intrinsic
def _weight_tile(typingctx, p, x0, ximg, xrow, gy, g0, gimg, grow, N, H, W, gw, w0, resume):
    """gw.flat[w0 + 16ic : +16] = (its value if `resume`, else 0) + the sum over (n, oy, ox)
    of p.flat[x0 + n·ximg + oy·xrow + 16ox + ic] · gy.flat[g0 + n·gimg + oy·grow + 16ox :
    +16], for ic < 16. A tile summed over images 0..k-1, then resumed over k..N-1, has the
    bits of one sum over 0..N-1 (the accumulators round-trip through memory exactly)."""
    i = types.intp

    def codegen(context, builder, sig, args):
        (p_, x0_, ximg_, xrow_, gy_, g0_, gimg_, grow_, N_, H_, W_, gw_, w0_, resume_) = args
        ta = sig.args
        acc = [cgutils.alloca_once(builder, _V16) for _ in range(BLOCK)]
        x_at = _float_pointer(context, builder, ta[0], p_, x0_)
        g_at = _float_pointer(context, builder, ta[4], gy_, g0_)
        w_at = _float_pointer(context, builder, ta[11], gw_, w0_)
        tile = [_vector_pointer(builder, builder.gep(w_at, [ir.Constant(_I64, ic * BLOCK)]))
                for ic in range(BLOCK)]
        zero = ir.Constant(_V16, [0.0] * BLOCK)
        for a, ptr in zip(acc, tile):
            builder.store(builder.select(resume_, builder.load(ptr, align=4), zero), a)
        _emit_pixels(builder, acc, x_at, g_at, (N_, H_, W_), (ximg_, xrow_), (gimg_, grow_))
        for a, ptr in zip(acc, tile):
            builder.store(builder.load(a), ptr, align=4)
        return context.get_dummy_value()

    return types.void(p, i, i, i, gy, i, i, i, i, i, i, gw, i, types.boolean), codegen


@njit(**JIT)
def _weight_tiles_avx512(p, gy, gw, t0, t1, images):
    """Items t0..t1-1, item t = (ob, cb, tap) in that order (tap fastest), by `_weight_tile`,
    `images` images at a time: every item sums one chunk of images (while it is in cache),
    then resumes on the next."""
    N, OCB, H, W = gy.shape[0], gy.shape[1], gy.shape[2], gy.shape[3]
    CB = p.shape[1]
    xrow = p.shape[3] * BLOCK
    ximg = CB * p.shape[2] * xrow
    gimg = OCB * H * W * BLOCK
    for n0 in range(0, N, images):
        for t in range(t0, t1):
            ob, cb, tap = t // (CB * 9), t // 9 % CB, t % 9
            x0 = n0 * ximg + (cb * p.shape[2] + tap // 3) * xrow + tap % 3 * BLOCK
            g0 = n0 * gimg + ob * H * W * BLOCK
            _weight_tile(p, x0, ximg, xrow, gy, g0, gimg, W * BLOCK,
                         min(images, N - n0), H, W, gw, t * BLOCK * BLOCK, n0 > 0)


# ----------------------------------------------------------------------------------------
# The same tiles in plain Numba loops (CPUs without AVX-512)
# ----------------------------------------------------------------------------------------

@njit(**JIT)
def _weight_tiles_loops(p, gy, gw, t0, t1, images):
    """`_weight_tiles_avx512`, one multiply-add at a time in the same order (multiply then
    add, so rounded twice where the FMA rounds once). `images` only keeps the signature:
    chunking the images changes no sum's order."""
    N, H, W = gy.shape[0], gy.shape[2], gy.shape[3]
    CB = p.shape[1]
    acc = np.empty((BLOCK, BLOCK), p.dtype)
    for t in range(t0, t1):
        ob, cb, tap = t // (CB * 9), t // 9 % CB, t % 9
        ky, kx = tap // 3, tap % 3
        acc[:, :] = 0.0
        for n in range(N):
            for oy in range(H):
                for ox in range(W):
                    for ic in range(BLOCK):
                        xv = p[n, cb, oy + ky, ox + kx, ic]
                        for o in range(BLOCK):
                            acc[ic, o] += xv * gy[n, ob, oy, ox, o]
        gw[ob, cb, ky, kx] = acc


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


# ----------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------

def unblock_filters(wb, OC, C):
    """wb (OCB, CB, 3, 3, 16 input, 16 output channels) -> W (OC, C, 3, 3): undoes
    `block_filters`."""
    OCB, CB, KH, KW = wb.shape[:4]
    W = wb.transpose(0, 5, 1, 4, 2, 3).reshape(OCB * BLOCK, CB * BLOCK, KH, KW)
    return np.ascontiguousarray(W[:OC, :C])


def conv2d_weight_grad_blocked(xb, gyb, C=None, OC=None, vector=None):
    """gW (OC, C, 3, 3), gb (OC,) float32: the gradients of conv(x, W) + b, 3×3/s1/p1.

    xb (N, CB, H, W, 16) and gyb (N, OCB, H, W, 16) from `to_blocked`; C, OC the real
    channel counts (default: every channel of the blocks). `vector` as in
    `conv2d_forward_blocked`. Items (output block, input block, tap) are spread over the
    pool; each 16×16 tile is one thread's sum over (image, row, pixel) in that order."""
    N, CB, H, W, _ = xb.shape
    p = np.zeros((N, CB, H + 2, W + 2, BLOCK), xb.dtype)
    p[:, :, 1:-1, 1:-1] = xb
    return weight_grad_from_padded(p, gyb, C, OC, vector)


def weight_grad_from_padded(p, gyb, C=None, OC=None, vector=None):
    """`conv2d_weight_grad_blocked` from x already in its zero-bordered copy,
    p (N, CB, H+2, W+2, 16)."""
    N, CB = p.shape[:2]
    OCB, H, W = gyb.shape[1:4]
    assert gyb.shape == (N, OCB, H, W, BLOCK) and p.shape == (N, CB, H + 2, W + 2, BLOCK)
    C = CB * BLOCK if C is None else C
    OC = OCB * BLOCK if OC is None else OC
    dtype = p.dtype  # float32, or float64 (the loops only)
    if vector is None:
        vector = dtype == np.float32 and not avx512_reason()
    tiles = _weight_tiles_avx512 if vector else _weight_tiles_loops
    p = np.ascontiguousarray(p)
    gy = np.ascontiguousarray(gyb, dtype=dtype)
    gw = np.empty((OCB, CB, 3, 3, BLOCK, BLOCK), dtype)
    # images per chunk: one input block and one gy block of them in GW_CHUNK_BYTES
    images = max(1, GW_CHUNK_BYTES // (((H + 2) * (W + 2) + H * W) * BLOCK * p.itemsize))
    map_ranges(lambda t0, t1: tiles(p, gy, gw, t0, t1, images), OCB * CB * 9)
    gb = np.empty(OCB * BLOCK, np.float64)
    _bias_grad(gy, gb)
    gb = gb[:OC].astype(dtype)
    return unblock_filters(gw, OC, C), gb
