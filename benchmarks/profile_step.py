"""Where one training step of minivgg spends its time, op by op (issue 26).

    python benchmarks/profile_step.py                          # the small recipe's step
    python benchmarks/profile_step.py --conv-algo im2col --steps 20
    python benchmarks/profile_step.py --batch 32 --output step.md

The step is the small Imagenette recipe's (`examples/train_imagenet.py ... -a A --width 0.25
--fc-width 512 --crop 64 -b 64`): forward, softmax cross-entropy, backward, the SGD update
(momentum 0.9, weight decay 5e-4, dropout 0.5), on random images. After `--warmup` untimed
steps (Numba loads its cache, the workspaces grow), the script times `--steps` plain steps,
then the same number with timers wrapped around:

* every op's forward and backward (`Function.forward` / `.backward` of each class in
  `minivgg.functional` and `minivgg.fused`; convolutions and fc layers per layer, by the
  module that ran them; the ReLU passes of a fused conv + ReLU count as relu all the same,
  a fused ReLU + max-pool has a row of its own);
* inside an op, what it spends handing work to the thread pool (`runtime.map_ranges`: the
  call's wall time less its longest job), copying (`np.ascontiguousarray`, `np.array`) and
  allocating (`np.empty`, `np.zeros`, `..._like`): the NumPy module the kernels and ops see
  is swapped for a timing proxy;
* the SGD update, `zero_grad`, and the autograd bookkeeping: the time inside the model's
  forward and `loss.backward()` that no op claims (module dispatch, `Function.__call__`,
  argument checks, the topological order, gradient accumulation).

Each timer counts its own time only (a nested timer's time is taken out of the one around
it), so the rows add up to the instrumented step; what no timer covers (the step loop
itself) is printed as the untracked remainder. Timers count on the main thread only: the
pool's threads run parts of the same ops while the main thread waits inside them.
NOTE: the timers cost a few microseconds each (a few hundred per step), so the instrumented
step is a little slower than the plain one; both are printed. On a loaded machine wall
times swing from step to step; `--clock cpu --threads 1` counts the CPU time of the one
thread doing all the work instead, which another process's load hardly changes (it leaves
out the thread hand-offs, which then do not happen).
"""

import argparse
import os
import sys
import threading
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repository root on sys.path)

# The NumPy functions the proxy times, by the column they go to.
COPIES = ("ascontiguousarray", "array", "copyto")
ALLOCATIONS = ("empty", "zeros", "empty_like", "zeros_like", "ones_like", "full")
# Modules whose `np` is swapped for the proxy: the ops, the autograd core, the CPU kernels.
PROXIED = ("minivgg.tensor", "minivgg.functional", "minivgg.optim",
           "minivgg.kernels.common", "minivgg.kernels.winograd", "minivgg.kernels.direct")
OP_NAMES = {"ReLU": "relu", "MaxPool2d": "max-pool", "Dropout": "dropout",
            "CrossEntropy": "softmax-CE loss", "Reshape": "flatten", "Linear": "fc",
            "Conv2d": "conv", "Conv2dReLU": "conv", "ReLUMaxPool2d": "relu + max-pool"}
PARTS = ("hand-off", "copies", "allocations")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("-a", "--arch", default="A")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--fc-width", type=int, default=512)
    p.add_argument("--size", type=int, default=64, help="input side (the recipe's crop)")
    p.add_argument("-b", "--batch", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=10, help="timed steps (each way)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--conv-algo", default="auto", help="backend.set_conv_algorithm")
    p.add_argument("--precision", default=None,
                   help="backend.set_precision, where this minivgg has it (fp32, bf16)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: the main thread's CPU time (time.thread_time), which another "
                        "process's load hardly changes; with --threads 1 all the work is "
                        "on that thread")
    p.add_argument("--output", metavar="FILE", help="also write the tables to FILE")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------
# Timers: exclusive time per label, on the main thread
# ----------------------------------------------------------------------------------------

