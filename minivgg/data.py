"""Images in, batches out: the paper's data pipeline (Sec. 3.1 and 3.2).

The pieces, in the order an image meets them:

    load_rgb(path)                   decode with Pillow, any mode -> uint8 (H, W, 3) RGB,
                                     upright (EXIF orientation), 16-bit/float scaled
    rescale_smallest_side(img, S)    isotropic rescale, smallest side S (Pillow bilinear)
    TrainTransform                   random S in [Smin, Smax], random crop, random flip,
                                     AlexNet's PCA colour shift, mean subtraction
    EvalTransform                    rescale to smallest side Q, centre crop
    to_chw_float32(img, mean_rgb)    uint8 (H, W, 3) -> float32 (3, H, W), mean subtracted
    compute_stats(train)             mean RGB and colour PCA, every image weighing the same
    Loader                           batches, decoded and augmented in worker processes
                                     (minivgg.workers: Ctrl-C and SIGTERM cannot hang them)

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
import os
import sys
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from minivgg.workers import WorkerPool

# The ILSVRC layout uses ".JPEG"; accept the usual image extensions in any case.
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A dataset that cannot be used: missing folder, no images, mismatched classes..."""


# ----------------------------------------------------------------------------------------
# Image helpers (also used by minivgg.evaluate)
# ----------------------------------------------------------------------------------------

def load_rgb(path):
    """Decode an image file into a uint8 array (H, W, 3) in RGB order, upright.

    Every Pillow mode is handled (`to_rgb8`), and the EXIF orientation tag is applied (see
    `upright`). Raises `OSError` "cannot read image PATH: why" for anything Pillow cannot
    read: a missing, empty, truncated or foreign file, a folder, a decompression bomb.
    """
    # NOTE: Pillow pads a truncated JPEG with grey, silently, only when the global
    # ImageFile.LOAD_TRUNCATED_IMAGES is True; at its default (False) `im.load()` raises,
    # which is what lets the loader skip and count such files.
    try:
        with warnings.catch_warnings(), Image.open(path) as im:
            # Between 89M and 179M pixels Pillow only warns (above, it raises): a large
            # scan is a legitimate image, and a warning per worker per file is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
            return to_rgb8(upright(im))
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBomb
        raise OSError(f"cannot read image {path}: {_read_failure(path, e)}") from None


def _read_failure(path, error):
    """Why an image could not be read, in words (the path is named by the caller)."""
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, IsADirectoryError) or os.path.isdir(path):
        return "it is a folder, not an image file"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, UnidentifiedImageError):
        empty = os.path.isfile(path) and os.path.getsize(path) == 0
        return "the file is empty" if empty else "not an image format Pillow can read"
    return f"{type(error).__name__}: {error}"


def upright(im):
    """The image as a viewer shows it: the EXIF orientation tag (1-8) applied.

    NOTE: the choice. A phone photo is stored sideways with a tag saying "rotate 90";
    every viewer, and so the person who sorted it into a class folder, sees it upright.
    torchvision's ImageFolder ignores the tag (Pillow does not apply it) and the paper says
    nothing; ILSVRC's JPEGs carry almost no orientation tags, so the paper's numbers do not
    depend on it, while on a folder of phone photos ignoring it would train on sideways
    images and evaluate differently from what the user looked at. So minivgg applies it,
    in training and at test time alike. A damaged EXIF block counts as no tag.
    """
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # malformed EXIF: the pixels are still fine, keep them as stored
        return im


# Nominal range of each integer mode: the value that means full white.
_UINT16_MAX = 65535


def to_rgb8(im):
    """Any Pillow image -> uint8 (H, W, 3) RGB.

    - 8-bit modes (L, P, 1, CMYK, YCbCr, LAB, HSV, RGBX...) go through Pillow's own
      conversion; transparency (RGBA, LA, PA, P with a transparent colour) is dropped,
      keeping the colour channels, as torchvision's `convert("RGB")` does.
    - 16-bit integer grey (I;16, I;16B, I;16L, I;16N) is scaled by its nominal range,
      0..65535 -> 0..255 (rounded), not stretched from the image's own min..max: a dark
      photo must stay dark, and the same value must mean the same grey in every image.
      NOTE: Pillow's own `convert` clips instead, so a 0-65535 ramp comes out 99.6% white.
    - 32-bit integer grey (I) holds 16-bit data when Pillow reads a 16-bit PNG or TIFF
      this way, so values within 0..65535 get the same 16-bit scale. Values outside it
      have no nominal range worth using (2^31 would leave every image black), so such an
      image is stretched from its own min..max to 0..255.
    - 32-bit float grey (F) is read as 0..1 (the convention of float image files and of
      torchvision's ToTensor): clipped to [0, 1], then scaled to 0..255; NaN becomes 0.
    """
    mode = im.mode
    if mode.startswith(("I", "F")):
        grey = _grey_to_uint8(np.asarray(im), mode)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode in ("La", "RGBa"):  # premultiplied alpha: Pillow converts RGBa, not La
        im = im.convert("RGBA") if mode == "RGBa" else Image.merge("L", im.split()[:1])
    elif mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # avoids Pillow's palette-transparency warning
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8).copy()


