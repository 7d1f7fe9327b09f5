"""Images in, batches out: the paper's data pipeline (Sec. 3.1 and 3.2).

The pieces, in the order an image meets them:

    load_rgb(path)                   decode with Pillow, any mode -> uint8 (H, W, 3) RGB
    rescale_smallest_side(img, S)    isotropic rescale, smallest side S (Pillow bilinear)
    TrainTransform                   random S in [Smin, Smax], random crop, random flip,
                                     AlexNet's PCA colour shift, mean subtraction
    EvalTransform                    rescale to smallest side Q, centre crop
    to_chw_float32(img, mean_rgb)    uint8 (H, W, 3) -> float32 (3, H, W), mean subtracted
    Loader                           batches, decoded and augmented in worker processes

NOTE: the scale. Pixels go into the network on the 0-255 scale with the training set's
mean RGB subtracted, `x - mean_rgb`, exactly as in the paper (Sec. 2.1) and Caffe, and
every statistic in `DataStats` (the mean RGB, and the eigenvalues and eigenvectors of the
RGB covariance) is on that 0-255 scale. Two consequences worth knowing: a 0-1 scale would
shrink every activation of a BatchNorm-free VGG 255-fold, and Glorot- or N(0, 0.01)-
initialised nets then sit at loss ln(K) for epochs; and AlexNet's PCA formula
(`pca_colour_shift`) must be read on the 0-1 scale, where it gives shifts of a few grey
levels (as in fb.resnet.torch), not on the 0-255 scale, where it would give thousands.

Datasets (`ImageFolder`, `minivgg.synthetic.SyntheticImages`) share one small interface:
`classes` (names in index order), `labels` (int64 array), `paths` (one name per sample) and
`load(i) -> uint8 (H, W, 3)`, which raises `OSError` for an unreadable file.
"""

import math
import multiprocessing as mp
import os
import sys
import warnings
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

