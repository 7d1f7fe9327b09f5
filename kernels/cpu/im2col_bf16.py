"""im2col straight into packed bf16 tiles: the conv layers' right-hand GEMM operand under
bf16, made where it is produced instead of as a float32 matrix that is then rounded and
packed (`amx.pack_b`), which wrote and re-read the 16 MB chunk once more.

A chunk's im2col matrix cols (CKK, P) (kernels/common.py) is the B operand of two GEMMs:

    forward          y    = W @ cols        B = cols    (K = CKK, N = P)
    weight gradient  gW   = gy @ cols^T     B = cols^T  (K = P,   N = CKK)

`im2col_operand` writes either as a `Packed` B (amx.py: VNNI pairs of K rows), a strip of
columns at a time: each row piece of cols is first copied (as `conv._im2col_same_chunk`
copies it, in cache) into a small buffer, then rounded and interleaved into the tiles. For
"same" stride-1 convolutions (every VGG layer) only; the rest go through `im2col_chunk` and
`pack_b`. The plain definition it is tested against: `amx.pack_b(cols)` and
`amx.pack_b(cols.T)` of the float32 cols (tests/test_bf16.py).
"""

import numpy as np
from numba import njit

from minivgg.kernels.cpu.amx import Packed
from minivgg.kernels.cpu.amx_isa import TILE_K, TILE_N
from minivgg.kernels.cpu.bf16 import bf16_bits
from minivgg.kernels.cpu.flat_copy import flat_span, wrapped_columns
from minivgg.kernels.cpu.runtime import JIT, workspace

# Column tiles per strip of `_im2col_packed_b`: 128 (2048 columns, 8 KB per row piece; the
# strip's tiles of one K block, 128 KB, stay in L2). Each row piece costs a fixed set-up, so
# wider strips win; 32 (amx.PACK_B_TILES) was slower than im2col + pack_b.
STRIP_TILES = 128


@njit(**JIT)
def _row_piece(xf, n0, oy0, oy1, r, KH, KW, PH, PW, H, W, col0, col1, dst):
    """dst[:col1 - col0] = cols[r, col0:col1], cols the chunk's im2col matrix (images
    n0.., output rows oy0..oy1-1 of each), 0 for r past the last row; flat copies as in
    `conv._im2col_same_chunk`, whose row r this is a piece of."""
    if r >= xf.shape[1] * KH * KW:
        dst[:col1 - col0] = 0
        return
    KK = KH * KW
    c, ky, kx = r // KK, (r % KK) // KW, r % KW
    block = (oy1 - oy0) * W
    _, _, shift, lo, hi = flat_span(oy0, oy1, ky, kx, PH, PW, H, W)
    ox_lo, ox_hi = wrapped_columns(kx, PW, W)
    col = col0
    while col < col1:
        i = col // block
        q0, q1 = col - i * block, min(block, col1 - i * block)
        d = col - col0 - q0  # dst[q + d] holds column q of image i
        s, e = min(max(q0, lo), q1), max(min(q1, hi), q0)
        dst[q0 + d:s + d] = 0
        if e > s:
            dst[s + d:e + d] = xf[n0 + i, c, s + shift:e + shift]
        dst[max(s, e) + d:q1 + d] = 0
        for q in range(q0 - q0 % W, q1, W):  # the wrapped columns of each output row
            for ox in range(ox_lo):
                if q0 <= q + ox < q1:
                    dst[q + ox + d] = 0
            for ox in range(ox_hi, W):
                if q0 <= q + ox < q1:
                    dst[q + ox + d] = 0
        col = (i + 1) * block


@njit(**JIT)
def _interleave(low, high, pairs, s0, s1, kb, p):
    """Row p of the tiles [s0:s1, kb]: the VNNI pairs (low[q], high[q]), rounded to bf16.
    NOTE: a function of its own: inlined into `_im2col_packed_b`'s loops it ran about 1.5× slower
    (one thread, conv1_2's chunk)."""
    for n in range(s0, s1):
        j0 = (n - s0) * TILE_N
        for j in range(TILE_N):
            pairs[n, kb, p, j] = (np.uint32(bf16_bits(low[j0 + j]))
                                  | (np.uint32(bf16_bits(high[j0 + j])) << np.uint32(16)))


