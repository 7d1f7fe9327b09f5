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

    python benchmarks/winograd_accuracy.py                  # print the markdown table
    python benchmarks/winograd_accuracy.py --size 28 --batch 1
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402,F401  (puts the repository root on sys.path)

import numpy as np  # noqa: E402

from minivgg.kernels import cpu  # noqa: E402

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
    return p.parse_args(argv)


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


if __name__ == "__main__":
    main()
