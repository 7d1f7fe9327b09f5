"""The weight gradient of the AMX direct convolution (`blocked_amx.py`, whose docstring
sets out the flat padded positions q and the shifts s = ky·Wp + kx).

    conv2d_weight_grad_amx(x, gy) -> gW (OC, C, 3, 3) float32

**The GEMM.** gW[oc, c, ky, kx] = Σ_q x(q + s)[c] · gy(q)[oc], a product whose reduction runs
over the positions. Per tap, gW_tap^T (C × OC) = X_s (C × positions) @ GY^T (positions × OC):

    A tile: 16 input channels × 32 consecutive positions q+s.., straight from xc
            (`to_channel_rows`: (Cp, L) bf16, each channel's padded flat positions in a
            row, so an A tile is 16 rows of 64 contiguous bytes, L·2 bytes apart: any
            shift s, no copy)
    B tile: 16 position pairs × 16 output channels × 2 bf16 (VNNI), from gyv
            (`to_position_pairs`: (Q/2, OCs, 2) bf16, gy at the output positions and
            zero at the dropped ones, so the dropped positions add exact zeros; a pair
            never straddles two rows, since Wp is even)
    C tile: 16 input channels × 16 output channels of one tap, fp32

Why x as the A side: a shift s moves an A tile by s positions, any s, while a B tile's rows
are *pairs* of positions, which an odd s would split (x as the B side would need a second
copy of x, shifted by one). gy has no shift, so its pairs are always aligned.

**Blocking and order.** Tiles 0-3 hold 2 × 2 C tiles (32 input × 32 output channels of
one tap), 4-5 two A tiles, 6-7 two B tiles. The units (below) are taken a group at a time
(`group_units`: their C tiles, up to 1 MB, stay in L2) and, inside a group, the positions a
chunk at a time (`chunk_positions`: the chunk's gy stays in L2 while the group's units pass
over it, and the chunk's x rows of one unit in L1 while its output channel pairs do);
between chunks the C tiles are stored and reloaded, which is exact. Each C tile sums its
positions in order 0, 32, 64, ... whatever the chunk and group sizes; the batch itself
is taken a chunk of images at a time (`blocked_amx.image_chunks`, 16 MB of bf16 x and gy),
each going on from the sums of the images before. Ungrouped, with the
whole gW (9.4 MB for conv4/5) stored and reloaded at every chunk, the kernel ran at
500-560 GFLOP/s on 128 and 256 channels at batch 8 against 900-1090 grouped (one thread,
CPU time, load average 5; NOTE: on this shared machine the same call's CPU time swung
up to 4× from run to run (the cause is not established: the other processes' use of the
shared caches, or of the host core under this VM): every number here is the fastest of a
few runs).

**gW's layout.** The kernel writes gWt (9, C, OC), tap-major (its C tiles); `_untile_range`
turns it into (OC, C, 3, 3) in a compiled loop (NumPy's transposing copy took 17 ms on
conv5's 9.4 MB, more than the kernel at batch 1).

**Threads.** The output tiles are shared out: units (input channel tile pair, tap), a
contiguous range per thread (`runtime.map_ranges`); a unit's sums are one thread's, over all
positions, in the fixed order: the same bits at any thread count.
"""

import numpy as np
from numba import njit

from minivgg.kernels.cpu.amx_isa import (TILE_CONFIG, ldtilecfg, tdpbf16ps, tileload,
                                         tilerelease, tilestore, tilezero)
from minivgg.kernels.cpu.bf16 import bf16_bits
from minivgg.kernels.cpu.blocked_amx import (TAPS, FlatGeometry, _ceil_to, image_chunks,
                                              layout_bytes, require_amx, spread_row)
from minivgg.kernels.cpu.runtime import JIT, map_ranges

# A chunk of positions: at most CHUNK_POSITIONS, and at most CHUNK_BYTES of gy (bf16); a
# group of units: GROUP_BYTES of their C tiles (fp32). With both in L2, the group's C tiles
# are stored and reloaded there between chunks, and the chunk's gy is read from L2 by every
# unit of the group. NOTE: picked from single-thread probes at batch 8 (2026-12-05, shared
# machine, load average 5): 2048 positions and 1 MB groups ran best on 128 and 256
# channels (900-1090 GFLOP/s against 500-560 ungrouped), 1024 on 512 channels (450-480);
# 256 to 16384 positions were tried.
CHUNK_POSITIONS = 2048
CHUNK_BYTES = 2**20
GROUP_BYTES = 2**20


