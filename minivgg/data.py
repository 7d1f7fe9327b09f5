"""Datasets, their statistics and Sec. 3.1's augmentation (Sec. 3.1 and 3.2).

The pieces, in the order an image meets them (decoding is `minivgg.images`, batching is
`minivgg.loader`):

    ImageFolder / open_imagenet      the ILSVRC layout, root/<split>/<wnid>/*.JPEG
    TrainTransform                   random S in [Smin, Smax], random crop, random flip,
                                     AlexNet's PCA colour shift, mean subtraction
    EvalTransform                    rescale to smallest side Q, centre crop
    compute_stats(train)             mean RGB and colour PCA, every image weighing the same

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

import os
import sys
from dataclasses import asdict, dataclass

import numpy as np

from minivgg.images import (IMAGE_EXTENSIONS, center_crop, check_rescale, load_rgb,
                            not_regular, rescale_smallest_side, to_chw_float32)
from minivgg.workers import map_in_processes

class DataError(ValueError):
    """A dataset that cannot be used: missing folder, no images, mismatched classes..."""



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


MOMENT_ROWS = 2**20  # pixels per float64 block in `rgb_moments`: 24 MiB at a time


def rgb_moments(img):
    """(pixel count, sum of x, sum of x x^T) of one uint8 image (0-255 scale), float64.

    NOTE: in blocks of `MOMENT_ROWS` pixels, so a large image never needs a float64 copy
    of itself (8 bytes a channel where it holds 1); an ordinary one is a single block."""
    pixels = img.reshape(-1, 3)
    total, outer = np.zeros(3), np.zeros((3, 3))
    for start in range(0, len(pixels), MOMENT_ROWS):
        x = pixels[start:start + MOMENT_ROWS].astype(np.float64)
        total += x.sum(axis=0)
        outer += x.T @ x
    return len(pixels), total, outer


def image_moments(img):
    """One image's share of the training-set statistics: (1, mean x, mean x x^T).

    NOTE: per image, not per pixel. Summing these over N images gives the mean of the
    per-image mean colours and the covariance of a pixel drawn by first drawing an image
    uniformly: every image weighs the same whatever its size, so one 5000x20 panorama
    (a million pixels once its smallest side is rescaled) cannot outweigh ninety photos.
    The paper's "mean RGB value, computed on the training set" (Sec. 2.1) leaves the
    weighting open; Caffe's ImageNet mean is likewise an average over images of one size.
    """
    n, total, outer = rgb_moments(img)
    return 1, total / n, outer / n


def stats_from_moments(count, total, outer):
    """Mean and covariance eigen-decomposition from summed moments -> `DataStats`.

    `count` is what the moments were summed over: pixels (`rgb_moments`) or images
    (`image_moments`).
    """
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

    def __call__(self, img, rng, name="an image"):
        S = int(rng.integers(self.smin, self.smax + 1))
        check_rescale(*img.shape[:2], S, name)  # a thin image: refused, not allocated
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

    def __call__(self, img, rng=None, name="an image"):
        check_rescale(*img.shape[:2], self.Q, name)
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
    """The images of one split, e.g. root/train/<wnid>/*.JPEG; class index = sorted wnid.

    A sub-folder is a class when its name does not start with "." and it holds at least
    one image file (by extension; hidden files such as macOS's "._x.jpg" do not count).
    Hidden folders (`.ipynb_checkpoints`, `.git`) and folders without images are left out
    and listed in `self.ignored`; `warn` (default: print to stderr; False: say nothing)
    names them once, and `open_imagenet` names both splits' in one warning. A folder
    that cannot be listed (no permission) is a `DataError`, never a silently lost class.
    """

    def __init__(self, folder, warn=None):
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise DataError(f"image folder {folder!r} does not exist")
        self.root = folder
        self.classes, self.ignored, paths, labels = [], [], [], []
        for name in sorted(_list_folder(folder)):
            class_dir = os.path.join(folder, name)
            if not os.path.isdir(class_dir):
                continue
            images = [] if name.startswith(".") else _image_files(class_dir)
            if not images:
                self.ignored.append(name)
                continue
            paths += images
            labels += [len(self.classes)] * len(images)
            self.classes.append(name)
        if not self.classes:
            raise DataError(f"{folder!r} has no images: no class sub-folder holds image "
                            f"files ({', '.join(IMAGE_EXTENSIONS)}); expected the ILSVRC layout "
                            f"{folder}/<wnid>/*.JPEG"
                            + (f" (ignored: {', '.join(self.ignored)})" if self.ignored else ""))
        if self.ignored and warn is not False:
            (warn or print_warning)(ignored_message([(folder, self.ignored)]))
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.cache = self.moments = None  # filled by cache_in_memory()

    def __len__(self):
        return len(self.paths)

    def load(self, i):
        if self.cache is not None:
            img = self.cache[i]
            if img is None:
                raise OSError(f"cannot read image {self.paths[i]}: it could not be decoded "
                              f"when it was cached")
            return img
        return load_rgb(self.paths[i])

    def cache_in_memory(self, smallest_side, workers=0):
        """Decode every image once, rescaled to `smallest_side`, and keep it as uint8.

        Later `load()` calls are a list lookup. `smallest_side` must be at least the
        largest S (or Q) used, so that the transforms only ever shrink. Images already
        smaller are kept as they are. Unreadable files are kept as None and counted.

        NOTE: each image's share of the colour statistics (`image_moments` at side
        `STATS_SIDE`) is taken from the decoded file here too, not from the cached copy,
        which is already rescaled: `compute_stats` then gives the same numbers with and
        without the cache, and so does the whole run (README, "--cache").
        """
        jobs = [(p, smallest_side) for p in self.paths]
        decoded = list(map_in_processes(_decode_for_cache, jobs, workers))
        self.cache = [img for img, _ in decoded]
        self.moments = [m for _, m in decoded]
        return sum(img is None for img in self.cache)


def _list_folder(folder):
    try:
        return os.listdir(folder)
    except OSError as e:
        raise DataError(f"cannot read folder {folder!r}: {e.strerror or e}") from None


def _image_files(class_dir):
    """Sorted paths of the (non-hidden) image files directly inside `class_dir`.

    A name that is a named pipe, a device or a socket is left out with a warning: reading
    one would block, or never end. Only `os.stat` looks at it, which opens nothing. (A
    folder or a broken link with an image's name stays in: it is reported, and skipped,
    as an unreadable image when it is loaded.)"""
    paths, special = [], []
    for name in sorted(_list_folder(class_dir)):
        if not name.lower().endswith(IMAGE_EXTENSIONS) or name.startswith("."):
            continue
        path = os.path.join(class_dir, name)
        try:
            kind = not_regular(os.stat(path).st_mode)
        except OSError:
            kind = None
        if kind is None or kind == "a folder":
            paths.append(path)
        else:
            special.append(f"{path} ({kind})")
    if special:
        print_warning(f"ignoring {len(special)} file(s) that are not regular files and "
                      f"would block or never end a read: {', '.join(special[:5])}"
                      + (" ..." if len(special) > 5 else ""))
    return paths


def ignored_message(ignored):
    """One warning line for [(split folder, [ignored sub-folder names])]."""
    parts = [f"{folder}: {', '.join(names)}" for folder, names in ignored if names]
    return ("ignoring sub-folders that are hidden or hold no images (not classes): "
            + "; ".join(parts))



def _decode_for_cache(job, state=None):
    """(the image rescaled to smallest side `side` if larger, its statistics' share) of
    one file, or (None, None) when it is unreadable or over the size budget."""
    path, side = job
    try:
        img = load_rgb(path)
        moments = _moments_at(img, STATS_SIDE, path)
        if min(img.shape[:2]) > side:
            img = rescale_smallest_side(img, side, path)
    except OSError:
        return None, None
    return img, moments


def open_imagenet(root, warn=None):
    """(train, val) `ImageFolder`s of root/train and root/val, with the same classes.

    Both splits ignore the same kinds of sub-folder (see `ImageFolder`), so a hidden
    folder in both cannot become class 0 and shift every label; one warning names what
    was ignored in either.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"data directory {root!r} does not exist")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise DataError(f"{root!r} has no {split!r} folder; expected the ILSVRC layout "
                            f"{root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG")
    train = ImageFolder(os.path.join(root, "train"), warn=False)
    val = ImageFolder(os.path.join(root, "val"), warn=False)
    if train.ignored or val.ignored:
        (warn or print_warning)(ignored_message([(train.root, train.ignored),
                                                  (val.root, val.ignored)]))
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(f"train and val class sets differ: only in train {only_train[:5]}"
                        f"{'...' if len(only_train) > 5 else ''}, only in val "
                        f"{only_val[:5]}{'...' if len(only_val) > 5 else ''} (a class "
                        f"needs a folder holding images in both splits)")
    return train, val


STATS_SIDE = 64  # images are rescaled to this smallest side for the colour statistics


def compute_stats(dataset, max_images=2000, side=STATS_SIDE, seed=0, workers=0, warn=None):
    """Mean RGB and RGB-covariance PCA of (a seeded sample of) a training set.

    Each image counts once (`image_moments`), rescaled to smallest side `side` first: the
    colour statistics of a thumbnail are those of the image, at a fraction of the cost.
    Unreadable files are skipped and counted in one warning. Returns `DataStats` (0-255).
    """
    n = len(dataset)
    rng = np.random.default_rng(seed)
    index = np.sort(rng.permutation(n)[:max_images]) if n > max_images else np.arange(n)
    if isinstance(dataset, ImageFolder) and dataset.moments is not None and side == STATS_SIDE:
        moments = [dataset.moments[i] for i in index]  # taken from the files when cached
    elif isinstance(dataset, ImageFolder):
        jobs = [(dataset.paths[i], side) for i in index]
        moments = map_in_processes(_file_moments, jobs, workers)
    else:
        moments = (_image_moments(dataset, i, side) for i in index)
    count, total, outer, bad = 0, np.zeros(3), np.zeros((3, 3)), 0
    for m in moments:
        if m is None:
            bad += 1
        else:
            count, total, outer = count + m[0], total + m[1], outer + m[2]
    if count == 0:
        raise DataError("no readable training image to compute the mean colour from")
    if bad:
        (warn or print_warning)(f"{bad} of {len(index)} sampled training images are "
                                 f"unreadable; the mean colour comes from the other {count}")
    return stats_from_moments(count, total, outer)


def _file_moments(job, state=None):
    path, side = job
    try:
        return _moments_at(load_rgb(path), side, path)
    except OSError:
        return None


def _moments_at(img, side, name):
    """`image_moments` of a decoded image rescaled to smallest side `side` (up or down)."""
    return image_moments(rescale_smallest_side(img, side, name))


def _image_moments(dataset, i, side):
    try:
        img = dataset.load(i)
    except OSError:
        return None
    try:
        if min(img.shape[:2]) > side:
            img = rescale_smallest_side(img, side, dataset.paths[i])
    except OSError:
        return None
    return image_moments(img)


def print_warning(message):
    """The default `warn`: one "warning: ..." line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
