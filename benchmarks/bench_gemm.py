"""GEMM benchmark: minivgg's AMX bf16 GEMM against PyTorch's bf16 matmul and NumPy fp32.

The shapes are the convolutions' GEMMs as im2col lays them out: Y (M, N) = W (M, K) @
cols (K, N), M = output channels, K = input channels × 9, N = output pixels.

    python benchmarks/bench_gemm.py --precision bf16    # VGG-16 at 224 and the small recipe
    python benchmarks/bench_gemm.py --precision bf16 --nets vgg16 --append
    python benchmarks/bench_gemm.py --precision bf16 --shapes conv3_1,4096x1152x256 --rounds 3
    python benchmarks/bench_gemm.py                     # fp32: minivgg's GEMM, torch fp32

`--precision fp32` (the default, as in every benchmark) times minivgg's fp32 GEMM
(`kernels/cpu/matmul.py`, NumPy's BLAS) against PyTorch's fp32 matmul and NumPy; `bf16` the
AMX kernel against PyTorch's bf16 matmul, in the columns below.

N, stated: `vgg16` is configuration D at 224×224 with N = the pixels of one image (batch 1,
the unit an im2col chunk of the CPU path covers), so conv1_x has N = 50176 and conv5_x
N = 196; `small` is the small CPU recipe (A at width 0.25, 64×64) with N = the pixels of
its whole batch of 32. Layers with the same (M, K, N) share a row. `--shapes` picks rows by
layer name or adds MxKxN shapes (4096x1152x256 is the shape issue 23 quotes PyTorch on).

Columns, all in GFLOP/s (2 M N K FLOPs per call):
- "minivgg AMX": `gemm_bf16(pack_a(W), cols)`, W packed once (as a layer would, once per
  step) and cols rounded to bf16 and packed in every call, the way a conv layer would run;
- "AMX kernel": both operands packed beforehand, the kernel alone;
- "torch bf16": `torch.matmul` on bf16 tensors (oneDNN's AMX GEMM on such a CPU);
- "NumPy fp32": `np.matmul` on float32 (the BLAS the fp32 path uses).
Ratios are throughput ratios: minivgg AMX's GFLOP/s over torch's (target, issue 23: at least
0.8, stretch 1.0) and over NumPy's, and the kernel's alone over torch's. NOTE: torch's
operands are bf16 already (half the bytes to read) and it reorders B inside the call; the
"minivgg AMX" column starts from fp32 cols, as a conv layer's im2col gives them today, so on
thin layers (small M) its rounding and packing of cols costs more than the multiply.

Each library runs in a fresh process of its own (a worker), so one library's threads and
caches never meet the other's; the workers take turns (minivgg, torch, NumPy, minivgg, ...)
for `--rounds` rounds, each timing every shape `--repeats` times after `--warmup` calls.
Times are medians; the ratios are the median over rounds of each round's ratio (see
`common.median_ratio`).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repository root on sys.path)

NETS = {  # name: (config, input size, width, batch: the images whose pixels make N)
    "vgg16": ("D", 224, 1.0, 1),
    "small": ("A", 64, 0.25, 32),
}
LIBRARIES = ("minivgg", "torch", "numpy")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--nets", default="vgg16,small", help="comma-separated: vgg16, small")
    p.add_argument("--shapes", default="",
                   help="comma-separated layer names to keep and/or MxKxN shapes to add")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=2, help="turns of the three workers")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per shape and worker")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per shape and worker")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="minivgg's GEMM and PyTorch's dtype (see above)")
    p.add_argument("--append", action="store_true", help="append the table to the README")
    p.add_argument("--worker", choices=LIBRARIES, help=argparse.SUPPRESS)
    p.add_argument("--worker-shapes", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------

def conv_gemms(net):
    """[(label, M, K, N)] of a net's conv layers, layers of one shape in one row."""
    config, size, width, batch = NETS[net]
    _, rows = common.layer_rows(config, size, width)
    shapes = {}
    for r in rows:
        if not r.kind.startswith("conv"):
            continue
        M, H, W = r.out_shape
        N = batch * H * W
        K = r.macs // (M * H * W)
        shapes.setdefault((M, K, N), []).append(r.name)
    return [(f"{net} " + ",".join(names), M, K, N) for (M, K, N), names in shapes.items()]


def parse_shape(text):
    M, K, N = (int(v) for v in text.lower().split("x"))
    return (f"{M}x{K}x{N}", M, K, N)


def select_shapes(args):
    wanted = [s for s in args.shapes.split(",") if s]
    extra = [parse_shape(s) for s in wanted if s[0].isdigit()]
    names = {s for s in wanted if not s[0].isdigit()}
    shapes = [row for net in args.nets.split(",") if net for row in conv_gemms(net)
              if not names or names & set(row[0].split(" ", 1)[1].split(","))]
    return shapes + extra


# ----------------------------------------------------------------------------------------
# Workers: time every shape, print one JSON line {label: [seconds of each call]}
# ----------------------------------------------------------------------------------------

def operands(M, K, N):
    import numpy as np
    rng = np.random.default_rng(0)
    return (rng.standard_normal((M, K)).astype(np.float32),
            rng.standard_normal((K, N)).astype(np.float32))


def time_calls(fns, warmup, repeats):
    """{name: fn} -> {name: [seconds]}, interleaved within this worker."""
    return common.time_interleaved(fns, repeats, warmup, raw=True)


