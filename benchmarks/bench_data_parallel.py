"""Training steps of one global batch on N processes against one process (Sec. 3.3).

The same net and global batch as bench_step.py's cases, run as the training loop runs it:
each rank takes its slice of the batch, backward hands finished gradients to the buckets
(`loss.backward(on_leaf_done=reducer.grad_ready)`), the allreduces overlap the rest of
backward, then the SGD step. On one machine it answers: is 2 ranks x 1 thread faster than
1 rank x 2 threads?

    python benchmarks/bench_data_parallel.py --case small --threads 2 --append
    mpirun -n 2 python benchmarks/bench_data_parallel.py --case small --threads 1 --append
    python benchmarks/bench_data_parallel.py --case D --threads 2 --append
    mpirun -n 2 python benchmarks/bench_data_parallel.py --case D --threads 1 --append

Cases (bench_step.CASES): "small" is the Imagenette recipe's net (A at a quarter width, fc
512, 64x64, CPU batch 32), "A" and "D" the paper's nets at 224 (CPU batch 8). `--batch`
changes the global batch. Each step starts after a barrier; its time is the mean over
ranks of the time to updated weights (the allreduce makes the ranks wait for each other);
`--warmup` steps are untimed; the median over `--steps` is reported as seconds per step and
images/s of the global batch.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_step import CASES  # noqa: E402

import numpy as np  # noqa: E402

from minivgg import distributed, models, optim  # noqa: E402
from minivgg import functional as F  # noqa: E402
from minivgg.tensor import Tensor  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--case", choices=sorted(CASES), default="small")
    p.add_argument("--batch", type=int, help="global batch (default: the case's CPU batch)")
    p.add_argument("--threads", type=int, help="kernel threads per rank (default: cores / "
                                               "ranks on the machine)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--append", action="store_true", help="append the row to README.md")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    group = distributed.init("cpu", args.threads)
    config, width, fc_width, classes, size, cpu_batch, _ = CASES[args.case]
    batch = args.batch or cpu_batch
    model = models.vgg(config, classes, width, fc_width, size, init="glorot", seed=0)
    model.train()
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    reducer = group.gradient_reducer(model.parameters())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    labels = rng.integers(0, classes, batch)
    mine = slice(batch * group.rank // group.size, batch * (group.rank + 1) // group.size)
    x, labels = Tensor(x[mine]), labels[mine]

    def step():
        loss = F.cross_entropy(model(x), labels)
        opt.zero_grad()
        reducer.start(len(labels))
        loss.backward(on_leaf_done=reducer.grad_ready)
        reducer.finish()
        opt.step()

    def timed():
        group.sum([0.0])  # a barrier (a no-op for one process)
        t0 = time.perf_counter()
        step()
        return float(group.sum([time.perf_counter() - t0])[0]) / group.size  # mean rank

    for _ in range(args.warmup):
        timed()
    seconds = common.median([timed() for _ in range(args.steps)])
    if not group.is_root:
        return
    threads = os.environ.get("NUMBA_NUM_THREADS") or str(os.cpu_count())
    row = [f"{args.case} ({config} w{width} fc{fc_width} {size}px)", batch, group.size,
           threads, f"{seconds:.3f}", f"{batch / seconds:.1f}"]
    table = common.markdown_table(["net", "global batch", "ranks", "threads per rank",
                                   "s/step", "img/s"], [row])
    header = common.header(f"Data-parallel training step, {group.size} rank(s)", threads)
    header = header.replace("threads for both libraries", "kernel threads per rank")
    text = "\n".join([header, table, "", f"Median over {args.steps} steps of the mean "
                      f"rank's time, each step after a barrier; {group.description}."])
    print(text)
    if args.append:
        common.append_to_readme(text)


if __name__ == "__main__":
    main()
