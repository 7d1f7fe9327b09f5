"""Per-layer benchmark: every distinct layer shape of a VGG against PyTorch.

Rows (`--net vgg16`, the default): the nine distinct conv shapes of configuration D at
224×224 (Table 1), A-LRN's LRN layer, the five pool shapes and fc6/fc7/fc8; each forward
(no graph) and forward+backward. `--net small` gives the same rows for the small CPU
recipe instead (A at width 0.25, fc 512, 10 classes, 64×64, batch 32), so a gap in its
training step can be read layer by layer. The reference is PyTorch on the same device: on
CPU with the same thread count, on GPU cuDNN, once with TF32 off on both sides and once with
it on (`--tf32 on`).

    python benchmarks/bench_layers.py                      # CPU, batch 4, print the table
    python benchmarks/bench_layers.py --only conv --append # conv rows, add to the README
    python benchmarks/bench_layers.py --net small --append # the small recipe, batch 32
    python benchmarks/bench_layers.py --device cuda --batch 64 --tf32 off --append
    python benchmarks/bench_layers.py --only conv --algo all   # im2col, F(2,3), F(4,3),
                                                               # direct, blocked, torch

`--algo` puts minivgg's conv algorithms side by side on every conv row (`all`: im2col,
winograd = F(2×2,3×3), winograd4 = F(4×4,3×3), direct (kernels/direct.py), blocked
(kernels/cpu/blocked.py; on the GPU the CUDA twin), and `auto`'s pick when asked, as in
`--algo all,auto`). Convolutions Winograd, direct and blocked cannot run (1×1) run im2col
whatever is asked.

Each library runs in a fresh worker process of its own (a hidden `--worker minivgg|torch`
mode that builds every asked layer and prints its raw times as JSON), so PyTorch's OpenMP
threads, spinning after each of its calls, never take a core from minivgg's next call, and
neither library's caches or allocator help or hurt the other. The workers take turns,
minivgg's then PyTorch's, for `--rounds` rounds; inside minivgg's worker the algorithms of
a row take turns call by call. Times are medians over every timed call of every round; the
time ratio is the median over rounds of each round's ratio of medians (a round's two
workers run back to back, under about the same load).

GFLOP/s counts 2 FLOPs per multiply-add of Table 1's layer shapes (`minivgg.summary`), i.e.
of the direct algorithm, whichever algorithm ran: Winograd does fewer multiplications, so
its rates are *effective* rates and may exceed the machine's BLAS peak. A backward pass
costs twice the forward (gx and gW), except for conv1_1, whose gx is never needed. Pooling
and LRN are memory-bound and get no GFLOP/s.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repository root on sys.path)

if "--worker" in sys.argv and "--threads" in sys.argv:  # a worker: before NumPy loads below
    common.set_threads(sys.argv[sys.argv.index("--threads") + 1])
from minivgg.backend import CONV_ALGORITHMS, PRECISIONS  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--net", choices=sorted(NETS), default="vgg16",
                   help="whose layers: D at 224 (vgg16) or the small CPU recipe (small)")
    p.add_argument("--batch", type=int, default=None,
                   help="images per call (default: 4 on CPU, 64 on GPU; small: 32)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="CPU threads for both libraries (default: all cores)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed calls of each pass per worker (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--only", default="", help="comma-separated kinds: conv,lrn,pool,fc, or "
                   "layer names such as conv3_2")
    p.add_argument("--passes", default="fwd,fwd+bwd", help="fwd, fwd+bwd or both")
    p.add_argument("--tf32", choices=["off", "on"], default="off",
                   help="GPU only: TF32 for both minivgg and cuDNN")
    p.add_argument("--algo", default="im2col",
                   help="comma-separated conv algorithms of minivgg to time side by side: "
                        f"{', '.join(ALGOS)}, or all (default: im2col)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="CPU only: minivgg's GEMMs (backend.set_precision); bf16 runs "
                        "PyTorch under torch.autocast('cpu', dtype=torch.bfloat16)")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds of fresh worker processes, minivgg's then PyTorch's")
    p.add_argument("--append", action="store_true", help="append the table to the README")
    p.add_argument("--worker", choices=["minivgg", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.precision != "fp32" and args.device != "cpu":
        p.error("--precision bf16 runs on the CPU only (the GPU keeps fp32/TF32)")
    args.algos = []
    for a in args.algo.split(","):
        for name in (ALGOS[:-1] if a == "all" else [a] if a else []):
            if name not in args.algos:
                args.algos.append(name)
    unknown = [a for a in args.algos if a not in ALGOS]
    if unknown or not args.algos:
        p.error(f"--algo: unknown {', '.join(unknown) or 'empty list'}; choose from "
                f"{', '.join(ALGOS)} or all")
    return args


# minivgg's conv algorithms in table order: the fixed ones, then "auto"'s pick
ALGOS = tuple(a for a in CONV_ALGORITHMS if a != "auto") + ("auto",)


# name: (config, input size, width, fc_width, classes, with A-LRN's LRN row)
NETS = {
    "vgg16": ("D", 224, 1.0, 4096, 1000, True),
    "small": ("A", 64, 0.25, 512, 10, False),  # the Imagenette recipe of bench_step.py
}


def net_layers(net, batch):
    """[(name, kind, spec, forward FLOPs)] for every distinct layer shape of a `NETS` net.

    spec: conv (C, OC, H, K, P); pool (C, H, K); lrn (C, H); fc (in, out). The MACs come
    from `layer_table`, i.e. from the real layers. vgg16 adds A-LRN's LRN (on conv1's
    output, Table 1), which D itself does not have.
    """
    from minivgg import nn
    config, size, width, fc_width, classes, with_lrn = NETS[net]
    model, rows = common.layer_rows(config, size, width, fc_width, classes)
    macs = {r.name: r.macs for r in rows}
    layers, seen, in_ch = [], set(), 3
    for name, layer in model.named_children():
        if isinstance(layer, nn.Conv2d):
            spec = (layer.in_channels, layer.out_channels, size, layer.kernel_size[0],
                    layer.padding)
            if spec not in seen:
                seen.add(spec)
                layers.append((name, "conv", spec, macs[name] * batch))
            in_ch = layer.out_channels
        elif isinstance(layer, nn.MaxPool2d):
            layers.append((name, "pool", (in_ch, size, 2), 0))
            if name == "pool1" and with_lrn:
                # A-LRN's only LRN sits on conv1's output (Table 1), just before pool1.
                layers.insert(-1, ("norm1 (A-LRN)", "lrn", (in_ch, size), 0))
            size //= 2
        elif isinstance(layer, nn.Linear):
            layers.append((name, "fc", (layer.in_features, layer.out_features),
                           macs[name] * batch))
    return layers


# ----------------------------------------------------------------------------------------
# One layer on each library: returns {"fwd": fn, "fwd+bwd": fn}
# ----------------------------------------------------------------------------------------

def minivgg_layer(kind, spec, batch, device, rng):
    import numpy as np
    from minivgg import Tensor, no_grad, functional as F
    from minivgg.nn import Parameter

    def arr(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    first = kind == "conv" and spec[0] == 3  # conv1_1: the image needs no gradient
    if kind == "conv":
        C, OC, H, K, P = spec
        x = Tensor(arr(batch, C, H, H), requires_grad=not first)
        params = [Parameter(arr(OC, C, K, K) * 0.01), Parameter(arr(OC))]
        op = lambda x: F.conv2d(x, params[0], params[1], 1, P)  # noqa: E731
    elif kind == "pool":
        C, H, K = spec
        x, params = Tensor(arr(batch, C, H, H), requires_grad=True), []
        op = lambda x: F.max_pool2d(x, K, K)  # noqa: E731
    elif kind == "lrn":
        C, H = spec
        x, params = Tensor(arr(batch, C, H, H), requires_grad=True), []
        op = lambda x: F.local_response_norm(x, 5, 1e-4, 0.75, 2.0)  # noqa: E731
    else:
        n_in, n_out = spec
        x = Tensor(arr(batch, n_in), requires_grad=True)
        params = [Parameter(arr(n_out, n_in) * 0.01), Parameter(arr(n_out))]
        op = lambda x: F.linear(x, params[0], params[1])  # noqa: E731
    if device == "cuda":
        x = x.to("cuda")
        x.requires_grad = not first
        for p in params:
            p.data = p.to("cuda").data
    with no_grad():
        gy = op(x).data * 0 + 1  # an output gradient of the right shape, on the device

    def fwd():
        with no_grad():
            op(x)

    def fwd_bwd():
        for t in [x] + params:
            t.grad = None
        op(x).backward(gy)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def torch_layer(kind, spec, batch, device, seed, precision="fp32"):
    """{"fwd": fn, "fwd+bwd": fn} of the layer in PyTorch; in bf16 under CPU autocast."""
    import torch
    fns = _torch_layer(kind, spec, batch, device, seed)
    if precision == "fp32":
        return fns

    def autocast(fn):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fn()
        return run
    return {name: autocast(fn) for name, fn in fns.items()}


def _torch_layer(kind, spec, batch, device, seed):
    import torch
    import torch.nn.functional as TF
    g = torch.Generator().manual_seed(seed)

    def arr(*shape):
        return torch.randn(*shape, generator=g).to(device)

    first = kind == "conv" and spec[0] == 3
    if kind == "conv":
        C, OC, H, K, P = spec
        x = arr(batch, C, H, H).requires_grad_(not first)
        params = [(arr(OC, C, K, K) * 0.01).requires_grad_(), arr(OC).requires_grad_()]
        op = lambda x: TF.conv2d(x, params[0], params[1], 1, P)  # noqa: E731
    elif kind == "pool":
        C, H, K = spec
        x, params = arr(batch, C, H, H).requires_grad_(), []
        op = lambda x: TF.max_pool2d(x, K, K)  # noqa: E731
    elif kind == "lrn":
        C, H = spec
        x, params = arr(batch, C, H, H).requires_grad_(), []
        # PyTorch divides alpha by size; pass size*alpha so both compute the paper's LRN.
        op = lambda x: TF.local_response_norm(x, 5, 5 * 1e-4, 0.75, 2.0)  # noqa: E731
    else:
        n_in, n_out = spec
        x = arr(batch, n_in).requires_grad_()
        params = [(arr(n_out, n_in) * 0.01).requires_grad_(), arr(n_out).requires_grad_()]
        op = lambda x: TF.linear(x, params[0], params[1])  # noqa: E731
    with torch.no_grad():
        gy = torch.ones_like(op(x), dtype=torch.float32)

    def fwd():
        with torch.no_grad():
            op(x)

    def fwd_bwd():
        for t in [x] + params:
            t.grad = None
        op(x).backward(gy)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def with_conv_algorithm(algorithm, fn):
    """fn, run with minivgg's conv algorithm set to `algorithm` (a cheap global switch)."""
    from minivgg import backend

    def run():
        backend.set_conv_algorithm(algorithm)
        fn()
    return run


