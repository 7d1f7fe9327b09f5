"""Winograd convolution on the CPU: the tile and filter transforms (the twin of
`cuda/winograd.cu`).

The drivers, `conv2d_forward` and `conv2d_backward` of `kernels/winograd.py`, are written
once for both devices; `CpuPrimitives` (kernels/cpu/conv.py) hands them the transforms
below, serial Numba kernels (compiled once, cached on disk) spread over `runtime`'s pool.
The α² GEMMs between the transforms are NumPy's BLAS, one thread each. Shape legend and
the algorithm: see `kernels/winograd.py`.
"""

import numpy as np
from numba import njit

from minivgg.kernels import winograd
from minivgg.kernels.cpu.runtime import JIT, map_ranges

# Bytes of transformed tiles (V and M, or V and Z) per chunk, near the size of L2: the α²
# GEMMs then find their operands in cache right after the transforms wrote them, and peak
# memory stays small whatever the batch. Deep layers take more (`MIN_CHUNK_TILES` tiles,
# see kernels/winograd.py), so that their GEMMs are not too thin.
WINOGRAD_CHUNK_BYTES = 2**20


# Tiles transformed at once inside a chunk: their k×k windows and half-transformed tiles
# (2 × 36 × 128 floats for F(4×4,3×3)) stay in L1 while each channel is done.
BLOCK_TILES = 128


_matrices = {}  # (m, dtype) -> (B^T, A^T, A in dtype, G in float64), made once


def matrices(m, dtype):
    """B^T, A^T, A of F(m×m, 3×3) in the data's dtype and G in float64, contiguous."""
    key = (m, np.dtype(dtype))
    if key not in _matrices:
        BT, G, AT = winograd.transforms(m)
        _matrices[key] = (np.ascontiguousarray(BT, dtype=dtype),
                          np.ascontiguousarray(AT, dtype=dtype),
                          np.ascontiguousarray(AT.T, dtype=dtype), np.ascontiguousarray(G))
    return _matrices[key]


def point_gemms(A, B, out):
    """out[t] = A[t] @ B[t] for every transform point t: A (α², I, J), B (α², J, K).

    One NumPy call for the whole stack: NumPy runs one BLAS GEMM per point, in C, so the
    results equal α² separate calls bit for bit, without α² trips through Python (about
    1 µs each, which on the small recipe's thin layers is a third of a GEMM's time).
    """
    np.matmul(A, B, out=out)


# ----------------------------------------------------------------------------------------
# Tile transforms. A chunk is the tile rows r0..r1-1, r = n*TH + ty; tile (n, ty, tx) is
# column q = (r - r0)*TW + tx of the chunk's (C, P) matrices.
# ----------------------------------------------------------------------------------------
#
# Every transform is a "sandwich" L d L^T of a small tile d with a small matrix L, done for
# a block of up to BLOCK_TILES tiles at once: the tiles' (i, j) entries are gathered side by
# side into one row, so each step computes a whole row of outputs, dst[q] = sum_j L[a, j]
# src[j, q], which LLVM vectorises along q. Input: L = B^T (α×α); output: L = A^T (m×α);
# output gradient (for the weight gradient): L = A (α×m).

# NOTE: the loops index the whole 3-D/4-D arrays (out[a, bb, ch, q]) rather than 1-D
# slices or transposed views of them: Numba then knows the innermost axis is contiguous and
# LLVM vectorises the `q` loops; through a transposed view it does not (measured 3× slower).


@njit(**JIT)
def _combine(L, a, src, i, dst, u, v, q0, n):
    """dst[u, v, q0:q0+n] = sum_j L[a, j] src[i, j, :n], over the k = L.shape[1] rows j.

    NOTE: the k = 6 and k = 4 branches have a constant trip count for j, so LLVM unrolls
    it and keeps the sum in a vector register while it runs along q: one load per term and
    one store per output, against a load and a store per term when each term is added into
    dst in its own pass (which took about 1.5× the CPU time of the whole input transform,
    single thread). The terms are summed in order of j, zeros included, so the result is
    the same for every k branch.
    """
    k = L.shape[1]
    if k == 6:
        for q in range(n):
            s = L[a, 0] * src[i, 0, q]
            for j in range(1, 6):
                s += L[a, j] * src[i, j, q]
            dst[u, v, q0 + q] = s
    elif k == 4:
        for q in range(n):
            s = L[a, 0] * src[i, 0, q]
            for j in range(1, 4):
                s += L[a, j] * src[i, j, q]
            dst[u, v, q0 + q] = s
    else:
        for q in range(n):
            s = L[a, 0] * src[i, 0, q]
            for j in range(1, k):
                s += L[a, j] * src[i, j, q]
            dst[u, v, q0 + q] = s