# The ILSVRC layout uses ".JPEG"; accept the usual image extensions in any case.
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A dataset that cannot be used: missing folder, no images, mismatched classes..."""


# ----------------------------------------------------------------------------------------
# Image helpers (also used by minivgg.evaluate)
# ----------------------------------------------------------------------------------------

def load_rgb(path):
    """Decode an image file into a uint8 array (H, W, 3) in RGB order.

    Grayscale ("L", "I;16"...), CMYK, palette ("P") and RGBA images are converted to RGB;
    transparency is dropped (RGBA -> RGB keeps the colour channels). Raises `OSError` for a
    file Pillow cannot read, including a truncated JPEG.
    """
    # NOTE: Pillow pads a truncated JPEG with grey, silently, only when the global
    # ImageFile.LOAD_TRUNCATED_IMAGES is True; at its default (False) `im.load()` raises,
    # which is what lets the loader skip and count such files.
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")  # avoids Pillow's palette-transparency warning
            if im.mode != "RGB":
                im = im.convert("RGB")
            return np.asarray(im, dtype=np.uint8).copy()
    except OSError:
        raise
    except Exception as e:  # Pillow raises e.g. ValueError or SyntaxError for odd files
        raise OSError(f"cannot decode {path}: {type(e).__name__}: {e}") from e


def rescaled_size(height, width, S):
    """(new_height, new_width) with the smallest side equal to S, aspect ratio kept."""
    if height <= width:
        return S, max(S, int(round(width * S / height)))
    return max(S, int(round(height * S / width))), S


def rescale_smallest_side(img, S):
    """Isotropically rescale uint8 (H, W, 3) so its smallest side is S (Sec. 3.1, 3.2).

    Uses Pillow's bilinear filter, which averages over the whole footprint when shrinking
    (antialiased), as torchvision's Resize does. Returns `img` itself when nothing changes.
    """
    S = int(S)
    if S < 1:
        raise ValueError(f"rescale_smallest_side: S must be positive, got {S}")
    H, W = img.shape[:2]
    new_h, new_w = rescaled_size(H, W, S)
    if (new_h, new_w) == (H, W):
        return img
    out = Image.fromarray(img).resize((new_w, new_h), Image.BILINEAR)
    return np.asarray(out, dtype=np.uint8)


def center_crop(img, size):
    """The central size x size window of (H, W, C); an error if the image is smaller."""
    H, W = img.shape[:2]
    if size > H or size > W:
        raise ValueError(f"center_crop: crop {size} is larger than the image {H}x{W}")
    top, left = (H - size) // 2, (W - size) // 2
    return img[top:top + size, left:left + size]


def to_chw_float32(img, mean_rgb):
    """uint8 (H, W, 3) -> float32 (3, H, W) holding x - mean_rgb, 0-255 scale (Sec. 2.1).

    `mean_rgb` is the training set's mean colour on the 0-255 scale (see the module NOTE).
    """
    x = img.astype(np.float32)
    x -= np.asarray(mean_rgb, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


# ----------------------------------------------------------------------------------------
# Training-set statistics: mean RGB and the PCA of the RGB covariance
# ----------------------------------------------------------------------------------------

@dataclass
class DataStats:
    """Mean colour and RGB covariance eigen-decomposition, all on the 0-255 scale.

    `pca_eigval` is sorted in decreasing order; `pca_eigvec[:, i]` (a column) is the
    eigenvector of `pca_eigval[i]`. Stored in checkpoints as `meta["data_stats"]`.
    """
    mean_rgb: list
    pca_eigval: list
    pca_eigvec: list

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        try:
            stats = cls(mean_rgb=[float(v) for v in d["mean_rgb"]],
                        pca_eigval=[float(v) for v in d["pca_eigval"]],
                        pca_eigvec=[[float(v) for v in row] for row in d["pca_eigvec"]])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"malformed data statistics {d!r}: {e}") from e
        if (len(stats.mean_rgb) != 3 or len(stats.pca_eigval) != 3
                or np.shape(stats.pca_eigvec) != (3, 3)):
            raise DataError(f"data statistics need 3 means, 3 eigenvalues and a 3x3 "
                            f"eigenvector matrix, got {d!r}")
        return stats


def rgb_moments(img):
    """(pixel count, sum of x, sum of x x^T) of one uint8 image (0-255 scale), float64."""
    x = img.reshape(-1, 3).astype(np.float64)
    return x.shape[0], x.sum(axis=0), x.T @ x


def stats_from_moments(count, total, outer):
    """Mean and covariance eigen-decomposition from summed moments -> `DataStats`."""
    mean = total / count
    cov = outer / count - np.outer(mean, mean)
    eigval, eigvec = np.linalg.eigh(cov)        # ascending; columns are eigenvectors
    order = np.argsort(eigval)[::-1]
    eigval = np.clip(eigval[order], 0.0, None)  # NOTE: rounding can give -1e-18
    eigvec = eigvec[:, order]
    return DataStats(mean.tolist(), eigval.tolist(), eigvec.tolist())


def pca_colour_shift(stats, rng, std=0.1):
    """AlexNet's lighting noise, P @ (alpha * lambda), alpha ~ N(0, std) (Sec. 3.1).

    P holds the eigenvectors of the training set's RGB covariance as columns and lambda its
    eigenvalues. One shift per image, added to every pixel; returned on the 0-255 scale.

    NOTE: the formula is evaluated on the 0-1 scale, lambda_01 = lambda_255 / 255^2, and
    the shift multiplied back by 255: 255 * P @ (alpha * lambda_255 / 255^2). On ImageNet
    lambda_01 ~ (0.2, 0.02, 0.004), so the shift is ~5 grey levels (one standard deviation)
    along the first component.
    """
    alpha = rng.normal(0.0, std, size=3)
    lam = np.asarray(stats.pca_eigval) / 255.0
    return (np.asarray(stats.pca_eigvec) @ (alpha * lam)).astype(np.float32)


# ----------------------------------------------------------------------------------------
# Transforms: uint8 (H, W, 3) -> float32 (3, crop, crop)
# ----------------------------------------------------------------------------------------

class TrainTransform:
    """Sec. 3.1's augmentation: rescale to a (random) S, random crop, flip, colour shift.

    `scale` is an int S or a pair (Smin, Smax) for scale jittering (S drawn uniformly from
    the integers in [Smin, Smax] per image). Each call takes its own `rng`, so the result
    depends only on the image and that generator, never on which worker ran it.
    """

    def __init__(self, scale, crop, stats, flip=True, pca_std=0.1):
        self.smin, self.smax = (scale, scale) if np.isscalar(scale) else tuple(scale)
        self.smin, self.smax, self.crop = int(self.smin), int(self.smax), int(crop)
        check_crop(self.crop, self.smin)
        self.stats, self.flip, self.pca_std = stats, flip, pca_std
        self.mean = np.asarray(stats.mean_rgb, dtype=np.float32)

    def __call__(self, img, rng):
        S = int(rng.integers(self.smin, self.smax + 1))
        img = rescale_smallest_side(img, S)
        H, W = img.shape[:2]
        top = int(rng.integers(0, H - self.crop + 1))
        left = int(rng.integers(0, W - self.crop + 1))
        img = img[top:top + self.crop, left:left + self.crop]
        if self.flip and rng.random() < 0.5:
            img = img[:, ::-1]
        shift = self.mean.copy()
        if self.pca_std > 0:
            shift -= pca_colour_shift(self.stats, rng, self.pca_std)
        return to_chw_float32(img, shift)  # x + colour shift - mean


class EvalTransform:
    """Sec. 3.2's single-crop test view: rescale to smallest side Q, then centre-crop."""

    def __init__(self, Q, crop, stats):
        self.Q, self.crop = int(Q), int(crop)
        check_crop(self.crop, self.Q)
        self.mean = np.asarray(stats.mean_rgb, dtype=np.float32)

    def __call__(self, img, rng=None):
        return to_chw_float32(center_crop(rescale_smallest_side(img, self.Q), self.crop),
                              self.mean)


