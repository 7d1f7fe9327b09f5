"""The fc layers' bf16 GEMMs at small batch, forward x W.T and input gradient gy W: the
weights rounded and packed a small block at a time, in cache, and multiplied at once (issue
23), so W is read once as float32 and no packed copy of it is ever made.

**Why.** In fc6 (W: 4096 x 25088) at batch 8 or 32 the left operand is a few rows (x, or
the output gradient gy) and the right one is W.T or W. `gemm_bf16` packs all of B before
it multiplies (`fc_matmul` in column blocks of FC_PACK_BYTES): it reads W's 411 MB, writes
205 MB of tiles, and the kernel reads them back, each B tile feeding one tdpbf16ps at batch
8. Packing was most of the time. Single-thread CPU time (time.thread_time, min of 3-5), ms,
fc6 at batch 8 / 32, before this module (load 0.9):

    forward, bf16:  68 / 72   of which pack_b(W.T) alone 50;   fp32 (NumPy's BLAS): 77 / 111
    gx, bf16:      153 / 157  of which pack_b(W) alone 97;     fp32:                81 / 91

(`_pack_b_tiles` reads W down 512-column strips, 2 KB of two rows at a time.) The floor
for reading W once is about 27 ms (`W.max()`); rounding it two rows at a time into a small
buffer, 31 ms.

**gx = gy W** (B = W, rows contiguous; `_stream_columns`). A (gy) is packed once, cut in K
blocks of `STREAM_K_TILES` tiles. The output's columns are cut in strips of
`STREAM_N_TILES` tiles; each thread takes a contiguous range of strips and, per strip, for
each K block in order, rounds that block of W into its buffer (`_pack_rows_at`: a VNNI pair
row is two rows of W side by side, written in the order they are read) and multiplies it
into the strip's C tiles (`_tile_block_at`, B tiles loaded with the buffer's row stride).
Measured while choosing (fc6, batch 8, load 2.5): block 4 x 128 tiles 59 ms; 8 x 64: 60;
2 x 256: 63; 1 x 512: 68. Writing the same block as whole tiles (`amx._pack_b_tiles`'
layout, 64-byte rows scattered 8 KB apart) and rounding through `bf16_bits` (a float32
bitcast and a uint16 round trip, against `_bf16_of_bits` on uint32): 73-80.

**forward x W.T** (B = W.T, W's rows along K; `_stream_rows`). Computed as its transpose
W x.T: W's rows are the A operand, and an A tile row is 32 consecutive values of one row of
W, so `_round_rows_at` just rounds ROW_TILES x 16 whole rows of W into a buffer (1.6 MB for
fc6) that the kernel reads as A tiles with its row stride; x.T is packed once. Measured
(fc6, batch 8 / 32, load 2.8-3.0): 2 x 16 rows, all of K at once: 45-50 / 51-55 ms;
1 x 16: 54 / 67; 4 x 16: 58 / 50; K in blocks of 512 or 392 tiles: 65-73. The same
stream writing whole A tiles (rows scattered 1 KB apart) took 95-120.

The weight gradient gy.T x (K = batch, 4096 rows on the left) keeps `gemm_bf16`: fc6 43 ms
against BLAS's 80-100 (on rounded operands too), its cost the 411 MB fp32 output either
way; fc7 15-19 against 15 (load 3).

**Same bits as `gemm_bf16`.** Each C tile sums its K tiles 0, 1, ... in order, its running
sums stored to C and reloaded between K blocks (exact, fp32), as `_gemm_tiles` does past
BLOCK_K; and tdpbf16ps's sum for one output is the same sequence of (exact) products
whichever operand is A (Intel SDM's pseudo-code), so the transposed forward gives the same
bits too. Bit for bit `gemm_bf16`, at any thread count (each C tile is one thread's) and
any block sizes: tests/test_amx_stream.py checks all three.
"""

import numpy as np
from numba import njit

from minivgg.kernels.cpu.amx import _as_matrix, aligned_empty, pack_a, pack_b
from minivgg.kernels.cpu.amx_isa import (TILE_CONFIG, TILE_ELEMENTS, TILE_K, TILE_M, TILE_N,
                                         amx_available, ldtilecfg, tdpbf16ps, tileload,
                                         tilerelease, tilestore, tilezero)
from minivgg.kernels.cpu.runtime import JIT, map_ranges