class Profile:
    """Seconds and calls per label; a label's time excludes the timers nested in it."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.seconds, self.calls, self.order = {}, {}, []
        self.stack = []  # [label, start, seconds taken by nested timers]
        self.layer = None  # the module being called (conv1_1, fc6, ...)
        self.main = threading.get_ident()

    def reset(self):
        self.seconds, self.calls, self.order = {}, {}, []

    def on_main(self):
        return threading.get_ident() == self.main

    def push(self, label):
        self.stack.append([label, self.clock(), 0.0])

    def pop(self):
        """Close the innermost timer: its time less its nested timers' goes to its label,
        and all of it counts as nested time of the timer around it."""
        label, start, nested = self.stack.pop()
        elapsed = self.clock() - start
        self.add(label, elapsed - nested, count=True)
        if self.stack:
            self.stack[-1][2] += elapsed

    def add(self, label, seconds, count=False):
        if label not in self.seconds:
            self.seconds[label], self.calls[label] = 0.0, 0
            self.order.append(label)
        self.seconds[label] += seconds
        self.calls[label] += count

    def current_op(self):
        """The op the innermost open timer belongs to ("conv3_1 bwd", "SGD update")."""
        return self.stack[-1][0][0] if self.stack else "step"

    def timed(self, fn, label_of):
        """`fn` wrapped in a timer whose label is `label_of(args)`, on the main thread."""
        def wrapper(*args, **kwargs):
            if not self.on_main():
                return fn(*args, **kwargs)
            label = label_of(args)
            if self.stack and self.stack[-1][0] == label:  # Conv2dReLU's super().forward
                return fn(*args, **kwargs)
            self.push(label)
            try:
                return fn(*args, **kwargs)
            finally:
                self.pop()
        return wrapper


def numpy_proxy(prof, np):
    """A stand-in for the `numpy` module that times copies and allocations on the main
    thread (labelled with the op they happen in) and passes everything else through."""
    proxy = types.ModuleType("numpy")
    proxy.__getattr__ = lambda name: getattr(np, name)
    for part, names in (("copies", COPIES), ("allocations", ALLOCATIONS)):
        for name in names:
            setattr(proxy, name, prof.timed(getattr(np, name),
                                            lambda args, part=part: (prof.current_op(), part)))
    return proxy


def timed_map_ranges(prof, map_ranges):
    """`runtime.map_ranges` that books its wall time less its longest job as hand-off.

    The jobs' own time stays with the op that called it (the jobs may run on the pool's
    threads, where no timer counts)."""
    def wrapper(job, n_items, elements=None):
        if not prof.on_main():
            return map_ranges(job, n_items, elements)
        durations, op = [], prof.current_op()

        def timed_job(t0, t1):
            start = prof.clock()
            try:
                return job(t0, t1)
            finally:
                durations.append(prof.clock() - start)

        start = prof.clock()
        result = map_ranges(timed_job, n_items, elements)
        handoff = max(0.0, prof.clock() - start - max(durations, default=0.0))
        prof.add((op, "hand-off"), handoff, count=True)
        if prof.stack:  # not the op's own time: take it out of the timer around
            prof.stack[-1][2] += handoff
        return result
    return wrapper


def op_label(prof, fn, direction):
    """("conv3_1 fwd", "self"): the op kind, per layer for convolutions and fc layers."""
    if direction == "fwd":
        kind = OP_NAMES.get(type(fn).__name__, type(fn).__name__.lower())
        if kind in ("conv", "fc") and prof.layer:
            kind = prof.layer
        fn._profile_kind = kind
    return (f"{getattr(fn, '_profile_kind', type(fn).__name__.lower())} {direction}", "self")


def relu_kernel_timer(prof, kernel, label):
    """The kernel table's ReLU pass, booked as `label` also when a fused op runs it
    (`minivgg.fused.Conv2dReLU`: the ReLU in place on the convolution's output, and its
    mask in backward)."""
    def wrapper(*args, **kwargs):
        if not prof.on_main() or prof.current_op() == label:
            return kernel(*args, **kwargs)
        prof.push((label, "self"))
        try:
            return kernel(*args, **kwargs)
        finally:
            prof.pop()
    return wrapper


class Patches:
    """Attributes replaced for the profile and put back afterwards."""

    def __init__(self):
        self.saved = []

    def set(self, owner, name, value):
        self.saved.append((owner, name, owner.__dict__[name] if isinstance(owner, type)
                           else getattr(owner, name)))
        setattr(owner, name, value)

    def undo(self):
        for owner, name, value in reversed(self.saved):
            setattr(owner, name, value)
        self.saved.clear()


def function_classes(base):
    found, todo = [], [base]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            found.append(sub)
            todo.append(sub)
    return found


def instrument(prof):
    """Wrap the ops, the modules, map_ranges and NumPy's copies and allocations -> Patches."""
    import importlib
    import numpy as np
    from minivgg import nn, tensor
    from minivgg.kernels.cpu import runtime
    patches = Patches()
    module_call = nn.Module.__call__

    def call(module, *args, **kwargs):
        outer, prof.layer = prof.layer, module.name
        try:
            return module_call(module, *args, **kwargs)
        finally:
            prof.layer = outer

    patches.set(nn.Module, "__call__", call)
    for cls in function_classes(tensor.Function):
        for direction, name in (("fwd", "forward"), ("bwd", "backward")):
            if name in cls.__dict__:
                patches.set(cls, name, prof.timed(
                    cls.__dict__[name], lambda args, d=direction: op_label(prof, args[0], d)))
    from minivgg.kernels import cpu
    for name, label in (("relu_forward", "relu fwd"), ("relu_backward", "relu bwd")):
        patches.set(cpu, name, relu_kernel_timer(prof, getattr(cpu, name), label))
    proxy = numpy_proxy(prof, np)
    kernel_modules = [m for n, m in sorted(sys.modules.items())
                      if n.startswith("minivgg.kernels.cpu.") and m is not None]
    # NOTE: the original, taken before the loop patches runtime's own name: compared with
    # runtime.map_ranges as it goes, the modules after "runtime" (sgd, winograd) were left
    # unpatched and the device class's map_ranges was wrapped twice (its hand-offs booked
    # twice), until 2026-12-05.
    original = runtime.map_ranges
    for module in [importlib.import_module(n) for n in PROXIED] + kernel_modules:
        if getattr(module, "np", None) is np:
            patches.set(module, "np", proxy)
        if getattr(module, "map_ranges", None) is original:
            patches.set(module, "map_ranges", timed_map_ranges(prof, original))
    for module in kernel_modules:  # the device object the conv drivers call (`dev.xp`)
        for obj in vars(module).values():
            if isinstance(obj, type) and obj.__dict__.get("map_ranges") is not None:
                patches.set(obj, "map_ranges", staticmethod(timed_map_ranges(prof, original)))
            if isinstance(obj, type) and obj.__dict__.get("xp") is np:
                patches.set(obj, "xp", proxy)
    return patches


