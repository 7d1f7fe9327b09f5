"""The small recipe's ops outside the convolutions, minivgg against PyTorch (issue 26).

    python benchmarks/ops_vs_torch.py                 # 1 thread, batch 32, 64x64 crops
    python benchmarks/ops_vs_torch.py --repeats 50 --output ops.md

The ops of one training step of the small Imagenette recipe (VGG-A at width 0.25, fc 512,
10 classes, 64x64 crops) that are not convolutions, at that step's shapes, summed over the
layers that have them: ReLU and max-pool forward and backward (minivgg also as its fused
ReLU + pool, `minivgg.fused`, which the step runs), the fc layers' GEMMs, dropout,
softmax cross-entropy and the SGD update (momentum 0.9, weight decay 5e-4) of all 1.1M
parameters. PyTorch runs what its training step runs: in-place ReLU (torchvision's),
`max_pool2d_with_indices`, `addmm`, `native_dropout`, `torch.optim.SGD` (foreach).

Each library runs in a process of its own (`common.run_worker`) with `--threads` threads;
each op is timed by the CPU time of the calling thread (`time.thread_time`), the minimum
over `--repeats` calls after warm-up: the op's own cost with its data warm in cache, which
another process's load changes little. NOTE: it leaves out what a whole step adds (data
cold in cache, allocations of a step's size, thread hand-offs); `profile_step.py` measures
those inside the step.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repository root on sys.path)

N = 32
CONV_OUT = [(N, 16, 64, 64), (N, 32, 32, 32), (N, 64, 16, 16), (N, 64, 16, 16),
            (N, 128, 8, 8), (N, 128, 8, 8), (N, 128, 4, 4), (N, 128, 4, 4)]
POOL_IN = [CONV_OUT[i] for i in (0, 1, 3, 5, 7)]  # the ReLU outputs a pool reads
FC = [(512, 512), (512, 512), (512, 10)]  # (in, out) of fc6, fc7, fc8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30, help="timed calls per op")
    p.add_argument("--output", metavar="FILE", help="also write the table to FILE")
    p.add_argument("--worker", choices=["minivgg", "torch"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def cpu_ms(fn, repeats):
    """Minimum thread CPU time of fn() in ms, after 3 untimed calls."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return 1e3 * best


def linear(cpu, x, W, b):
    """`functional.Linear.forward`'s work: x W^T, then the bias added in place."""
    y = cpu.fc_matmul(x, W.T)
    y += b
    return y


def minivgg_ops(np, rng):
    """{op: fn()} of minivgg's kernel table at the recipe's shapes."""
    from minivgg import backend, models, optim
    from minivgg.kernels import cpu
    relu_x = [rng.standard_normal(s).astype(np.float32) for s in CONV_OUT]
    pool_x = [np.maximum(rng.standard_normal(s).astype(np.float32), 0) for s in POOL_IN]
    pooled = [cpu.max_pool2d_forward(x, (2, 2), (2, 2)) for x in pool_x]
    pool_gy = [rng.standard_normal(y.shape).astype(np.float32) for y, _ in pooled]
    fc_x = [rng.standard_normal((N, i)).astype(np.float32) for i, _ in FC]
    fc_w = [rng.standard_normal((o, i)).astype(np.float32) for i, o in FC]
    fc_b = [np.zeros(o, np.float32) for _, o in FC]
    fc_gy = [rng.standard_normal((N, o)).astype(np.float32) for _, o in FC]
    logits, labels = rng.standard_normal((N, 10)).astype(np.float32), rng.integers(0, 10, N)
    model = models.vgg("A", 10, 0.25, 512, 64, init="glorot", seed=0)
    params = list(model.parameters())
    for p in params:
        p.grad = np.ones_like(p.data)
    opt = optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    relu_y = [cpu.relu_forward(x) for x in relu_x]
    pool_args = [((2, 2), (2, 2))] * len(POOL_IN)
    return {
        "relu fwd (8 conv layers)": lambda: [cpu.relu_forward(x) for x in relu_x],
        "relu fwd, in place": lambda: [cpu.relu_forward(x, x) for x in relu_x],
        "relu bwd (8 conv layers)": lambda: [cpu.relu_backward(y, y) for y in relu_y],
        "max-pool fwd (5 pools)": lambda: [cpu.max_pool2d_forward(x, *a)
                                           for x, a in zip(pool_x, pool_args)],
        "max-pool bwd (5 pools)": lambda: [
            cpu.max_pool2d_backward(g, am, x.shape, *a)
            for g, (_, am), x, a in zip(pool_gy, pooled, pool_x, pool_args)],
        "relu + max-pool fwd (5 pools; minivgg fused)": lambda: [
            cpu.relu_max_pool2d_forward(x, *a) for x, a in zip(pool_x, pool_args)],
        "relu + max-pool bwd (5 pools; minivgg fused)": lambda: [
            cpu.relu_max_pool2d_backward(g, am, y, x.shape, *a)
            for g, (y, am), x, a in zip(pool_gy, pooled, pool_x, pool_args)],
        "fc fwd (3 layers, + bias)": lambda: [linear(cpu, x, w, b)
                                              for x, w, b in zip(fc_x, fc_w, fc_b)],
        "fc bwd (3 layers: gx, gW, gb)": lambda: [
            (cpu.fc_matmul(g, w), cpu.fc_matmul(g.T, x), g.sum(axis=0))
            for g, w, x in zip(fc_gy, fc_w, fc_x)],
        "dropout fwd (2 masks and products)": lambda: [
            x[:, :512] * cpu.dropout_mask((N, 512), 0.5, np.dtype(np.float32),
                                          backend.rng()) for x in fc_x[:2]],
        "softmax-CE fwd + bwd": lambda: cpu.softmax_cross_entropy_backward(
            cpu.softmax_cross_entropy_forward(logits, labels)[1], labels, np.float32(1)),
        "SGD update (all parameters)": opt.step,
    }


