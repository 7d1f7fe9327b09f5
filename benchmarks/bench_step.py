"""End-to-end benchmark: one SGD training step of a whole VGG against PyTorch.

A step is what `examples/train_imagenet.py` does per batch: forward, softmax cross-entropy,
backward, and the momentum + weight-decay update (Sec. 3.1: momentum 0.9, wd 5e-4,
dropout 0.5 on fc6 and fc7). The PyTorch model is the same net written the torchvision way
(in-place ReLU), with the same thread count.

    python benchmarks/bench_step.py                    # the three CPU cases below
    python benchmarks/bench_step.py --cases small --rounds 3 --append
    python benchmarks/bench_step.py --device cuda      # A and D at 224, batch 64
    python benchmarks/bench_step.py --conv-algo im2col # minivgg without Winograd

Cases: "A" and "D" are the paper's nets at 224×224 (batch 8 on CPU, 64 on GPU); "small" is
the Imagenette recipe: A at a quarter width, fc 512, 10 classes, 64×64, batch 32.

Every measurement runs in a fresh subprocess (a worker), so one library's caches and
allocator state never help or hurt the other; the workers take turns (minivgg, torch,
minivgg, ...) for `--rounds` rounds. Times are medians over all timed steps; the speed
ratio is the median over rounds of each round's ratio (a round's two workers run back to
back, under about the same load, which a ratio of overall medians would mix).

Peak memory on CPU is the peak resident set size (VmHWM) during the timed steps: the worker
resets the kernel's high-water mark (`/proc/self/clear_refs`, "5") after its warm-up step
and reads `/proc/self/status` at the end, so model construction and initialisation do not
count. "above imports" subtracts the resident size right after the imports, so the two
libraries' code is not compared. On GPU it is the memory pool's high-water mark (CuPy's
pool total, torch.cuda.max_memory_reserved).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repository root on sys.path)
from minivgg.backend import CONV_ALGORITHMS  # noqa: E402
from torch_net import torch_vgg  # noqa: E402

CASES = {  # name: (config, width, fc_width, num_classes, input size, CPU batch, GPU batch)
    "A": ("A", 1.0, 4096, 1000, 224, 8, 64),
    "D": ("D", 1.0, 4096, 1000, 224, 8, 64),
    "small": ("A", 0.25, 512, 10, 64, 32, 32),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--cases", default="A,D,small", help="comma-separated: A, D, small")
    p.add_argument("--batch", type=int, default=None, help="override every case's batch")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=2, help="worker pairs per case")
    p.add_argument("--steps", type=int, default=3, help="timed steps per worker")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per worker")
    p.add_argument("--tf32", choices=["off", "on"], default="off", help="GPU only")
    p.add_argument("--conv-algo", default="auto", choices=CONV_ALGORITHMS,
                   help="minivgg's 3x3 conv algorithm (minivgg.backend.set_conv_algorithm; "
                        "default auto: direct or Winograd per layer by a fixed shape rule)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="CPU only: minivgg's GEMMs (backend.set_precision); bf16 runs "
                        "PyTorch's step under torch.autocast('cpu', dtype=torch.bfloat16)")
    p.add_argument("--append", action="store_true", help="append the table to the README")
    p.add_argument("--worker", choices=["minivgg", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------

def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def reset_peak_rss():
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb():
    kb = _status_kb("VmHWM")
    if kb is None:  # not Linux: the lifetime peak, which includes model construction
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def rss_mb():
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else float("nan")


# ----------------------------------------------------------------------------------------
# Workers: build the net, warm up, time `steps` steps, print one JSON line
# ----------------------------------------------------------------------------------------

def minivgg_worker(args, case, batch):
    import time
    import numpy as np
    import minivgg
    from minivgg import Tensor, functional as F, models, optim
    if args.device == "cuda":
        # NOTE: minivgg's one TF32 switch; CuPy's CUPY_TF32 variable is overridden by it.
        minivgg.backend.set_tf32(args.tf32 == "on")
    base = rss_mb()
    minivgg.backend.set_conv_algorithm(args.conv_algo)
    minivgg.backend.set_precision(args.precision)
    config, width, fc_width, classes, size, _, _ = CASES[case]
    model = models.vgg(config, classes, width, fc_width, size, init="glorot", seed=0)
    if args.device == "cuda":
        model.to("cuda")
    model.train()
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((batch, 3, size, size)).astype(np.float32))
    labels = rng.integers(0, classes, batch)
    if args.device == "cuda":
        x = x.to("cuda")
        labels = minivgg.backend.to_device(labels, "cuda")

    def step():
        loss = F.cross_entropy(model(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        common.cuda_sync(args.device)

    for _ in range(args.warmup):
        step()
    reset = reset_peak_rss()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if args.device == "cuda":
        import cupy
        peak = cupy.get_default_memory_pool().total_bytes() / 2**20
        base = 0.0
    else:
        peak = peak_rss_mb()
    return {"times": times, "peak_mb": peak, "base_mb": base, "reset": reset}


def torch_worker(args, case, batch):
    import time
    import torch
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
        torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
        torch.backends.cudnn.benchmark = True
    base = rss_mb()
    config, width, fc_width, classes, size, _, _ = CASES[case]
    torch.manual_seed(0)
    model = torch_vgg(torch, config, classes, width, fc_width, size).to(args.device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, size, size, device=args.device)
    labels = torch.randint(0, classes, (batch,), device=args.device)
    loss_fn = torch.nn.CrossEntropyLoss()
    # bf16: PyTorch's CPU mixed precision (its conv and linear in bf16, the loss in fp32)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step():
        with autocast:
            loss = loss_fn(model(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        common.cuda_sync(args.device)

    for _ in range(args.warmup):
        step()
    reset = reset_peak_rss()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if args.device == "cuda":
        peak, base = torch.cuda.max_memory_reserved() / 2**20, 0.0
    else:
        peak = peak_rss_mb()
    return {"times": times, "peak_mb": peak, "base_mb": base, "reset": reset}


def run_worker(args, lib, case, batch):
    """Run one worker in a fresh interpreter and return its JSON result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", lib, "--case", case,
           "--batch", str(batch), "--device", args.device, "--threads", str(args.threads),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--tf32", args.tf32,
           "--conv-algo", args.conv_algo, "--precision", args.precision]
    return common.run_worker(cmd, f"{lib} worker for {case}")