def picked_by_auto(kind, spec, batch, device):
    """What "auto" runs for this conv layer ("-" for other layers)."""
    import numpy as np
    from minivgg import backend
    if kind != "conv":
        return "-"
    C, OC, H, K, P = spec
    backend.set_conv_algorithm("auto")
    x = np.empty((batch, C, H, H), dtype=np.float32)
    picked = backend.conv_algorithm_for(x, np.empty((OC, C, K, K)), (1, 1), (P, P))
    return picked if device == "cpu" else "im2col"


# ----------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    common.set_threads(args.threads)  # inherited by the workers, read before their imports
    batch = args.batch or (32 if args.net == "small" else 64 if args.device == "cuda" else 4)
    if args.worker:
        fn = minivgg_worker if args.worker == "minivgg" else torch_worker
        print(json.dumps(fn(args, batch)))
        return
    print(f"batch {batch}, {args.threads} threads, device {args.device}, conv "
          f"{','.join(args.algos)}, {args.precision}, {args.rounds} rounds of fresh worker "
          f"pairs, load {common.load_average()}")
    if common.load_warning(args.device):
        print(common.load_warning(args.device), file=sys.stderr)
    results = {"minivgg": [], "torch": []}
    for r in range(args.rounds):
        for lib in ("minivgg", "torch"):
            results[lib].append(run_worker(args, lib, batch))
            print(f"  round {r + 1}: {lib} worker done", flush=True)
    rows = []
    for name, kind, spec, flops_fwd in wanted_layers(args, batch):
        for pas in passes(args):
            key = f"{name}|{pas}"
            rows.append(layer_row(args, name, kind, spec, flops_fwd, pas,
                                  [w["times"][key] for w in results["minivgg"]],
                                  [w["times"][key]["torch"] for w in results["torch"]],
                                  results["minivgg"][0]["auto"].get(name, "-")))
            print(" | ".join(rows[-1]), flush=True)
    common.publish(report(args, batch, rows), args.append)


