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
cheap, memory-bound passes. This module holds the matrices and the drivers, written once
for both devices like `kernels/common.py`'s; each device supplies the transforms
(`kernels/cpu/winograd.py` in Numba, `kernels/cuda/winograd.cu` in CUDA C) and its GEMMs
(BLAS, cuBLAS). `kernels/reference.py` has the plain NumPy version of the whole algorithm.

Shape legend as in kernels/common.py, plus: m the output tile size, α = m + 2 the input
tile size, TH, TW = ceil(H/m), ceil(W/m) tiles per image column/row, P tiles in a chunk.

Accuracy (float32 against float64, every VGG-16 conv shape with its true channel counts,
spatial size capped at 56; `python benchmarks/winograd_accuracy.py`, full table in
benchmarks/winograd_accuracy.md): the worst error over the 13 layers, as
max |float32 - float64| / RMS(float64), is

                 y        gx       gW
    im2col       2.4e-06  2.5e-06  2.2e-06
    F(2×2,3×3)   3.3e-06  3.5e-06  3.1e-06
    F(4×4,3×3)   6.0e-05  7.8e-05  2.6e-05

F(2×2,3×3) only adds, subtracts and halves, and is as accurate as im2col. F(4×4,3×3) loses
about 5 bits (its transforms multiply by up to 8 and divide by 24, and large terms cancel),
still far below what SGD notices; larger tiles lose more (Lavin & Gray measure the same
growth), which is why we stop at m = 4.
"""

from typing import TYPE_CHECKING

import numpy as np


if TYPE_CHECKING:  # for the annotations: a device's kernels, as the drivers call them
    from minivgg.kernels.common import Primitives

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


# Conv algorithm name (`minivgg.backend.set_conv_algorithm`) -> output tile size m
ALGORITHMS = {"winograd": 2, "winograd4": 4}


# The largest input of one image (C·H·W values) "auto" gives the blocked kernel: 256 KiB of
# float32, the small recipe's layers up to 112-pixel crops, none of VGG-16's at 224.
BLOCKED_MAX_IMAGE = 1 << 16


def auto_algorithm(device, N, C, H, W, blocked=False):
    """The algorithm "auto" runs for a 3×3/s1/p1 layer: a fixed rule of the shapes.

    NOTE: a rule, not a timing. Timing each shape on first use (cuDNN's benchmark mode)
    can pick differently from one process to the next when two algorithms are close or the
    machine is busy, and then a resumed run would not be bit-identical to an uninterrupted
    one. The rule depends only on the shapes, so every run makes the same choices.

    `blocked`: whether the CPU's blocked direct convolution (`kernels/cpu/blocked.py`) runs
    its AVX-512 micro-kernel on this layer (float32 on a CPU with AVX-512; the caller,
    `backend.conv_algorithm_for`, asks). Its plain-loop fallback is never picked.

    On the CPU the filter transforms cost about α²·C·OC per call whatever the batch, while
    the saving grows with the output pixels N·H·W, so
      * with `blocked`, C <= 128 and at most 2^16 input values per image (C·H·W): the
        blocked direct convolution. On such thin layers im2col's copies and Winograd's
        transforms cost as much as the GEMMs they feed, while the blocked kernel keeps 8
        pixels × 32 output channels in registers (its weight gradient takes the images a
        few rows at a time, so the batch does not matter). With more channels or bigger
        maps F(4×4,3×3)'s 4× fewer multiplications win (every VGG-16 layer at 224×224).
        That includes the RGB layer of the small recipe (3 -> 16 channels, 64×64, batch 32:
        forward + weight gradient 6.7 ms against the direct kernel's 10.7; 1 thread, CPU
        time, 2026-12-05, load 0.5, its forward then summing 4 input channels, now 3); at
        224×224 (150,528 values an image) direct stays ahead (batch 8: 119 ms against 126).
        NOTE: a bound on the whole input (C·N·H·W <= 2^19, until 2026-12-05) sent the small
        recipe's conv1_1, conv2_1 and conv3_2 to direct and F(4×4,3×3) at batch 64, and its
        training step took 0.117 s there against 0.091 s with every layer blocked (AMD
        EPYC, 2 threads, medians of 10 steps);
      * C < 8 otherwise (the RGB layer): direct convolution (kernels/direct.py); Winograd's
        GEMMs and im2col's would have an inner dimension of C = 3 or 27, far too thin;
      * N·H·W >= 1536: F(4×4,3×3), 4× fewer multiplications;
      * 512 <= N·H·W < 1536: F(2×2,3×3), whose filters are 2.25× smaller;
      * smaller: im2col; the transforms cost more than the multiplications they save.
    On the GPU: im2col, the fastest or within 1.4× of the fastest of minivgg's algorithms
    on every VGG-16 layer with TF32 off and on.
    The measurements behind each threshold, dated: benchmarks/README.md, "How auto's rule
    was derived".
    """
    if device != "cpu":
        return "im2col"
    pixels = N * H * W
    if blocked and C <= 128 and C * H * W <= BLOCKED_MAX_IMAGE:
        return "blocked"
    if C < 8:
        return "direct"
    if pixels >= 1536:
        return "winograd4"
    return "winograd" if pixels >= 512 else "im2col"


# Fewest tiles a chunk holds (when the layer has them): the GEMMs' inner dimension for gW
# and their column count otherwise; BLAS runs far below its peak on thinner matrices.
MIN_CHUNK_TILES = 64


def tile_chunks(n_rows, row_bytes, chunk_bytes, parts=1, TW=1):
    """Cut range(n_rows) tile rows (TW tiles each) into (r0, r1) chunks of about
    `chunk_bytes` but at least MIN_CHUNK_TILES tiles, and at least `parts` chunks when
    there are enough rows. Depends on the sizes only, never on timing."""
    step = max(1, chunk_bytes // row_bytes, -(-MIN_CHUNK_TILES // TW))
    step = max(1, min(step, -(-n_rows // parts)))
    return [(r0, min(r0 + step, n_rows)) for r0 in range(0, n_rows, step)]


# ----------------------------------------------------------------------------------------
# Drivers: the same for both devices. `dev` is a device's `common.Primitives`: the tile and
# filter transforms (each device holds the matrices above in its own form), `point_gemms`
# for the α² GEMMs, `map_ranges`, `workspace`, `num_parts()`, `winograd_chunk_bytes`.
# ----------------------------------------------------------------------------------------

def conv2d_forward(dev: "Primitives", x, W, b, m):
    """y = conv(x, W) + b by F(m×m, 3×3).  x (N, C, H, W), W (OC, C, 3, 3), b (OC,) or None.

    Per chunk of tile rows: input transform into V (α², C, P), α² GEMMs
    U (OC, C) @ V (C, P) into M, output transform of M straight into y (with the bias).
    """
    xp = dev.xp
    x = xp.ascontiguousarray(x)
    OC, C = W.shape[0], W.shape[1]
    b = xp.zeros(OC, dtype=x.dtype) if b is None else xp.ascontiguousarray(b, dtype=x.dtype)
    # NOTE: a workspace, not a fresh array: U is 4× the filters for F(4×4,3×3) (38 MB for
    # conv5), and page-faulting a new one on every call cost more than computing it.
    U = dev.workspace("wino_U", (m + 2, m + 2, OC, C), x.dtype)
    dev.filter_transform(xp.ascontiguousarray(W), m, False, U)
    return _convolve(dev, x, U, b, m)


def _convolve(dev: "Primitives", x, U, b, m):
    """y (N, OC, H, W) from x and transformed filters U (α, α, OC, C)."""
    xp = dev.xp
    N, C, H, Wd = x.shape
    OC, a2 = U.shape[2], (m + 2) ** 2
    TH, TW = tile_grid(H, Wd, m)
    y = xp.empty((N, OC, H, Wd), dtype=x.dtype)
    row_bytes = a2 * (C + OC) * TW * x.itemsize
    # NOTE: every chunk's GEMMs read all of U; chunks at least as big as U keep that to
    # half the traffic (deep layers' U is 38 MB, and their tiles miss L2 anyway).
    chunk_bytes = max(dev.winograd_chunk_bytes, U.nbytes)
    chunks = tile_chunks(N * TH, row_bytes, chunk_bytes, dev.num_parts(), TW)
    Umat = dev.pack_weights(U.reshape(a2, OC, C))  # once per call, not per chunk

    def job(t0, t1):
        for r0, r1 in chunks[t0:t1]:
            P = (r1 - r0) * TW
            V = dev.workspace("wino_V", (m + 2, m + 2, C, P), x.dtype)
            M = dev.workspace("wino_M", (m + 2, m + 2, OC, P), x.dtype)
            dev.input_transform(x, m, r0, r1, TH, TW, V)
            # one GEMM (OC, C) @ (C, P) per transform point
            dev.point_gemms(Umat, V.reshape(a2, C, P), M.reshape(a2, OC, P))
            dev.output_transform(M, m, r0, r1, TH, TW, b, y)

    dev.map_ranges(job, len(chunks))
    return y


def conv2d_backward(dev: "Primitives", x, W, gy, need_gx, m):
    """Gradients of `conv2d_forward` -> (gx or None, gW, gb).

    gx: a "same" 3×3 convolution of gy with each filter rotated by 180° and the channel
    axes swapped, run by the forward algorithm.
    gW: the gradient form of the forward, dL/dg = G^T [ sum over tiles of
    (A gy_tile A^T) ⊙ (B^T d B) ] G: per chunk, α² GEMMs Z (OC, P) @ V^T (P, C), summed in
    the transform domain and transformed back once.
    """
    xp = dev.xp
    x, gy = xp.ascontiguousarray(x), xp.ascontiguousarray(gy)
    OC, C = W.shape[0], W.shape[1]
    gx = None
    if need_gx:
        U = dev.workspace("wino_U", (m + 2, m + 2, C, OC), gy.dtype)
        dev.filter_transform(xp.ascontiguousarray(W), m, True, U)
        gx = _convolve(dev, gy, U, xp.zeros(C, dtype=gy.dtype), m)
    gW = _weight_grad(dev, x, gy, m)
    gb = gy.sum(axis=(0, 2, 3))
    return gx, gW, gb


def _weight_grad(dev: "Primitives", x, gy, m):
    """gW (OC, C, 3, 3) from the transformed products summed over every tile.

    NOTE: part k of the T parts sums a fixed, contiguous range of chunks, in order, into
    its own (α², OC, C) buffer, and the parts are added in order 0..T-1: the result does
    not depend on which thread ran which part or when (a resumed run stays bit-identical).
    """
    xp = dev.xp
    N, C, H, Wd = x.shape
    OC, a2 = gy.shape[1], (m + 2) ** 2
    TH, TW = tile_grid(H, Wd, m)
    row_bytes = a2 * (C + OC) * TW * x.itemsize
    # NOTE: chunks as big as the (α², OC, C) product, when that is larger: every chunk after
    # a part's first costs one pass over it (`parts[k] += prod`), which on deep layers took
    # as long as a GEMM when the chunks were the forward's 1 MB.
    chunk_bytes = max(dev.winograd_chunk_bytes, a2 * OC * C * x.itemsize)
    chunks = tile_chunks(N * TH, row_bytes, chunk_bytes, dev.num_parts(), TW)
    T = min(dev.num_parts(), len(chunks))
    bounds = [len(chunks) * k // T for k in range(T + 1)]
    parts = dev.workspace("wino_dU_parts", (T, a2, OC, C), x.dtype)

    def part(k):
        for i, (r0, r1) in enumerate(chunks[bounds[k]:bounds[k + 1]]):
            P = (r1 - r0) * TW
            V = dev.workspace("wino_V", (m + 2, m + 2, C, P), x.dtype)
            Z = dev.workspace("wino_M", (m + 2, m + 2, OC, P), x.dtype)
            dev.input_transform(x, m, r0, r1, TH, TW, V)
            dev.grad_output_transform(gy, m, r0, r1, TH, TW, Z)
            prod = parts[k] if i == 0 else dev.workspace("wino_dU", (a2, OC, C), x.dtype)
            # one GEMM (OC, P) @ (P, C) per transform point
            dev.point_gemms(Z.reshape(a2, OC, P), V.reshape(a2, C, P).transpose(0, 2, 1), prod)
            if i > 0:
                parts[k] += prod

    # one range of parts per thread; T <= the thread count, so usually one part each
    dev.map_ranges(lambda k0, k1: [part(k) for k in range(k0, k1)], T)
    dU = parts[0]
    for k in range(1, T):
        dU += parts[k]
    gW = xp.empty((OC, C, 3, 3), dtype=x.dtype)
    dev.filter_grad_transform(dU.reshape(m + 2, m + 2, OC, C), m, gW)
    return gW
