"""The conv algorithm "blocked" under bf16 on AMX: an implicit-GEMM direct convolution
(3×3/s1/p1) on the tile registers, no im2col matrix. The weight gradient is in
`blocked_amx_grad.py`; `CpuPrimitives` (conv.py) runs both when the precision is bf16 and
`amx_isa.amx_available()`, else the fp32 kernel on bf16-rounded operands.

    conv2d_forward_amx(x, W, b)        -> y (N, OC, H, W) float32
    conv2d_input_grad_amx(gy, W)       -> gx (N, C, H, W) float32

**Flat padded positions.** Each image is zero-padded by one pixel, Hp = H + 2, Wp = W + 2
(W + 3 for an odd W: `FlatGeometry`), and the padded pixels of the whole batch are
numbered q = n·Hp·Wp + i·Wp + j. Output pixel (n, oy, ox) is computed at
q = n·Hp·Wp + oy·Wp + ox; its tap (ky, kx) reads the padded input at q + s with
s = ky·Wp + kx, the same constant shift for every output. So 16 consecutive
outputs q..q+15 read 16 consecutive inputs q+s..q+s+15, whatever rows and images they span.
Outputs at q whose oy >= H or ox >= W (2 of every Wp, and 2 rows per image) are computed
from zeros and neighbours, and dropped: a waste of about 2/Wp + 2/Hp, in exchange for tiles
that run across rows and images (a 4×4 map still fills 16-wide tiles).

**The GEMM.** Y^T (OC × positions) = Σ_tap W_tap (OC × C) @ X_tap (C × positions):

    A tile: 16 output channels × 32 input channels of W_tap, packed once per call
            (`pack_filters`: (OCt, 9, Kb, 16, 32) bf16, 1 KB per tile)
    B tile: 16 channel pairs × 16 positions × 2 bf16 (VNNI): row p holds, for positions
            q+s..q+s+15, the bf16 of channels 2p and 2p+1 side by side
    C tile: 16 output channels × 16 positions, fp32

The input is kept as channel pairs (`to_pairs`: xq (Cp/2, L, 2) bf16, Cp = C rounded up to
32, zero channels and zero borders), so row p of a B tile is 64 contiguous bytes at
xq[p, q+s] and the 16 rows are L·4 bytes apart: ONE `tileload` straight from xq, for any
shift s. Each C tile holds 16 channels × 16 consecutive positions, so its rows are pieces of
NCHW output rows: the epilogue (`_scatter`) copies them out contiguously, with the bias.
The blocking is amx.py's: tiles 0-3 a 2 × 2 block of C (32 channels × 32 positions), 4-5
two A tiles, 6-7 two B tiles, four tdpbf16ps per four loads, over (tap, Kb) in that fixed
order.

Why channels × positions, not positions × channels (A = 16 positions × 32 channels straight
from a channel-last x, also one tile load per shift): its C tiles would hold positions ×
channels, and every output would need a transpose back to NCHW, the layout of the layers
around (ReLU, pooling) and of `Tensor`. Here the epilogue is a plain copy.

**Input gradient.** gx = the same kernel on gy (as channel pairs, padded) with the filters
rotated 180° and their in/out channels swapped (`rotated_filters`; `pack_filters(W,
rotate=True)` packs them without the copy).

**Cache sets.** The 16 rows of a tile lie L·4 (xq) or row·4 (ybuf) bytes apart; were that a
multiple of 4 KB, all 16 would fall in one set of the 64-set, 12-way L1 and evict each other
at every load. So L ≡ 32 (mod 64) and the scratch rows are `spread_row` long (an odd number
of 64-byte lines, or twice one). NOTE: by that argument, not by a measurement: on the shared
machine an A/B of the two layouts swung 2× either way from run to run (load average 17).

**Memory.** A layer runs a chunk of images at a time (`image_chunks`: at most
IMAGE_CHUNK_BYTES, 16 MB, of bf16 layout, or one image), so besides its output it holds xq
for one chunk (the input in bf16, about half of it in fp32), the packed filters and per
thread a 32 × 272 fp32 scratch (`workspace`); the weight gradient holds one chunk of x and
of gy in bf16 (whole-batch layouts would be 52 MB each for conv1_2 at batch 8). The
layouts are plain `np.empty`, not workspaces, which would keep the largest layer's size for
the rest of the run (glibc hands the freed memory to the next call:
`runtime._keep_freed_memory`). The bf16 VGG-D step at batch 8 (2 threads) peaked at 3088
MB above the imports against fp32's 2897 (bf16 with im2col: 3287), in fc6's backward (the
bf16 fc GEMM, not a conv layer; RSS sampled by op, 2026-12-05, shared machine); since the fc
layers stream their weights (`amx_stream.py`) it is level with fp32's: 2497 MB against 2494
(`bench_step.py --cases D --precision bf16`, quiet, 2026-12-05 09:05 UTC).

**Threads.** The positions are cut in blocks of `QBLOCK` (fewer when the layer has fewer
positions than threads × QBLOCK), each thread gets a contiguous range of blocks
(`runtime.map_ranges`). Every output is one thread's sum in the fixed (tap, Kb) order,
whatever the block or thread count: the same bits at any thread count.

**Numbers.** bf16 operands (round to nearest even), fp32 sums in the tiles, fp32 output
(see amx.py's docstring for why). The reference the tests hold it to: the float64
convolution of the bf16-rounded operands.

**Measured** (taken on a SHARED machine, 2026-12-05 07:43 UTC, load average 4.5-4.7 on 2
cores; indicative only, the quiet tables belong in benchmarks/README.md): GFLOP/s of each
pass, whole calls (layouts, filter packing, epilogue included), one thread, the fastest of
3 by CPU time; `python benchmarks/bench_blocked_amx.py [--net small]`. amx: this kernel;
im2col: the bf16 im2col path (im2col into tiles + the AMX GEMM); torch: PyTorch 2.13's
bf16 conv (oneDNN), its own process, one thread.

    VGG-16 at batch 2          fwd               gx                gW
    C -> OC @ side        amx im2col torch  amx im2col torch  amx im2col torch
    3->64 @224          34     35    12    58     29    42    27     22    40
    64->64 @224        417    114   195   404     48   200   274    133   353
    64->128 @112       452    188   154   513     87   533   444    182   536
    128->128 @112      598    211   278   559     89   270   363    217   461
    128->256 @56       640    314   704   662    147   707   365    385   604
    256->256 @56       732    352   924   687    136   783   425    352   606
    256->512 @28       547    495   903   475    200   736   332    488   745
    512->512 @28       537    474  1035   475    233   942   394    418   787
    512->512 @14       252    340   792   289    153   738   284    377   395

    small recipe, batch 32      fwd               gx                gW
    C -> OC @ side        amx im2col torch  amx im2col torch  amx im2col torch
    3->16 @64           31     19    49    40     11    71    30     16    62
    16->32 @32         190     47   221   246     27   266   158     49   247
    32->64 @16         328     98   446   359     57   444   251    102   389
    64->64 @16         457     94   613   426     61   613   306    101   512
    64->128 @8         359    142   626   394     94   488   230    163   322
    128->128 @8        470    157   764   424     87   671   444    171   334
    128->128 @4        263     87   393   228     75   428   161     89   140

Tried and dropped: folding conv1_1's taps into its channels (9·C = 27 of one 32-wide K
block, one tap instead of 9 taps of 32 channels, 29 of them zero). The kernel ran 1.3×
faster (3.1 -> 2.3 ms, the small recipe's conv1_1 at batch 32, one thread), but the folded
layout took 5.7 ms to build against `to_pairs`' 0.5: a layer this thin is bound by its
tile stores and epilogue, not by tdpbf16ps.

The tile kernel alone reached 500-950 GFLOP/s forward at batch 8 (conv1_2 the lowest,
conv3 the highest); what the whole calls lose on top is the bf16 layouts (conv1_2's
`to_pairs` at batch 8: 14 ms of a 67 ms forward), the filter packing (4 ms per call on
512 channels, which small batches feel: conv5 at batch 2) and, at batch 2, the weight
gradient's short sums (512 positions on conv5) against its 9·C·OC outputs.

Training steps, bf16, one thread (shared machine, 2026-12-05): VGG-D at 224, batch 8, by
`profile_step.py --clock cpu --threads 1` (CPU time, load average 2.5-4): 2.47-2.56 s with
"auto" running this kernel for every layer, against 4.6 s with the bf16 im2col path, and
3.24-3.68 s of CPU time for PyTorch under autocast; `bench_step.py --precision bf16
--threads 1 --rounds 2` (wall time, load average 1.5): VGG-D 1.43× PyTorch's images/s
(the two rounds 1.35 and 1.52), the small recipe 1.01× (0.87 and 1.15). The conv layers
are then about two thirds of the step; fc6's backward (the bf16 fc GEMM, not this
kernel) takes 0.3-0.5 s of it. Two threads: too noisy to quote (the same call's wall time
swung 2× from run to run); the 64- and 256-channel layers ran 1.8-2× faster on two
threads when undisturbed, the 512-channel ones about 1.0× (cause not established).

Tried and dropped as well: gy's two bf16 layouts made in one pass, with gW and gx taken
chunk by chunk together: slower (conv1_2's backward at batch 8, 176 ms against 152), its
chunks holding three layouts fit one image where two fit two.
"""

