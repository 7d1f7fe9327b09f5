"""Winograd convolution, F(2×2,3×3) and F(4×4,3×3), for VGG's 3×3/stride-1/padding-1 convs.

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016,
arXiv:1509.09308), after Winograd's minimal filtering algorithms (1980). Every VGG conv
layer but config C's 1×1s is 3×3, stride 1, padding 1 (Sec. 2.1), exactly the case where a
minimal filtering algorithm saves most: F(m×m, 3×3) computes an m×m block of outputs from an
α×α input tile, α = m + 2, with α² multiplications per (input, output) channel pair instead
of 9 m² for direct convolution or im2col:

    Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A        g: 3×3 filter, d: α×α tile, Y: m×m outputs

    F(2×2, 3×3): 16 multiplications for 4 outputs, 2.25× fewer than 36
    F(4×4, 3×3): 36 multiplications for 16 outputs, 4× fewer than 144

Over a layer the ⊙ becomes, for each of the α² transform points (ξ, ν), one GEMM
U[ξ,ν] (OC, C) @ V[ξ,ν] (C, P) over all P tiles of a chunk; the transforms around it are
cheap, memory-bound passes (Numba kernels below) and the GEMMs are NumPy's BLAS.

Shape legend as in kernels/cpu.py, plus: m the output tile size, α = m + 2 the input tile
size, TH, TW = ceil(H/m), ceil(W/m) tiles per image column/row, P tiles in a chunk.

Accuracy (float32 against float64, every VGG-16 conv shape with its true channel counts,
spatial size capped at 56; `python benchmarks/winograd_accuracy.py`, full table in
benchmarks/winograd_accuracy.md): the worst error over the 13 layers, as
max |float32 - float64| / RMS(float64), is

                 y        gx       gW
    im2col       2.4e-06  2.5e-06  2.2e-06
    F(2×2,3×3)   3.3e-06  3.6e-06  3.0e-06
    F(4×4,3×3)   6.7e-05  7.8e-05  2.8e-05

F(2×2,3×3) only adds, subtracts and halves, and is as accurate as im2col. F(4×4,3×3) loses
about 5 bits (its transforms multiply by up to 8 and divide by 24, and large terms cancel),
still far below what SGD notices; larger tiles lose more (Lavin & Gray measure the same
growth), which is why we stop at m = 4.
"""

import numpy as np
from numba import njit

from minivgg.kernels.cpu import _JIT, _num_threads, _parallel_for, _run_jobs, workspace

# ----------------------------------------------------------------------------------------
# The transform matrices
# ----------------------------------------------------------------------------------------
#
# F(m, 3) in 1-D: m outputs y_i = sum_k g_k d_{i+k} of a 3-tap filter over α = m + 2
# inputs, as y = A^T [(G g) ⊙ (B^T d)]. Winograd's construction picks α - 1 distinct
# interpolation points plus the point at infinity, evaluates the filter polynomial (G) and
# the input (B^T) at them, multiplies point by point, and interpolates back (A^T). Nesting
# the 1-D algorithm with itself gives the 2-D one, Y = A^T [(G g G^T) ⊙ (B^T d B)] A.

# F(2, 3): points 0, 1, -1 and infinity. Lavin & Gray Sec. 4, F(2×2,3×3).
BT2 = np.array([[1, 0, -1, 0],
                [0, 1, 1, 0],
                [0, -1, 1, 0],
                [0, 1, 0, -1]], dtype=np.float64)
G2 = np.array([[1, 0, 0],
               [1 / 2, 1 / 2, 1 / 2],
               [1 / 2, -1 / 2, 1 / 2],
               [0, 0, 1]], dtype=np.float64)
AT2 = np.array([[1, 1, 1, 0],
                [0, 1, -1, -1]], dtype=np.float64)

# F(4, 3): points 0, 1, -1, 2, -2 and infinity. Lavin & Gray Sec. 4, F(4×4,3×3); NNPACK's
# F(6×6,3×3) takes the same points plus ±1/2. Small integer points keep B^T and A^T small
# integers; the 1/4, 1/6, 1/12, 1/24 in G are the interpolation denominators, applied once
# to the filters.
BT4 = np.array([[4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1]], dtype=np.float64)
G4 = np.array([[1 / 4, 0, 0],
               [-1 / 6, -1 / 6, -1 / 6],
               [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6],
               [1 / 24, -1 / 12, 1 / 6],
               [0, 0, 1]], dtype=np.float64)