# ----------------------------------------------------------------------------------------
# The step, plain and instrumented
# ----------------------------------------------------------------------------------------

def build(args):
    """The model, optimizer and one random batch of the small recipe -> step()."""
    import numpy as np
    from minivgg import backend, functional as F, models, optim
    from minivgg.tensor import Tensor
    backend.set_conv_algorithm(args.conv_algo)
    if args.precision is not None:
        if not hasattr(backend, "set_precision"):
            raise SystemExit("error: this minivgg has no backend.set_precision; "
                             "drop --precision")
        backend.set_precision(args.precision)
    model = models.vgg(args.arch, args.classes, args.width, args.fc_width, args.size,
                       init="glorot", dropout=args.dropout, seed=0)
    model.train()
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((args.batch, 3, args.size, args.size)) * 50).astype(np.float32)
    labels = rng.integers(0, args.classes, args.batch)

    def step(prof=None):
        phase = (lambda label: prof.push((label, "self"))) if prof else (lambda label: None)
        end = prof.pop if prof else (lambda: None)
        phase("autograd bookkeeping, forward")
        loss = F.cross_entropy(model(Tensor(x)), labels)
        end()
        phase("zero_grad")
        opt.zero_grad()
        end()
        phase("autograd bookkeeping, backward")
        loss.backward()
        end()
        phase("SGD update")
        opt.step()
        end()

    return step


