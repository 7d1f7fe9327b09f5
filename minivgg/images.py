"""Image files in, uint8 RGB arrays out: the one place minivgg opens an image file.

    load_rgb(path)                   decode with Pillow, any mode -> uint8 (H, W, 3) RGB,
                                     upright (EXIF orientation), 16-bit/float scaled
    rescale_smallest_side(img, S)    isotropic rescale, smallest side S (Pillow bilinear),
                                     within the budget MAX_PIXELS (check_rescale)
    center_crop(img, size)           the central size x size window
    to_chw_float32(img, mean_rgb)    uint8 (H, W, 3) -> float32 (3, H, W), mean subtracted

Used by the training data (`minivgg.data`), the testing protocol (`minivgg.evaluate`) and
the pretrained weights' input transform (`minivgg.pretrained.input_transform`). Pixels stay
on the 0-255 scale, as in the paper (Sec. 2.1; see `minivgg.data` for why).
"""

import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The ILSVRC layout uses ".JPEG"; accept the usual image extensions in any case.
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")

# The budget of one image minivgg makes (a rescale, a test scale, a crop): 2^24 pixels,
# 4096 x 4096, 48 MiB as uint8 RGB and 192 MiB as float32. NOTE: Pillow's bomb check
# bounds the decoded file (179M pixels), not what a rescale makes of it: a 228-byte
# 50000 x 1 PNG rescaled to smallest side 72 would be 3,600,000 x 72 pixels (0.8 GB, and
# 6 GB as float64 statistics). The paper's scales (256-512) stay far below it, as do
# panoramas of 1:20 at S = 512.
MAX_PIXELS = 2**24
MAX_SIDE = 4096  # the largest square within MAX_PIXELS: the largest scale a flag can ask


class ImageTooLarge(OSError):
    """An image (or a scale) would make an array over `MAX_PIXELS`; nothing was allocated.
    An OSError, so the loaders skip such an image as they skip an unreadable one."""


def check_pixels(height, width, what):
    """Raise `ImageTooLarge` naming `what` when height x width exceeds `MAX_PIXELS`."""
    if height * width > MAX_PIXELS:
        raise ImageTooLarge(f"{what} would be {height}x{width} = {height * width:,} pixels, "
                            f"over minivgg's budget of {MAX_PIXELS:,} pixels per image "
                            f"({MAX_SIDE}x{MAX_SIDE}, minivgg.images.MAX_PIXELS)")


def check_scale(S, flag):
    """Raise ValueError, naming `flag`, for a scale whose smallest square is over budget."""
    if S > MAX_SIDE:
        raise ValueError(f"{flag} {S}: an image rescaled to smallest side {S} has at least "
                         f"{S * S:,} pixels, over minivgg's budget of {MAX_PIXELS:,} "
                         f"({MAX_SIDE}x{MAX_SIDE}); use at most {MAX_SIDE}")


def check_rescale(height, width, S, name="an image"):
    """Raise `ImageTooLarge` when an image of height x width rescaled to smallest side S
    is over budget: the check before `rescale_smallest_side` allocates anything."""
    new_h, new_w = rescaled_size(height, width, S)
    check_pixels(new_h, new_w, f"{name} ({height}x{width}) rescaled to smallest side {S}")

def load_rgb(path):
    """Decode an image file into a uint8 array (H, W, 3) in RGB order, upright.

    Every Pillow mode is handled (`to_rgb8`), and the EXIF orientation tag is applied (see
    `upright`). Raises `OSError` "cannot read image PATH: why" for anything Pillow cannot
    read: a missing, empty, truncated or foreign file, a folder, a decompression bomb, and
    anything that is not a regular file (a named pipe would block the reader forever).
    """
    # NOTE: Pillow pads a truncated JPEG with grey, silently, only when the global
    # ImageFile.LOAD_TRUNCATED_IMAGES is True; at its default (False) `im.load()` raises,
    # which is what lets the loader skip and count such files.
    try:
        with warnings.catch_warnings(), open_regular(path) as f, Image.open(f) as im:
            # Between 89M and 179M pixels Pillow only warns (above, it raises): a large
            # scan is a legitimate image, and a warning per worker per file is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
            return to_rgb8(upright(im))
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBomb
        raise OSError(f"cannot read image {path}: {_read_failure(path, e)}") from None


class NotARegularFile(OSError):
    """A path that names a pipe, a device or a socket: never read as an image."""


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def not_regular(mode):
    """What a file of stat mode `mode` is, in words, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def open_regular(path):
    """Open `path` for reading if it is a regular file -> binary file object; never blocks.

    NOTE: O_NONBLOCK makes opening a FIFO return at once (a plain open waits for a writer,
    forever); the descriptor's own fstat then tells what was opened, with no race between
    a check and the open. For a regular file the flag changes nothing.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        kind = not_regular(os.fstat(fd).st_mode)
        if kind is not None:
            raise NotARegularFile(f"it is {kind}, not an image file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _read_failure(path, error):
    """Why an image could not be read, in words (the path is named by the caller)."""
    if isinstance(error, NotARegularFile):
        return str(error)
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


def rescale_smallest_side(img, S, name="an image"):
    """Isotropically rescale uint8 (H, W, 3) so its smallest side is S (Sec. 3.1, 3.2).

    Uses Pillow's bilinear filter, which averages over the whole footprint when shrinking
    (antialiased), as torchvision's Resize does. Returns `img` itself when nothing changes.
    Raises `ImageTooLarge` (naming `name`) when the result would exceed `MAX_PIXELS`, as a
    very thin image does, before allocating it.
    """
    S = int(S)
    if S < 1:
        raise ValueError(f"rescale_smallest_side: S must be positive, got {S}")
    H, W = img.shape[:2]
    check_rescale(H, W, S, name)
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
