"""Accuracy of Winograd convolution against float64, for every VGG-16 conv layer shape.

For each of the 13 conv layers of configuration D (Table 1) with its true channel counts,
the forward output y, the input gradient gx and the weight gradient gW are computed in
float32 by im2col + GEMM, Winograd F(2×2,3×3) and F(4×4,3×3), and compared with im2col in
float64 on the same (float32-representable) inputs. The error reported is

    max |result32 - exact64| / RMS(exact64)

the worst element's error in units of the typical magnitude of the result. Inputs are
ReLU'd normals (what a hidden layer sees; conv1_1 sees plain normals, as a mean-subtracted
image), filters He-initialised, output gradients normal. The spatial size is reduced from
224..14 to at most `--size` (the error of y and gx depends on the channels, which are the
true ones; gW sums over N*H*W positions, so it is reported at that reduced size).

`--tf32` adds what the GPU's TF32 mode would do to the forward output: the GEMM operands
rounded to TF32 (`round_tf32`: float32 with 10 mantissa bits, round to nearest even) and
the products summed in float32, as cuBLAS's CUBLAS_COMPUTE_32F_FAST_TF32 does; im2col's
GEMM operands are the image patches and the filters, Winograd's the transformed tiles and
transformed filters (`winograd_forward_tf32`, a plain NumPy Winograd written here so the
rounding sits exactly where the GPU's would).

    python benchmarks/winograd_accuracy.py                  # print the markdown table
    python benchmarks/winograd_accuracy.py --size 28 --batch 1
    python benchmarks/winograd_accuracy.py --tf32          # + forward errors under TF32
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402,F401  (puts the repository root on sys.path)

import numpy as np  # noqa: E402

from minivgg.kernels import cpu  # noqa: E402
from minivgg.kernels.winograd import tile_grid, transforms  # noqa: E402

# (name, C, OC, spatial size at 224×224 input): configuration D, Table 1
VGG16_CONVS = [
    ("conv1_1", 3, 64, 224), ("conv1_2", 64, 64, 224),
    ("conv2_1", 64, 128, 112), ("conv2_2", 128, 128, 112),
    ("conv3_1", 128, 256, 56), ("conv3_2", 256, 256, 56), ("conv3_3", 256, 256, 56),
    ("conv4_1", 256, 512, 28), ("conv4_2", 512, 512, 28), ("conv4_3", 512, 512, 28),
    ("conv5_1", 512, 512, 14), ("conv5_2", 512, 512, 14), ("conv5_3", 512, 512, 14),
]

# column title -> the CPU kernel table's conv algorithm
ALGORITHMS = {"im2col": "im2col", "F(2x2,3x3)": "winograd", "F(4x4,3x3)": "winograd4"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=56, help="largest spatial size (default 56)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated layer names")
    p.add_argument("--tf32", action="store_true",
                   help="also the forward error with TF32-rounded GEMM operands")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------
# TF32, emulated: what the GPU's tensor cores do to a float32 GEMM in TF32 mode
# ----------------------------------------------------------------------------------------

def round_tf32(a):
    """float32 `a` rounded to TF32: 1 sign, 8 exponent and 10 mantissa bits (of float32's
    23), round to nearest, ties to even; still stored as float32.

    NOTE: done on the bits: add half of the dropped 13 bits' range, plus the lowest kept
    bit for ties-to-even, then clear the 13 bits. (Infinities and NaNs do not occur here.)
    """
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    keep = (bits >> np.uint32(13)) & np.uint32(1)
    bits = (bits + np.uint32(0x0FFF) + keep) & np.uint32(0xFFFFE000)
    return bits.view(np.float32)


def gemm_tf32(A, B):
    """A @ B as TF32 tensor cores compute it: operands rounded to TF32, float32 sums."""
    return np.matmul(round_tf32(A), round_tf32(B), dtype=np.float32)


def im2col_forward_tf32(x, W, b):
    """3×3/s1/p1 convolution as one im2col GEMM per image with TF32 operands."""
    N, C, H, Wd = x.shape
    cols = cpu.im2col(x, 3, 3, 1, 1, 1, 1)  # (N, C*9, H*W)
    y = np.stack([gemm_tf32(W.reshape(len(W), -1), cols[n]) for n in range(N)])
    return y.reshape(N, len(W), H, Wd) + b[None, :, None, None]


def winograd_forward_tf32(x, W, b, m):
    """3×3/s1/p1 convolution by Winograd F(m×m,3×3) (kernels/winograd.py's algorithm):
    transforms in float32, the α² point GEMMs U (OC, C) @ V (C, tiles) with TF32 operands."""
    BT, G, AT = (t.astype(np.float32) for t in transforms(m))
    N, C, H, Wd = x.shape
    alpha, (TH, TW) = m + 2, tile_grid(H, Wd, m)
    pad = np.zeros((N, C, TH * m + 2, TW * m + 2), np.float32)
    pad[:, :, 1:H + 1, 1:Wd + 1] = x
    # d[n, c, ty, tx] = the α×α input tile whose outputs start at (ty*m, tx*m)
    rows = np.arange(TH)[:, None] * m + np.arange(alpha)[None, :]  # (TH, α)
    cols = np.arange(TW)[:, None] * m + np.arange(alpha)[None, :]  # (TW, α)
    d = pad[:, :, rows[:, :, None, None], cols[None, None, :, :]]  # (N, C, TH, α, TW, α)
    V = np.einsum("ij,ncyjxk,lk->ilcnyx", BT, d, BT, dtype=np.float32)
    U = np.einsum("ij,ocjk,lk->iloc", G, W, G, dtype=np.float32)
    M = gemm_tf32(U.reshape(alpha * alpha, len(W), C),
                  V.reshape(alpha * alpha, C, -1)).reshape(alpha, alpha, len(W), N, TH, TW)
    Y = np.einsum("ij,jkonyx,lk->noyixl", AT, M, AT, dtype=np.float32)
    y = Y.reshape(N, len(W), TH * m, TW * m)[:, :, :H, :Wd]
    return y + b[None, :, None, None]


def measure_tf32(name, C, OC, size, batch, rng):
    """{algorithm: error of y} with TF32-rounded GEMM operands, for one layer."""
    x, W, b, _ = layer_inputs(C, OC, size, batch, name == "conv1_1", rng)
    exact = cpu.conv2d_forward(*(a.astype(np.float64) for a in (x, W, b)), (1, 1), (1, 1))
    return {"im2col": relative_error(im2col_forward_tf32(x, W, b), exact),
            "F(2x2,3x3)": relative_error(winograd_forward_tf32(x, W, b, 2), exact),
            "F(4x4,3x3)": relative_error(winograd_forward_tf32(x, W, b, 4), exact)}


def layer_inputs(C, OC, size, batch, first, rng):
    """float32 x, W, b, gy for one layer (see the module docstring)."""
    x = rng.normal(size=(batch, C, size, size))
    x = x if first else np.maximum(x, 0)
    W = rng.normal(size=(OC, C, 3, 3)) * np.sqrt(2.0 / (9 * C))
    b = rng.normal(size=OC) * 0.1
    gy = rng.normal(size=(batch, OC, size, size))
    return [a.astype(np.float32) for a in (x, W, b, gy)]


def relative_error(result, exact):
    return float(np.abs(result.astype(np.float64) - exact).max() / np.sqrt((exact ** 2).mean()))


def measure(name, C, OC, size, batch, rng):
    """{algorithm: (error of y, of gx, of gW)} for one layer."""
    x, W, b, gy = layer_inputs(C, OC, size, batch, name == "conv1_1", rng)
    x64, W64, b64, gy64 = (a.astype(np.float64) for a in (x, W, b, gy))
    y_exact = cpu.conv2d_forward(x64, W64, b64, (1, 1), (1, 1))
    gx_exact, gW_exact, _ = cpu.conv2d_backward(x64, W64, gy64, (1, 1), (1, 1))
    errors = {}
    for algo, name in ALGORITHMS.items():
        y = cpu.conv2d_forward(x, W, b, (1, 1), (1, 1), name)
        gx, gW, _ = cpu.conv2d_backward(x, W, gy, (1, 1), (1, 1), True, name)
        errors[algo] = (relative_error(y, y_exact), relative_error(gx, gx_exact),
                        relative_error(gW, gW_exact))
    return errors


def main(argv=None):
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    only = {s for s in args.only.split(",") if s}
    algos = list(ALGORITHMS)
    print(f"max |float32 - float64| / RMS(float64); batch {args.batch}, spatial size "
          f"min(layer's, {args.size}), seed {args.seed}\n")
    print("| layer | C→OC | size | " + " | ".join(f"{a} y / gx / gW" for a in algos) + " |")
    print("|---" * (3 + len(algos)) + "|")
    worst = {a: [0.0, 0.0, 0.0] for a in algos}
    for name, C, OC, full in VGG16_CONVS:
        if only and name not in only:
            continue
        size = min(full, args.size)
        errors = measure(name, C, OC, size, args.batch, rng)
        cells = []
        for a in algos:
            worst[a] = [max(w, e) for w, e in zip(worst[a], errors[a])]
            cells.append(" / ".join(f"{e:.1e}" for e in errors[a]))
        print(f"| {name} | {C}→{OC} | {size} | " + " | ".join(cells) + " |", flush=True)
    print("| **worst** | | | " + " | ".join(" / ".join(f"{e:.1e}" for e in worst[a])
                                          for a in algos) + " |")
    if args.tf32:
        print_tf32_table(args, only)


def print_tf32_table(args, only):
    rng = np.random.default_rng(args.seed)  # the same inputs as the table above
    algos = list(ALGORITHMS)
    print("\nForward output y with TF32 GEMM operands (max |y - exact64| / RMS(exact64)):\n")
    print("| layer | C→OC | size | " + " | ".join(f"{a} y, TF32" for a in algos) + " |")
    print("|---" * (3 + len(algos)) + "|")
    worst = {a: 0.0 for a in algos}
    for name, C, OC, full in VGG16_CONVS:
        if only and name not in only:
            continue
        errors = measure_tf32(name, C, OC, min(full, args.size), args.batch, rng)
        worst = {a: max(worst[a], errors[a]) for a in algos}
        print(f"| {name} | {C}→{OC} | {min(full, args.size)} | "
              + " | ".join(f"{errors[a]:.1e}" for a in algos) + " |", flush=True)
    print("| **worst** | | | " + " | ".join(f"{worst[a]:.1e}" for a in algos) + " |")


if __name__ == "__main__":
    main()
