"""Gradient averaging alone: the time one training step spends in the allreduce.

Run under an MPI launcher; every rank holds a full set of VGG gradients (VGG-16: 138M
parameters, 553 MB in float32) and averages them as a training step does:

    mpirun -n 2 python benchmarks/bench_allreduce.py                # VGG-16 (D), CPU, MPI
    mpirun -n 2 python benchmarks/bench_allreduce.py --append       # add a table to README
    mpirun -n 4 python benchmarks/bench_allreduce.py --device cuda  # NCCL, one GPU a rank

Two rows per run:

* "reducer": `GradientReducer.finish()` as the training loop calls it without overlap:
  pack the gradients into the buckets (times the image count), one nonblocking allreduce
  per bucket, wait, divide, hand back. It is the most a step can pay for communication.
* "Allreduce only": one blocking in-place `Allreduce` of each bucket buffer, nothing else.

Bandwidths follow nccl-tests' convention: "algorithm" = bytes / time; "bus" = algorithm x
2(N-1)/N, the bytes each rank's link really carries in a ring allreduce, comparable to the
link's speed and to benchmarks/scaling_model.py's assumption. Timing: `--warmup` untimed
steps, then `--steps` timed ones, each between barriers (and GPU syncs); the medians over
steps of the slowest rank are reported.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import numpy as np  # noqa: E402

from minivgg import backend, distributed, models  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("-a", "--arch", default="D", help="Table 1 column (default D, VGG-16)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--bucket-mb", type=float, default=distributed.BUCKET_BYTES / 2**20,
                   help="bucket size in MiB (default %(default)g)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--append", action="store_true", help="append the table to README.md")
    return p.parse_args(argv)


def timed(group, fn, device):
    """Seconds of fn() on the slowest rank, the ranks starting together."""
    common.cuda_sync(device)
    group.comm.Barrier()
    t0 = time.perf_counter()
    fn()
    common.cuda_sync(device)
    seconds = np.array([time.perf_counter() - t0])
    group.comm.Allreduce(group.MPI.IN_PLACE, seconds, op=group.MPI.MAX)
    return float(seconds[0])


def main(argv=None):
    args = parse_args(argv)
    group = distributed.init(args.device)
    if group.size < 2:
        sys.exit("error: run under an MPI launcher with at least 2 ranks, e.g. "
                 "mpirun -n 2 python benchmarks/bench_allreduce.py")
    model = models.VGG(args.arch).to(args.device)
    params = list(model.parameters())
    xp = backend.array_module(params[0].data)
    for p in params:  # any finite values: the time does not depend on them
        p.grad = xp.full(p.shape, 1e-3 * (group.rank + 1), dtype=p.dtype)
    grads = [p.grad for p in params]
    reducer = group.gradient_reducer(params, bucket_bytes=int(args.bucket_mb * 2**20),
                                     overlap=False)
    nbytes = sum(p.size for p in params) * params[0].data.dtype.itemsize

    def reducer_step():
        for p, g in zip(params, grads):
            p.grad = g
        reducer.start(32)
        reducer.finish()

    transport = reducer.transport

    def allreduce_only():
        transport.wait([transport.start(b.flat) for b in reducer.buckets])

    rows = []
    for name, fn in (("reducer (pack, Iallreduce, wait, divide)", reducer_step),
                     ("Allreduce only", allreduce_only)):
        for _ in range(args.warmup):
            timed(group, fn, args.device)
        seconds = common.median([timed(group, fn, args.device) for _ in range(args.steps)])
        algo = nbytes / seconds / 1e9
        bus = algo * 2 * (group.size - 1) / group.size
        rows.append([name, group.size, len(reducer.buckets), f"{nbytes / 1e6:.1f}",
                     f"{1e3 * seconds:.1f}", f"{algo:.2f}", f"{bus:.2f}"])
    if not group.is_root:
        return
    title = (f"Gradient allreduce, VGG-{args.arch}, {args.device}, {group.size} ranks "
             f"({group.description})")
    threads = os.environ.get("NUMBA_NUM_THREADS", "?")
    table = common.markdown_table(
        ["what", "ranks", "buckets", "MB per rank", "ms per step", "algorithm GB/s",
         "bus GB/s"], rows)
    header = common.header(title, threads, args.device).replace(
        "threads for both libraries", "kernel threads per rank")
    text = "\n".join([header, table, "",
                      f"Medians over {args.steps} steps of the slowest rank; bus = algorithm"
                      f" x 2(N-1)/N (ring allreduce)."])
    print(text)
    if args.append:
        common.append_to_readme(text)


if __name__ == "__main__":
    main()