@njit(**JIT)
def _split_row(xr, m, k, TW, d, i, t0):
    """d[i, j, t0 + tx] = xr[tx*m + j]: row i of every window of one tile row, j < k.

    NOTE: with m and k known (F(4×4,3×3)'s input transform, m = 4, k = 6, and its output
    gradient, k = 4) the stride is a constant and LLVM vectorises the strided loads, one
    tile per iteration; the general loop (runtime stride) stays scalar. The constant
    branch took about a fifth less CPU time for the whole input transform (single thread).
    """
    if m == 4 and k == 6:
        for tx in range(TW):
            p = tx * 4
            d[i, 0, t0 + tx] = xr[p]
            d[i, 1, t0 + tx] = xr[p + 1]
            d[i, 2, t0 + tx] = xr[p + 2]
            d[i, 3, t0 + tx] = xr[p + 3]
            d[i, 4, t0 + tx] = xr[p + 4]
            d[i, 5, t0 + tx] = xr[p + 5]
    elif m == 4 and k == 4:
        for tx in range(TW):
            p = tx * 4
            d[i, 0, t0 + tx] = xr[p]
            d[i, 1, t0 + tx] = xr[p + 1]
            d[i, 2, t0 + tx] = xr[p + 2]
            d[i, 3, t0 + tx] = xr[p + 3]
    else:
        for j in range(k):
            for tx in range(TW):
                d[i, j, t0 + tx] = xr[tx * m + j]


