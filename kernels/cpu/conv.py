"""Convolution on the CPU: the im2col / col2im chunk kernels (the twin of `cuda/conv.cu`),
and `CpuPrimitives`, the CPU's side of `common.Primitives`.

The drivers, `conv2d_forward` and `conv2d_backward`, are written once in `kernels/common.py`
(im2col), `kernels/winograd.py` and `kernels/direct.py` for both devices; `CpuPrimitives` at
the end of this file hands them the CPU's kernels: the loops here, the Winograd transforms of
`winograd.py`, the direct kernels of `direct.py` and the blocked direct convolution of
`blocked_nchw.py` (NCHW in and out). The loops that move data are Numba kernels compiled
once and cached on disk; the GEMMs (`matmul.py`: NumPy's BLAS in fp32, the AMX tiles in
bf16) are one per chunk, each on one thread of `runtime`'s pool. Shape legend: see
`kernels/common.py`. The plain NumPy
version of im2col that these are tested against is `kernels/reference.py`.
"""

import numpy as np
from numba import njit

from minivgg.kernels import common
from minivgg.kernels.cpu import blocked_amx, blocked_amx_grad, blocked_nchw
from minivgg.kernels.cpu import direct as cpu_direct
from minivgg.kernels.cpu import im2col_bf16
from minivgg.kernels.cpu import matmul as cpu_matmul
from minivgg.kernels.cpu import runtime
from minivgg.kernels.cpu import winograd as cpu_winograd
from minivgg.kernels.cpu.flat_copy import flat_span, wrapped_columns
from minivgg.kernels.cpu.runtime import JIT, num_threads
from minivgg.kernels.shapes import conv_output_size

# Bytes of im2col matrix built at once, per thread. The GEMM streams this buffer, so it
# should be large enough to keep the GEMM efficient and small enough to stay near the cache
# and to keep the step's peak memory low: conv1_2's full im2col matrix is 115 MB per image.
IM2COL_CHUNK_BYTES = 16 * 2**20


def num_parts():
    """Chunks a conv layer is cut into at least: one per thread."""
    return num_threads()


# ----------------------------------------------------------------------------------------
# im2col / col2im on a chunk: images n0..n1-1, output rows oy0..oy1-1 of each
# ----------------------------------------------------------------------------------------

def flat_copy_applies(SH, SW, PW, KW, W):
    """Whether im2col and col2im take the flat-copy kernels: the one place that chooses.

    True for "same" stride-1 convolutions (OW == W): VGG's 3×3/p1 and 1×1/p0.
    """
    return SH == 1 and SW == 1 and conv_output_size(W, KW, SW, PW) == W


def im2col_chunk(x, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, cols):
    """Fill cols (CKK, P) for a chunk of x (N, C, H, W); padding reads as zero.

    "Same" stride-1 convolutions (every VGG conv) take the flat-copy kernel, the rest the
    general one (`flat_copy_applies`).
    """
    if flat_copy_applies(SH, SW, PW, KW, x.shape[3]):
        _im2col_same_chunk(x, n0, n1, oy0, oy1, KH, KW, PH, PW, cols)
    else:
        _im2col_general_chunk(x, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, cols)


def col2im_chunk(cols, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, gx):
    """The adjoint of `im2col_chunk`: add every entry of cols (CKK, P) back into gx.

    NOTE: cols is scratch: the flat-add kernel zeroes some of its entries first.
    """
    if flat_copy_applies(SH, SW, PW, KW, gx.shape[3]):
        _col2im_same_chunk(cols, n0, n1, oy0, oy1, KH, KW, PH, PW, gx)
    else:
        _col2im_general_chunk(cols, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, gx)