def profile(args):
    """-> (plain step seconds, per-step seconds by label, calls by label, Profile)."""
    step = build(args)
    for _ in range(args.warmup):
        step()
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    plain = []
    for _ in range(args.steps):
        t0 = clock()
        step()
        plain.append(clock() - t0)
    prof = Profile(clock)
    patches = instrument(prof)
    try:
        step(prof)  # once untimed, so the wrappers' first calls do not count
        prof.reset()
        for _ in range(args.steps):
            prof.push(("step (untracked remainder)", "self"))
            step(prof)
            prof.pop()
    finally:
        patches.undo()
    return plain, prof


# ----------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------

def kind_of(op):
    """"conv3_1 fwd" -> "conv fwd", "fc6 bwd" -> "fc bwd"; others unchanged."""
    name, _, direction = op.rpartition(" ")
    if direction in ("fwd", "bwd"):
        for prefix, kind in (("conv", "conv"), ("fc", "fc")):
            if name.startswith(prefix) and name != "flatten":
                return f"{kind} {direction}"
    return op


def tables(prof, steps, group):
    """Markdown rows per op (or per op kind with `group`): ms per step by part."""
    rows, ops = {}, []
    for op, part in prof.order:
        key = kind_of(op) if group else op
        if key not in rows:
            rows[key] = dict.fromkeys(("self",) + PARTS, 0.0) | {"calls": 0}
            ops.append(key)
        rows[key][part] += prof.seconds[(op, part)] * 1e3 / steps
        if part == "self":
            rows[key]["calls"] += prof.calls[(op, part)] / steps
    total = sum(sum(r[p] for p in ("self",) + PARTS) for r in rows.values())
    out = []
    for key in ops:
        r = rows[key]
        ms = r["self"] + sum(r[p] for p in PARTS)
        out.append([key, f"{r['calls']:g}", f"{ms:.2f}", f"{100 * ms / total:.1f}%"]
                   + [f"{r[p]:.2f}" if r[p] else "" for p in PARTS])
    out.append(["**sum**", "", f"**{total:.2f}**", "100%"] + [
        f"{sum(r[p] for r in rows.values()):.2f}" for p in PARTS])
    return out, total


def report(args, plain, prof):
    headers = ["op", "calls", "ms/step", "share", "of which hand-off", "copies",
               "allocations"]
    by_kind, total = tables(prof, args.steps, group=True)
    by_op, _ = tables(prof, args.steps, group=False)
    untracked = prof.seconds.get(("step (untracked remainder)", "self"), 0.0) * 1e3 / args.steps
    conv = f", precision {args.precision}" if args.precision else ""
    lines = [
        f"### Profile of one training step: VGG-{args.arch} width {args.width:g}, "
        f"fc {args.fc_width}, {args.size}x{args.size}, batch {args.batch}",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {common.cpu_model()}, "
        f"{args.threads} threads, conv {args.conv_algo}{conv}, {args.clock} clock"
        f"{' (the main thread)' if args.clock == 'cpu' else ''}, load average "
        f"{common.load_average()}, {args.steps} steps after {args.warmup} warm-up.",
        "",
        f"Plain step (no timers): median {1e3 * common.median(plain):.1f} ms "
        f"(min {1e3 * min(plain):.1f}). Instrumented step: {total:.1f} ms = the sum below; "
        f"untracked remainder (the step loop, outside every timer) {untracked:.2f} ms.",
    ]
    warning = common.load_warning()
    if warning:
        lines += ["", warning]
    lines += ["", "By op kind:", "", common.markdown_table(headers, by_kind), "",
              "By op and layer:", "", common.markdown_table(headers, by_op)]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    common.set_threads(args.threads)
    plain, prof = profile(args)
    text = report(args, plain, prof)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