def torch_ops(torch, rng):
    """{op: fn()} of PyTorch's ops at the recipe's shapes (what its training step runs)."""
    from torch_net import torch_vgg
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    relu_x = [t(rng.standard_normal(s).astype("float32")) for s in CONV_OUT]
    relu_y = [torch.relu(x) for x in relu_x]
    pool_x = [torch.relu(t(rng.standard_normal(s).astype("float32"))) for s in POOL_IN]
    pooled = [torch.ops.aten.max_pool2d_with_indices(x, [2, 2], [2, 2]) for x in pool_x]
    pool_gy = [torch.randn(y.shape) for y, _ in pooled]
    fc_x = [torch.randn(N, i) for i, _ in FC]
    fc_w, fc_b = [torch.randn(o, i) for i, o in FC], [torch.zeros(o) for _, o in FC]
    fc_gy = [torch.randn(N, o) for _, o in FC]
    logits, labels = torch.randn(N, 10, requires_grad=True), torch.randint(0, 10, (N,))
    net = torch_vgg(torch, "A", 10, 0.25, 512, 64, init="glorot")
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return {
        "relu fwd (8 conv layers)": lambda: [torch.relu(x) for x in relu_x],
        "relu fwd, in place": lambda: [torch.relu_(x) for x in relu_x],
        "relu bwd (8 conv layers)": lambda: [torch.ops.aten.threshold_backward(y, y, 0)
                                             for y in relu_y],
        "max-pool fwd (5 pools)": lambda: [torch.ops.aten.max_pool2d_with_indices(
            x, [2, 2], [2, 2]) for x in pool_x],
        "max-pool bwd (5 pools)": lambda: [torch.ops.aten.max_pool2d_with_indices_backward(
            g, x, [2, 2], [2, 2], [0, 0], [1, 1], False, am)
            for g, x, (_, am) in zip(pool_gy, pool_x, pooled)],
        "relu + max-pool fwd (5 pools; minivgg fused)": lambda: [
            torch.ops.aten.max_pool2d_with_indices(torch.relu_(x), [2, 2], [2, 2])
            for x in pool_x],
        "relu + max-pool bwd (5 pools; minivgg fused)": lambda: [
            torch.ops.aten.threshold_backward(torch.ops.aten.max_pool2d_with_indices_backward(
                g, x, [2, 2], [2, 2], [0, 0], [1, 1], False, am), x, 0)
            for g, x, (_, am) in zip(pool_gy, pool_x, pooled)],
        "fc fwd (3 layers, + bias)": lambda: [torch.addmm(b, x, w.t())
                                              for x, w, b in zip(fc_x, fc_w, fc_b)],
        "fc bwd (3 layers: gx, gW, gb)": lambda: [(g.mm(w), g.t().mm(x), g.sum(0))
                                                  for g, w, x in zip(fc_gy, fc_w, fc_x)],
        "dropout fwd (2 masks and products)": lambda: [
            torch.ops.aten.native_dropout(x[:, :512], 0.5, True) for x in fc_x[:2]],
        "softmax-CE fwd + bwd": lambda: torch.autograd.grad(
            torch.nn.functional.cross_entropy(logits, labels), logits),
        "SGD update (all parameters)": opt.step,
    }


def worker(args):
    """Time every op of one library in this process -> JSON {op: ms} on stdout."""
    import json
    import numpy as np
    rng = np.random.default_rng(0)
    if args.worker == "torch":
        import torch
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        ops = torch_ops(torch, rng)
    else:
        ops = minivgg_ops(np, rng)
    print(json.dumps({name: cpu_ms(fn, args.repeats) for name, fn in ops.items()}))


def main(argv=None):
    args = parse_args(argv)
    common.set_threads(args.threads)
    if args.worker:
        return worker(args)
    me = [sys.executable, os.path.abspath(__file__), "--threads", str(args.threads),
          "--repeats", str(args.repeats), "--worker"]
    mine = common.run_worker(me + ["minivgg"], "the minivgg worker")
    theirs = common.run_worker(me + ["torch"], "the torch worker")
    rows = [[op, f"{ms:.3f}", f"{theirs[op]:.3f}" if op in theirs else "",
             f"{ms / theirs[op]:.2f}" if theirs.get(op) else ""] for op, ms in mine.items()]
    text = "\n".join([
        common.header("Ops outside the convolutions, small recipe, thread CPU time",
                      args.threads),
        common.markdown_table(["op", "minivgg ms", "torch ms", "time ratio (minivgg / torch)"],
                              rows)])
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