# ----------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    common.set_threads(args.threads)  # inherited by the workers, read before their imports
    if args.worker:
        batch = args.batch
        fn = minivgg_worker if args.worker == "minivgg" else torch_worker
        print(json.dumps(fn(args, args.case, batch)))
        return

    rows = []
    if args.precision != "fp32" and args.device != "cpu":
        sys.exit("--precision bf16 runs on the CPU only (the GPU keeps fp32/TF32)")
    print(f"{args.threads} threads, device {args.device}, conv {args.conv_algo}, "
          f"{args.precision}, load {common.load_average()}")
    if common.load_warning(args.device):
        print(common.load_warning(args.device), file=sys.stderr)
    for case in [c for c in args.cases.split(",") if c]:
        rows.append(time_case(args, case))
        print(" | ".join(str(v) for v in rows[-1]), flush=True)
    common.publish(report(args, rows), args.append)


def time_case(args, case):
    """Time `case`'s training step in `args.rounds` worker pairs (minivgg, then PyTorch,
    back to back) -> its table row."""
    config, width, fc_width, classes, size, cpu_batch, gpu_batch = CASES[case]
    batch = args.batch or (gpu_batch if args.device == "cuda" else cpu_batch)
    results = {"minivgg": [], "torch": []}
    for _ in range(args.rounds):
        for lib in ("minivgg", "torch"):
            results[lib].append(run_worker(args, lib, case, batch))
            r = results[lib][-1]
            print(f"  {case} {lib}: steps {['%.3f' % t for t in r['times']]} s, "
                  f"peak {r['peak_mb']:.0f} MB", flush=True)
    t = {lib: common.median([s for r in rs for s in r["times"]])
         for lib, rs in results.items()}
    # The speed ratio of each worker pair (ran back to back, so under about the same
    # load), then the median over pairs: see `common.median_ratio`.
    pair_t = {lib: [common.median(r["times"]) for r in rs] for lib, rs in results.items()}
    speed_ratio = common.median_ratio(pair_t["torch"], pair_t["minivgg"])
    print(f"  {case} speed ratio per pair: "
          f"{['%.2f' % (b / a) for a, b in zip(pair_t['minivgg'], pair_t['torch'])]}")
    peak = {lib: max(r["peak_mb"] for r in rs) for lib, rs in results.items()}
    above = {lib: max(r["peak_mb"] - r["base_mb"] for r in rs)
             for lib, rs in results.items()}
    _, table = common.layer_rows(config, size, width, fc_width, classes)
    flops = common.training_flops(table, batch)
    label = f"{config} w{width:g} fc{fc_width} {size}px" if case == "small" else \
        f"{config} {size}px"
    return [label, batch, f"{t['minivgg']:.3f}", f"{t['torch']:.3f}",
            f"{batch / t['minivgg']:.1f}", f"{batch / t['torch']:.1f}",
            f"{speed_ratio:.2f}",
            f"{common.gflops(flops, t['minivgg']):.0f}",
            f"{common.gflops(flops, t['torch']):.0f}",
            f"{peak['minivgg']:.0f} / {above['minivgg']:.0f}",
            f"{peak['torch']:.0f} / {above['torch']:.0f}",
            f"{above['minivgg'] / above['torch']:.2f}"]


def report(args, rows):
    """The Markdown table of `rows` under its title and the machine's header."""
    ref = "cuDNN" if args.device == "cuda" else "torch"
    headers = ["net", "batch", "minivgg s/step", f"{ref} s/step", "minivgg img/s",
               f"{ref} img/s", "speed ratio (img/s minivgg / torch)", "minivgg GFLOP/s",
               f"{ref} GFLOP/s", "minivgg peak MB (total / above imports)",
               f"{ref} peak MB (total / above imports)", "memory ratio (above imports)"]
    title = f"Training step, {args.device}, minivgg conv {args.conv_algo}"
    if args.device == "cuda":
        title += f", TF32 {args.tf32}"
    if args.precision != "fp32":
        title += f", {args.precision} (torch: CPU autocast {args.precision})"
    mem_note = ("GPU memory pool high-water mark" if args.device == "cuda" else
                "peak RSS (VmHWM) during the timed steps, reset after warm-up")
    return common.header(title, args.threads, args.device) + "\n" + common.markdown_table(
        headers, rows) + f"\n\nMedians over {args.rounds} worker pairs x {args.steps} " \
        f"steps; the speed ratio is the median over worker pairs of each pair's ratio " \
        f"of medians. Memory: {mem_note}. Speed ratio above 1 means minivgg is faster."


if __name__ == "__main__":
    main()
