"""The fc layers' input gradient in bf16 at small batch: B packed a small block at a time,
in cache, and multiplied at once (issue 23), so no packed copy of the weights is made.

**Why.** In fc6 (W: 4096 x 25088) at batch 8 or 32 the input gradient gx = gy W has a few
rows on the left (the output gradient gy) and W on the right, with K = 4096 and W's rows
contiguous along N. `gemm_bf16` packs all of B before it multiplies (`fc_matmul` in column
blocks of FC_PACK_BYTES): `_pack_b_tiles` reads W down 512-column strips, a new 2 KB row
piece for every two K rows, writes 205 MB of tiles and the kernel reads them back, each B
tile feeding one tdpbf16ps. Single-thread CPU time (time.thread_time, min of 3-5) in ms,
fc6, batch 8 / 32, `fc_matmul` before this module:

    gx, bf16 (pack_b in blocks + kernel):  153 / 157  (load 0.9);  171 / 175  (load 6)
    pack_b(W) alone:                       97 / 99    (load 0.9)
    gx, fp32 (NumPy's BLAS):               81 / 91    (load 0.9);  75 / 93    (load 6)

**How.** `gemm_stream` packs A (the few rows) once, cut in K blocks of `STREAM_K_TILES`
tiles. The output's columns are cut in strips of `STREAM_N_TILES` tiles; each thread takes a
contiguous range of strips and, per strip, for each K block in order, packs that block of B
into its own buffer (`_pack_tiles_at`, `amx._pack_b_tiles` on a block: two rows of B
interleaved, read 4 KB at a time) and multiplies it into the strip's C tiles with
`amx._tile_block`. W is read once, as float32; the packed block (512 KB) stays in L2; the only
new memory is that buffer and a small C per thread. Measured (same units, load 4-6, fc6
batch 8 / 32): K x N tiles per block 8 x 64: 80 / 84 ms; 4 x 128: 85 / 89; 16 x 32: 92 /
96; 32 x 16: 131 / 145; 2 x 256: 102 / 110 (short K blocks reload C more often, narrow
strips read W in short pieces).

NOTE: the forward (B = W.T, W's rows along K) was streamed the same way, with W's rows
packed as A tiles of the transposed product (no transposing in the packing): 95-120 ms
against `fc_matmul`'s 67-78 (`_pack_b_rows` on whole rows of W, in 32 MB column blocks);
the forward keeps that path. The weight gradient (K = batch) keeps `gemm_bf16` too: 44 ms
against BLAS's 86 (load 0.9), its cost the 411 MB fp32 output either way.

**Same bits as `gemm_bf16`.** Each C tile sums its K tiles 0, 1, ... in order, its running
sums stored to C and reloaded between K blocks (exact, fp32), exactly as `_gemm_tiles` does
past BLOCK_K: the result is bit for bit `gemm_bf16`'s, at any thread count and any block
sizes (tests/test_amx_stream.py checks both).
"""

import numpy as np
from numba import njit

from minivgg.kernels.cpu.amx import _tile_block, aligned_empty, pack_a
from minivgg.kernels.cpu.amx_isa import (TILE_CONFIG, TILE_K, TILE_M, TILE_N, amx_available,
                                         ldtilecfg, tilerelease)
from minivgg.kernels.cpu.bf16 import bf16_bits
from minivgg.kernels.cpu.runtime import JIT, map_ranges

# K tiles per block (256 of K) and column tiles per strip (1024 columns): a strip's block
# of packed B is 8 x 64 tiles of 1 KB = 512 KB, a quarter of a core's 2 MB L2.
STREAM_K_TILES = 8
STREAM_N_TILES = 64
# `matmul.fc_matmul` streams B when A has at most this many rows (fc layers at small batch).
STREAM_MAX_M = 64