def check_crop(crop, smallest_scale):
    if crop < 1:
        raise DataError(f"the crop size must be positive, got {crop}")
    if crop > smallest_scale:
        raise DataError(f"crop {crop} is larger than the smallest scale S={smallest_scale}: "
                        f"a {crop}x{crop} crop does not fit in an image rescaled to "
                        f"smallest side {smallest_scale}")


# ----------------------------------------------------------------------------------------
# ImageFolder: the ILSVRC layout, root/<split>/<wnid>/*.JPEG
# ----------------------------------------------------------------------------------------

class ImageFolder:
    """The images of one split, e.g. root/train/<wnid>/*.JPEG; class index = sorted wnid."""

    def __init__(self, folder):
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise DataError(f"image folder {folder!r} does not exist")
        self.root = folder
        self.classes = sorted(d for d in os.listdir(folder)
                              if os.path.isdir(os.path.join(folder, d)))
        if not self.classes:
            raise DataError(f"{folder!r} has no class sub-folders; expected the ILSVRC "
                            f"layout {folder}/<wnid>/*.JPEG")
        paths, labels = [], []
        for label, wnid in enumerate(self.classes):
            class_dir = os.path.join(folder, wnid)
            for name in sorted(os.listdir(class_dir)):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(class_dir, name))
                    labels.append(label)
        if not paths:
            raise DataError(f"{folder!r} has class folders but no images "
                            f"({', '.join(IMAGE_EXTENSIONS)})")
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.cache = None  # filled by cache_in_memory()

    def __len__(self):
        return len(self.paths)

    def load(self, i):
        if self.cache is not None:
            img = self.cache[i]
            if img is None:
                raise OSError(f"{self.paths[i]} could not be decoded when it was cached")
            return img
        return load_rgb(self.paths[i])

    def cache_in_memory(self, smallest_side, workers=0):
        """Decode every image once, rescaled to `smallest_side`, and keep it as uint8.

        Later `load()` calls are a list lookup. `smallest_side` must be at least the
        largest S (or Q) used, so that the transforms only ever shrink. Images already
        smaller are kept as they are. Unreadable files are kept as None and counted.
        """
        jobs = [(p, smallest_side) for p in self.paths]
        self.cache = list(_map(_decode_for_cache, jobs, workers))
        return sum(img is None for img in self.cache)


def _decode_for_cache(job):
    path, side = job
    try:
        img = load_rgb(path)
    except OSError:
        return None
    if min(img.shape[:2]) > side:
        img = rescale_smallest_side(img, side)
    return img


def _map(fn, items, workers, chunksize=16):
    """map(fn, items) in order, over a pool of `workers` processes (0 = here)."""
    if workers <= 0:
        return map(fn, items)
    with _pool(workers) as pool:
        return pool.map(fn, items, chunksize=chunksize)


def _pool(workers, initializer=None, initargs=()):
    # NOTE: "fork" shares an in-memory cache with the workers copy-on-write, for free;
    # "spawn" (the default on macOS and Windows) would pickle it to every worker.
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else "spawn")
    return ctx.Pool(workers, initializer=initializer, initargs=initargs)


