"""A bf16 GEMM on Intel AMX tiles: C (M, N) float32 = bf16(A) (M, K) @ bf16(B) (K, N).

Three modules: `bf16.py` (the numbers: rounding, the reference product), `amx_isa.py` (the
tile instructions from Numba, and whether this process may use them) and this one (the
packed layouts, the tile kernel, the threads).

**Tiles.** AMX adds eight tile registers, each up to 16 rows of 64 bytes, a tile
configuration (`ldtilecfg`: rows and bytes per row of each tile) and one multiply
instruction for bf16, `tdpbf16ps C, A, B`. With every tile configured 16 × 64 bytes:

    A tile: 16 rows (of C)  × 32 bf16 along K                 (16 × 64 bytes)
    B tile: 16 K-pairs      × 16 columns (of C) × 2 bf16      (16 × 64 bytes)
    C tile: 16 rows         × 16 columns, fp32                (16 × 64 bytes)

    tdpbf16ps:  C[i, j] += A[i, 2p] * B[2p, j] + A[i, 2p + 1] * B[2p + 1, j],  p = 0..15

one instruction, 16 × 16 × 32 multiply-adds. **The VNNI layout**: tdpbf16ps multiplies
*pairs* of bf16 along K, so a row of the B tile holds, for 16 columns j, the two values
B[2p, j], B[2p + 1, j] side by side (`pack_b` writes B that way; row p of a B tile is K-rows
2p and 2p + 1 of B, interleaved). A row of an A tile is just 32 consecutive K values.

**Why accumulation stays fp32.** bf16 keeps float32's 8-bit exponent but only 8 significant
bits (7 stored; about 2.4 decimal digits), so rounding an operand costs a relative error of
at most 2^-8 (float32: 2^-24). The product of two bf16 numbers is exact in fp32, and the
sums over K (1152 terms in conv2_2, 4608 in conv5_x) are kept in fp32 tiles. A sum rounded
to bf16 at every step would drop each term below half a bf16 ulp of the running total
(about 2^-8 of it): a long dot product of similar terms stops growing after a few hundred,
and every step adds an error of up to 2^-8 of the total. So tdpbf16ps accumulates in fp32,
the output stays fp32, and only the operands are rounded. NOTE: tdpbf16ps treats
bf16 subnormal inputs as zero and flushes subnormal results (Intel SDM); the fp32 fallback
does not, so the two paths differ on numbers below 1.2e-38.

**Blocking** (as oneDNN's brgemm and LIBXSMM block AMX). Tiles 0-3 hold a 2 × 2 block of C
tiles (32 × 32 of C), tiles 4-5 two A tiles, 6-7 two B tiles; each loaded A tile feeds two
tdpbf16ps and so does each B tile, four multiplies per four 1 KB loads:

             B6      B7
    A4    [ C0 ]  [ C1 ]          per 32 of K: load A4, B6, B7, A5;
    A5    [ C2 ]  [ C3 ]          C0 += A4 B6, C1 += A4 B7, C2 += A5 B6, C3 += A5 B7

Both operands are packed first (`pack_a`, `pack_b`) so that every tile is 1 KB of contiguous
memory starting on a cache line (each 64-byte row one line) and a 32-column panel of B walks
memory in order along K.
Around the 2 × 2 kernel, A is cut in panels of `BLOCK_M` tile rows (a panel over all of K,
BLOCK_M KB per 32 of K, stays in L2 while every 32-column B panel passes it). The C tiles
stay in tile registers over all of K, up to `BLOCK_K`. Single-thread probes on the VGG conv
shapes found no cut of K faster overall (K blocks of 256 with C blocks of 256 × 256 kept in
L2, panels in L1, won on K = 4608 and lost more elsewhere; numbers belong in
benchmarks/README.md once taken on a quiet machine). Past
BLOCK_K (fc6's 25088) K is cut in blocks, and C in blocks of BLOCK_M × BLOCK_N tiles that stay
in L2 while their sums grow; the C tiles are stored and reloaded between K blocks (exact).

**Threads and fixed results.** The output is cut along its longer side into 32-wide bands,
and `runtime.map_ranges` gives each thread a contiguous range of bands (fixed by the sizes
and the thread count). Each C tile is computed by one thread, over all of K, in the same
order (K block by K block, 32 by 32) whatever the thread count, band or neighbour tiles: the
same inputs give the same bits at any thread count.

**Edges.** Packing pads with zeros to whole tiles (M and N to 16, K to 32); zero padding in
both operands adds exact zeros to the sums. When M or N is not a multiple of 16 the kernel
writes a padded C and the valid part is copied out. A 2 × 2 block at the bottom or right edge
runs as 2 × 1, 1 × 2 or 1 × 1 (no work on tiles of padding only).

**Permission.** Linux gives a process AMX's 8 KB of tile state only after it asks once
(`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, Linux 5.16+); we ask on first use,
so processes that never run a bf16 GEMM (data-loader workers) never ask. A forked child
inherits the permission and exec clears it (seen on Linux 6.18); we ask once per process
id, so a child asks again, which costs one system call.

**Machines without AMX** (or `MINIVGG_DISABLE_AMX=1`, or `gemm_bf16(..., amx=False)`): the
same bf16-rounded operands go through NumPy's fp32 matmul, the same numbers up to
summation order; a warning says once that bf16 is not faster there and which feature is
missing (`amx_available()`). The AMX kernels are compiled only after the CPU check, since
LLVM aborts the process when asked to emit AMX for a CPU without it.

The machine code of `_gemm_tiles` holds ldtilecfg, tileloadd, tdpbf16ps, tilestored and
tilerelease (tests/test_amx.py reads it with Numba's `inspect_asm`). Measured GFLOP/s
against PyTorch's bf16 matmul and NumPy's fp32 one: `benchmarks/bench_gemm.py`, its table
"GEMM, bf16 AMX" in benchmarks/README.md (taken on a quiet machine; none is recorded yet).
"""

