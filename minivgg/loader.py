"""Batches out: the loader that decodes and augments in background processes (Sec. 3.1).

    loader = Loader(train_set, TrainTransform(...), batch_size=256, workers=2, seed=0)
    for x, y in loader.epoch(e):   # float32 (N, 3, crop, crop), int64 (N,)
        ...
    loader.close()

The worker processes are `minivgg.workers`' (Ctrl-C and SIGTERM cannot hang them); the
datasets and transforms are `minivgg.data`'s. Every batch is a function of (seed, epoch,
index) only, so it is bit-identical for any number of workers or ranks.
"""

import math

import numpy as np

from minivgg.data import DataError, print_warning
from minivgg.workers import WorkerPool


def sample_rng(seed, epoch, index):
    """The generator for one sample's augmentation: a function of (seed, epoch, index) only,
    so a batch comes out the same whichever worker (or how many workers) made it."""
    return np.random.default_rng([seed, epoch, index])


def _make_batch(job, state):
    """Decode and transform the samples of one batch -> (x, y, bad paths with reasons)."""
    dataset, transform = state
    seed, epoch, indices = job
    xs, ys, bad = [], [], []
    for i in indices:
        try:
            img = dataset.load(i)
            # an OSError here is `images.ImageTooLarge`: a thin image rescaled over budget
            xs.append(transform(img, sample_rng(seed, epoch, int(i)), dataset.paths[i]))
        except OSError as e:
            bad.append((dataset.paths[i], str(e)))
            continue
        ys.append(dataset.labels[i])
    if not xs:
        return None, None, bad
    return np.stack(xs), np.asarray(ys, dtype=np.int64), bad


class Loader:
    """Mini-batches of (float32 (N, 3, crop, crop), int64 (N,)) for one dataset.

    With `workers` > 0, a pool of processes decodes and augments whole batches while the
    network trains, keeping `prefetch` batches in flight. The order is a seeded
    permutation per epoch and each sample's augmentation is seeded from (seed, epoch,
    index), so an epoch's batches are bit-identical for any number of workers.

    Unreadable files are skipped (the batch is one shorter) with a warning, and counted in
    `self.skipped` for the epoch summary. The worker processes ignore Ctrl-C and SIGTERM
    and are stopped by `close()`, which cannot hang (`minivgg.workers`); an interrupted
    epoch can be continued exactly with `epoch(e, start=k)`.

    Data parallelism (Sec. 3.3): with `shard=(rank, ranks)` every batch of `batch_size` (the
    global batch) is cut into `ranks` contiguous slices that differ by at most one image,
    and this loader yields slice `rank`. The permutation is the same for every number of
    ranks, so a run resumed on another number of processes continues the same sequence
    (also from batch `start` part-way through an epoch); the last, shorter batch is kept
    and cut the same way. Every rank yields exactly
    `len(self)` batches: a slice left empty (fewer images than ranks, or all unreadable)
    comes as an empty batch rather than none, so no rank skips a step the others take.
    """

    def __init__(self, dataset, transform, batch_size, shuffle=True, seed=0, workers=0,
                 drop_last=False, prefetch=None, warn=None, shard=(0, 1)):
        if batch_size < 1:
            raise DataError(f"batch size must be positive, got {batch_size}")
        self.rank, self.ranks = shard
        self.dataset, self.transform = dataset, transform
        self.batch_size, self.shuffle, self.seed = int(batch_size), shuffle, int(seed)
        self.workers, self.drop_last = int(workers), drop_last
        self.prefetch = prefetch or max(2, 2 * self.workers)
        self.skipped = 0
        self.warned = set()
        self.warn = warn or print_warning
        self._pool = None

    def __len__(self):
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batch_indices(self, epoch):
        """The list of index arrays, one per batch, for `epoch`."""
        n = len(self.dataset)
        order = (np.random.default_rng([self.seed, epoch, 2**31]).permutation(n)
                 if self.shuffle else np.arange(n))
        batches = [order[i:i + self.batch_size] for i in range(0, len(self) * self.batch_size,
                                                                  self.batch_size)]
        r, R = self.rank, self.ranks
        return [b[len(b) * r // R:len(b) * (r + 1) // R] for b in batches] if R > 1 else batches

    def epoch(self, epoch, start=0):
        """Iterate over the batches of `epoch` (0-based) from batch `start` on; they are
        the same batches a whole epoch gives from there. Resets `self.skipped`."""
        self.skipped = 0
        jobs = [(self.seed, epoch, idx) for idx in self.batch_indices(epoch)[start:]]
        results = self._run(jobs)
        for x, y, bad in results:
            for path, reason in bad:
                self.skipped += 1
                if path not in self.warned:  # one warning per file per run
                    self.warned.add(path)
                    self.warn(f"{reason}; skipping it")
            if x is not None:
                yield x, y
            elif self.ranks > 1:  # NOTE: keep in step with the other ranks
                crop = self.transform.crop
                yield np.zeros((0, 3, crop, crop), np.float32), np.zeros(0, np.int64)

    def _run(self, jobs):
        state = (self.dataset, self.transform)
        if self.workers <= 0:
            for job in jobs:
                yield _make_batch(job, state)
            return
        if self._pool is None or self._pool.closed:  # closed: an epoch was abandoned
            self._pool = WorkerPool(self.workers, _make_batch, state, "minivgg-loader")
        # NOTE: bounded look-ahead; mapping the whole epoch at once would decode it all.
        yield from self._pool.map(jobs, ahead=self.prefetch)

    @property
    def worker_pids(self):
        """Process ids of the running worker processes (none before the first batch)."""
        return self._pool.pids if self._pool is not None else []

    def close(self):
        """Stop the worker processes (quickly, and never waiting on a lock; see workers.py)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