@njit(**JIT)
def _im2col_packed_b(xf, n0, oy0, oy1, KH, KW, PH, PW, H, W, P, pairs):
    """pairs (Nt, Kb, 16, 16) uint32: `Packed` B of cols, a strip of STRIP_TILES column
    tiles at a time; per pair of K rows, two row pieces then one interleaving pass."""
    Nt, Kb = pairs.shape[0], pairs.shape[1]
    width = STRIP_TILES * TILE_N
    low, high = np.empty(width, np.float32), np.empty(width, np.float32)
    for s0 in range(0, Nt, STRIP_TILES):
        s1 = min(s0 + STRIP_TILES, Nt)
        col0, col1 = s0 * TILE_N, min(s1 * TILE_N, P)
        low[:] = 0  # the padding columns past P stay 0
        high[:] = 0
        for kb in range(Kb):
            for p in range(TILE_K // 2):
                r = kb * TILE_K + 2 * p
                _row_piece(xf, n0, oy0, oy1, r, KH, KW, PH, PW, H, W, col0, col1, low)
                _row_piece(xf, n0, oy0, oy1, r + 1, KH, KW, PH, PW, H, W, col0, col1, high)
                _interleave(low, high, pairs, s0, s1, kb, p)


@njit(**JIT)
def _im2col_packed_bt(xf, n0, oy0, oy1, KH, KW, PH, PW, H, W, P, pairs):
    """pairs (Nt, Kb, 16, 16) uint32: `Packed` B of cols^T. Tile column j of tile n is row
    16n + j of cols, whose neighbours along P are the VNNI pairs: 16 whole rows rounded into
    `rows`, then each tile's 16 x 16 pairs transposed out of it (as `amx._pack_b_rows`)."""
    Nt, Kb = pairs.shape[0], pairs.shape[1]
    piece = np.zeros(Kb * TILE_K, np.float32)  # past P: zero
    rows = np.empty((TILE_N, Kb * TILE_K), np.uint16)
    rows_pairs = rows.view(np.uint32)  # (16, Kb * 16): pair q of row j at [j, q]
    for n in range(Nt):
        for j in range(TILE_N):
            _row_piece(xf, n0, oy0, oy1, n * TILE_N + j, KH, KW, PH, PW, H, W, 0, P, piece)
            for k in range(Kb * TILE_K):
                rows[j, k] = bf16_bits(piece[k])
        for kb in range(Kb):
            for p in range(TILE_K // 2):
                for j in range(TILE_N):
                    pairs[n, kb, p, j] = rows_pairs[j, kb * (TILE_K // 2) + p]


def im2col_operand(x, n0, n1, oy0, oy1, KH, KW, PH, PW, transposed):
    """The chunk's cols (or cols^T with `transposed`) as a `Packed` B operand, rounded to
    bf16, from x (N, C, H, W) float32, for a "same" stride-1 convolution
    (`conv.flat_copy_applies`). Runs on the calling thread (a pool job); the tiles live in
    this thread's workspace until its next call."""
    N, C, H, W = x.shape
    CKK, P = C * KH * KW, (n1 - n0) * (oy1 - oy0) * W
    K, cols = (P, CKK) if transposed else (CKK, P)
    shape = (-(-cols // TILE_N), -(-K // TILE_K), TILE_K // 2, TILE_N, 2)
    # NOTE: a workspace, as the float32 cols it replaces (a fresh 8 MB array per chunk costs
    # its page faults), started on a cache line (amx.aligned_empty says why)
    nbytes = int(np.prod(shape)) * 2
    raw = workspace("bf16_cols", (nbytes + 64,), np.uint8)
    start = -raw.ctypes.data % 64
    tiles = raw[start:start + nbytes].view(np.uint16).reshape(shape)
    pairs = tiles.view(np.uint32)[..., 0]
    xf = np.ascontiguousarray(x).reshape(N, C, H * W)
    kernel = _im2col_packed_bt if transposed else _im2col_packed_b
    kernel(xf, n0, oy0, oy1, KH, KW, PH, PW, H, W, P, pairs)
    return Packed("B", tiles, K, cols)