AT4 = np.array([[1, 1, 1, 1, 1, 0],
                [0, 1, -1, 2, -2, 0],
                [0, 1, 1, 4, 4, 0],
                [0, 1, -1, 8, -8, 1]], dtype=np.float64)

TILE_SIZES = (2, 4)


def transforms(m):
    """(B^T, G, A^T) of F(m×m, 3×3), m = 2 or 4, in float64."""
    if m == 2:
        return BT2, G2, AT2
    if m == 4:
        return BT4, G4, AT4
    raise ValueError(f"Winograd tile size must be 2 or 4, got {m}")


def tile_grid(H, W, m):
    """(TH, TW): m×m output tiles that cover an H×W output (the last ones hang over)."""
    return -(-H // m), -(-W // m)


# ----------------------------------------------------------------------------------------
# The plain NumPy version: every tile at once (tests, teaching)
# ----------------------------------------------------------------------------------------

def conv2d_winograd_reference(x, W, b, m):
    """y = conv(x, W) + b, 3×3, stride 1, padding 1, by F(m×m, 3×3) on all tiles at once.

    x (N, C, H, W), W (OC, C, 3, 3), b (OC,) or None -> (N, OC, H, W). Twelve lines of
    NumPy that the fast kernels below are tested against.
    """
    BT, G, AT = transforms(m)
    N, C, H, Wd = x.shape
    TH, TW = tile_grid(H, Wd, m)
    xp = np.zeros((N, C, TH * m + 2, TW * m + 2), dtype=x.dtype)
    xp[:, :, 1:H + 1, 1:Wd + 1] = x                    # padding 1, plus the overhang
    d = np.lib.stride_tricks.sliding_window_view(xp, (m + 2, m + 2), axis=(2, 3))
    d = d[:, :, ::m, ::m]                              # (N, C, TH, TW, α, α), overlap 2
    V = np.einsum("ai,nctuij,bj->nctuab", BT, d, BT)   # input transform  B^T d B
    U = np.einsum("ai,ocij,bj->ocab", G, W, G)         # filter transform G g G^T
    M = np.einsum("ocab,nctuab->notuab", U, V)         # α² products, summed over c
    Y = np.einsum("ia,notuab,jb->notuij", AT, M, AT)   # output transform A^T M A
    y = Y.transpose(0, 1, 2, 4, 3, 5).reshape(N, -1, TH * m, TW * m)[:, :, :H, :Wd]
    y = y + b[None, :, None, None] if b is not None else y
    return y.astype(x.dtype)


# ----------------------------------------------------------------------------------------
# Transform kernels (Numba). A chunk is the tile rows r0..r1-1, r = n*TH + ty; tile
# (n, ty, tx) is column q = (r - r0)*TW + tx of the chunk's (C, P) matrices.
# ----------------------------------------------------------------------------------------
#
# Every transform is a "sandwich" L d L^T of a small tile d with a small matrix L, done for
# a whole row of TW tiles at once: the tiles' (i, j) entries lie side by side in a row of
# TW floats, so each step is `row += coef * other_row`, which LLVM vectorises, and the zero
# entries of L are skipped. Input: L = B^T (α×α); output: L = A^T (m×α); output gradient
# (for the weight gradient): L = A (α×m).

# NOTE: the loops index the whole 3-D/4-D arrays (out[a, bb, ch, q]) rather than 1-D
# slices or transposed views of them: Numba then knows the innermost axis is contiguous and
# LLVM vectorises the `q` loops; through a transposed view it does not (measured 3× slower).

@njit(**_JIT)
def _along_rows(L, d, tmp):
    """tmp[i, bb, q] = sum_j L[bb, j] d[i, j, q]: L applied to each window row (d L^T)."""
    r, k = L.shape
    for i in range(d.shape[0]):
        for bb in range(r):
            for q in range(d.shape[2]):
                tmp[i, bb, q] = 0
            for j in range(k):
                coef = L[bb, j]
                if coef != 0:
                    for q in range(d.shape[2]):
                        tmp[i, bb, q] += coef * d[i, j, q]


@njit(**_JIT)
def tile_transform(src, L, m, shift, r0, r1, TH, TW, out):
    """out[a, b, ch, q] = (L d L^T)[a, b] for the k×k window d of src[n, ch] of every tile q.

    src (N, CH, H, W); L (r, k); out (r, r, CH, P). Tile (n, ty, tx)'s window starts at row
    ty*m + shift, column tx*m + shift, and reads zeros outside the image. The input
    transform is (L, shift) = (B^T, -1): α×α windows overlapping by 2 (padding 1); the
    output-gradient transform is (A, 0): the tile's own m×m block of gy.
    """
    CH, H, W = src.shape[1], src.shape[2], src.shape[3]
    r, k = L.shape
    P = (r1 - r0) * TW
    width = (TW - 1) * m + k  # xr[t] = src[n, ch, iy, t + shift], zero outside the row
    xr = np.zeros(width, dtype=out.dtype)
    lo, hi = max(0, -shift), max(0, min(width, W - shift))
    d = np.empty((k, k, P), dtype=out.dtype)
    tmp = np.empty((k, r, P), dtype=out.dtype)
    for ch in range(CH):
        for row in range(r0, r1):  # gather the windows: d[i, j, q] = window q's (i, j)
            n, ty, q0 = row // TH, row % TH, (row - r0) * TW
            for i in range(k):
                iy = ty * m + shift + i
                if iy < 0 or iy >= H:
                    d[i, :, q0:q0 + TW] = 0
                    continue
                xr[lo:hi] = src[n, ch, iy, lo + shift:hi + shift]
                for j in range(k):
                    for tx in range(TW):
                        d[i, j, q0 + tx] = xr[tx * m + j]
        _along_rows(L, d, tmp)
        for a in range(r):  # out = L tmp, along the window columns
            for bb in range(r):
                for q in range(P):
                    out[a, bb, ch, q] = 0
                for i in range(k):
                    coef = L[a, i]
                    if coef != 0:
                        for q in range(P):
                            out[a, bb, ch, q] += coef * tmp[i, bb, q]


@njit(**_JIT)
def input_transform(x, BT, m, r0, r1, TH, TW, V):
    """V (α, α, C, P) = B^T d B for the α×α input tile d of every tile and channel."""
    tile_transform(x, BT, m, -1, r0, r1, TH, TW, V)


@njit(**_JIT)
def grad_output_transform(gy, A, m, r0, r1, TH, TW, Z):
    """Z (α, α, OC, P) = A g A^T for the m×m block g of gy of every tile: the adjoint of
    `output_transform` (gy outside the image, cropped from y, counts as zero)."""
    tile_transform(gy, A, m, 0, r0, r1, TH, TW, Z)


@njit(**_JIT)
def output_transform(M, AT, m, r0, r1, TH, TW, b, y):
    """y tile = A^T M[:, :, oc, q] A + b[oc], cropped to the image, for every tile q.

    M (α, α, OC, P), b (OC,), y (N, OC, H, W).
    """
    OC, H, W = y.shape[1], y.shape[2], y.shape[3]
    alpha, P = m + 2, (r1 - r0) * TW
    tmp = np.empty((alpha, m, P), dtype=M.dtype)
    o = np.empty((m, m, P), dtype=M.dtype)
    for oc in range(OC):
        for a in range(alpha):  # tmp[a, j] = sum_b M[a, b] A[b, j], along the rows
            for j in range(m):
                for q in range(P):
                    tmp[a, j, q] = 0
                for bb in range(alpha):
                    coef = AT[j, bb]
                    if coef != 0:
                        for q in range(P):
                            tmp[a, j, q] += coef * M[a, bb, oc, q]
        for i in range(m):  # o[i, j] = sum_a A^T[i, a] tmp[a, j], along the columns
            for j in range(m):
                for q in range(P):
                    o[i, j, q] = 0
                for a in range(alpha):
                    coef = AT[i, a]
                    if coef != 0:
                        for q in range(P):
                            o[i, j, q] += coef * tmp[a, j, q]
        for row in range(r0, r1):  # move each tile row's m×m blocks into y, cropped
            n, ty, q0 = row // TH, row % TH, (row - r0) * TW
            for i in range(min(m, H - ty * m)):
                for j in range(m):
                    for tx in range(min(TW, (W - j + m - 1) // m)):
                        y[n, oc, ty * m + i, tx * m + j] = o[i, j, q0 + tx] + b[oc]


@njit(**_JIT)
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


def filter_transform(W, m, dtype, rotate=False):
    """U (α, α, OC, C) = G W[oc, c] G^T for every filter, computed in float64, stored in
    `dtype`. With `rotate`, the filters of the input gradient instead: W[:, :, ::-1, ::-1]
    with the channel axes swapped, U (α, α, C, OC). The result lives in this thread's
    workspace until the next call."""
    O, I = (W.shape[1], W.shape[0]) if rotate else (W.shape[0], W.shape[1])
    # NOTE: a workspace, not a fresh array: U is 4× the filters for F(4×4,3×3) (38 MB for
    # conv5), and page-faulting a new one on every call cost more than computing it.
    U = workspace("wino_U", (m + 2, m + 2, O, I), dtype)
    _parallel_for(_filter_transform_kernel, O, np.ascontiguousarray(W), transforms(m)[1],
                  rotate, U, elements=U.size)
    return U


@njit(**_JIT)
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


def filter_grad_transform(dU, m, dtype):
    """gW (OC, C, 3, 3) = G^T dU[:, :, oc, c] G, from dU (α, α, OC, C); computed in float64,
    stored in `dtype`."""
    OC, C = dU.shape[2], dU.shape[3]
    gW = np.empty((OC, C, 3, 3), dtype=dtype)
    _parallel_for(_filter_grad_transform_kernel, OC, dU, transforms(m)[1], gW,
                  elements=dU.size)
    return gW


# ----------------------------------------------------------------------------------------
# Chunks: tiles handed to one thread at a time
# ----------------------------------------------------------------------------------------

# Bytes of transformed tiles (V and M, or V and Z) per chunk: each α² GEMM then streams a
# slab that stays in L2/L3 while the transform around it works on it, and the step's peak
# memory stays bounded whatever the batch.
WINOGRAD_CHUNK_BYTES = 8 * 2**20


def tile_chunks(n_rows, row_bytes, parts=None):
    """Cut range(n_rows) tile rows into (r0, r1) chunks of about WINOGRAD_CHUNK_BYTES, at
    least `parts` of them (default: one per thread) when there are enough rows."""
    parts = _num_threads() if parts is None else parts
    step = max(1, WINOGRAD_CHUNK_BYTES // row_bytes)
    step = max(1, min(step, -(-n_rows // parts)))
    return [(r0, min(r0 + step, n_rows)) for r0 in range(0, n_rows, step)]


# ----------------------------------------------------------------------------------------
# Convolution
# ----------------------------------------------------------------------------------------

def _check(W, stride, padding):
    if W.shape[2:] != (3, 3) or tuple(stride) != (1, 1) or tuple(padding) != (1, 1):
        raise ValueError("Winograd convolution needs 3×3 filters, stride 1, padding 1; got "
                         f"{W.shape[2:]}, stride {stride}, padding {padding}")


def _winograd_conv(x, U, b, m):
    """y (N, OC, H, W) from x and transformed filters U (α, α, OC, C); the shared forward."""
    N, C, H, Wd = x.shape
    OC, alpha = U.shape[2], m + 2
    BT, _, AT = (t.astype(x.dtype) for t in transforms(m))
    TH, TW = tile_grid(H, Wd, m)
    Umat = U.reshape(alpha * alpha, OC, C)
    y = np.empty((N, OC, H, Wd), dtype=x.dtype)

    def job(chunk):
        r0, r1 = chunk
        P = (r1 - r0) * TW
        V = workspace("wino_V", (alpha, alpha, C, P), x.dtype)
        M = workspace("wino_M", (alpha, alpha, OC, P), x.dtype)
        input_transform(x, BT, m, r0, r1, TH, TW, V)
        # α² GEMMs (OC, C) @ (C, P), one per transform point
        np.matmul(Umat, V.reshape(alpha * alpha, C, P), out=M.reshape(alpha * alpha, OC, P))
        output_transform(M, AT, m, r0, r1, TH, TW, b, y)

    row_bytes = alpha * alpha * (C + OC) * TW * x.itemsize
    _run_jobs(job, tile_chunks(N * TH, row_bytes))
    return y


def conv2d_winograd_forward(x, W, b, stride=(1, 1), padding=(1, 1), m=4):
    """y = conv(x, W) + b by F(m×m, 3×3).  x (N, C, H, W), W (OC, C, 3, 3), b (OC,) or None.

    Per chunk of tiles, on one thread: input transform into V (α², C, P), α² GEMMs
    U (OC, C) @ V (C, P) into M, output transform of M straight into y (with the bias).
    """
    _check(W, stride, padding)
    x = np.ascontiguousarray(x)
    b = np.zeros(W.shape[0], x.dtype) if b is None else np.ascontiguousarray(b, x.dtype)
    return _winograd_conv(x, filter_transform(W, m, x.dtype), b, m)


def conv2d_winograd_backward(x, W, gy, stride=(1, 1), padding=(1, 1), need_gx=True, m=4):
    """Gradients of `conv2d_winograd_forward` -> (gx or None, gW, gb).

    gx: a "same" 3×3 convolution of gy with each filter rotated by 180° and the channel
    axes swapped (W' (C, OC, 3, 3)), run by the forward algorithm.
    gW: the gradient form of the forward, dL/dg = G^T [ sum over tiles of
    (A gy_tile A^T) ⊙ (B^T d B) ] G: per chunk, α² GEMMs Z (OC, P) @ V^T (P, C), summed in
    the transform domain and transformed back once.
    """
    _check(W, stride, padding)
    x, gy = np.ascontiguousarray(x), np.ascontiguousarray(gy)
    gx = None
    if need_gx:
        gx = _winograd_conv(gy, filter_transform(W, m, gy.dtype, rotate=True),
                            np.zeros(W.shape[1], gy.dtype), m)
    gW = _winograd_weight_grad(x, gy, m)
    gb = gy.sum(axis=(0, 2, 3))
    return gx, gW, gb


def _winograd_weight_grad(x, gy, m):
    """gW (OC, C, 3, 3) from the transformed products summed over every tile.

    NOTE: each of the T parts sums a fixed, contiguous range of tiles into its own
    (α, α, OC, C) buffer, and the parts are added in order 0..T-1, so the result does not
    depend on which thread ran which part or when (a resumed run stays bit-identical).
    """
    N, C, H, Wd = x.shape
    OC, alpha = gy.shape[1], m + 2
    BT, _, AT = (t.astype(x.dtype) for t in transforms(m))
    A = np.ascontiguousarray(AT.T)
    TH, TW = tile_grid(H, Wd, m)
    row_bytes = alpha * alpha * (C + OC) * TW * x.itemsize
    chunks = tile_chunks(N * TH, row_bytes)
    T = min(_num_threads(), len(chunks))
    bounds = [len(chunks) * k // T for k in range(T + 1)]
    parts = workspace("wino_dU_parts", (T, alpha * alpha, OC, C), x.dtype)

    def part(k):
        for r0, r1 in chunks[bounds[k]:bounds[k + 1]]:
            first = r0 == chunks[bounds[k]][0]
            prod = parts[k] if first else workspace("wino_dU", (alpha * alpha, OC, C), x.dtype)
            P = (r1 - r0) * TW
            V = workspace("wino_V", (alpha, alpha, C, P), x.dtype)
            Z = workspace("wino_M", (alpha, alpha, OC, P), x.dtype)
            input_transform(x, BT, m, r0, r1, TH, TW, V)
            grad_output_transform(gy, A, m, r0, r1, TH, TW, Z)
            # α² GEMMs (OC, P) @ (P, C)
            np.matmul(Z.reshape(alpha * alpha, OC, P),
                      V.reshape(alpha * alpha, C, P).transpose(0, 2, 1), out=prod)
            if not first:
                parts[k] += prod

    _run_jobs(part, list(range(T)))
    dU = parts[0]
    for k in range(1, T):
        dU += parts[k]
    return filter_grad_transform(dU.reshape(alpha, alpha, OC, C), m, x.dtype)