@njit(**JIT)
def tile_transform(src, L, m, shift, r0, r1, TH, TW, out):
    """out[a, b, ch, q] = (L d L^T)[a, b] for the k×k window d of src[n, ch] of every tile q.

    src (N, CH, H, W); L (r, k); out (r, r, CH, P). Tile (n, ty, tx)'s window starts at row
    ty*m + shift, column tx*m + shift, and reads zeros outside the image. The input
    transform is (L, shift) = (B^T, -1): α×α windows overlapping by 2 (padding 1); the
    output-gradient transform is (A, 0): the tile's own m×m block of gy.
    """
    CH, H, W = src.shape[1], src.shape[2], src.shape[3]
    r, k = L.shape
    group = max(1, BLOCK_TILES // TW)  # tile rows per block: d and tmp stay in L1
    d = np.empty((k, k, group * TW), dtype=out.dtype)  # d[i, j, q]: window q's (i, j)
    tmp = np.empty((r, k, group * TW), dtype=out.dtype)  # tmp[b, i, q] = (d L^T)[i, b]
    # one image row with the window's overhang as zeros: tile tx's column j is xr[tx*m + j]
    xr = np.zeros(TW * m + k, dtype=out.dtype)
    for g0 in range(r0, r1, group):
        g1 = min(r1, g0 + group)
        nq, q0 = (g1 - g0) * TW, (g0 - r0) * TW  # the block's tiles: q0 .. q0 + nq - 1
        for ch in range(CH):
            for row in range(g0, g1):  # gather the windows
                n, ty, t0 = row // TH, row % TH, (row - g0) * TW
                for i in range(k):
                    iy = ty * m + shift + i
                    if iy < 0 or iy >= H:
                        for j in range(k):
                            for tx in range(TW):
                                d[i, j, t0 + tx] = 0
                        continue
                    for t in range(W):
                        xr[t - shift] = src[n, ch, iy, t]
                    _split_row(xr, m, k, TW, d, i, t0)
            for i in range(k):  # tmp = d L^T, along the window rows
                for bb in range(r):
                    _combine(L, bb, d, i, tmp, bb, i, 0, nq)
            for a in range(r):  # out = L tmp, along the window columns
                for bb in range(r):
                    _combine(L, a, tmp, bb, out[a], bb, ch, q0, nq)


def input_transform(x, m, r0, r1, TH, TW, V):
    """V (α, α, C, P) = B^T d B for the α×α input tile d of every tile and channel."""
    tile_transform(x, matrices(m, V.dtype)[0], m, -1, r0, r1, TH, TW, V)


def grad_output_transform(gy, m, r0, r1, TH, TW, Z):
    """Z (α, α, OC, P) = A g A^T for the m×m block g of gy of every tile: the adjoint of
    `output_transform` (gy outside the image, cropped from y, counts as zero)."""
    tile_transform(gy, matrices(m, Z.dtype)[2], m, 0, r0, r1, TH, TW, Z)


def output_transform(M, m, r0, r1, TH, TW, b, y):
    """y tile = A^T M[:, :, oc, q] A + b[oc], cropped to the image, for every tile q.

    M (α, α, OC, P), b (OC,), y (N, OC, H, W).
    """
    _output_transform(M, matrices(m, M.dtype)[1], m, r0, r1, TH, TW, b, y)


@njit(**JIT)
def _output_transform(M, AT, m, r0, r1, TH, TW, b, y):
    """`output_transform` with A^T (m, α) in M's dtype."""
    OC, H, W = y.shape[1], y.shape[2], y.shape[3]
    alpha = m + 2
    group = max(1, BLOCK_TILES // TW)  # tile rows per block, as in `tile_transform`
    d = np.empty((alpha, alpha, group * TW), dtype=M.dtype)
    tmp = np.empty((m, alpha, group * TW), dtype=M.dtype)
    o = np.empty((m, m, group * TW), dtype=M.dtype)
    yrow = np.empty(TW * m, dtype=M.dtype)
    for g0 in range(r0, r1, group):
        g1 = min(r1, g0 + group)
        nq, q0 = (g1 - g0) * TW, (g0 - r0) * TW  # the block's tiles: q0 .. q0 + nq - 1
        for oc in range(OC):
            for a in range(alpha):  # the block's products, copied close together first
                for bb in range(alpha):
                    for q in range(nq):
                        d[a, bb, q] = M[a, bb, oc, q0 + q]
            for j in range(m):  # tmp[j, a] = sum_b M[a, b] A[b, j], along the rows
                for a in range(alpha):
                    _combine(AT, j, d, a, tmp, j, a, 0, nq)
            for i in range(m):  # o[i, j] = sum_a A^T[i, a] tmp[j, a], along the columns
                for j in range(m):
                    _combine(AT, i, tmp, j, o, i, j, 0, nq)
            for row in range(g0, g1):  # move each tile row's m×m blocks into y, cropped
                n, ty, t0 = row // TH, row % TH, (row - g0) * TW
                for i in range(min(m, H - ty * m)):
                    for tx in range(TW):  # one image row: the tiles' row i side by side
                        for j in range(m):
                            yrow[tx * m + j] = o[i, j, t0 + tx]
                    for t in range(W):
                        y[n, oc, ty * m + i, t] = yrow[t] + b[oc]


# ----------------------------------------------------------------------------------------
# Filter transforms: once per call, over all OC*C filters
# ----------------------------------------------------------------------------------------

@njit(**JIT)
def _filter_transform_kernel(W, G, rotate, U, t0, t1):
    """U[a, b, o, i] = (G w G^T)[a, b] for output channels o = t0..t1-1, in float64.

    w = W[o, i], or with `rotate` W[i, o] turned by 180° (the input gradient's filters).
    U (α, α, O, I); every step runs along the I input channels at once.
    """
    alpha, n_in = G.shape[0], U.shape[3]
    g = np.empty((3, 3, n_in))
    t = np.empty((alpha, 3, n_in))
    for o in range(t0, t1):
        for i in range(n_in):
            for ky in range(3):
                for kx in range(3):
                    g[ky, kx, i] = W[i, o, 2 - ky, 2 - kx] if rotate else W[o, i, ky, kx]
        for a in range(alpha):  # t = G g, along the filter columns
            for kx in range(3):
                for i in range(n_in):
                    t[a, kx, i] = G[a, 0] * g[0, kx, i] + G[a, 1] * g[1, kx, i] \
                        + G[a, 2] * g[2, kx, i]
        for a in range(alpha):  # U = t G^T, along the rows
            for bb in range(alpha):
                for i in range(n_in):
                    U[a, bb, o, i] = G[bb, 0] * t[a, 0, i] + G[bb, 1] * t[a, 1, i] \
                        + G[bb, 2] * t[a, 2, i]


def filter_transform(W, m, rotate, U):
    """U (α, α, O, I) = G w G^T for every filter w of W (OC, C, 3, 3), summed in float64.

    Without `rotate`, w = W[o, i] (O, I = OC, C); with it, the input gradient's filters,
    W[i, o] turned by 180° (O, I = C, OC).
    """
    G = matrices(m, U.dtype)[3]
    map_ranges(lambda t0, t1: _filter_transform_kernel(W, G, rotate, U, t0, t1), U.shape[2],
               elements=U.size)


@njit(**JIT)
def _filter_grad_transform_kernel(dU, G, gW, t0, t1):
    """gW[oc, c] = G^T dU[:, :, oc, c] G for oc = t0..t1-1, summed in float64 (the adjoint
    of `_filter_transform_kernel`)."""
    alpha, C = G.shape[0], gW.shape[1]
    t = np.empty((alpha, 3, C))
    g = np.empty((3, 3, C))
    for oc in range(t0, t1):
        for a in range(alpha):  # t = dU G, along the rows
            for kx in range(3):
                for c in range(C):
                    t[a, kx, c] = 0
                for bb in range(alpha):
                    coef = G[bb, kx]
                    if coef != 0:
                        for c in range(C):
                            t[a, kx, c] += coef * dU[a, bb, oc, c]
        for ky in range(3):  # g = G^T t, along the columns
            for kx in range(3):
                for c in range(C):
                    g[ky, kx, c] = G[0, ky] * t[0, kx, c]
                for a in range(1, alpha):
                    coef = G[a, ky]
                    if coef != 0:
                        for c in range(C):
                            g[ky, kx, c] += coef * t[a, kx, c]
        for c in range(C):
            for ky in range(3):
                for kx in range(3):
                    gW[oc, c, ky, kx] = g[ky, kx, c]


def filter_grad_transform(dU, m, gW):
    """gW (OC, C, 3, 3) = G^T dU[:, :, oc, c] G, from dU (α, α, OC, C), summed in float64."""
    G = matrices(m, gW.dtype)[3]
    map_ranges(lambda t0, t1: _filter_grad_transform_kernel(dU, G, gW, t0, t1), gW.shape[0],
               elements=dU.size)