def wanted_layers(args, batch):
    """The `net_layers` rows that `--only` asks for (all when empty)."""
    wanted = [w for w in args.only.split(",") if w]
    return [(name, kind, spec, flops) for name, kind, spec, flops in net_layers(args.net, batch)
            if not wanted or kind in wanted or name in wanted]


def passes(args):
    return [p for p in args.passes.split(",") if p]


def run_worker(args, lib, batch):
    """One worker in a fresh interpreter (inheriting the thread variables) -> its JSON."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", lib, "--net", args.net,
           "--batch", str(batch), "--device", args.device, "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--only", args.only,
           "--passes", args.passes, "--tf32", args.tf32, "--algo", ",".join(args.algos),
           "--precision", args.precision]
    return common.run_worker(cmd, f"{lib} worker")


# ----------------------------------------------------------------------------------------
# Workers: build every asked layer of one library, time each pass, return raw times
# ----------------------------------------------------------------------------------------

def minivgg_worker(args, batch):
    """{"times": {"layer|pass": {algorithm: [s, ...]}}, "auto": {layer: auto's pick}}.

    The algorithms of a row take turns (one library, one process: nothing to bias)."""
    import numpy as np
    from minivgg import backend
    if args.device == "cuda":
        backend.require_cuda()
        backend.set_tf32(args.tf32 == "on")  # minivgg's switch; it overrides CUPY_TF32
    backend.set_precision(args.precision)
    times, auto = {}, {}
    for name, kind, spec, _ in wanted_layers(args, batch):
        ours = minivgg_layer(kind, spec, batch, args.device, np.random.default_rng(0))
        algos = args.algos if kind == "conv" else args.algos[:1]
        for pas in passes(args):
            fns = {a: with_conv_algorithm(a, ours[pas]) for a in algos}
            times[f"{name}|{pas}"] = common.time_interleaved(
                fns, args.repeats, args.warmup, args.device, raw=True)
        if "auto" in args.algos:
            auto[name] = picked_by_auto(kind, spec, batch, args.device)
    return {"times": times, "auto": auto}


def torch_worker(args, batch):
    """{"times": {"layer|pass": {"torch": [s, ...]}}, "auto": {}}: PyTorch (cuDNN on GPU)."""
    import torch
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
        torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
        torch.backends.cudnn.benchmark = True  # cuDNN picks its fastest algorithm per shape
    times = {}
    for name, kind, spec, _ in wanted_layers(args, batch):
        ref = torch_layer(kind, spec, batch, args.device, 0, args.precision)
        for pas in passes(args):
            times[f"{name}|{pas}"] = common.time_interleaved(
                {"torch": ref[pas]}, args.repeats, args.warmup, args.device, raw=True)
    return {"times": times, "auto": {}}


# ----------------------------------------------------------------------------------------

def layer_row(args, name, kind, spec, flops_fwd, pas, ours, ref, picked):
    """One table row from raw times: `ours` [{algorithm: [s, ...]} per round], `ref`
    [[s, ...] per round]. Times: medians over every repeat of every round; ratios: the
    median over rounds of each round's ratio of medians (`common.median_ratio`)."""
    t = {a: common.median([s for r in ours for s in r[a]]) for a in ours[0]}
    t["torch"] = common.median([s for r in ref for s in r])
    ref_rounds = [common.median(r) for r in ref]
    ratio = {a: common.median_ratio([common.median(r[a]) for r in ours], ref_rounds)
             for a in ours[0]}
    first = kind == "conv" and spec[0] == 3
    mult = 1 if pas == "fwd" else (2 if first else 3)
    flops = 2 * flops_fwd * mult
    cells = [[f"{t[a] * 1e3:.1f}" if a in ratio else "-" for a in args.algos],
             [f"{common.gflops(flops, t[a]):.0f}" if a in ratio and flops else "-"
              for a in args.algos],
             [f"{ratio[a]:.2f}" if a in ratio else "-" for a in args.algos]]
    row = [name, kind, "x".join(map(str, spec)), pas, *cells[0], f"{t['torch'] * 1e3:.1f}",
           *cells[1], f"{common.gflops(flops, t['torch']):.0f}" if flops else "-",
           *cells[2]]
    if "auto" in args.algos:
        row.insert(4, picked)
    return row


def report(args, batch, rows):
    """The Markdown table of `rows` under its title and the machine's header."""
    ref_name = "cuDNN" if args.device == "cuda" else "torch"
    # a single algorithm keeps the old column names; several get one column each
    names = ["minivgg"] if args.algos == ["im2col"] else [f"minivgg {a}" for a in args.algos]
    effective = "" if args.algos == ["im2col"] else " (effective)"
    headers = (["layer", "kind", "shape", "pass"]
               + (["auto runs"] if "auto" in args.algos else [])
               + [f"{n} ms" for n in names] + [f"{ref_name} ms"]
               + [f"{n} GFLOP/s{effective}" for n in names] + [f"{ref_name} GFLOP/s"]
               + [f"time ratio {n}/{ref_name}" for n in names])
    title = f"Layers, {args.device}, batch {batch}"
    if args.net != "vgg16":
        title = f"Layers of the small recipe ({NETS[args.net][0]} w{NETS[args.net][2]:g} " \
            f"fc{NETS[args.net][3]} {NETS[args.net][1]}px), {args.device}, batch {batch}"
    if args.device == "cuda":
        title += f", TF32 {args.tf32}"
    if args.precision != "fp32":
        title += f", {args.precision} (torch: CPU autocast {args.precision})"
    return common.header(title, args.threads, args.device) + "\n" + common.markdown_table(
        headers, rows) + "\n\nShapes: conv C x OC x H x K x padding, pool C x H x K, " \
        "lrn C x H, fc in x out. Each library timed in its own fresh worker processes: " \
        f"{args.rounds} rounds (minivgg's worker, then PyTorch's) x {args.repeats} calls " \
        f"per pass after {args.warmup} warm-up; times are medians over all calls of all " \
        "rounds; the time ratio is the median over rounds of each round's ratio of " \
        "medians. Time ratio below 1 means minivgg is faster. GFLOP/s count the direct " \
        "algorithm's FLOPs, so Winograd's are effective rates."


if __name__ == "__main__":
    main()
