"""Accuracy of bf16 mixed precision against float64, for every VGG-16 conv and fc shape.

The companion of `winograd_accuracy.py` (same layers, inputs and error measure) with
`minivgg.backend.set_precision("bf16")`: every GEMM takes bf16 operands (8 significant
bits, round to nearest even) and sums in fp32 (`kernels/cpu/matmul.py`, the AMX kernel or
its fallback). For each conv layer of configuration D (Table 1, true channel counts,
spatial size capped at `--size`) the forward output y, the input gradient gx and the weight
gradient gW are computed by im2col, Winograd F(2×2,3×3), F(4×4,3×3), direct convolution and
the blocked direct convolution in bf16 and compared with im2col in float64 on the same
float32 inputs:

    max |result - exact64| / RMS(exact64)

The fc rows do the same for fc6, fc7, fc8 (y = x W^T + b, gx, gW) on a batch of `--batch`.
The column "operands only" is the error that rounding x and W (and gy) to bf16 costs by
itself: the float64 result on the rounded operands. An algorithm whose error is a small
multiple of it loses nothing more; Winograd's transforms are rounded where the GEMM reads
them (the transformed tiles and filters), after the transform has mixed values of very
different sizes, so their error can be much larger.

    python benchmarks/bf16_accuracy.py                       # print the markdown tables
    python benchmarks/bf16_accuracy.py --out benchmarks/bf16_accuracy.md
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# first: winograd_accuracy imports common, which puts the repository root on sys.path
from winograd_accuracy import VGG16_CONVS, layer_inputs, relative_error  # noqa: E402

import numpy as np  # noqa: E402

from minivgg import backend  # noqa: E402
from minivgg.kernels import cpu  # noqa: E402
from minivgg.kernels.cpu.amx_isa import amx_available  # noqa: E402
from minivgg.kernels.cpu.bf16 import round_to_bf16  # noqa: E402

# column title -> the CPU kernel table's conv algorithm
ALGORITHMS = {"im2col": "im2col", "F(2x2,3x3)": "winograd", "F(4x4,3x3)": "winograd4",
              "direct": "direct", "blocked": "blocked"}
FCS = [("fc6", 25088, 4096), ("fc7", 4096, 4096), ("fc8", 4096, 1000)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=28, help="largest spatial size (default 28)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated layer names")
    p.add_argument("--out", help="also write the tables, with how they were made, here")
    return p.parse_args(argv)


def exact_conv(x, W, b, gy):
    """(y, gx, gW) by im2col in float64."""
    x, W, b, gy = (a.astype(np.float64) for a in (x, W, b, gy))
    gx, gW, _ = cpu.conv2d_backward(x, W, gy, (1, 1), (1, 1))
    return cpu.conv2d_forward(x, W, b, (1, 1), (1, 1)), gx, gW


def measure_conv(name, C, OC, size, batch, rng):
    """{column: (error of y, of gx, of gW)} for one conv layer."""
    x, W, b, gy = layer_inputs(C, OC, size, batch, name == "conv1_1", rng)
    exact = exact_conv(x, W, b, gy)
    rounded = exact_conv(round_to_bf16(x), round_to_bf16(W), b, round_to_bf16(gy))
    errors = {"operands only": [relative_error(r, e) for r, e in zip(rounded, exact)]}
    backend.set_precision("bf16")
    try:
        for column, algo in ALGORITHMS.items():
            y = cpu.conv2d_forward(x, W, b, (1, 1), (1, 1), algo)
            gx, gW, _ = cpu.conv2d_backward(x, W, gy, (1, 1), (1, 1), True, algo)
            errors[column] = [relative_error(r, e) for r, e in zip((y, gx, gW), exact)]
    finally:
        backend.set_precision("fp32")
    return errors


def fc_products(x, W, b, gy, matmul):
    """(y, gx, gW) of y = x W^T + b with `matmul`, as `functional.Linear` computes them."""
    return matmul(x, W.T) + b, matmul(gy, W), matmul(gy.T, x)


def measure_fc(n_in, n_out, batch, rng):
    """{column: (error of y, of gx, of gW)} for one fc layer."""
    x = np.maximum(rng.normal(size=(batch, n_in)), 0).astype(np.float32)
    W = (rng.normal(size=(n_out, n_in)) * np.sqrt(2.0 / n_in)).astype(np.float32)
    b = (rng.normal(size=n_out) * 0.1).astype(np.float32)
    gy = rng.normal(size=(batch, n_out)).astype(np.float32)
    exact = fc_products(*(a.astype(np.float64) for a in (x, W, b, gy)), np.matmul)
    rounded = fc_products(*(round_to_bf16(a).astype(np.float64) for a in (x, W)), b,
                          round_to_bf16(gy).astype(np.float64), np.matmul)
    backend.set_precision("bf16")
    try:
        ours = fc_products(x, W, b, gy, cpu.fc_matmul)
    finally:
        backend.set_precision("fp32")
    return {"operands only": [relative_error(r, e) for r, e in zip(rounded, exact)],
            "fc_matmul": [relative_error(r, e) for r, e in zip(ours, exact)]}


def table(rows, columns):
    """Markdown rows [(name, shape, {column: errors})] with a "worst" line."""
    lines = ["| layer | shape | " + " | ".join(f"{c} y / gx / gW" for c in columns) + " |",
             "|---" * (2 + len(columns)) + "|"]
    worst = {c: [0.0, 0.0, 0.0] for c in columns}
    for name, shape, errors in rows:
        for c in columns:
            worst[c] = [max(w, e) for w, e in zip(worst[c], errors[c])]
        lines.append(f"| {name} | {shape} | " + " | ".join(
            " / ".join(f"{e:.1e}" for e in errors[c]) for c in columns) + " |")
    lines.append("| **worst** | | " + " | ".join(
        " / ".join(f"{e:.1e}" for e in worst[c]) for c in columns) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    only = {s for s in args.only.split(",") if s}
    amx, why_not = amx_available()
    head = (f"max |bf16 result - float64| / RMS(float64); batch {args.batch}, spatial size "
            f"min(layer's, {args.size}), seed {args.seed}; GEMMs on "
            f"{'AMX tiles' if amx else 'the fp32 fallback (' + why_not + ')'}")
    print(head + "\n", flush=True)
    convs = []
    for name, C, OC, full in VGG16_CONVS:
        if not only or name in only:
            size = min(full, args.size)
            convs.append((name, f"{C}→{OC}, {size}²", measure_conv(name, C, OC, size,
                                                                   args.batch, rng)))
            print(f"{name}: " + ", ".join(f"{c} {e[0]:.1e}" for c, e in convs[-1][2].items()),
                  file=sys.stderr, flush=True)
    fcs = [(name, f"{n_in}→{n_out}", measure_fc(n_in, n_out, args.batch, rng))
           for name, n_in, n_out in FCS if not only or name in only]
    text = (table(convs, ["operands only", *ALGORITHMS]) + "\n\n"
            + table(fcs, ["operands only", "fc_matmul"]))
    print(text)
    if args.out:
        command = "python benchmarks/bf16_accuracy.py " + " ".join(
            a for a in (argv if argv is not None else sys.argv[1:]))
        with open(args.out, "w") as f:
            f.write(f"{OUT_HEADER}\n    {command.strip()}\n\n{head}\n\n{text}\n")


OUT_HEADER = """# bf16 mixed precision: accuracy against float64

Produced by `benchmarks/bf16_accuracy.py` (its docstring says what is measured; accuracy
does not depend on machine load). The conclusions drawn from it (the tolerances of
tests/test_bf16.py; `auto` running im2col where it would run Winograd under bf16) are in
README.md, "bf16 on AMX".
"""


if __name__ == "__main__":
    main()