def _ceil_div(a, b):
    return -(-a // b)


@njit(**JIT)
def _pack_tiles_at(B, k0, k1, j0, j1, pairs):
    """pairs (ns, kbk, 16, 16) = B[k0:k1, j0:j1] packed, B (K, N) float32 with contiguous
    rows (`amx._pack_b_tiles` on a block): K rows k and k + 1 of B, interleaved, are row p
    of a tile, read along the strip's whole width. Zero past k1 and j1."""
    ns, kbk = pairs.shape[0], pairs.shape[1]
    for kb in range(kbk):
        for p in range(TILE_K // 2):
            k = k0 + kb * TILE_K + 2 * p
            for n in range(ns):
                c0 = j0 + n * TILE_N
                if k + 1 < k1 and c0 + TILE_N <= j1:
                    for j in range(TILE_N):
                        low = np.uint32(bf16_bits(B[k, c0 + j]))
                        high = np.uint32(bf16_bits(B[k + 1, c0 + j]))
                        pairs[n, kb, p, j] = low | (high << np.uint32(16))
                else:
                    for j in range(TILE_N):
                        low = high = np.uint32(0)
                        if k < k1 and c0 + j < j1:
                            low = np.uint32(bf16_bits(B[k, c0 + j]))
                        if k + 1 < k1 and c0 + j < j1:
                            high = np.uint32(bf16_bits(B[k + 1, c0 + j]))
                        pairs[n, kb, p, j] = low | (high << np.uint32(16))


@njit(**JIT)
def _stream_columns(config, a_blocks, B, tiles, pairs, C, out, s0, s1):
    """out[:, strips s0..s1-1] = A @ B on this thread, one strip and K block at a time.

    a_blocks (Q, Mt, kbk, 16, 32): A's `pack_a` tiles cut in Q blocks of kbk K tiles (the
    last padded with zero tiles, never multiplied). B (K, N) with contiguous rows. tiles /
    pairs: this thread's buffer for one block of B, as uint16 tiles (ns, kbk, 16, 16, 2)
    and as uint32 VNNI pairs; C (16 Mt, 16 ns) float32.
    """
    M, N = out.shape
    K = B.shape[0]
    Q, Mt, kbk = a_blocks.shape[0], a_blocks.shape[1], a_blocks.shape[2]
    width = tiles.shape[0] * TILE_N  # columns per strip
    ldtilecfg(config)
    for s in range(s0, s1):
        j0 = s * width
        j1 = min(j0 + width, N)
        ns = (j1 - j0 + TILE_N - 1) // TILE_N
        for q in range(Q):
            k0 = q * kbk * TILE_K
            k1 = min(k0 + kbk * TILE_K, K)
            _pack_tiles_at(B, k0, k1, j0, j1, pairs)
            kbq = (k1 - k0 + TILE_K - 1) // TILE_K
            for n in range(0, ns, 2):
                for m in range(0, Mt, 2):
                    _tile_block(a_blocks[q], tiles, C, m, n, m + 1 < Mt, n + 1 < ns, 0, kbq,
                                q == 0)
        for i in range(M):
            for j in range(j1 - j0):
                out[i, j0 + j] = C[i, j]
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


def gemm_stream(A, B, k_tiles=STREAM_K_TILES, n_tiles=STREAM_N_TILES, parallel=True):
    """C (M, N) float32 = bf16(A) @ bf16(B) on AMX, bit for bit `amx.gemm_bf16(A, B)`, with B
    packed a block at a time (see the module docstring). A (M, K), B (K, N) float32, either
    may be a transposed view; M small (the batch). Needs AMX (`amx_available()`).
    k_tiles, n_tiles: the block of B packed at once, in tiles (they do not change the bits).
    """
    available, reason = amx_available()
    if not available:  # NOTE: without Linux's permission the first tile load is SIGILL
        raise RuntimeError(f"AMX is not available: {reason}")
    (M, K), N = A.shape, B.shape[1]
    if B.shape[0] != K:
        raise ValueError(f"gemm_stream: A is {M}x{K} but B is {B.shape[0]}x{N}")
    out = np.empty((M, N), np.float32)
    a_blocks = _k_blocked(pack_a(A, parallel=parallel).tiles, k_tiles)
    Mt = a_blocks.shape[1]

    def job(s0, s1):
        tiles = aligned_empty((n_tiles, k_tiles, TILE_K // 2, TILE_N, 2), np.uint16)
        pairs = tiles.view(np.uint32)[..., 0]
        C = aligned_empty((Mt * TILE_M, n_tiles * TILE_N), np.float32)
        _stream_columns(TILE_CONFIG, a_blocks, B, tiles, pairs, C, out, s0, s1)

    strips = _ceil_div(N, n_tiles * TILE_N)
    if parallel:
        map_ranges(job, strips, B.size)
    else:
        job(0, strips)
    return out
