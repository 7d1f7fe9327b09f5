"""A register-blocked direct convolution with channel-blocked filters (fp32, 3×3/s1/p1),
forward; x and y stay NCHW.

Issue 26: thin layers (16-128 channels) at PyTorch's speed. The conv algorithm "blocked"
runs it through `blocked_nchw.py`; the pieces:

    block_filters(W)        W (OC, C, 3, 3)      -> wb (OCB, CB, 3, 3, 16ic, 16oc)
    block_filters(W, True)  the input gradient's rotated filters, blocked the same way
    block_bias(b, OC)       b (OC,) or None      -> bb (OCB*16,)
    conv2d_nchw(x, wb, bb, OC, relu=False, vector=None) -> y (N, OC, H, W)
    to_blocked(x) / from_blocked(xb, C)   NCHW <-> (N, CB, H, W, 16) "nChw16c"
    conv2d_forward_blocked(xb, wb, bb, relu=False, vector=None) -> yb (N, OCB, H, W, 16)

CB = ceil(C/16), OCB = ceil(OC/16); the padded channels are zeros (in x's copy, in W and in
b), so they add nothing. float64 arrays run the plain loops below in float64 (the tests'
exact oracles); the micro-kernel is float32 only.

The micro-kernel (`_conv_block`) holds one block of 16 output channels × 16 output pixels
(2 rows of PIX = 8, or 4 rows of 4 on maps 4 wide: all of a 4×4 map), 16 `<16 x float>`
accumulators, for the whole C×3×3 reduction:

    for cb in range(CB): for ky in range(3): for kx in range(3):       (loops in the IR)
        border case of (ky, kx): which pixels and rows of the block read the image
        for ic in range(16):                                           (unrolled)
            w = the 16 output channels' weights of (cb, ky, kx, ic)    (one 64-byte load)
            for p in the pixels of the case:
                acc[p] = fma(broadcast(x[16cb + ic, oy + p // pw + ky, ox0 + p % pw + kx]),
                             w, acc[p])

then adds the bias, applies ReLU if asked, turns the 16 accumulators into 16 rows of
pixels in registers (`emit_transpose`) and stores them into y's NCHW rows
(`llvm.masked.store`, so a block past the row's end writes nothing). Each output is summed
in that fixed order (cb, ky, kx, ic) by one thread, so the result does not depend on the
thread count. Each filter vector feeds 16 FMAs, and each input value is broadcast from
memory into its one FMA (`{1to16}`).

Border cases: oneDNN's direct convolution leaves out every product that would read the
zero border (on a 4×4 map 44 of each channel's 144, on 8×8 16%), and so does this kernel:
`blocked_ir._emit_edge_taps` emits a tap body per case (the row's first or last pixel, the
block's first or last row left out, 3 × 3 cases), and the driver says which sides of the
block touch the border (`edges`). One thread, CPU time, batch 32 (AMD EPYC Zen 4,
2026-12-05, `bench_blocked_parts.py`): the forward pass of 128 -> 128 channels of 4×4
went from 1.42 to 1.06 ms (PyTorch 1.01), of 8×8 from 5.06 to 4.63 (4.59). Two things
that did not work: blocks of two output-channel blocks × 8 pixels (each input value
feeding 2 FMAs, 2 filter vectors), which were 10-25% faster than one block on an Intel
Xeon without the border cases, kept 16 accumulators, 2 filter vectors and the cases' phis
live across the switch, and LLVM spilled 76-99 registers per shape (5.5 against 4.56 ms
on 8×8); and taps with kx unrolled in the IR, which let LLVM share input values between
taps and spill them. So one block per register block, and kx's trip count hidden from
LLVM (`blocked_ir._opaque`) so that it keeps the taps a loop.

Maps 1-3 wide take blocks of 4 pixels of one row (both blocks of a pair, or one), with no
border cases. A block on an input of 4 channels or fewer sums only those per tap, not 16
of which 12 or 13 are zeros: 5.07 -> 1.58 ms on 3 -> 16 channels of 64×64, batch 32,
summing 4 (one thread, CPU time, 2026-12-05 07:55 UTC, load average 1.5), and summing
conv1_1's 3, not 4, 2.1-2.3 -> 1.61-1.65 ms (one thread, wall clock, median of 201, AMD
EPYC, 2026-12-05 afternoon).

No layout conversion: the kernel broadcasts x one value at a time, so x's layout costs
nothing in the inner loop; it reads x's channel planes as they are (the channel stride is
an argument) and writes y's as PyTorch's layers want them. The conversions it replaced
(x to nChw16c, y back, per convolution; `blocked_nchw.py` has the numbers) had become up
to a quarter of a thin layer's time.

What made it vectorise: Numba's loops do not, written plainly (the accumulators live in an
array in memory and fastmath is off, so LLVM may neither keep them in registers across the
reduction nor fuse the multiply-adds). So the micro-kernel is a `numba.extending.intrinsic`
(in kernels/cpu/blocked_ir.py, as kernels/cpu/amx_isa.py emits AMX) that writes the LLVM
IR itself: `<16 x float>` loads of the filter, a scalar load + `shufflevector` splat of
each input value, and `llvm.fma.v16f32`. The accumulators are allocas in the function's
entry block, which LLVM's SROA/mem2reg turns into registers (phis around the loops); on
AVX-512 each input value is broadcast straight into its FMA, `vfmadd231ps zmm, zmm, dword
ptr [...]{1to16}` (the two-block shape of maps 1-3 wide: one `vbroadcastss` feeding two
FMAs), with no register spilled, as tests/test_blocked.py checks through `inspect_asm`.

Without AVX-512 (or with MINIVGG_DISABLE_AVX512=1, NUMBA_DISABLE_JIT=1, or Numba compiling
for another CPU) the same driver runs `_conv_block_loops`, plain Numba loops (multiply, then
add: the numbers differ from the FMA path by rounding only).

Spatial padding: each thread copies one image at a time into a zero-bordered buffer of its
own (`_pad_image`: plain row copies), (CB·16, rows, WQ+2) with WQ = W rounded up to PIX and
rows enough for the last item's block, so the kernel reads every tap with no edge test; a
block past the row's end computes on zeros and stores nothing. A block of one row (maps 1-3
wide) on the map's first or last row sums only the two rows of taps that reach inside the
image (`_conv_block`'s ky0, ky1).
"""