import numpy as np
from numba import njit

from minivgg.kernels.cpu.amx_isa import (TILE_CONFIG, TILE_ELEMENTS, TILE_K, TILE_M, TILE_N,
                                         amx_available, ldtilecfg, tdpbf16ps, tileload,
                                         tilerelease, tilestore, tilezero, warn_fallback)
from minivgg.kernels.cpu.bf16 import bf16_bits, from_bf16, round_to_bf16, spread
from minivgg.kernels.cpu.runtime import JIT, map_ranges

# K summed with the C tiles held in registers: all of it for every VGG conv (K <= 4608);
# past it K is cut in blocks (`_k_blocks`).
BLOCK_K = 4608
# A tile rows per panel: 8 rows (128 of A) over K = 4608 is 1.1 MB, in a core's 2 MB L2.
BLOCK_M = 8
# B tile columns per C block when K is cut: 8 x 16 C tiles (128 KB) stay in L2.
BLOCK_N = 16

# B tiles (16 columns each) `pack_b` fills at once, row by row of B: see `_pack_b_tiles`.
# 32 (2 KB of each row of B per visit) packed fastest of 8-128 in single-thread probes.
PACK_B_TILES = 32

# Below this many FLOPs (2.7e8) a GEMM runs on the calling thread. Two threads take
# F / (2 R) + h against one thread's F / R, h the pool's hand-off (about 0.1 ms, runtime.py),
# so they win when F > 2 R h: about 2.4e8 FLOPs at R = 1.2e12 FLOP/s per core.
INLINE_FLOPS = 1 << 28

# ----------------------------------------------------------------------------------------
# Packing: operands as whole 1 KB tiles, padded with zeros
# ----------------------------------------------------------------------------------------