def chunk_positions(OCp):
    """Positions per chunk (a multiple of 32): see CHUNK_POSITIONS."""
    return max(32, min(CHUNK_POSITIONS, CHUNK_BYTES // (OCp * 2) // 32 * 32))


def group_units(OCw):
    """Units per group: GROUP_BYTES of their C tiles (32 input × OCw output channels)."""
    return max(1, GROUP_BYTES // (32 * OCw * 4))


# ----------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------

@njit(**JIT)
def _rows_range(x, xc, Wp, plane, c0, c1):
    """xc[c, q] = bf16(x[n, c, i, j]) at the padded position q of (n, i, j), for the
    channels c0..c1-1; zeros on the border, past C and past the last image."""
    N, C, H, W = x.shape
    for c in range(c0, c1):
        xc[c] = 0
        if c >= C:
            continue
        for n in range(N):
            for i in range(H):
                base = n * plane + (i + 1) * Wp + 1
                dst, src = xc[c, base:base + W], x[n, c, i]  # 1-D views: see _pairs_range
                for j in range(W):
                    dst[j] = bf16_bits(src[j])


def to_channel_rows(x, geometry):
    """x (N, C, H, W) float -> xc (Cp, L) uint16, Cp = C rounded up to 16."""
    Cp = _ceil_to(x.shape[1], 16)
    xc = np.empty((Cp, geometry.L), np.uint16)
    x = np.ascontiguousarray(x, np.float32)
    g = geometry
    map_ranges(lambda c0, c1: _rows_range(x, xc, g.Wp, g.plane, c0, c1), Cp,
               elements=xc.size)
    return xc


@njit(**JIT)
def _position_pairs_range(gy, gyw, Wp, plane, r0, r1):
    """gyw[q // 2, oc] = the pair (bf16 gy at q, bf16 gy at q + 1) as one uint32 for the
    padded rows of the output rows r = n·H + oy in r0..r1-1 (q = n·plane + oy·Wp + ox,
    even at ox = 0 since Wp and plane are even; zero past W). The rows of 16 channels are
    rounded into `rows` first, then written a position pair (64 bytes) at a time."""
    N, OC, H, W = gy.shape
    rows = np.zeros((16, Wp), np.uint32)   # columns W.. stay zero
    for r in range(r0, r1):
        n, oy = r // H, r % H
        h0 = (n * plane + oy * Wp) // 2
        for oc0 in range(0, gyw.shape[1], 16):
            for k in range(16):
                row = rows[k]
                if oc0 + k < OC:
                    src = gy[n, oc0 + k, oy]
                    for ox in range(W):
                        row[ox] = bf16_bits(src[ox])
                else:
                    row[:W] = 0
            for h in range(Wp // 2):
                dst = gyw[h0 + h, oc0:oc0 + 16]
                for k in range(16):
                    dst[k] = rows[k, 2 * h] | rows[k, 2 * h + 1] << 16


def to_position_pairs(gy, geometry):
    """gy (N, OC, H, W) float -> gyv (Q/2, OCs, 2) uint16, OCs = OC rounded up to 16 (and
    `spread_row`), zero at every position that is not an output and past OC."""
    N, OC, H, W = gy.shape
    g = geometry
    gyv = np.empty((g.Q // 2, spread_row(_ceil_to(OC, 16)), 2), np.uint16)
    gyw = gyv.view(np.uint32)[..., 0]
    for n in range(N):  # the 2 padding rows under each image, and the end
        gyw[(n * g.plane + H * g.Wp) // 2:(n + 1) * g.plane // 2 if n + 1 < N else None] = 0
    gy = np.ascontiguousarray(gy, np.float32)
    map_ranges(lambda r0, r1: _position_pairs_range(gy, gyw, g.Wp, g.plane, r0, r1),
               N * H, elements=gy.size)
    return gyv


# ----------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------

@njit(**JIT)
def _tile_pair_grad(xc, gyv, gwt, m, n, s, tap, k0, k1, two_m, two_n, first):
    """C tiles (m, n), (m, n+1), (m+1, n), (m+1, n+1) of gW_tap^T += the positions k0..k1-1
    (from zero when `first` and k0 == 0, else reloaded from gwt (9, Cw, OCw) fp32), and
    stored back."""
    L, OCp = xc.shape[1], gyv.shape[1]
    Cw, OCw = gwt.shape[1], gwt.shape[2]    # whole pairs of tiles
    a_stride, b_stride, c_stride = L * 2, OCp * 4, OCw * 4
    c0 = (tap * Cw + 16 * m) * OCw + 16 * n
    c2 = c0 + 16 * OCw
    if first and k0 == 0:
        tilezero(0)
        tilezero(1)
        tilezero(2)
        tilezero(3)
    else:
        tileload(0, gwt, c0, c_stride)
        tileload(1, gwt, c0 + 16, c_stride)
        tileload(2, gwt, c2, c_stride)
        tileload(3, gwt, c2 + 16, c_stride)
    a = 16 * m * L + k0 + s                 # xc[16m, k0 + s]
    b = (k0 // 2 * OCp + 16 * n) * 2        # gyv[k0 / 2, 16n, 0]
    for _ in range(k0, k1, 32):
        tileload(4, xc, a, a_stride)
        tileload(6, gyv, b, b_stride)
        tdpbf16ps(0, 4, 6)
        if two_n:
            tileload(7, gyv, b + 32, b_stride)
            tdpbf16ps(1, 4, 7)
        if two_m:
            tileload(5, xc, a + 16 * L, a_stride)
            tdpbf16ps(2, 5, 6)
            if two_n:
                tdpbf16ps(3, 5, 7)
        a += 32
        b += 32 * OCp                     # 16 position pairs on
    tilestore(0, gwt, c0, c_stride)
    tilestore(1, gwt, c0 + 16, c_stride)
    tilestore(2, gwt, c2, c_stride)
    tilestore(3, gwt, c2 + 16, c_stride)


@njit(**JIT)
def _grad_units(config, xc, gyv, gwt, shifts, Nt, u0, u1, chunk, group, first):
    """The units u0..u1-1 (u = 9·(input tile pair) + tap) of gwt over all positions:
    `group` units at a time (their C tiles stay in L2), a chunk of positions at a time
    (the chunk's gy stays in L2 while the group's units pass over it); `first`: these are
    the first images, so the C tiles start from zero (else from gwt, the sums over the
    images before). NOTE: tiles past the
    last input or output channel tile are computed from zeros (two_m / two_n skip their
    multiplies) and stored into gwt's padding, which the caller drops."""
    Q = 2 * gyv.shape[0]
    Mt = xc.shape[0] // 16   # input channel tiles (Nt: output channel tiles)
    ldtilecfg(config)
    for g0 in range(u0, u1, group):
        for k0 in range(0, Q, chunk):
            k1 = min(k0 + chunk, Q)
            for u in range(g0, min(g0 + group, u1)):
                m, tap = 2 * (u // TAPS), u % TAPS
                for n in range(0, Nt, 2):
                    _tile_pair_grad(xc, gyv, gwt, m, n, shifts[tap], tap, k0, k1,
                                    m + 1 < Mt, n + 1 < Nt, first)
    tilerelease()


@njit(**JIT)
def _untile_range(gwt, gW, c0, c1):
    """gW[oc, c, tap] = gwt[tap, c, oc] for the input channels c0..c1-1: per channel, the
    9 rows of gwt read side by side and each output channel's 9 taps written together
    (NOTE: NumPy's transposing copy of conv5's 9.4 MB took 17 ms, one thread)."""
    OC = gW.shape[0]
    for c in range(c0, c1):
        for oc in range(OC):
            for tap in range(TAPS):
                gW[oc, c, tap] = gwt[tap, c, oc]


def conv2d_weight_grad_amx(x, gy):
    """gW (OC, C, 3, 3) float32 = Σ over the batch and positions of bf16(x) ⊗ bf16(gy),
    3×3/s1/p1, summed in fp32 (module docstring), a chunk of images at a time
    (`blocked_amx.image_chunks`): every C tile goes on from its sums over the chunks before."""
    x, gy = np.asarray(x), np.asarray(gy)
    if x.ndim != 4 or gy.ndim != 4 or x.shape[0] != gy.shape[0] or x.shape[2:] != gy.shape[2:]:
        raise ValueError(f"conv2d_weight_grad_amx: x {x.shape} and gy {gy.shape} must be "
                         f"(N, C, H, W) and (N, OC, H, W)")
    require_amx()
    N, C, H, W = x.shape
    OC = gy.shape[1]
    Cp, OCp = _ceil_to(C, 16), _ceil_to(OC, 16)
    # room for whole 2 x 2 blocks of tiles: one more tile of each when the count is odd
    gwt = np.empty((TAPS, _ceil_to(Cp, 32), spread_row(_ceil_to(OCp, 32))), np.float32)
    units = TAPS * (_ceil_to(Cp, 32) // 32)
    chunk, group = chunk_positions(OCp), group_units(gwt.shape[2])
    per_image = layout_bytes(C, H, W) + layout_bytes(OC, H, W)
    for n0, n1 in image_chunks(N, per_image):
        geometry = FlatGeometry(n1 - n0, H, W)
        xc, gyv = to_channel_rows(x[n0:n1], geometry), to_position_pairs(gy[n0:n1], geometry)
        shifts, first = geometry.shifts(), n0 == 0
        map_ranges(lambda u0, u1: _grad_units(TILE_CONFIG, xc, gyv, gwt, shifts, OCp // 16,
                                              u0, u1, chunk, group, first), units)
    gW = np.empty((OC, C, TAPS), np.float32)
    map_ranges(lambda c0, c1: _untile_range(gwt, gW, c0, c1), C, elements=gW.size)
    return gW.reshape(OC, C, 3, 3)