import os

import numba
import numpy as np
from numba import njit

from minivgg.kernels.cpu.machine import cpu_flags
from minivgg.kernels.cpu.blocked_ir import BLOCK, PIX, _conv_block, _turn_block
from minivgg.kernels.cpu.runtime import JIT, map_ranges, workspace


# ----------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------

def _blocks(C):
    return -(-C // BLOCK)


def _float(dtype):
    """float64 stays float64 (the tests' exact oracle runs the loop path); all else float32."""
    return np.result_type(dtype, np.float32)


def to_blocked(x):
    """x (N, C, H, W) -> xb (N, CB, H, W, 16), channels zero-padded to CB·16; float32
    (float64 stays float64)."""
    N, C, H, W = x.shape
    xb = np.zeros((N, _blocks(C) * BLOCK, H, W), _float(x.dtype))
    xb[:, :C] = x
    return np.ascontiguousarray(xb.reshape(N, -1, BLOCK, H, W).transpose(0, 1, 3, 4, 2))


def from_blocked(xb, C):
    """xb (N, CB, H, W, 16) -> x (N, C, H, W): the first C channels."""
    N, CB, H, W, _ = xb.shape
    x = xb.transpose(0, 1, 4, 2, 3).reshape(N, CB * BLOCK, H, W)
    return np.ascontiguousarray(x[:, :C])


def block_filters(W, rotate=False):
    """W (OC, C, 3, 3) -> wb (OCB, CB, 3, 3, 16 input, 16 output channels), zero-padded.

    wb[ob, cb, ky, kx, i, o] = W[16·ob + o, 16·cb + i, ky, kx]: for one tap and one input
    channel, the 16 output channels' weights are contiguous, one vector load.
    rotate=True blocks the input gradient's filters instead, `rotated_filters(W)` (C, OC,
    3, 3): each filter turned by 180°, the channel axes swapped, wb (CB, OCB, 3, 3, 16, 16)
    with wb[cb, ob, ky, kx, o, i] = W[16·ob + o, 16·cb + i, 2-ky, 2-kx].
    One pass of `_block_filters` in wb's order: 0.050 and 0.077 ms (plain and rotated) on
    128 -> 128 channels, where NumPy's pad, transpose and copy (and a flip before them for
    the rotated ones) took 0.066 and 0.163 (one thread, CPU time, best of 30, 2026-12-05
    07:25 UTC, load average 3.0)."""
    OC, C, KH, KW = W.shape
    dtype = _float(W.dtype)
    shape = (_blocks(C), _blocks(OC)) if rotate else (_blocks(OC), _blocks(C))
    wb = np.empty(shape + (KH, KW, BLOCK, BLOCK), dtype)
    W = np.ascontiguousarray(W, dtype=dtype)
    # NOTE: spread over the pool: on one thread the filters of 128 -> 128 channels (blocked
    # for the forward pass, rotated for the input gradient) and their gradient's unblocking
    # took 0.25 ms of conv5's 2.3 ms forward + backward on 2 threads (AMD EPYC, 2026-12-05)
    map_ranges(lambda a0, a1: _block_filters(W, wb, rotate, a0, a1), shape[0],
               elements=wb.size)
    return wb


@njit(**JIT)
def _block_filters(W, wb, rotate, a0, a1):
    """`block_filters` into wb[a0:a1], written in its own order (zeros past OC and C)."""
    OC, C, KH, KW = W.shape
    for A in range(a0, a1):
        for B in range(wb.shape[1]):
            for ky in range(KH):
                for kx in range(KW):
                    for i in range(BLOCK):
                        for o in range(BLOCK):
                            if rotate:  # wb[cb, ob, ky, kx, o, i]
                                oc, c = B * BLOCK + i, A * BLOCK + o
                                u, v = KH - 1 - ky, KW - 1 - kx
                            else:  # wb[ob, cb, ky, kx, i, o]
                                oc, c, u, v = A * BLOCK + o, B * BLOCK + i, ky, kx
                            inside = oc < OC and c < C
                            wb[A, B, ky, kx, i, o] = W[oc, c, u, v] if inside else 0.0


def block_bias(b, OC, dtype=np.float32):
    """b (OC,) or None -> (OCB·16,) of `dtype`, zero-padded."""
    bb = np.zeros(_blocks(OC) * BLOCK, dtype)
    if b is not None:
        bb[:OC] = b
    return bb


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


# ----------------------------------------------------------------------------------------
# The same block in plain Numba loops (CPUs without AVX-512)
# ----------------------------------------------------------------------------------------

@njit(**JIT)
def _conv_block_loops(p, oy, ox0, wb, ob, bb, y, n, relu, acc):
    """y[n, 16ob : 16ob+16, oy, ox0 : ox0+PIX] (those that exist) as `_conv_block` computes
    them from the zero-bordered image p (CB·16, H+2 or more, WQ+2), one multiply-add at a time in
    the same order (multiply then add, so rounded twice where the FMA rounds once)."""
    CB, OC, W = wb.shape[1], y.shape[1], y.shape[3]
    acc[:, :] = 0.0
    for cb in range(CB):
        for ky in range(3):
            for kx in range(3):
                for ic in range(BLOCK):
                    for q in range(PIX):
                        xv = p[cb * BLOCK + ic, oy + ky, ox0 + q + kx]
                        for o in range(BLOCK):
                            acc[q, o] += xv * wb[ob, cb, ky, kx, ic, o]
    for o in range(min(BLOCK, OC - ob * BLOCK)):
        for q in range(min(PIX, W - ox0)):
            v = acc[q, o] + bb[ob * BLOCK + o]
            y[n, ob * BLOCK + o, oy, ox0 + q] = 0.0 if relu and v < 0.0 else v


# ----------------------------------------------------------------------------------------
# The driver: a range of (image, output-channel block, output row) items on one thread
# ----------------------------------------------------------------------------------------

def row_width(W):
    """WQ: W rounded up to PIX. An image's zero-bordered copy is (CB·16, rows, WQ+2), so a
    block of pixels past the row's end reads zeros inside the buffer."""
    return -(-W // PIX) * PIX


@njit(**JIT)
def _pad_image(x, n, p, whole=True):
    """p (CB·16, H', W') = image n of x (N, C, H, W) at p[:C, 1:H+1, 1:W+1], zeros around it
    (the border, the columns past W+1, the planes past C): plain row copies, no layout
    change. whole=False copies the image only: p's zeros are still there from the last.
    (A driver zeroes its buffer at its first image only: on 128 channels of 4×4, 40 of the
    70 values of a plane are zeros.)"""
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    if whole:
        p[...] = 0.0
    for c in range(C):
        for i in range(H):
            for j in range(W):
                p[c, i + 1, j + 1] = x[n, c, i, j]


@njit(**JIT)
def _pad_images(x, out, n0, n1):
    for n in range(n0, n1):
        _pad_image(x, n, out[n])


def pad_images(x, out):
    """out (N, CB·16, H+2, W'+2) = every image of x (N, C, H, W) as `_pad_image` copies it,
    spread over the pool by image; returns out."""
    x = np.ascontiguousarray(x, dtype=out.dtype)
    map_ranges(lambda n0, n1: _pad_images(x, out, n0, n1), x.shape[0], elements=out.size)
    return out


@njit(**JIT)
def _blocks_at(p, x0, istride, rstride, CB, wb, w0, wstep, bb, b0, y, y0, ycs, yrow, valid,
               vrows, ochans, relu, ky0, ky1, edges, pix, nob):
    """`_conv_block` with its literal shape chosen at run time by pix: 16 (1 block × 2 rows
    of PIX), -4 (1 block × 4 rows of 4), 4 (nob blocks × 4 pixels of a row), 64 (as 16,
    summing 4 input channels, not 16), 48 (as 16, summing 3: conv1_1's RGB). ky0, ky1: the
    rows of taps summed (`_conv_block`; 0, 3 for all); edges: where the block touches x's
    zero border (`blocked_ir._emit_edge_taps`), whose products the shapes 16 and -4 leave
    out (the others sum them: zeros)."""
    if pix == 3 * BLOCK:  # 16 as for one block of 2 rows, x with 3 channels or fewer
        _conv_block(p, x0, istride, rstride, CB, wb, w0, wstep, bb, b0, y, y0, ycs, yrow,
                    valid, vrows, ochans, relu, ky0, ky1, edges, 16, 1, PIX, 3, False)
    elif pix == 4 * BLOCK:  # the same, x with 4 channels
        _conv_block(p, x0, istride, rstride, CB, wb, w0, wstep, bb, b0, y, y0, ycs, yrow,
                    valid, vrows, ochans, relu, ky0, ky1, edges, 16, 1, PIX, 4, False)
    elif pix == 16:
        _conv_block(p, x0, istride, rstride, CB, wb, w0, wstep, bb, b0, y, y0, ycs, yrow,
                    valid, vrows, ochans, relu, ky0, ky1, edges, 16, 1, PIX, 16, True)
    elif pix == -4:
        _conv_block(p, x0, istride, rstride, CB, wb, w0, wstep, bb, b0, y, y0, ycs, yrow,
                    valid, vrows, ochans, relu, ky0, ky1, edges, 16, 1, 4, 16, True)
    elif nob == 2:
        _conv_block(p, x0, istride, rstride, CB, wb, w0, wstep, bb, b0, y, y0, ycs, yrow,
                    valid, vrows, ochans, relu, ky0, ky1, edges, 4, 2, 4, 16, False)
    else:
        _conv_block(p, x0, istride, rstride, CB, wb, w0, wstep, bb, b0, y, y0, ycs, yrow,
                    valid, vrows, ochans, relu, ky0, ky1, edges, 4, 1, 4, 16, False)


@njit(**JIT)
def rows_per_item(W):
    """Output rows one item of `_conv_rows_avx512` covers: 4 on maps 4 wide (a block of
    4 rows × 4 pixels is the whole of a 4×4 map), else 2."""
    return 4 if W == 4 else 2


@njit(**JIT)
def _conv_rows_avx512(x, wb, bb, y, p, t0, t1, relu, xb, sums):
    """Items t0..t1-1, item t = (n, pair of output-channel blocks, group of `rows_per_item`
    rows) in that order (rows fastest), by `_conv_block`. Image n of x (NCHW) is copied
    into p (consecutive items of one image share it); y (NCHW) is written straight from
    the registers. Each block of 16 output channels takes 16 accumulators: 2 rows × PIX
    pixels, or on maps 4 wide 4 rows × 4 (the whole of a 4×4 map); maps 1-3 wide take
    both blocks × 4 pixels of one row (8 would compute on padding half the time or more).
    A block on x of 4 channels or fewer sums only those (3 for conv1_1's RGB; the planes
    past them are zeros). The micro-kernel is scheduled as for Skylake on every CPU
    (`blocked_ir.tune_scheduling`). With xb (N, CB, H·W, 16) not empty, the range that
    holds an image's first item also writes that image in nChw16c into xb, and its planes'
    sums into sums (`_block_planes`), while it is in cache: the input gradient's pass
    blocks gy for the weight gradient on the way."""
    OCB, CB = wb.shape[0], wb.shape[1]
    H, W = y.shape[2], y.shape[3]
    pairs, rstride = (OCB + 1) // 2, p.shape[2]
    istride, wstep = p.shape[1] * rstride, CB * 9 * BLOCK * BLOCK
    RG = rows_per_item(W)
    G = -(-H // RG)
    C = x.shape[1]
    last = -1
    for t in range(t0, t1):
        n, r = t // (pairs * G), t % (pairs * G)
        ob, oy = r // G * 2, r % G * RG
        if n != last:
            _pad_image(x, n, p, last < 0)
            last = n
            if xb.shape[0] > 0 and r == 0:
                _block_planes(x.reshape((x.shape[0], C, H * W)), xb, n * CB, (n + 1) * CB,
                              True, sums)
        nob, rows = min(2, OCB - ob), min(RG, H - oy)
        if W < 4:  # both blocks, 4 pixels of one row at a time
            _item_blocks(p, istride, rstride, CB, wb, wstep, bb, y, n, ob, oy, rows, relu, 4,
                         nob)
            continue
        pix = -4 if W == 4 else (16 if C > 4 else (4 if C == 4 else 3) * BLOCK)
        for k in range(nob):
            _item_blocks(p, istride, rstride, CB, wb, wstep, bb, y, n, ob + k, oy, rows,
                         relu, pix, 1)


@njit(**JIT)
def _item_blocks(p, istride, rstride, CB, wb, wstep, bb, y, n, ob, oy, rows, relu, pix, nob):
    """The blocks of `rows` output rows from oy, of output-channel blocks ob..ob+nob-1, in
    the shape pix (`_blocks_at`): one row at a time (pix 4) or all rows of the item in
    one block. A block of one row on the map's first or last row skips the row of taps
    above or below it (ky0, ky1); other blocks are told which of their sides touch x's
    zero border (`edges`), and the shapes that can leave those products out."""
    OC, H, W = y.shape[1], y.shape[2], y.shape[3]
    step = 1 if pix == 4 else rows
    pw = 4 if pix in (4, -4) else PIX
    for r0 in range(0, rows, step):
        ky0 = 1 if oy + r0 == 0 and step == 1 else 0
        ky1 = 2 if oy + r0 == H - 1 and step == 1 else 3
        # bit 2: the block's first row is the map's first; bit 3: its last row the last
        tall = 4 if pix == -4 else 2  # the block's rows, stored or not
        tb = 4 * (oy + r0 == 0) + 8 * (oy + r0 + tall - 1 == H - 1) if step > 1 else 0
        for ox0 in range(0, W, pw):
            edges = tb + (ox0 == 0) + 2 * (ox0 + pw == W)
            _blocks_at(p, (oy + r0) * rstride + ox0, istride, rstride, CB, wb, ob * wstep,
                       wstep, bb, ob * BLOCK, y,
                       ((n * OC + ob * BLOCK) * H + oy + r0) * W + ox0, H * W, W, W - ox0,
                       rows - r0, OC - ob * BLOCK, relu, ky0, ky1, edges, pix, nob)


@njit(**JIT)
def _conv_rows_loops(x, wb, bb, y, p, t0, t1, relu, xb, sums):
    """`_conv_rows_avx512` with `_conv_block_loops` as the micro-kernel, one block at a
    time (xb and sums only keep the signature: `conv2d_nchw` blocks x only on AVX-512)."""
    OCB, H, W = wb.shape[0], y.shape[2], y.shape[3]
    acc = np.empty((PIX, BLOCK), y.dtype)
    last = -1
    for t in range(t0, t1):
        n, r = t // (OCB * H), t % (OCB * H)
        ob, oy = r // H, r % H
        if n != last:
            _pad_image(x, n, p, last < 0)
            last = n
        for ox0 in range(0, W, PIX):
            _conv_block_loops(p, oy, ox0, wb, ob, bb, y, n, relu, acc)


# ----------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------

def avx512_reason():
    """Why the AVX-512 micro-kernel cannot run here, or "" when it can."""
    if os.environ.get("MINIVGG_DISABLE_AVX512", "") not in ("", "0"):
        return "MINIVGG_DISABLE_AVX512 is set"
    if numba.config.DISABLE_JIT:
        return "NUMBA_DISABLE_JIT is set, and the intrinsic exists in compiled code only"
    # NOTE: a portable cache (NUMBA_CPU_NAME=generic) must not hold AVX-512 code.
    if numba.config.CPU_NAME and numba.config.CPU_NAME != "host":
        return f"Numba compiles for NUMBA_CPU_NAME={numba.config.CPU_NAME}"
    if "avx512f" not in cpu_flags():  # read once per process (machine.py)
        return "this CPU has no avx512f (/proc/cpuinfo flags)"
    return ""


def conv2d_nchw(x, wb, bb, OC, relu=False, vector=None, blocked_out=None):
    """y (N, OC, H, W) = conv(x, wb) + bb (then ReLU if `relu`), 3×3/s1/p1, x (N, C, H, W).

    wb from `block_filters` (OC's and C's blocks), bb from `block_bias`; all float32, or
    all float64 (which only the loops run). `vector`: True for the AVX-512 micro-kernel,
    False for the plain loops, None to choose by `avx512_reason()`. Items (image, pair of
    output-channel blocks, group of `rows_per_item` rows; the loops: image, block, row) are
    spread over the pool in contiguous ranges; each output is computed by one thread in a
    fixed order. Each thread copies one image at a time into a zero-bordered buffer of its
    own, (CB·16, ⌈H/RG⌉·RG + 2, WQ+2) with RG = `rows_per_item(W)` and WQ =
    `row_width(W)`; the kernel broadcasts its values from there and writes y's rows
    itself, so x and y need no conversion to the blocked layout. `blocked_out`, (xb, sums)
    with xb (N, CB, H·W, 16) and sums (N, CB·16) float64, AVX-512 only: x in nChw16c and
    its planes' sums as well (`_conv_rows_avx512`).
    """
    N, C, H, W = x.shape
    OCB, CB = wb.shape[:2]
    assert wb.shape == (OCB, CB, 3, 3, BLOCK, BLOCK) and bb.shape == (OCB * BLOCK,)
    assert _blocks(C) == CB and _blocks(OC) == OCB, "x, wb and OC do not match"
    dtype = _float(x.dtype)
    if vector is None:
        vector = dtype == np.float32 and not avx512_reason()
    assert not (vector and dtype != np.float32), "the AVX-512 micro-kernel is float32 only"
    rows = _conv_rows_avx512 if vector else _conv_rows_loops
    x, wb, bb = (np.ascontiguousarray(a, dtype=dtype) for a in (x, wb, bb))
    y = np.empty((N, OC, H, W), dtype)
    if blocked_out is None:
        xb, sums = np.empty((0, 0, 0, BLOCK), dtype), np.empty((0, 0), np.float64)
    else:
        assert vector, "x is blocked on the way by the AVX-512 driver only"
        xb, sums = blocked_out
        assert xb.shape == (N, CB, H * W, BLOCK) and sums.shape == (N, CB * BLOCK)

    def job(t0, t1):
        # rows of zeros past the map: the last item's block reads rows_per_item rows + 2
        RG = rows_per_item(W)
        p = workspace("blocked_pad", (CB * BLOCK, -(-H // RG) * RG + 2, row_width(W) + 2),
                      dtype)
        rows(x, wb, bb, y, p, t0, t1, bool(relu), xb, sums)

    if vector:  # (image, pair of blocks, group of rows) as `_conv_rows_avx512` has them
        map_ranges(job, N * ((OCB + 1) // 2) * -(-H // rows_per_item(W)))
    else:
        map_ranges(job, N * OCB * H)
    return y


def conv2d_forward_blocked(xb, wb, bb, relu=False, vector=None):
    """yb (N, OCB, H, W, 16) = conv(xb, wb) + bb (then ReLU if `relu`), 3×3/s1/p1, blocked
    in and out: xb from `to_blocked`, wb from `block_filters`, bb from `block_bias`.
    `conv2d_nchw` between `from_blocked` and `to_blocked` (every channel of the blocks:
    the padded ones are zeros in, and zeros out)."""
    OCB, CB = wb.shape[:2]
    y = conv2d_nchw(from_blocked(xb, CB * BLOCK), wb, bb, OCB * BLOCK, relu, vector)
    return to_blocked(y)