def open_imagenet(root):
    """(train, val) `ImageFolder`s of root/train and root/val, with the same classes."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"data directory {root!r} does not exist")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise DataError(f"{root!r} has no {split!r} folder; expected the ILSVRC layout "
                            f"{root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG")
    train, val = ImageFolder(os.path.join(root, "train")), ImageFolder(
        os.path.join(root, "val"))
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(f"train and val class sets differ: only in train {only_train[:5]}"
                        f"{'...' if len(only_train) > 5 else ''}, only in val "
                        f"{only_val[:5]}{'...' if len(only_val) > 5 else ''}")
    return train, val


def compute_stats(dataset, max_images=2000, side=64, seed=0, workers=0):
    """Mean RGB and RGB-covariance PCA of (a seeded sample of) a training set.

    Each image is rescaled to smallest side `side` first: the colour statistics of a
    thumbnail are those of the image, at a fraction of the cost. Unreadable files are
    skipped. Returns `DataStats` (0-255 scale).
    """
    n = len(dataset)
    rng = np.random.default_rng(seed)
    index = np.sort(rng.permutation(n)[:max_images]) if n > max_images else np.arange(n)
    if isinstance(dataset, ImageFolder) and dataset.cache is None:
        moments = _map(_file_moments, [(dataset.paths[i], side) for i in index], workers)
    else:
        moments = (_image_moments(dataset, i, side) for i in index)
    count, total, outer = 0, np.zeros(3), np.zeros((3, 3))
    for m in moments:
        if m is not None:
            count, total, outer = count + m[0], total + m[1], outer + m[2]
    if count == 0:
        raise DataError("no readable training image to compute the mean colour from")
    return stats_from_moments(count, total, outer)


def _file_moments(job):
    path, side = job
    try:
        return rgb_moments(rescale_smallest_side(load_rgb(path), side))
    except OSError:
        return None


def _image_moments(dataset, i, side):
    try:
        img = dataset.load(i)
    except OSError:
        return None
    if min(img.shape[:2]) > side:
        img = rescale_smallest_side(img, side)
    return rgb_moments(img)


# ----------------------------------------------------------------------------------------
# Loader: batches decoded and augmented in background processes
# ----------------------------------------------------------------------------------------

def sample_rng(seed, epoch, index):
    """The generator for one sample's augmentation: a function of (seed, epoch, index) only,
    so a batch comes out the same whichever worker (or how many workers) made it."""
    return np.random.default_rng([seed, epoch, index])


def _print_warning(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


# Set in each worker by _init_worker (inherited through fork, or pickled once by spawn).
_worker_state = None


def _init_worker(dataset, transform):
    global _worker_state
    _worker_state = (dataset, transform)
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def _make_batch(job, state=None):
    """Decode and transform the samples of one batch -> (x, y, bad paths with reasons)."""
    dataset, transform = state or _worker_state
    seed, epoch, indices = job
    xs, ys, bad = [], [], []
    for i in indices:
        try:
            img = dataset.load(i)
        except OSError as e:
            bad.append((dataset.paths[i], str(e)))
            continue
        xs.append(transform(img, sample_rng(seed, epoch, int(i))))
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
    `self.skipped` for the epoch summary.

    Data parallelism (Sec. 3.3): with `shard=(rank, ranks)` every batch of `batch_size` (the
    global batch) is cut into `ranks` contiguous slices that differ by at most one image,
    and this loader yields slice `rank`. The permutation is the same for every number of
    ranks, so a run resumed on another number of processes continues the same sequence;
    the last, shorter batch is kept and cut the same way. Every rank yields exactly
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
        self.warn = warn or _print_warning
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

    def epoch(self, epoch):
        """Iterate over the batches of `epoch` (0-based). Resets `self.skipped`."""
        self.skipped = 0
        jobs = [(self.seed, epoch, idx) for idx in self.batch_indices(epoch)]
        results = self._run(jobs)
        for x, y, bad in results:
            for path, reason in bad:
                self.skipped += 1
                if path not in self.warned:  # one warning per file per run
                    self.warned.add(path)
                    self.warn(f"skipping unreadable image {path}: {reason}")
            if x is not None:
                yield x, y
            elif self.ranks > 1:  # NOTE: keep in step with the other ranks
                crop = self.transform.crop
                yield np.zeros((0, 3, crop, crop), np.float32), np.zeros(0, np.int64)

    def _run(self, jobs):
        if self.workers <= 0:
            state = (self.dataset, self.transform)
            for job in jobs:
                yield _make_batch(job, state)
            return
        if self._pool is None:
            self._pool = _pool(self.workers, _init_worker, (self.dataset, self.transform))
        pending = deque()
        jobs = iter(jobs)
        for job in jobs:  # NOTE: bounded look-ahead; Pool.imap would run the whole epoch
            pending.append(self._pool.apply_async(_make_batch, (job,)))
            if len(pending) >= self.prefetch:
                break
        for job in jobs:
            result = pending.popleft().get()
            pending.append(self._pool.apply_async(_make_batch, (job,)))
            yield result
        while pending:
            yield pending.popleft().get()

    def close(self):
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# ----------------------------------------------------------------------------------------
# `python -m minivgg.data DIR`: how fast the loader alone delivers training batches
# ----------------------------------------------------------------------------------------

def measure_data_rate(loader, batches=50, epoch=0):
    """Images per second that `loader` delivers with no network consuming them."""
    import time
    it = loader.epoch(epoch)
    next(it)  # start-up (pool, first batch) is not part of the steady rate
    start, seen = time.perf_counter(), 0
    for _, (x, _) in zip(range(batches), it):
        seen += len(x)
    return seen / (time.perf_counter() - start)


def main(argv=None):
    import argparse
    import time
    p = argparse.ArgumentParser(prog="python -m minivgg.data",
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