def _grey_to_uint8(x, mode):
    """One-channel 16/32-bit integer or float pixels -> uint8, as `to_rgb8` documents."""
    x = x.astype(np.float64)
    if mode.startswith("F"):
        x = np.clip(np.nan_to_num(x, nan=0.0), 0.0, 1.0) * 255.0
    elif x.size and (x.min() < 0 or x.max() > _UINT16_MAX):
        low, high = x.min(), x.max()
        x = (x - low) * (255.0 / (high - low))  # high > low: one of them is outside 0..65535
    else:
        x = x * (255.0 / _UINT16_MAX)
    return np.rint(x).astype(np.uint8)


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
            (warn or _print_warning)(ignored_message([(folder, self.ignored)]))
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.cache = None  # filled by cache_in_memory()

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
        """
        jobs = [(p, smallest_side) for p in self.paths]
        self.cache = list(_map(_decode_for_cache, jobs, workers))
        return sum(img is None for img in self.cache)


def _list_folder(folder):
    try:
        return os.listdir(folder)
    except OSError as e:
        raise DataError(f"cannot read folder {folder!r}: {e.strerror or e}") from None


def _image_files(class_dir):
    """Sorted paths of the (non-hidden) image files directly inside `class_dir`."""
    return [os.path.join(class_dir, name) for name in sorted(_list_folder(class_dir))
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")]


def ignored_message(ignored):
    """One warning line for [(split folder, [ignored sub-folder names])]."""
    parts = [f"{folder}: {', '.join(names)}" for folder, names in ignored if names]
    return ("ignoring sub-folders that are hidden or hold no images (not classes): "
            + "; ".join(parts))


def _decode_for_cache(job, state=None):
    path, side = job
    try:
        img = load_rgb(path)
    except OSError:
        return None
    if min(img.shape[:2]) > side:
        img = rescale_smallest_side(img, side)
    return img


def _map(fn, items, workers):
    """[fn(item) for item in items], in order, over `workers` processes (0 = here)."""
    if workers <= 0:
        return [fn(item) for item in items]
    pool = WorkerPool(workers, fn)
    try:
        return list(pool.map(items, ahead=4 * workers))
    finally:
        pool.close()


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
        (warn or _print_warning)(ignored_message([(train.root, train.ignored),
                                                  (val.root, val.ignored)]))
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(f"train and val class sets differ: only in train {only_train[:5]}"
                        f"{'...' if len(only_train) > 5 else ''}, only in val "
                        f"{only_val[:5]}{'...' if len(only_val) > 5 else ''} (a class "
                        f"needs a folder holding images in both splits)")
    return train, val


def compute_stats(dataset, max_images=2000, side=64, seed=0, workers=0, warn=None):
    """Mean RGB and RGB-covariance PCA of (a seeded sample of) a training set.

    Each image counts once (`image_moments`), rescaled to smallest side `side` first: the
    colour statistics of a thumbnail are those of the image, at a fraction of the cost.
    Unreadable files are skipped and counted in one warning. Returns `DataStats` (0-255).
    """
    n = len(dataset)
    rng = np.random.default_rng(seed)
    index = np.sort(rng.permutation(n)[:max_images]) if n > max_images else np.arange(n)
    if isinstance(dataset, ImageFolder) and dataset.cache is None:
        moments = _map(_file_moments, [(dataset.paths[i], side) for i in index], workers)
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
        (warn or _print_warning)(f"{bad} of {len(index)} sampled training images are "
                                 f"unreadable; the mean colour comes from the other {count}")
    return stats_from_moments(count, total, outer)


def _file_moments(job, state=None):
    path, side = job
    try:
        return image_moments(rescale_smallest_side(load_rgb(path), side))
    except OSError:
        return None


def _image_moments(dataset, i, side):
    try:
        img = dataset.load(i)
    except OSError:
        return None
    if min(img.shape[:2]) > side:
        img = rescale_smallest_side(img, side)
    return image_moments(img)


# ----------------------------------------------------------------------------------------
# Loader: batches decoded and augmented in background processes
# ----------------------------------------------------------------------------------------

def sample_rng(seed, epoch, index):
    """The generator for one sample's augmentation: a function of (seed, epoch, index) only,
    so a batch comes out the same whichever worker (or how many workers) made it."""
    return np.random.default_rng([seed, epoch, index])


def _print_warning(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _make_batch(job, state):
    """Decode and transform the samples of one batch -> (x, y, bad paths with reasons)."""
    dataset, transform = state
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