def minivgg_worker(shapes, args):
    import numpy as np
    if args.precision == "fp32":
        from minivgg.kernels.cpu import matmul
        results = {}
        for label, M, K, N in shapes:
            W, cols = operands(M, K, N)
            out = np.empty((M, N), np.float32)
            results[label] = time_calls({"layer": lambda: matmul.matmul(W, cols, out)},
                                        args.warmup, args.repeats)
            results[label]["kernel"] = results[label]["layer"]  # one GEMM, nothing to pack
        return results
    from minivgg.kernels.cpu import amx, amx_isa
    available, reason = amx_isa.amx_available()
    if not available:
        raise SystemExit(f"no AMX on this machine ({reason}): nothing to benchmark")
    results = {}
    for label, M, K, N in shapes:
        W, cols = operands(M, K, N)
        packed_w, packed_cols = amx.pack_a(W), amx.pack_b(cols)
        out = np.empty((M, N), np.float32)
        t = time_calls({"layer": lambda: amx.gemm_bf16(packed_w, cols, out=out),
                        "kernel": lambda: amx.gemm_bf16(packed_w, packed_cols, out=out)},
                       args.warmup, args.repeats)
        results[label] = t
    return results


def torch_worker(shapes, args):
    import torch
    torch.set_num_threads(args.threads)
    results = {}
    for label, M, K, N in shapes:
        dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        W, cols = (torch.from_numpy(x).to(dtype) for x in operands(M, K, N))
        out = torch.empty((M, N), dtype=dtype)
        results[label] = time_calls({"torch": lambda: torch.matmul(W, cols, out=out)},
                                    args.warmup, args.repeats)
    return results


def numpy_worker(shapes, args):
    import numpy as np
    results = {}
    for label, M, K, N in shapes:
        W, cols = operands(M, K, N)
        out = np.empty((M, N), np.float32)
        results[label] = time_calls({"fp32": lambda: np.matmul(W, cols, out=out)},
                                    args.warmup, args.repeats)
    return results


WORKERS = {"minivgg": minivgg_worker, "torch": torch_worker, "numpy": numpy_worker}


def run_worker(args, lib, shapes):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", lib,
           "--worker-shapes", json.dumps(shapes), "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--precision", args.precision]
    return common.run_worker(cmd, f"{lib} worker")


# ----------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    common.set_threads(args.threads)  # inherited by the workers, read before their imports
    if args.worker:
        shapes = [tuple(s) for s in json.loads(args.worker_shapes)]
        print(json.dumps(WORKERS[args.worker](shapes, args)))
        return

    shapes = select_shapes(args)
    print(f"{args.threads} threads, {len(shapes)} shapes, load {common.load_average()}")
    if common.load_warning():
        print(common.load_warning(), file=sys.stderr)
    rounds = []  # [{lib: {label: {column: [seconds]}}}]
    for r in range(args.rounds):
        rounds.append({lib: run_worker(args, lib, shapes) for lib in LIBRARIES})
        print(f"  round {r + 1}/{args.rounds} done", flush=True)

    def seconds(lib, column, label):
        """Each round's median, and the median over all calls of all rounds."""
        per_round = [common.median(rd[lib][label][column]) for rd in rounds]
        every = [t for rd in rounds for t in rd[lib][label][column]]
        return per_round, common.median(every)

    rows = []
    for label, M, K, N in shapes:
        flops = 2 * M * K * N
        layer, t_layer = seconds("minivgg", "layer", label)
        kernel, t_kernel = seconds("minivgg", "kernel", label)
        torch_rounds, t_torch = seconds("torch", "torch", label)
        numpy_rounds, t_numpy = seconds("numpy", "fp32", label)
        rows.append([label, M, K, N, f"{flops / 1e9:.2f}",
                     f"{common.gflops(flops, t_layer):.0f}",
                     f"{common.gflops(flops, t_kernel):.0f}",
                     f"{common.gflops(flops, t_torch):.0f}",
                     f"{common.gflops(flops, t_numpy):.0f}",
                     f"{common.median_ratio(torch_rounds, layer):.2f}",
                     f"{common.median_ratio(torch_rounds, kernel):.2f}",
                     f"{common.median_ratio(numpy_rounds, layer):.2f}"])
        print(" | ".join(str(v) for v in rows[-1]), flush=True)

    p = args.precision
    ours = "minivgg AMX GFLOP/s (W packed)" if p == "bf16" else "minivgg fp32 GFLOP/s"
    kernel = "AMX kernel" if p == "bf16" else "minivgg fp32 (the same)"
    headers = ["layers", "M", "K", "N", "GFLOP per call", ours,
               f"{kernel} GFLOP/s (both packed)", f"torch {p} GFLOP/s", "NumPy fp32 GFLOP/s",
               f"minivgg / torch {p}", f"{kernel} / torch {p}", "minivgg / NumPy fp32"]
    title = "GEMM, bf16 AMX" if p == "bf16" else "GEMM, fp32"
    text = common.header(title, args.threads) + "\n" + common.markdown_table(
        headers, rows) + (
        f"\n\nY (M, N) = W (M, K) @ cols (K, N); vgg16: N = pixels of one image at 224, "
        f"small: N = pixels of a batch of 32 at 64 (A w0.25). Medians over {args.rounds} "
        f"rounds x {args.repeats} calls, each library in its own process; ratios are "
        f"throughput ratios (median over rounds)" + (
            "; minivgg's column rounds and packs cols in every call, W once." if p == "bf16"
            else "; minivgg's fp32 GEMM is NumPy's, called as a conv chunk calls it."))
    common.publish(text, args.append)


if __name__ == "__main__":
    main()