class Packed:
    """An operand packed for the AMX kernel: `tiles` plus the logical shape it holds.

    A (M, K): tiles (ceil(M/16), ceil(K/32), 16, 32), tile [m, kb] holds
        A[16m + i, 32kb + k] at [m, kb, i, k].
    B (K, N): tiles (ceil(N/16), ceil(K/32), 16, 16, 2), tile [n, kb] holds
        B[32kb + 2p + h, 16n + j] at [n, kb, p, j, h]  (the VNNI pair layout).
    Entries outside the matrix are zero. Each tile is 1 KB, rows 64 bytes apart, and the
    tiles one kernel walks along K are adjacent.
    """

    def __init__(self, operand, tiles, rows, cols):
        self.operand, self.tiles, self.shape = operand, tiles, (rows, cols)

    def __repr__(self):
        return f"Packed({self.operand}, shape={self.shape}, tiles={self.tiles.shape})"

    def unpack(self):
        """The bf16 values as a float32 matrix of the logical shape (the fallback's input)."""
        t = self.tiles
        if self.operand == "A":
            full = t.transpose(0, 2, 1, 3).reshape(t.shape[0] * 16, t.shape[1] * 32)
        else:
            full = t.transpose(1, 2, 4, 0, 3).reshape(t.shape[1] * 32, t.shape[0] * 16)
        return from_bf16(full[:self.shape[0], :self.shape[1]])


