"""How fast the training loader alone delivers batches: `python benchmarks/data_rate.py DIR`.

No network consumes the batches, so the figure is the ceiling the data pipeline puts on a
training run's images/s (decode, Sec. 3.1's augmentation, worker processes). Compare it
with the training step's rate (`bench_step.py`): below that, the loader is the bottleneck
and `--cache` or more `-j` workers help.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minivgg.data import DataError, TrainTransform, compute_stats, open_imagenet  # noqa: E402
from minivgg.loader import Loader  # noqa: E402


def measure_data_rate(loader, batches=50, epoch=0):
    """Images per second that `loader` delivers with no network consuming them."""
    it = loader.epoch(epoch)
    next(it)  # start-up (pool, first batch) is not part of the steady rate
    start, seen = time.perf_counter(), 0
    for _, (x, _) in zip(range(batches), it):
        seen += len(x)
    return seen / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/data_rate.py",
                                description="measure the training loader's data rate")
    p.add_argument("data", metavar="DIR", help="ILSVRC-layout folder (train/, val/)")
    p.add_argument("--scale", type=int, default=256)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("-b", "--batch-size", type=int, default=256)
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--cache", action="store_true")
    args = p.parse_args(argv)
    try:
        train, _ = open_imagenet(args.data)
        if args.cache:
            t = time.perf_counter()
            train.cache_in_memory(args.scale, args.workers)
            print(f"cached {len(train)} images in {time.perf_counter() - t:.1f}s")
        stats = compute_stats(train, max_images=200, workers=args.workers)
        loader = Loader(train, TrainTransform(args.scale, args.crop, stats), args.batch_size,
                        workers=args.workers)
        rate = measure_data_rate(loader, args.batches)
        loader.close()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"data rate: {rate:.0f} images/s (S={args.scale}, crop {args.crop}, batch "
          f"{args.batch_size}, {args.workers} workers, cache {'on' if args.cache else 'off'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
