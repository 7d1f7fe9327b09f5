"""The bf16 convolution layer by layer, one thread, CPU time: the AMX direct convolution
(kernels/cpu/blocked_amx.py, the algorithm "blocked" under bf16) against today's other bf16
paths and PyTorch's bf16 convolution (what `torch.autocast("cpu", dtype=torch.bfloat16)`
runs), each pass on its own: forward, input gradient, weight gradient.

    python benchmarks/bench_blocked_amx.py                   # VGG-16's conv shapes, batch 2
    python benchmarks/bench_blocked_amx.py --net small       # the small recipe, batch 32
    python benchmarks/bench_blocked_amx.py --net vgg16 --batch 8 --paths amx,torch

Paths: "amx" (blocked_amx), "im2col" (im2col + the AMX GEMM, `set_precision("bf16")`),
"rounded" (the fp32 AVX-512 blocked kernel on bf16-rounded operands, what "blocked" ran
under bf16 before), "direct" (kernels/direct.py on rounded operands; C < 8 only) and "torch"
(torch.nn.functional.conv2d on bf16 tensors and aten's convolution_backward with one output
asked for, in a process of its own). Each number is the fastest of `--repeats` calls by
`time.thread_time` on one thread (`NUMBA_NUM_THREADS=1`, `torch.set_num_threads(1)`): other
processes' load hardly changes it, so it is the measure for a shared machine. im2col's
input gradient is its backward with the input gradient less the one without. GFLOP/s:
2 FLOPs per multiply-add of the direct convolution. The load average is printed with the
table.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

NETS = {  # (C, OC, side) of each distinct 3×3 conv shape
    "vgg16": [(3, 64, 224), (64, 64, 224), (64, 128, 112), (128, 128, 112), (128, 256, 56),
              (256, 256, 56), (256, 512, 28), (512, 512, 28), (512, 512, 14)],
    "small": [(3, 16, 64), (16, 32, 32), (32, 64, 16), (64, 64, 16), (64, 128, 8),
              (128, 128, 8), (128, 128, 4)],
}
PASSES = ("fwd", "gx", "gW")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--net", choices=sorted(NETS), default="vgg16")
    p.add_argument("--batch", type=int, default=None, help="default: 2 (vgg16), 32 (small)")
    p.add_argument("--paths", default="amx,im2col,rounded,direct,torch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", choices=["minivgg", "torch"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def fastest(fn, repeats):
    fn()  # warm-up: compilation, workspaces
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return best


def minivgg_passes(path, x, W, b, gy):
    """{pass: callable} of one minivgg path (module docstring)."""
    from minivgg.kernels.cpu import blocked_amx, blocked_amx_grad, blocked_nchw, direct
    from minivgg.kernels.cpu.bf16 import round_to_bf16
    from minivgg.kernels.cpu.conv import PRIMITIVES as P
    if path == "amx":
        return {"fwd": lambda: blocked_amx.conv2d_forward_amx(x, W, b),
                "gx": lambda: blocked_amx.conv2d_input_grad_amx(gy, W),
                "gW": lambda: blocked_amx_grad.conv2d_weight_grad_amx(x, gy)}
    if path == "im2col":
        back = lambda need_gx: P.conv2d_backward(x, W, gy, (1, 1), (1, 1), need_gx)  # noqa
        return {"fwd": lambda: P.conv2d_forward(x, W, b, (1, 1), (1, 1)),
                "gx+gW": lambda: back(True), "gW": lambda: back(False)}
    r = [round_to_bf16(a) for a in (x, W, gy)]
    if path == "direct":
        y = np.empty(gy.shape, np.float32)
        gW = np.empty(W.shape, np.float32)
        return {"fwd": lambda: direct.direct_conv(r[0], r[1], b, y),
                "gW": lambda: direct.direct_weight_grad(r[0], r[2], gW)}
    return {"fwd": lambda: blocked_nchw.blocked_conv2d_forward(r[0], r[1], b),
            "gx+gW": lambda: blocked_nchw.blocked_conv2d_backward(*r, True),
            "gW": lambda: blocked_nchw.blocked_conv2d_backward(*r, False)}


def torch_passes(x, W, b, gy):
    import torch
    torch.set_num_threads(1)
    xt, Wt, bt, gyt = (torch.from_numpy(a).to(torch.bfloat16) for a in (x, W, b, gy))

    def backward(mask):
        return torch.ops.aten.convolution_backward(gyt, xt, Wt, [Wt.shape[0]], [1, 1],
                                                   [1, 1], [1, 1], False, [0, 0], 1, mask)
    return {"fwd": lambda: torch.nn.functional.conv2d(xt, Wt, bt, padding=1),
            "gx": lambda: backward([True, False, False]),
            "gW": lambda: backward([False, True, True])}


def worker(args, path_names):
    """{path: {layer: {pass: seconds}}} for the paths of one library, in this process."""
    from minivgg import backend
    backend.set_precision("bf16")
    rng = np.random.default_rng(0)
    out = {p: {} for p in path_names}
    for C, OC, side in NETS[args.net]:
        x = np.maximum(rng.normal(size=(args.batch, C, side, side)), 0).astype(np.float32)
        W = (rng.normal(size=(OC, C, 3, 3)) * np.sqrt(2 / (9 * C))).astype(np.float32)
        b = rng.normal(size=OC).astype(np.float32)
        gy = rng.normal(size=(args.batch, OC, side, side)).astype(np.float32)
        for path in path_names:
            if path == "direct" and C >= 8:
                continue
            passes = (torch_passes(x, W, b, gy) if path == "torch"
                      else minivgg_passes(path, x, W, b, gy))
            t = {k: fastest(fn, args.repeats) for k, fn in passes.items()}
            if "gx+gW" in t:
                t["gx"] = max(t.pop("gx+gW") - t["gW"], 0.0)
            out[path][f"{C}->{OC} @{side}"] = t
    return out


def run_worker(args, library, paths):
    env = {**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--worker", library, "--net", args.net, "--batch",
           str(args.batch), "--paths", ",".join(paths), "--repeats", str(args.repeats)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    args.batch = args.batch or (32 if args.net == "small" else 2)
    paths = args.paths.split(",")
    if args.worker:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        print(json.dumps(worker(args, paths)))
        return
    results = {}
    if [p for p in paths if p != "torch"]:
        results.update(run_worker(args, "minivgg", [p for p in paths if p != "torch"]))
    if "torch" in paths:
        results.update(run_worker(args, "torch", ["torch"]))
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {args.net}, batch "
          f"{args.batch}, 1 thread, CPU time (min of {args.repeats}), load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("| layer | pass | " + " | ".join(f"{p} ms (GFLOP/s)" for p in paths) + " |")
    print("|---|---|" + "---:|" * len(paths))
    for C, OC, side in NETS[args.net]:
        layer = f"{C}->{OC} @{side}"
        flops = 2 * args.batch * C * OC * 9 * side * side
        for name in PASSES:
            cells = []
            for p in paths:
                t = results[p].get(layer, {}).get(name)
                cells.append("" if not t else f"{t * 1e3:.2f} ({flops / t / 1e9:.0f})")
            print(f"| {layer} | {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