def _ceil_div(a, b):
    return -(-a // b)


def aligned_empty(shape, dtype, alignment=64):
    """np.empty whose data starts on a cache line (64 bytes).

    NOTE: NumPy's large arrays start 16 bytes past a line (malloc's header), so every
    64-byte tile row would straddle two lines and a tile load touch 32 lines, not 16.
    """
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(size + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + size].view(dtype).reshape(shape)


@njit(**JIT)
def _pack_a_tiles(A, tiles, m0, m1):
    """tiles[m0:m1] of `Packed` A from A (M, K) float32, any strides, rounded to bf16."""
    M, K = A.shape
    Kb = tiles.shape[1]
    for m in range(m0, m1):
        for i in range(TILE_M):
            row = m * TILE_M + i
            for kb in range(Kb):
                k0 = kb * TILE_K
                if row < M and k0 + TILE_K <= K:  # a whole row of 32: no edge tests
                    for k in range(TILE_K):
                        tiles[m, kb, i, k] = bf16_bits(A[row, k0 + k])
                else:
                    for k in range(TILE_K):
                        inside = row < M and k0 + k < K
                        tiles[m, kb, i, k] = bf16_bits(A[row, k0 + k]) if inside else 0


@njit(**JIT)
def _pack_b_tiles(B, pairs, n0, n1):
    """pairs[n0:n1] of `Packed` B from B (K, N) float32, any strides, rounded to bf16.

    pairs: the tiles seen as uint32 (Nt, Kb, 16, 16), one VNNI pair per entry: B[k, j] in
    the low half, B[k + 1, j] in the high half (x86 is little-endian), so the interleaving
    is a shift and an or on whole rows, which LLVM vectorises.
    """
    K, N = B.shape
    Kb = pairs.shape[1]
    # NOTE: a strip of PACK_B_TILES tiles (512 columns) at a time, down its K rows: each row
    # of B is read 2 KB at a time and each tile written in order. Walking down one 16-column
    # strip reads 64 bytes per row (a new page per read for conv1's N = 50176); walking
    # whole rows of B scatters the writes over every tile at once.
    for s0 in range(n0, n1, PACK_B_TILES):
        s1 = min(s0 + PACK_B_TILES, n1)
        for kb in range(Kb):
            for p in range(TILE_K // 2):
                k = kb * TILE_K + 2 * p  # K rows k and k + 1 interleave in tile row p
                for n in range(s0, s1):
                    j0 = n * TILE_N
                    if k + 1 < K and j0 + TILE_N <= N:
                        for j in range(TILE_N):
                            low = np.uint32(bf16_bits(B[k, j0 + j]))
                            high = np.uint32(bf16_bits(B[k + 1, j0 + j]))
                            pairs[n, kb, p, j] = low | (high << np.uint32(16))
                    else:
                        for j in range(TILE_N):
                            low = high = np.uint32(0)
                            if k < K and j0 + j < N:
                                low = np.uint32(bf16_bits(B[k, j0 + j]))
                            if k + 1 < K and j0 + j < N:
                                high = np.uint32(bf16_bits(B[k + 1, j0 + j]))
                            pairs[n, kb, p, j] = low | (high << np.uint32(16))


@njit(**JIT)
def _pack_b_rows(S, pairs, n0, n1):
    """pairs[n0:n1] of `Packed` B from B = S.T, S (N, K) float32 with contiguous rows.

    NOTE: B's columns are S's rows, so a VNNI pair (B[k, j], B[k + 1, j]) is two adjacent
    values of row j of S: 32 values of a row rounded to bf16 side by side *are* 16 pairs
    (x86 is little-endian). One tile at a time: 16 rows of S, 128 bytes of each, rounded
    into `rows` (contiguous, so the rounding vectorises), then the 16 x 16 pairs transposed
    into the tile. (`_pack_b_tiles` on such a B reads one float per cache line.)
    """
    N, K = S.shape
    Kb = pairs.shape[1]
    rows = np.zeros((TILE_N, TILE_K), np.uint16)
    rows_pairs = rows.view(np.uint32)  # (16, 16): pair p of row j at [j, p]
    for n in range(n0, n1):
        for kb in range(Kb):
            k0 = kb * TILE_K
            for j in range(TILE_N):
                row = n * TILE_N + j
                if row < N and k0 + TILE_K <= K:
                    for k in range(TILE_K):
                        rows[j, k] = bf16_bits(S[row, k0 + k])
                else:
                    for k in range(TILE_K):
                        inside = row < N and k0 + k < K
                        rows[j, k] = bf16_bits(S[row, k0 + k]) if inside else 0
            for p in range(TILE_K // 2):
                for j in range(TILE_N):
                    pairs[n, kb, p, j] = rows_pairs[j, p]


def _as_matrix(x, name):
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a matrix, got shape {x.shape}")
    return x if x.dtype == np.float32 else x.astype(np.float32)


def pack_a(A, trans=False, parallel=True):
    """`Packed` A of A (M, K) (A.T (M, K) of A (K, M) with trans=True), bf16 RNE.
    parallel: see `gemm_bf16`."""
    A = _as_matrix(A, "A")
    if trans:
        A = A.T
    M, K = A.shape
    tiles = aligned_empty((_ceil_div(M, TILE_M), _ceil_div(K, TILE_K), TILE_M, TILE_K),
                          np.uint16)
    spread(lambda m0, m1: _pack_a_tiles(A, tiles, m0, m1), tiles.shape[0], A.size, parallel)
    return Packed("A", tiles, M, K)


def pack_b(B, trans=False, parallel=True):
    """`Packed` B of B (K, N) (B.T (K, N) of B (N, K) with trans=True), bf16 RNE, VNNI.

    A layer that multiplies by the same weights many times packs them once and passes the
    `Packed` to `gemm_bf16` (`pack_a` likewise for weights on the left). parallel: see
    `gemm_bf16`.
    """
    B = _as_matrix(B, "B")
    if trans:
        B = B.T
    K, N = B.shape
    tiles = aligned_empty((_ceil_div(N, TILE_N), _ceil_div(K, TILE_K), TILE_K // 2, TILE_N, 2),
                          np.uint16)
    pairs = tiles.view(np.uint32)[..., 0]
    if B.strides[0] == B.itemsize and N > 1:  # B's columns lie in memory: `_pack_b_rows`
        S = B.T
        spread(lambda n0, n1: _pack_b_rows(S, pairs, n0, n1), tiles.shape[0], B.size, parallel)
    else:
        spread(lambda n0, n1: _pack_b_tiles(B, pairs, n0, n1), tiles.shape[0], B.size,
               parallel)
    return Packed("B", tiles, K, N)


# ----------------------------------------------------------------------------------------
# The kernel: a 2 x 2 block of C tiles over a range of K, and the loops around it
# ----------------------------------------------------------------------------------------

@njit(**JIT)
def _tile_block(a_tiles, b_tiles, C, m, n, two_m, two_n, kb0, kb1, first):
    """C tiles [m, n], [m, n+1], [m+1, n], [m+1, n+1] += A tiles [m], [m+1] @ B tiles [n],
    [n+1] over the K blocks kb0..kb1-1 (row m+1 only if two_m, column n+1 only if two_n).

        tile registers:   C0 = C[m, n]     C1 = C[m, n+1]     A4 = A[m]     B6 = B[n]
                          C2 = C[m+1, n]   C3 = C[m+1, n+1]   A5 = A[m+1]   B7 = B[n+1]

    first: the C tiles start from zero, else from C. a_tiles, b_tiles: `Packed.tiles`;
    C (M, N) float32, C-contiguous, M and N multiples of 16. What it computes, plainly:
    `reference_gemm_bf16` (C = bf16(A) @ bf16(B), summed in fp32 here).
    """
    Kb = a_tiles.shape[1]                     # K blocks per packed row (A and B alike)
    stride = C.shape[1] * 4                   # bytes between rows of C
    c0 = m * TILE_M * C.shape[1] + n * TILE_N  # C[16m, 16n]
    c2 = c0 + TILE_M * C.shape[1]              # C[16(m+1), 16n]
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
    a = (m * Kb + kb0) * TILE_ELEMENTS         # A tile [m, kb0]; A[m+1] is Kb tiles on
    b = (n * Kb + kb0) * TILE_ELEMENTS         # B tile [n, kb0]; B[n+1] likewise
    row_a = Kb * TILE_ELEMENTS
    for _ in range(kb1 - kb0):
        # loads interleaved with the multiplies that wait for them, as oneDNN orders them
        tileload(4, a_tiles, a, 64)
        tileload(6, b_tiles, b, 64)
        tdpbf16ps(0, 4, 6)
        if two_n:
            tileload(7, b_tiles, b + row_a, 64)
            tdpbf16ps(1, 4, 7)
        if two_m:
            tileload(5, a_tiles, a + row_a, 64)
            tdpbf16ps(2, 5, 6)
            if two_n:
                tdpbf16ps(3, 5, 7)
        a += TILE_ELEMENTS
        b += TILE_ELEMENTS
    tilestore(0, C, c0, stride)
    if two_n:
        tilestore(1, C, c0 + TILE_N, stride)
    if two_m:
        tilestore(2, C, c2, stride)
        if two_n:
            tilestore(3, C, c2 + TILE_N, stride)


@njit(**JIT)
def _gemm_tiles(config, a_tiles, b_tiles, C, m0, m1, n0, n1, block_kb, block_m, block_n):
    """C tiles [m0:m1, n0:n1] = A tiles [m0:m1] @ B tiles [n0:n1] over all of K, on this
    thread. Loops, outer to inner: C blocks of block_m x block_n tiles (kept in L2 while
    their sums grow), K blocks of block_kb tiles, B column pairs, A row pairs.

    Every C tile sums its K blocks in order 0, 1, ..., whatever m0..n1 and the block sizes
    are: the bits of C do not depend on how the tiles were shared out.
    """
    Kb = a_tiles.shape[1]
    ldtilecfg(config)
    for mb0 in range(m0, m1, block_m):
        mb1 = min(mb0 + block_m, m1)
        for nb0 in range(n0, n1, block_n):
            nb1 = min(nb0 + block_n, n1)
            for kb0 in range(0, Kb, block_kb):
                kb1 = min(kb0 + block_kb, Kb)
                for n in range(nb0, nb1, 2):
                    for m in range(mb0, mb1, 2):
                        _tile_block(a_tiles, b_tiles, C, m, n, m + 1 < mb1, n + 1 < nb1,
                                    kb0, kb1, kb0 == 0)
    tilerelease()


def _k_blocks(Kb):
    """Tiles of K per block: all Kb up to BLOCK_K, else equal blocks of at most BLOCK_K."""
    per_block = BLOCK_K // TILE_K
    return _ceil_div(Kb, _ceil_div(Kb, per_block))


# ----------------------------------------------------------------------------------------
# The GEMM
# ----------------------------------------------------------------------------------------

def gemm_bf16(A, B, out=None, trans_a=False, trans_b=False, amx=None, parallel=True):
    """C (M, N) float32 = bf16(A) @ bf16(B), summed in fp32.

    A: (M, K) float32 (or (K, M) with trans_a) or a `pack_a` result; B: (K, N) (or (N, K)
    with trans_b) or a `pack_b` result. Operands are rounded to bf16 to nearest even; any
    M, N, K >= 1. out: an (M, N) float32 array to write into. amx: None uses AMX where
    `amx_available()`, False forces the fp32 fallback (True insists on AMX). parallel=False
    keeps all the work on the calling thread: NOTE: pass it from inside a job of
    `runtime.map_ranges` (a conv layer's chunk), where a nested map_ranges would wait for
    the pool's own busy threads.

    Results are the same bits at any thread count. The fallback gives the same numbers up
    to the order of the fp32 sums (and subnormals, see the module docstring).
    """
    a = A if isinstance(A, Packed) else None
    b = B if isinstance(B, Packed) else None
    if a is not None and a.operand != "A" or b is not None and b.operand != "B":
        raise ValueError("A must come from pack_a and B from pack_b")
    shape_a = a.shape if a else _as_matrix(A, "A").shape[::-1 if trans_a else 1]
    shape_b = b.shape if b else _as_matrix(B, "B").shape[::-1 if trans_b else 1]
    (M, K), (K2, N) = shape_a, shape_b
    if K != K2:
        raise ValueError(f"gemm_bf16: A is {M}x{K} but B is {K2}x{N}")
    if out is not None and (out.shape != (M, N) or out.dtype != np.float32):
        raise ValueError(f"out must be a float32 array of shape {(M, N)}")

    use_amx, reason = amx_available()
    if amx is True and not use_amx:
        raise RuntimeError(f"AMX asked for but not available: {reason}")
    if amx is False:
        use_amx = False
    elif not use_amx:
        warn_fallback(reason)
    if not use_amx:
        a_values = a.unpack() if a else round_to_bf16(A.T if trans_a else A, parallel)
        b_values = b.unpack() if b else round_to_bf16(B.T if trans_b else B, parallel)
        return np.matmul(a_values, b_values, out=out)

    a = a or pack_a(A, trans_a, parallel)
    b = b or pack_b(B, trans_b, parallel)
    return _gemm_packed(a, b, out, parallel=parallel)


def _gemm_packed(a, b, out=None, block_kb=None, block_m=BLOCK_M, block_n=BLOCK_N,
                 parallel=True):
    """C = the product of two `Packed` operands on AMX, on the runtime's threads.

    The output is shared out in bands of two tiles (32 rows or columns) along its longer
    side; each thread runs `_gemm_tiles` on a contiguous range of bands.
    """
    available, reason = amx_available()
    if not available:  # NOTE: without Linux's permission the first tile load is SIGILL
        raise RuntimeError(f"AMX is not available: {reason}")
    (M, K), N = a.shape, b.shape[1]
    Mt, Nt, Kb = a.tiles.shape[0], b.tiles.shape[0], a.tiles.shape[1]
    exact = M == Mt * TILE_M and N == Nt * TILE_N
    if exact and out is not None and out.flags.c_contiguous:
        C = out
    elif exact and out is None:
        C = aligned_empty((M, N), np.float32)
    else:  # whole tiles into a padded C (or a contiguous one), the valid part copied out
        C = aligned_empty((Mt * TILE_M, Nt * TILE_N), np.float32)
    block_kb = block_kb or _k_blocks(Kb)
    split_n = Nt >= Mt

    def job(band0, band1):
        if split_n:
            n0, n1, m0, m1 = 2 * band0, min(2 * band1, Nt), 0, Mt
        else:
            m0, m1, n0, n1 = 2 * band0, min(2 * band1, Mt), 0, Nt
        _gemm_tiles(TILE_CONFIG, a.tiles, b.tiles, C, m0, m1, n0, n1, block_kb, block_m,
                    block_n)

    bands = _ceil_div(Nt if split_n else Mt, 2)
    if 2 * M * N * K < INLINE_FLOPS or not parallel:
        job(0, bands)
    else:
        map_ranges(job, bands)
    if C is out:
        return out
    if out is None:
        return C if exact else np.ascontiguousarray(C[:M, :N])
    out[...] = C[:M, :N]
    return out