@njit(**JIT)
def _im2col_general_chunk(x, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, cols):
    """`im2col_chunk` for any stride and padding, one output row (OW columns) at a time.

    Row by row of cols: zeros where the window hangs over the padding, a plain copy of an
    input row (strided by SW) in between.
    """
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    OW = (W + 2 * PW - KW) // SW + 1
    rows = oy1 - oy0
    KK = KH * KW
    for task in range((n1 - n0) * C * KK):
        i, r = task // (C * KK), task % (C * KK)
        c, ky, kx = r // KK, (r % KK) // KW, r % KW
        # output columns whose input column ix = ox*SW + kx - PW lies inside 0..W-1
        ox_lo = min(OW, max(0, (PW - kx + SW - 1) // SW))
        ox_hi = max(ox_lo, min(OW, (W - 1 + PW - kx) // SW + 1))
        for oy in range(oy0, oy1):
            iy = oy * SH + ky - PH
            dst = cols[r, (i * rows + oy - oy0) * OW:(i * rows + oy - oy0 + 1) * OW]
            if iy < 0 or iy >= H:
                dst[:] = 0
                continue
            src = x[n0 + i, c, iy]
            for ox in range(ox_lo):
                dst[ox] = 0
            if SW == 1:  # the VGG case: a contiguous copy, which LLVM vectorises
                dst[ox_lo:ox_hi] = src[ox_lo + kx - PW:ox_hi + kx - PW]
            else:
                for ox in range(ox_lo, ox_hi):
                    dst[ox] = src[ox * SW + kx - PW]
            for ox in range(ox_hi, OW):
                dst[ox] = 0


# "Same" convolutions, stride 1 and OW == W (VGG's 3×3/p1 and 1×1/p0): an output row and
# its input row have the same length W, so a whole band of rows of one (image, c, ky, kx)
# is one flat copy of the input plane, shifted by (ky - PH) * W + (kx - PW). The shift
# wraps around the row ends: where the window hangs over the left or right padding, the
# flat copy reads the neighbouring row's edge instead of a zero, so those columns (at most
# PW on each side) are zeroed afterwards. On the small recipe's 4-32 pixel rows this is
# 2-5x faster than copying row by row (each short row costs a slice and its bounds).

@njit(**JIT)
def _im2col_same_chunk(x, n0, n1, oy0, oy1, KH, KW, PH, PW, cols):
    """`im2col_chunk` for SH = SW = 1 and OW = W, by flat copies (see above)."""
    N, C, H, W = x.shape
    xf = x.reshape(N, C, H * W)
    block = (oy1 - oy0) * W  # columns of one image in cols
    KK = KH * KW
    for r in range(C * KK):
        c, ky, kx = r // KK, (r % KK) // KW, r % KW
        # cols entry p reads xf[..., p + shift] for a <= p < b (clipped to [lo, hi))
        a, b, shift, lo, hi = flat_span(oy0, oy1, ky, kx, PH, PW, H, W)
        ox_lo, ox_hi = wrapped_columns(kx, PW, W)
        for i in range(n1 - n0):
            dst = cols[r, i * block:(i + 1) * block]
            dst[:a] = 0
            dst[a:lo] = 0
            dst[lo:hi] = xf[n0 + i, c, lo + shift:hi + shift]
            dst[hi:b] = 0
            dst[b:] = 0
            for q in range(a, b, W):  # scalar loops: a strided slice per column costs more
                for ox in range(ox_lo):
                    dst[q + ox] = 0
                for ox in range(ox_hi, W):
                    dst[q + ox] = 0


@njit(**JIT)
def _col2im_same_chunk(cols, n0, n1, oy0, oy1, KH, KW, PH, PW, gx):
    """`col2im_chunk` for SH = SW = 1 and OW = W, by flat adds.

    NOTE: it zeroes the wrapped entries of cols first (they hold gradients for padding
    pixels, which have no gx), so cols must be scratch. Every gx pixel then receives its
    (ky, kx) terms in the same order as in `_col2im_general_chunk`, so the sums are bit for
    bit equal.
    """
    N, C, H, W = gx.shape
    gxf = gx.reshape(N, C, H * W)
    block = (oy1 - oy0) * W
    KK = KH * KW
    for task in range((n1 - n0) * C):
        i, c = task // C, task % C
        for k in range(KK):
            ky, kx = k // KW, k % KW
            a, b, shift, lo, hi = flat_span(oy0, oy1, ky, kx, PH, PW, H, W)
            src = cols[c * KK + k, i * block:(i + 1) * block]
            ox_lo, ox_hi = wrapped_columns(kx, PW, W)
            for q in range(a, b, W):  # scalar loops: a strided slice per column costs more
                for ox in range(ox_lo):
                    src[q + ox] = 0
                for ox in range(ox_hi, W):
                    src[q + ox] = 0
            # NOTE: indexed through the C-contiguous 3-D and 2-D arrays, not through 1-D
            # slices of them: measured 1.3-1.6x faster here (the loop is the same; what
            # Numba knows about the arrays' layout is not).
            r, j, n = c * KK + k, i * block, n0 + i
            for p in range(lo, hi):
                gxf[n, c, p + shift] += cols[r, j + p]


@njit(**JIT)
def _col2im_general_chunk(cols, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, gx):
    """`col2im_chunk` for any stride and padding.

    A gather: each input row of gx collects, while it sits in L1, the KH*KW column rows
    that copied it. It adds into gx, so the rows a band shares with its neighbour band (the
    KH-1 halo rows) receive both bands' parts.
    NOTE: two bands next to each other write the same halo rows, so `conv2d_backward` never
    runs them at the same time (it runs even chunks, then odd ones).
    """
    C, H, W = gx.shape[1], gx.shape[2], gx.shape[3]
    OW = (W + 2 * PW - KW) // SW + 1
    rows = oy1 - oy0
    KK = KH * KW
    # Input rows that some output row of this band reads (the band's halo included).
    iy_lo = max(0, oy0 * SH - PH)
    iy_hi = min(H, (oy1 - 1) * SH - PH + KH)
    for task in range((n1 - n0) * C):
        i, c = task // C, task % C
        for iy in range(iy_lo, iy_hi):
            dst = gx[n0 + i, c, iy]
            for ky in range(KH):
                t = iy + PH - ky  # = oy * SH for the output row oy that reads iy via ky
                if t % SH != 0 or t // SH < oy0 or t // SH >= oy1:
                    continue
                j = (i * rows + t // SH - oy0) * OW
                for kx in range(KW):
                    src = cols[c * KK + ky * KW + kx, j:j + OW]
                    ox_lo = min(OW, max(0, (PW - kx + SW - 1) // SW))
                    ox_hi = max(ox_lo, min(OW, (W - 1 + PW - kx) // SW + 1))
                    if SW == 1:  # the VGG case: one contiguous, vectorisable add
                        off = kx - PW
                        for ox in range(ox_lo, ox_hi):
                            dst[ox + off] += src[ox]
                    else:
                        for ox in range(ox_lo, ox_hi):
                            dst[ox * SW + kx - PW] += src[ox]


# ----------------------------------------------------------------------------------------
# Moving a chunk of outputs between the GEMM's (OC, P) layout and NCHW
# ----------------------------------------------------------------------------------------

@njit(**JIT)
def cols_to_nchw(ycols, b, n0, n1, oy0, oy1, y):
    """y[n, oc, oy0:oy1, :] = ycols[oc, chunk columns of n] + b[oc], for n in n0..n1-1.

    The GEMM writes a chunk of several images as (OC, P); this moves it into y
    (N, OC, OH, OW) and adds the bias in the same pass.
    """
    OC, OW = y.shape[1], y.shape[3]
    band = (oy1 - oy0) * OW
    for i in range(n1 - n0):
        for oc in range(OC):
            dst = y[n0 + i, oc].reshape(-1)
            for p in range(band):
                dst[oy0 * OW + p] = ycols[oc, i * band + p] + b[oc]


@njit(**JIT)
def nchw_to_cols(gy, n0, n1, oy0, oy1, gycols):
    """The inverse move: gycols (OC, P) = the chunk of gy (N, OC, OH, OW)."""
    OC, OW = gy.shape[1], gy.shape[3]
    band = (oy1 - oy0) * OW
    for i in range(n1 - n0):
        for oc in range(OC):
            src = gy[n0 + i, oc].reshape(-1)
            for p in range(band):
                gycols[oc, i * band + p] = src[oy0 * OW + p]


@njit(**JIT)
def add_bias(ycols, b):
    """ycols (OC, P) += b[:, None], while the GEMM's output is still in cache."""
    for oc in range(ycols.shape[0]):
        for p in range(ycols.shape[1]):
            ycols[oc, p] += b[oc]


# ----------------------------------------------------------------------------------------
# The CPU's primitives (kernels/common.py: Primitives), and the conv entry points on them
# ----------------------------------------------------------------------------------------

class CpuPrimitives(common.Primitives):
    """The CPU's kernels, as the shared drivers call them: each name is the Numba kernel or
    the NumPy call itself (no wrapper in between), from this file, `cpu/winograd.py`,
    `cpu/direct.py`, `cpu/blocked_nchw.py` (`cpu/blocked_amx.py` under bf16) and
    `cpu/runtime.py`. Contract: `common.Primitives`."""

    xp = np

    @property
    def im2col_chunk_bytes(self):
        """This module's IM2COL_CHUNK_BYTES, read at each call (a test may change it)."""
        return IM2COL_CHUNK_BYTES

    @property
    def winograd_chunk_bytes(self):
        """`cpu/winograd.py`'s WINOGRAD_CHUNK_BYTES, read at each call."""
        return cpu_winograd.WINOGRAD_CHUNK_BYTES

    @staticmethod
    def num_parts():
        """Chunks a conv layer is cut into at least: one per thread."""
        return num_threads()

    @staticmethod
    def direct_conv(x, W, b, y):
        """`cpu/direct.py`'s kernel, on bf16-rounded x and W under bf16 (no GEMM to
        hand them to: the rounding is the whole of bf16 here)."""
        round_operand = cpu_matmul.round_operand
        cpu_direct.direct_conv(round_operand(x), round_operand(W), b, y)

    @staticmethod
    def direct_weight_grad(x, gy, gW):
        """`cpu/direct.py`'s kernel, on bf16-rounded x and gy under bf16."""
        round_operand = cpu_matmul.round_operand
        cpu_direct.direct_weight_grad(round_operand(x), round_operand(gy), gW)

    @staticmethod
    def im2col_operand(x, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, cols, transposed):
        """cols filled by `im2col_chunk` (cols.T with `transposed`); under bf16 on AMX, for
        "same" convolutions, bf16 tiles packed straight from x (`cpu/im2col_bf16.py`)."""
        if cpu_matmul.packs_bf16(x) and flat_copy_applies(SH, SW, PW, KW, x.shape[3]):
            return im2col_bf16.im2col_operand(x, n0, n1, oy0, oy1, KH, KW, PH, PW, transposed)
        im2col_chunk(x, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, cols)
        return cols.T if transposed else cols

    @staticmethod
    def blocked_conv2d_forward(x, W, b):
        """`cpu/blocked_nchw.py`'s; under bf16 on AMX the tile kernel of
        `cpu/blocked_amx.py`, elsewhere under bf16 the fp32 kernel on bf16-rounded x and W."""
        if cpu_matmul.packs_bf16(x):
            return blocked_amx.conv2d_forward_amx(x, W, b)
        round_operand = cpu_matmul.round_operand
        return blocked_nchw.blocked_conv2d_forward(round_operand(x), round_operand(W), b)

    @staticmethod
    def blocked_conv2d_backward(x, W, gy, need_gx):
        """`cpu/blocked_nchw.py`'s; under bf16 on AMX the tile kernels of
        `cpu/blocked_amx.py` and `cpu/blocked_amx_grad.py`, elsewhere under bf16 the fp32
        kernels on bf16-rounded x, W and gy. The bias gradient, a reduction, stays the
        fp32 sum of gy."""
        if cpu_matmul.packs_bf16(x):
            # NOTE: gW first: its bf16 copies of x and gy are gone before gx exists
            gW = blocked_amx_grad.conv2d_weight_grad_amx(x, gy)
            gx = blocked_amx.conv2d_input_grad_amx(gy, W) if need_gx else None
            return gx, gW, gy.sum(axis=(0, 2, 3))
        rounded = [cpu_matmul.round_operand(a) for a in (x, W, gy)]
        gx, gW, gb = blocked_nchw.blocked_conv2d_backward(*rounded, need_gx)
        if rounded[2] is not gy:  # bf16: gb from the fp32 gy
            gb = gy.sum(axis=(0, 2, 3))
        return gx, gW, gb

    # the GEMMs, in the precision `backend.set_precision` chose (cpu/matmul.py)
    matmul = staticmethod(cpu_matmul.matmul)
    point_gemms = staticmethod(cpu_matmul.point_gemms)
    pack_weights = staticmethod(cpu_matmul.pack_weights)

    map_ranges = staticmethod(runtime.map_ranges)
    workspace = staticmethod(runtime.workspace)
    im2col_chunk = staticmethod(im2col_chunk)
    col2im_chunk = staticmethod(col2im_chunk)
    cols_to_nchw = staticmethod(cols_to_nchw)
    nchw_to_cols = staticmethod(nchw_to_cols)
    add_bias = staticmethod(add_bias)
    input_transform = staticmethod(cpu_winograd.input_transform)
    grad_output_transform = staticmethod(cpu_winograd.grad_output_transform)
    output_transform = staticmethod(cpu_winograd.output_transform)
    filter_transform = staticmethod(cpu_winograd.filter_transform)
    filter_grad_transform = staticmethod(cpu_winograd.filter_grad_transform)


PRIMITIVES = CpuPrimitives()

# The conv entry points of the CPU table, written once in `common.Primitives`: whole-batch
# im2col / col2im and conv2d_forward / conv2d_backward by the chosen algorithm.
im2col, col2im = PRIMITIVES.im2col, PRIMITIVES.col2im
conv2d_forward, conv2d_backward = PRIMITIVES.conv2d_forward, PRIMITIVES.conv2d_backward