# K tiles per block (128 of K) and column tiles per strip (2048 columns): a strip's block
# of packed B is 4 x 128 tiles of 1 KB = 512 KB, a quarter of a core's 2 MB L2.
STREAM_K_TILES = 4
STREAM_N_TILES = 128
# The forward's blocks of W (B = W.T): tiles of 16 rows of W by K tiles per block; fc6's
# whole rows (784 K tiles) in one block, 32 x 25088 bf16 = 1.6 MB, in a core's 2 MB L2.
ROW_TILES = 2
ROW_K_TILES = 1024
# `matmul.fc_matmul` streams B when A has at most this many rows (fc layers at small batch).
STREAM_MAX_M = 64


def _ceil_div(a, b):
    return -(-a // b)


@njit(**JIT)
def _bf16_of_bits(u):
    """`bf16.bf16_bits` on a float32's bits as uint32 (the result in the low half): the same
    rounding, to nearest even, NaNs kept quiet NaNs. On uint32 throughout it runs about
    1.5x faster in `_pack_rows_at` than the float32 bitcast and uint16 round trip."""
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    quiet_nan = (u >> np.uint32(16)) | np.uint32(0x0040)
    return quiet_nan if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else rounded


@njit(**JIT)
def _pack_rows_at(U, k0, k1, j0, j1, rows):
    """rows (kbk, 16, 16 ns) uint32 = B[k0:k1, j0:j1] rounded to bf16 in VNNI pairs, row p
    of K tile kb holding B[k, j] (low half) and B[k + 1, j] (high), k = k0 + 32 kb + 2 p,
    for every column j of the strip side by side: B tile n is rows[kb, :, 16 n:16 n + 16],
    loaded with a stride of 64 ns bytes (`_tile_block_at`). Zero past k1 and j1.
    U: B's float32 bits (B.view(np.uint32)), B (K, N).

    NOTE: written row by row, in the order B is read, two rows of B at a time (tiles
    written whole, `amx._pack_b_tiles`' layout, scatter 64-byte rows 8 KB apart).
    """
    kbk = rows.shape[0]
    w = j1 - j0
    for kb in range(kbk):
        for p in range(TILE_K // 2):
            k = k0 + kb * TILE_K + 2 * p
            dst = rows[kb, p]
            if k + 1 < k1:
                low, high = U[k, j0:j1], U[k + 1, j0:j1]
                for j in range(w):
                    dst[j] = _bf16_of_bits(low[j]) | (_bf16_of_bits(high[j]) << np.uint32(16))
            elif k < k1:
                low = U[k, j0:j1]
                for j in range(w):
                    dst[j] = _bf16_of_bits(low[j])
            else:
                dst[:w] = 0
            dst[w:] = 0


@njit(**JIT)
def _tile_block_at(A, a, a_next, a_step, a_stride, B, b, b_next, b_step, b_stride, C, m, n,
                   two_m, two_n, kbq, first):
    """`amx._tile_block` with the tiles anywhere: C tiles [m, n], [m, n+1], [m+1, n],
    [m+1, n+1] (+)= A tiles [m], [m+1] @ B tiles [n], [n+1] over kbq K tiles in order.

    A tile [m] starts at A.flat[a] (A tile [m+1] a_next elements on, the next K tile
    a_step on), its rows a_stride bytes apart; B likewise. C (16 Mt, 16 Nt) float32,
    C-contiguous; first: the C tiles start from zero, else from C.
    """
    stride = C.shape[1] * 4
    c0 = m * TILE_M * C.shape[1] + n * TILE_N
    c2 = c0 + TILE_M * C.shape[1]
    if first:
        tilezero(0)
        tilezero(1)
        tilezero(2)
        tilezero(3)
    else:
        tileload(0, C, c0, stride)
        if two_n:
            tileload(1, C, c0 + TILE_N, stride)
        if two_m:
            tileload(2, C, c2, stride)
            if two_n:
                tileload(3, C, c2 + TILE_N, stride)
    for _ in range(kbq):
        tileload(4, A, a, a_stride)
        tileload(6, B, b, b_stride)
        tdpbf16ps(0, 4, 6)
        if two_n:
            tileload(7, B, b + b_next, b_stride)
            tdpbf16ps(1, 4, 7)
        if two_m:
            tileload(5, A, a + a_next, a_stride)
            tdpbf16ps(2, 5, 6)
            if two_n:
                tdpbf16ps(3, 5, 7)
        a += a_step
        b += b_step
    tilestore(0, C, c0, stride)
    if two_n:
        tilestore(1, C, c0 + TILE_N, stride)
    if two_m:
        tilestore(2, C, c2, stride)
        if two_n:
            tilestore(3, C, c2 + TILE_N, stride)


@njit(**JIT)
def _stream_columns(config, a_blocks, U, rows, C, out, s0, s1):
    """out[:, strips s0..s1-1] = A @ B on this thread, one strip and K block at a time.

    a_blocks (Q, Mt, kbk, 16, 32): A's `pack_a` tiles cut in Q blocks of kbk K tiles (the
    last padded with zero tiles, never multiplied). U (K, N): B's float32 bits. rows (kbk, 16,
    16 ns): this thread's buffer for one block of B (`_pack_rows_at`); C (16 Mt, 16 ns) float32.
    """
    M, N = out.shape
    K = U.shape[0]
    Q, Mt, kbk = a_blocks.shape[0], a_blocks.shape[1], a_blocks.shape[2]
    width = rows.shape[2]  # columns per strip
    ldtilecfg(config)
    for s in range(s0, s1):
        j0 = s * width
        j1 = min(j0 + width, N)
        ns = (j1 - j0 + TILE_N - 1) // TILE_N
        for q in range(Q):
            k0 = q * kbk * TILE_K
            k1 = min(k0 + kbk * TILE_K, K)
            _pack_rows_at(U, k0, k1, j0, j1, rows)
            kbq = (k1 - k0 + TILE_K - 1) // TILE_K
            a_tiles = a_blocks[q]
            for n in range(0, ns, 2):  # B tile n: 16 n pairs along each row of `rows`
                for m in range(0, Mt, 2):
                    _tile_block_at(a_tiles, m * kbk * TILE_ELEMENTS, kbk * TILE_ELEMENTS,
                                   TILE_ELEMENTS, 64, rows, n * TILE_N, TILE_N,
                                   TILE_K // 2 * width, width * 4, C, m, n, m + 1 < Mt,
                                   n + 1 < ns, kbq, q == 0)
        for i in range(M):
            for j in range(j1 - j0):
                out[i, j0 + j] = C[i, j]
    tilerelease()


@njit(**JIT)
def _round_rows_at(U, i0, i1, k0, k1, arows):
    """arows (16 ms, 32 kbk) uint16 = S[i0:i1, k0:k1] rounded to bf16, zero past i1 and
    k1: A tiles of `_stream_rows`, tile [m, kb] at arows[16 m, 32 kb], rows 64 kbk bytes
    apart. U: S's float32 bits. Each row of S is read and written in one contiguous run."""
    w = k1 - k0
    for r in range(arows.shape[0]):
        dst = arows[r]
        if i0 + r < i1:
            src = U[i0 + r, k0:k1]
            for k in range(w):
                dst[k] = np.uint16(_bf16_of_bits(src[k]))
            dst[w:] = 0
        else:
            dst[:] = 0


@njit(**JIT)
def _stream_rows(config, b_blocks, U, arows, C, out, s0, s1):
    """out[:, strips s0..s1-1] = A @ S.T on this thread, computed as its transpose S @ A.T:
    S's rows (W's, out's columns) rounded a block at a time into `arows` as A tiles.

    b_blocks (Q, Nt, kbk, 16, 16, 2): A.T's `pack_b` tiles cut in K blocks (zero tiles past
    the end, never multiplied). U (N, K): S's float32 bits. arows (16 ms, 32 kbk) uint16;
    C (16 ms, 16 Nt) float32.
    """
    M, N = out.shape
    K = U.shape[1]
    Q, Nt, kbk = b_blocks.shape[0], b_blocks.shape[1], b_blocks.shape[2]
    height, length = arows.shape[0], arows.shape[1]  # rows of S per strip, K per block
    ldtilecfg(config)
    for s in range(s0, s1):
        i0 = s * height
        i1 = min(i0 + height, N)
        ms = (i1 - i0 + TILE_M - 1) // TILE_M
        for q in range(Q):
            k0 = q * length
            k1 = min(k0 + length, K)
            _round_rows_at(U, i0, i1, k0, k1, arows)
            kbq = (k1 - k0 + TILE_K - 1) // TILE_K
            b_tiles = b_blocks[q]
            for m in range(0, ms, 2):  # A tile m: 16 rows of `arows` from row 16 m
                for n in range(0, Nt, 2):
                    _tile_block_at(arows, m * TILE_M * length, TILE_M * length, TILE_K,
                                   length * 2, b_tiles, n * kbk * TILE_ELEMENTS,
                                   kbk * TILE_ELEMENTS, TILE_ELEMENTS, 64, C, m, n,
                                   m + 1 < ms, n + 1 < Nt, kbq, q == 0)
        for i in range(M):
            for j in range(i1 - i0):
                out[i, i0 + j] = C[j, i]
    tilerelease()


def _k_blocked(a_tiles, kbk):
    """`Packed` tiles (T, Kb, ...) as (Q, T, kbk, ...), Q = ceil(Kb / kbk): block q holds
    K tiles q kbk ... (q + 1) kbk - 1, zero tiles past Kb."""
    T, Kb = a_tiles.shape[:2]
    Q = _ceil_div(Kb, kbk)
    blocks = aligned_empty((Q, T, kbk) + a_tiles.shape[2:], np.uint16)
    for q in range(Q):
        count = min(kbk, Kb - q * kbk)
        blocks[q, :, :count] = a_tiles[:, q * kbk:q * kbk + count]
        blocks[q, :, count:] = 0
    return blocks


def gemm_stream(A, B, k_tiles=STREAM_K_TILES, n_tiles=STREAM_N_TILES, row_k_tiles=ROW_K_TILES,
                row_tiles=ROW_TILES, parallel=True):
    """C (M, N) float32 = bf16(A) @ bf16(B) on AMX, bit for bit `amx.gemm_bf16(A, B)`, with B
    packed a block at a time (see the module docstring). A (M, K), B (K, N) float32, either
    may be a transposed view; M small (the batch). Needs AMX (`amx_available()`).
    k_tiles x n_tiles: the block of B packed at once, in tiles, where B's rows are
    contiguous (gy W); row_tiles x row_k_tiles: the block of S where B = S.T with S's rows
    contiguous (x W.T), computed as (S A.T).T. They do not change the bits.
    """
    available, reason = amx_available()
    if not available:  # NOTE: without Linux's permission the first tile load is SIGILL
        raise RuntimeError(f"AMX is not available: {reason}")
    A, B = _as_matrix(A, "A"), _as_matrix(B, "B")
    (M, K), N = A.shape, B.shape[1]
    if B.shape[0] != K:
        raise ValueError(f"gemm_stream: A is {M}x{K} but B is {B.shape[0]}x{N}")
    out = np.empty((M, N), np.float32)
    Kb, Nt = _ceil_div(K, TILE_K), _ceil_div(N, TILE_N)  # no block larger than the matrix
    k_tiles, row_k_tiles = min(k_tiles, Kb), min(row_k_tiles, Kb)
    n_tiles, row_tiles = min(n_tiles, Nt), min(row_tiles, Nt)
    if B.strides[0] == B.itemsize and N > 1:  # B = S.T, S's rows contiguous: the forward
        U = B.T.view(np.uint32)
        b_blocks = _k_blocked(pack_b(A.T, parallel=parallel).tiles, row_k_tiles)
        strips = _ceil_div(N, row_tiles * TILE_M)

        def job(s0, s1):
            arows = aligned_empty((row_tiles * TILE_M, row_k_tiles * TILE_K), np.uint16)
            C = aligned_empty((row_tiles * TILE_M, b_blocks.shape[1] * TILE_N), np.float32)
            _stream_rows(TILE_CONFIG, b_blocks, U, arows, C, out, s0, s1)
    else:
        U = B.view(np.uint32)  # NOTE: the same strides, so a view of any float32 B
        a_blocks = _k_blocked(pack_a(A, parallel=parallel).tiles, k_tiles)
        strips = _ceil_div(N, n_tiles * TILE_N)

        def job(s0, s1):
            rows = aligned_empty((k_tiles, TILE_K // 2, n_tiles * TILE_N), np.uint32)
            C = aligned_empty((a_blocks.shape[1] * TILE_M, n_tiles * TILE_N), np.float32)
            _stream_columns(TILE_CONFIG, a_blocks, U, rows, C, out, s0, s1)

    if parallel:
        map_ranges(job, strips, B.size)
    else:
        job(0, strips)
    return out