import numpy as np
from numba import njit

from minivgg.kernels.cpu.amx import aligned_empty
from minivgg.kernels.cpu.amx_isa import (TILE_CONFIG, TILE_ELEMENTS, amx_available, ldtilecfg,
                                         tdpbf16ps, tileload, tilerelease, tilestore,
                                         tilezero)
from minivgg.kernels.cpu.bf16 import bf16_bits
from minivgg.kernels.cpu.runtime import JIT, map_ranges, num_threads, workspace

# Positions per block of work: 256 (16 tiles). A block's input (Cp·2 bytes per position,
# plus the 2·Wp + 2 halo) and a 32-channel panel of filters stay in L2 while every panel
# of output channels passes over it.
QBLOCK = 256
TAPS = 9
# Bytes of bf16 layout made at once: a layer runs a chunk of images at a time (`image_chunks`),
# so its transient copies stay small next to the activations (conv1_2's input at batch 8
# would be 52 MB in bf16, 6.5 MB per image).
IMAGE_CHUNK_BYTES = 16 * 2**20


def _ceil_to(a, b):
    return -(-a // b) * b


def spread_row(n):
    """n (a multiple of 16) floats or bf16 pairs per row, plus 16 where n / 16 is even: rows
    of 4-byte values an odd number of 64-byte lines apart fall in different cache sets (see
    `FlatGeometry.L`)."""
    return n + 16 if n // 16 % 2 == 0 else n


class FlatGeometry:
    """The flat padded numbering of an (N, C, H, W) batch (module docstring; Wp = W + 2,
    or W + 3 for an odd W, which keeps it even): Q positions
    computed (a whole number of blocks), L positions stored per channel (Q plus the largest
    shift and one tile of slack, all zeros)."""

    def __init__(self, N, H, W, threads=None):
        self.N, self.H, self.W = N, H, W
        # NOTE: Wp even (one more zero column for an odd W), so every row starts at an even
        # position and the weight gradient's position pairs never straddle two rows
        self.Hp, self.Wp = H + 2, W + 2 + W % 2
        self.plane = self.Hp * self.Wp
        # one past the last output row's padding (`to_position_pairs` writes whole rows)
        last = (N - 1) * self.plane + H * self.Wp
        threads = threads or num_threads()
        self.qblock = min(QBLOCK, _ceil_to(-(-last // threads), 32))
        self.Q = _ceil_to(last, self.qblock)
        # NOTE: L ≡ 32 (mod 64), so the 16 rows of a tile, L·2 or L·4 bytes apart, fall in
        # 16 different sets of the 64-set L1 cache (a multiple of 4 KB apart they would all
        # fall in one set, whose 12 ways cannot hold them)
        self.L = _ceil_to(self.Q + 2 * self.Wp + 2 + 32, 64) + 32

    def shifts(self):
        return np.array([ky * self.Wp + kx for ky in range(3) for kx in range(3)], np.int64)


# ----------------------------------------------------------------------------------------
# Layouts: input as bf16 channel pairs, filters as A tiles
# ----------------------------------------------------------------------------------------

@njit(**JIT)
def _pairs_range(x, xw, Wp, plane, p0, p1):
    """xw[p, q] = the pair (bf16(x[n, 2p, i, j]), bf16(x[n, 2p + 1, i, j])) as one uint32
    (low half first: x86 is little-endian) at the padded position q of (n, i, j), for the
    channel pairs p0..p1-1; zeros on the border, past C and past the last image."""
    N, C, H, W = x.shape
    for p in range(p0, p1):
        xw[p] = 0
        c0, c1 = 2 * p, 2 * p + 1
        if c0 >= C:
            continue
        for n in range(N):
            for i in range(H):
                base = n * plane + (i + 1) * Wp + 1
                # NOTE: through 1-D row views: indexing the 4-D and 2-D arrays in the loop
                # ran 3.6x slower (a 64 x 224 x 224 copy, one thread)
                dst, low = xw[p, base:base + W], x[n, c0, i]
                if c1 < C:
                    high = x[n, c1, i]
                    for j in range(W):
                        dst[j] = (np.uint32(bf16_bits(low[j]))
                                  | np.uint32(bf16_bits(high[j])) << 16)
                else:
                    for j in range(W):
                        dst[j] = np.uint32(bf16_bits(low[j]))


def to_pairs(x, geometry):
    """x (N, C, H, W) float -> xq (Cp/2, L, 2) uint16: bf16 channel pairs, padded, flat."""
    C = x.shape[1]
    Cp = _ceil_to(C, 32)
    xq = np.empty((Cp // 2, geometry.L, 2), np.uint16)
    xw = xq.view(np.uint32)[..., 0]
    x = np.ascontiguousarray(x, np.float32)
    g = geometry
    map_ranges(lambda p0, p1: _pairs_range(x, xw, g.Wp, g.plane, p0, p1), Cp // 2,
               elements=xq.size)
    return xq


@njit(**JIT)
def _pack_filters(W, out, rotate, r0, r1):
    """out[o, 3ky + kx, kb, i, k] = bf16(W[16o + i, 32kb + k, ky, kx]) (`out` comes zeroed:
    zeros around W), in W's order; with `rotate`, of the input gradient's filters
    W'[c, oc, ky, kx] = W[oc, c, 2 - ky, 2 - kx] instead (`rotated_filters`, not copied);
    the tile rows r0..r1-1 (W's oc, or its c when rotated)."""
    OC, C = W.shape[0], W.shape[1]
    # NOTE: the outer loop runs over the packed tiles' rows (W's oc, or its c when rotated),
    # so the writes go to one tile row after another; the reads are W's 9 taps, together
    for r in range(r0, r1):
        for m in range(OC if rotate else C):
            a, b = (m, r) if rotate else (r, m)  # W[a, b] lands in row r, column m
            o, i, kb, k = r // 16, r % 16, m // 32, m % 32
            for tap in range(TAPS):
                source = TAPS - 1 - tap if rotate else tap
                out[o, tap, kb, i, k] = bf16_bits(W[a, b, source // 3, source % 3])


def pack_filters(W, rotate=False):
    """W (OC, C, 3, 3) -> (OCt, 9, Kb, 16, 32) uint16: A tile (o, tap, kb) holds
    bf16(W[16o + i, 32kb + k, ky, kx]), zeros past OC and C; tap = 3·ky + kx. With
    `rotate`, the tiles of `rotated_filters(W)`."""
    OC, C = W.shape[:2]
    if rotate:
        OC, C = C, OC
    out = aligned_empty((_ceil_to(OC, 16) // 16, TAPS, _ceil_to(C, 32) // 32, 16, 32),
                        np.uint16)
    out[...] = 0
    W = np.ascontiguousarray(W, np.float32)
    map_ranges(lambda r0, r1: _pack_filters(W, out, rotate, r0, r1), OC, elements=W.size)
    return out


def rotated_filters(W):
    """The filters of the input gradient: W'[c, oc, ky, kx] = W[oc, c, 2 - ky, 2 - kx]
    (what `pack_filters(W, rotate=True)` packs)."""
    return np.ascontiguousarray(np.asarray(W).transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])


# ----------------------------------------------------------------------------------------
# The kernel: 2 × 2 C tiles (32 channels × 32 positions) over all taps and channel blocks
# ----------------------------------------------------------------------------------------

@njit(**JIT)
def _tile_pair_sum(wt, xq, shifts, o, qt, two_m):
    """C tiles 0-3 = the sums of output channel tiles o, o+1 (o+1 only if two_m) at the
    positions qt..qt+31, over (tap, kb) in that order (the module docstring's GEMM)."""
    Kb = wt.shape[2]
    L = xq.shape[1]
    b_stride = L * 4                 # bytes between channel pairs in xq
    next_m = TAPS * Kb * TILE_ELEMENTS  # A tile (o+1, tap, kb) is this far on
    tilezero(0)
    tilezero(1)
    tilezero(2)
    tilezero(3)
    a = o * next_m
    for tap in range(TAPS):
        bq = (qt + shifts[tap]) * 2  # xq[0, qt + s, 0]
        for _ in range(Kb):
            tileload(4, wt, a, 64)
            tileload(6, xq, bq, b_stride)
            tdpbf16ps(0, 4, 6)
            tileload(7, xq, bq + 32, b_stride)  # 16 positions on
            tdpbf16ps(1, 4, 7)
            if two_m:
                tileload(5, wt, a + next_m, 64)
                tdpbf16ps(2, 5, 6)
                tdpbf16ps(3, 5, 7)
            a += TILE_ELEMENTS
            bq += 32 * L                 # 16 channel pairs on
        # (a has walked over this tap's Kb tiles: it now points at the next tap's)


@njit(**JIT)
def _scatter(ybuf, y, b, oc0, noc, q0, q1, Wp, plane):
    """y[n, oc0 + c, oy, ox] = ybuf[c, q - q0] + b[oc0 + c] for the positions q0..q1-1 that
    are outputs, one piece of an output row at a time (contiguous in both)."""
    N, _, H, W = y.shape
    q = q0
    while q < q1:
        n = q // plane
        r = q - n * plane
        oy = r // Wp
        ox = r - oy * Wp
        end = min(q1, q + Wp - ox)     # the end of this padded row
        if n < N and oy < H and ox < W:
            ox_end = min(W, ox + end - q)
            off = q - q0 - ox
            for c in range(noc):
                bias = b[oc0 + c]
                for t in range(ox, ox_end):
                    y[n, oc0 + c, oy, t] = ybuf[c, off + t] + bias
        q = end


@njit(**JIT)
def _conv_blocks(config, wt, xq, shifts, ybuf, y, b, qb, blk0, blk1, Wp, plane):
    """y (NCHW) at the positions of the blocks of qb positions blk0..blk1-1 (ybuf (32, row
    >= qb) fp32 is the thread's scratch): per block, per pair of output channel tiles,
    every 32 positions' sums, stored to ybuf, then copied out with the bias."""
    OCt, OC = wt.shape[0], y.shape[1]
    row = ybuf.shape[1]
    c_stride = row * 4
    ldtilecfg(config)
    for blk in range(blk0, blk1):
        q0 = blk * qb
        for o in range(0, OCt, 2):
            two_m = o + 1 < OCt
            for qt in range(q0, q0 + qb, 32):
                _tile_pair_sum(wt, xq, shifts, o, qt, two_m)
                c = qt - q0
                tilestore(0, ybuf, c, c_stride)
                tilestore(1, ybuf, c + 16, c_stride)
                if two_m:
                    tilestore(2, ybuf, 16 * row + c, c_stride)
                    tilestore(3, ybuf, 16 * row + c + 16, c_stride)
            _scatter(ybuf, y, b, 16 * o, min(32, OC - 16 * o), q0, q0 + qb, Wp, plane)
    tilerelease()


def require_amx():
    """Raise unless this process may run the tiles. NOTE: it must be asked first: without
    Linux's permission (amx_available asks for it) the first tile load is SIGILL."""
    available, reason = amx_available()
    if not available:
        raise RuntimeError(f"AMX is not available: {reason}")


def _run(wt, xq, geometry, out, bias):
    """out (N, OC, H, W) float32 = the convolution of the pairs xq by the tiles wt + bias."""
    require_amx()
    shifts = geometry.shifts()
    qb = geometry.qblock

    def job(blk0, blk1):
        ybuf = workspace("amx_conv_out", (32, spread_row(qb)), np.float32)
        _conv_blocks(TILE_CONFIG, wt, xq, shifts, ybuf, out, bias, qb, blk0, blk1,
                     geometry.Wp, geometry.plane)

    map_ranges(job, geometry.Q // qb)
    return out


def _check(x, W, name):
    if x.ndim != 4 or W.ndim != 4 or W.shape[2:] != (3, 3):
        raise ValueError(f"{name}: expected x (N, C, H, W) and W (OC, C, 3, 3), got "
                         f"{x.shape} and {W.shape}")


def image_chunks(N, per_image_bytes):
    """(n0, n1) ranges of images whose bf16 layouts take at most IMAGE_CHUNK_BYTES (one
    image at least): fixed by the shapes, never by the thread count."""
    step = max(1, IMAGE_CHUNK_BYTES // per_image_bytes)
    return [(n0, min(N, n0 + step)) for n0 in range(0, N, step)]


def layout_bytes(C, H, W):
    """Bytes of one image's bf16 layout with C channels (padded, flat)."""
    return _ceil_to(C, 32) * 2 * (H + 2) * (W + 2 + W % 2)


def _convolve(x, wt, out, bias):
    """out = the convolution of x by the packed tiles wt, + bias, a chunk of images at a
    time (each chunk's pairs made, used and dropped)."""
    N, C, H, W = x.shape
    for n0, n1 in image_chunks(N, layout_bytes(C, H, W)):
        geometry = FlatGeometry(n1 - n0, H, W)
        _run(wt, to_pairs(x[n0:n1], geometry), geometry, out[n0:n1], bias)
    return out


def conv2d_forward_amx(x, W, b):
    """y (N, OC, H, W) float32 = conv(bf16(x), bf16(W)) + b, 3×3/s1/p1, summed in fp32."""
    x, W = np.asarray(x), np.asarray(W)
    _check(x, W, "conv2d_forward_amx")
    N, C, H, Wd = x.shape
    OC = W.shape[0]
    if W.shape[1] != C:
        raise ValueError(f"conv2d_forward_amx: x has {C} channels, W expects {W.shape[1]}")
    bias = np.zeros(OC, np.float32) if b is None else np.asarray(b, np.float32)
    y = np.empty((N, OC, H, Wd), np.float32)
    return _convolve(x, pack_filters(W), y, bias)


def conv2d_input_grad_amx(gy, W):
    """gx (N, C, H, W) float32 of `conv2d_forward_amx`: gy (N, OC, H, W) convolved with
    the rotated, transposed filters (bf16 operands, fp32 sums)."""
    gy, W = np.asarray(gy), np.asarray(W)
    _check(gy, W, "conv2d_input_grad_amx")
    N, OC, H, Wd = gy.shape
    if W.shape[0] != OC:
        raise ValueError(f"conv2d_input_grad_amx: gy has {OC} channels, W makes {W.shape[0]}")
    C = W.shape[1]
    gx = np.empty((N, C, H, Wd), np.float32)
    return _convolve(gy, pack_filters(W, rotate=True), gx, np.zeros(C, np.float32))
