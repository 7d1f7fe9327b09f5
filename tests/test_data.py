"""The data pipeline: layouts, decoding, the Sec. 3.1 augmentation, statistics, the loader."""

import os

import numpy as np
import pytest
from PIL import Image

from minivgg import data, images
from minivgg.data import (DataError, DataStats, EvalTransform, ImageFolder, TrainTransform,
                          open_imagenet)
from minivgg.images import load_rgb, rescale_smallest_side, to_chw_float32
from minivgg.loader import Loader
from minivgg.synthetic import CLASSES, SyntheticImages

IMAGENETTE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                          "imagenette2-224")


def write_image(path, mode, size=(20, 12), colour=None):
    """A small image of `mode` at `path` (folders created); `size` is (width, height)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(abs(hash(str(path))) % 2**32)
    rgb = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    if colour is not None:
        rgb[:] = colour
    im = Image.fromarray(rgb)
    if mode == "RGBA":
        im = im.convert("RGBA")
    elif mode != "RGB":
        im = im.convert(mode)
    fmt = "PNG" if mode in ("RGBA", "P", "LA") or str(path).endswith(".png") else "JPEG"
    im.save(path, format=fmt)
    return rgb


def make_layout(root, classes=("n01", "n02"), per_class=3, splits=("train", "val")):
    for split in splits:
        for c in classes:
            for i in range(per_class):
                write_image(os.path.join(root, split, c, f"{c}_{i}.JPEG"), "RGB")
    return root


IDENTITY_STATS = DataStats([0.0, 0.0, 0.0], [0.0, 0.0, 0.0],
                           np.eye(3).tolist())


# --- decoding -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "RGB", "I;16", "1", "LA"])
def test_load_rgb_converts_every_mode_to_uint8_rgb(tmp_path, mode):
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    if mode in ("CMYK",):
        path = tmp_path / "img_cmyk.jpg"
    if mode == "I;16":
        os.makedirs(tmp_path, exist_ok=True)
        Image.fromarray(np.full((12, 20), 1000, dtype=np.uint16)).save(path)
    else:
        write_image(str(path), mode)
    img = load_rgb(str(path))
    assert img.dtype == np.uint8 and img.shape == (12, 20, 3)


def test_load_rgb_keeps_the_colours_of_grayscale_and_rgba(tmp_path):
    write_image(str(tmp_path / "g.png"), "L", colour=(90, 90, 90))
    assert (load_rgb(str(tmp_path / "g.png")) == 90).all()
    write_image(str(tmp_path / "a.png"), "RGBA", colour=(10, 200, 30))
    assert (load_rgb(str(tmp_path / "a.png")) == [10, 200, 30]).all()


def test_load_rgb_raises_oserror_for_truncated_and_garbage_files(tmp_path):
    write_image(str(tmp_path / "ok.JPEG"), "RGB", size=(64, 64))
    raw = (tmp_path / "ok.JPEG").read_bytes()
    (tmp_path / "cut.JPEG").write_bytes(raw[:len(raw) // 2])
    (tmp_path / "junk.JPEG").write_bytes(b"this is not an image")
    for name in ("cut.JPEG", "junk.JPEG"):
        with pytest.raises(OSError):
            load_rgb(str(tmp_path / name))


# --- geometry -----------------------------------------------------------------------------

@pytest.mark.parametrize("hw, S, expected", [((100, 200), 50, (50, 100)),
                                             ((300, 150), 60, (120, 60)),
                                             ((64, 64), 64, (64, 64)),
                                             ((10, 15), 20, (20, 30))])
def test_rescale_smallest_side_is_isotropic(hw, S, expected):
    img = np.zeros(hw + (3,), dtype=np.uint8)
    out = rescale_smallest_side(img, S)
    assert out.shape == expected + (3,) and out.dtype == np.uint8


def test_rescale_smallest_side_keeps_a_flat_colour():
    img = np.full((40, 60, 3), (12, 34, 56), dtype=np.uint8)
    assert (rescale_smallest_side(img, 17) == (12, 34, 56)).all()


def test_to_chw_float32_keeps_the_0_255_scale_and_subtracts_the_mean():
    img = np.zeros((2, 3, 3), dtype=np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 255, 51, 0
    x = to_chw_float32(img, [100.0, 1.5, 0.0])
    assert x.shape == (3, 2, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:, 1, 2], [155.0, 49.5, 0.0])


def test_eval_transform_takes_the_centre_crop():
    img = np.zeros((40, 40, 3), dtype=np.uint8)
    img[18:22, 18:22] = 255  # a bright centre, visible only in a centred crop
    x = EvalTransform(40, 4, IDENTITY_STATS)(img)
    assert x.shape == (3, 4, 4) and np.all(x == 255.0)


def test_train_transform_crops_lie_inside_the_rescaled_image_and_cover_it():
    # Encode each pixel's column in the red channel; the crop's left edge shows where it is.
    img = np.zeros((32, 64, 3), dtype=np.uint8)
    img[..., 0] = np.arange(64)[None, :]
    t = TrainTransform(32, 16, IDENTITY_STATS, flip=False, pca_std=0.0)
    lefts = []
    for i in range(300):
        x = t(img, np.random.default_rng(i))
        assert x.shape == (3, 16, 16)
        row = x[0, 0].astype(int)
        assert (np.diff(row) == 1).all()
        lefts.append(row[0])
    assert min(lefts) == 0 and max(lefts) == 64 - 16  # every position can be drawn
    assert abs(np.mean(lefts) - 24) < 3                 # uniform: mean (64 - 16) / 2


def test_train_transform_flips_half_the_time():
    img = np.zeros((16, 16, 3), dtype=np.uint8)
    img[:, :8] = 255  # bright left half
    t = TrainTransform(16, 16, IDENTITY_STATS, flip=True, pca_std=0.0)
    flipped = [t(img, np.random.default_rng(i))[0, 0, 0] == 0 for i in range(400)]
    assert 0.4 < np.mean(flipped) < 0.6


def test_scale_jitter_draws_every_integer_scale_in_range_uniformly(monkeypatch):
    seen = []

    def recording_rescale(img, S):
        seen.append(S)
        return rescale_smallest_side(img, S)

    monkeypatch.setattr(data, "rescale_smallest_side", recording_rescale)
    img = np.zeros((40, 80, 3), dtype=np.uint8)
    t = TrainTransform((20, 24), 16, IDENTITY_STATS)
    for i in range(500):
        assert t(img, np.random.default_rng(i)).shape == (3, 16, 16)
    counts = np.bincount(seen, minlength=25)[20:]
    assert counts.sum() == 500 and counts.min() > 70  # each of 5 scales ~100 times


def test_crop_larger_than_the_smallest_scale_is_a_clear_error():
    with pytest.raises(DataError, match="crop 64 is larger than the smallest scale S=56"):
        TrainTransform((56, 80), 64, IDENTITY_STATS)
    with pytest.raises(DataError, match="crop 64"):
        EvalTransform(60, 64, IDENTITY_STATS)


# --- statistics and the PCA colour shift ----------------------------------------------------

def test_stats_from_moments_matches_numpy_mean_and_covariance_eigendecomposition():
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, size=(8, 9, 3)).astype(np.uint8) for _ in range(5)]
    imgs[0][..., 1] = imgs[0][..., 0]  # correlated channels
    count, total, outer = 0, np.zeros(3), np.zeros((3, 3))
    for img in imgs:
        n, s, o = data.rgb_moments(img)
        count, total, outer = count + n, total + s, outer + o
    stats = data.stats_from_moments(count, total, outer)
    pixels = np.concatenate([i.reshape(-1, 3) for i in imgs]).astype(np.float64)
    np.testing.assert_allclose(stats.mean_rgb, pixels.mean(0), rtol=1e-10)
    cov = np.cov(pixels.T, bias=True)
    P, lam = np.asarray(stats.pca_eigvec), np.asarray(stats.pca_eigval)
    np.testing.assert_allclose(P @ np.diag(lam) @ P.T, cov, atol=1e-8)  # cov = P L P^T
    np.testing.assert_allclose(P.T @ P, np.eye(3), atol=1e-12)          # orthonormal
    assert lam[0] >= lam[1] >= lam[2] >= 0


def test_pca_colour_shift_has_the_alexnet_magnitude_along_each_eigenvector():
    # Eigenvalues on the 0-255 scale, as measured on Imagenette; on the 0-1 scale they are
    # (0.2, 0.017, 0.0034), close to fb.resnet.torch's ImageNet values.
    P = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))[0]
    lam = np.array([13000.0, 1100.0, 220.0])
    stats = DataStats([0.0] * 3, lam.tolist(), P.tolist())
    rng = np.random.default_rng(2)
    shifts = np.stack([data.pca_colour_shift(stats, rng) for _ in range(20000)])
    coords = shifts @ P  # along each eigenvector: 255 * alpha_i * lambda_i / 255^2
    np.testing.assert_allclose(coords.std(0), 0.1 * lam / 255, rtol=0.03)
    assert (np.abs(coords.mean(0)) < 4 * coords.std(0) / np.sqrt(len(coords))).all()
    assert 4 < coords[:, 0].std() < 6  # about 5 grey levels along the first component


def test_train_transform_applies_one_colour_shift_to_every_pixel():
    stats = DataStats([100.0, 110.0, 120.0], [13000.0, 1100.0, 220.0], np.eye(3).tolist())
    img = np.full((8, 8, 3), 128, dtype=np.uint8)
    x = TrainTransform(8, 8, stats, flip=True)(img, np.random.default_rng(3))
    shift = x - (128 - np.array([100.0, 110.0, 120.0]))[:, None, None]
    assert np.ptp(shift.reshape(3, -1), axis=1).max() < 1e-4   # same for every pixel
    expected = data.pca_colour_shift(stats, _after_geometry(np.random.default_rng(3)))
    np.testing.assert_allclose(shift[:, 0, 0], expected, atol=1e-4)
    assert np.abs(expected).max() > 0.01  # a real shift was applied


def _after_geometry(rng):
    """The generator of TrainTransform after it drew S, the crop corner and the flip."""
    rng.integers(8, 9), rng.integers(0, 1), rng.integers(0, 1), rng.random()
    return rng


def test_compute_stats_of_a_flat_dataset(tmp_path):
    root = tmp_path / "d"
    for i, c in enumerate([(255, 0, 0), (0, 0, 255)]):
        write_image(str(root / "a" / f"{i}.png"), "RGB", colour=c)
    stats = data.compute_stats(ImageFolder(str(root)))
    np.testing.assert_allclose(stats.mean_rgb, [127.5, 0.0, 127.5], atol=1e-9)
    # Two colours, each half the pixels, +-(127.5, 0, -127.5) from the mean: all the
    # variance, |(127.5, 0, -127.5)|^2 = 32512.5, lies along (1, 0, -1) / sqrt(2).
    np.testing.assert_allclose(stats.pca_eigval, [32512.5, 0.0, 0.0], atol=1e-6)
    assert abs(abs(np.asarray(stats.pca_eigvec)[:, 0] @ [1, 0, -1]) - np.sqrt(2)) < 1e-9


# --- layouts ------------------------------------------------------------------------------

def test_image_folder_indexes_classes_in_sorted_order(tmp_path):
    for c in ("n03", "n01", "n02"):
        write_image(str(tmp_path / c / "x.JPEG"), "RGB")
    write_image(str(tmp_path / "n01" / "y.jpg"), "RGB")
    (tmp_path / "n02" / "notes.txt").write_text("not an image")
    ds = ImageFolder(str(tmp_path))
    assert ds.classes == ["n01", "n02", "n03"]
    assert ds.labels.tolist() == [0, 0, 1, 2] and len(ds) == 4


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_imagenet(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="no 'train' folder"):
        open_imagenet(str(tmp_path))
    os.makedirs(tmp_path / "train" / "n01")
    os.makedirs(tmp_path / "val" / "n01")
    with pytest.raises(DataError, match="no images"):
        open_imagenet(str(tmp_path))


def test_different_train_and_val_classes_are_a_clear_error(tmp_path):
    make_layout(str(tmp_path), ("n01", "n02"), 1, ("train",))
    make_layout(str(tmp_path), ("n01", "n03"), 1, ("val",))
    with pytest.raises(DataError, match=r"only in train \['n02'\], only in val \['n03'\]"):
        open_imagenet(str(tmp_path))


# --- the loader -----------------------------------------------------------------------------

def test_loader_is_deterministic_and_independent_of_the_worker_count():
    ds = SyntheticImages(40, 20, seed=0)
    t = TrainTransform((18, 22), 16, IDENTITY_STATS)
    runs = []
    for workers in (0, 2):
        loader = Loader(ds, t, 8, seed=5, workers=workers)
        runs.append([(x.copy(), y.copy()) for x, y in loader.epoch(3)])
        loader.close()
    for (x0, y0), (x2, y2) in zip(*runs):
        np.testing.assert_array_equal(x0, x2)
        np.testing.assert_array_equal(y0, y2)
    again = list(Loader(ds, t, 8, seed=5).epoch(3))
    np.testing.assert_array_equal(again[0][0], runs[0][0][0])
    other_epoch = list(Loader(ds, t, 8, seed=5).epoch(4))
    assert not np.array_equal(other_epoch[0][1], runs[0][0][1])


def test_loader_visits_every_sample_once_per_epoch():
    ds = SyntheticImages(23, 16, seed=0)
    loader = Loader(ds, EvalTransform(16, 16, IDENTITY_STATS), 5, shuffle=True, seed=1)
    order = np.concatenate(loader.batch_indices(0))
    assert sorted(order.tolist()) == list(range(23)) and len(loader) == 5
    labels = np.concatenate([y for _, y in loader.epoch(0)])
    np.testing.assert_array_equal(labels, ds.labels[order])


def test_loader_skips_corrupt_files_and_reads_odd_modes(tmp_path):
    root = str(tmp_path / "train")
    for i, mode in enumerate(["RGB", "L", "CMYK", "RGBA", "P"]):
        ext = "png" if mode in ("RGBA", "P") else "JPEG"
        write_image(os.path.join(root, "n01", f"{i}.{ext}"), mode, size=(24, 20))
    (tmp_path / "train" / "n01" / "bad.JPEG").write_bytes(b"\xff\xd8\xff garbage")
    good = tmp_path / "train" / "n01" / "0.JPEG"
    (tmp_path / "train" / "n01" / "truncated.JPEG").write_bytes(good.read_bytes()[:200])
    ds = ImageFolder(root)
    warnings = []
    loader = Loader(ds, EvalTransform(20, 16, IDENTITY_STATS), 3, shuffle=False,
                    warn=warnings.append)
    batches = list(loader.epoch(0))
    assert sum(len(y) for _, y in batches) == 5
    assert all(x.shape[1:] == (3, 16, 16) and x.dtype == np.float32 for x, _ in batches)
    assert loader.skipped == 2 and len(warnings) == 2
    assert any("bad.JPEG" in w for w in warnings) and any("truncated" in w for w in warnings)
    list(loader.epoch(1))  # the next epoch counts again but warns no more
    assert loader.skipped == 2 and len(warnings) == 2


def test_cache_in_memory_gives_the_same_batches_when_no_rescale_is_lost(tmp_path):
    make_layout(str(tmp_path), ("n01", "n02"), 4, ("train",))
    ds = ImageFolder(str(tmp_path / "train"))
    t = TrainTransform(12, 10, IDENTITY_STATS)
    before = [x for x, _ in Loader(ds, t, 4, seed=2).epoch(0)]
    assert ds.cache_in_memory(12, workers=2) == 0
    assert all(min(img.shape[:2]) == 12 for img in ds.cache)
    after = [x for x, _ in Loader(ds, t, 4, seed=2).epoch(0)]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


# --- synthetic data -------------------------------------------------------------------------

def test_synthetic_images_are_reproducible_balanced_and_distinct():
    a, b = SyntheticImages(30, 24, seed=3), SyntheticImages(30, 24, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images))
    assert np.bincount(a.labels).tolist() == [3] * len(CLASSES)
    assert a.images[0].shape == (24, 24, 3) and a.images[0].dtype == np.uint8
    val = SyntheticImages(30, 24, seed=3, split="val")
    assert not np.array_equal(val.images[0], a.images[0])


@pytest.mark.skipif(not os.path.isdir(IMAGENETTE), reason="Imagenette not in ../shared/data")
def test_imagenette_has_the_ilsvrc_layout():
    train, val = open_imagenet(IMAGENETTE)
    assert len(train.classes) == 10 and train.classes == val.classes
    assert load_rgb(train.paths[0]).shape[2] == 3


# --- every Pillow mode, 16/32-bit and float images, EXIF orientation ------------------------

def _mode_image(mode):
    """A 3x4 image of `mode` made from a mid-grey RGB image (or its own array type)."""
    grey = Image.new("RGB", (4, 3), (128, 128, 128))
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return Image.new(mode, (4, 3), 32896)  # 128.5 * 257: the 16-bit mid grey
    if mode == "La":
        return Image.new("La", (4, 3), (128, 255))
    if mode == "RGBa":
        return Image.new("RGBa", (4, 3), (128, 128, 128, 255))
    if mode in ("P", "PA"):  # an adaptive palette holds the grey exactly (no dithering)
        return grey.convert("P", palette=Image.Palette.ADAPTIVE).convert(mode)
    return grey.convert(mode)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa",
                                  "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16",
                                  "I;16B", "I;16L", "I;16N", "F"])
def test_to_rgb8_gives_uint8_rgb_for_every_pillow_mode(mode):
    img = images.to_rgb8(_mode_image(mode))
    assert img.dtype == np.uint8 and img.shape == (3, 4, 3)
    if mode not in ("1", "I", "F"):  # "1" is black or white; I and F have their own tests
        assert np.abs(img.astype(int) - 128).max() <= 2, (mode, img[0, 0])


def test_a_16_bit_ramp_is_scaled_by_the_nominal_range_not_clipped(tmp_path):
    # The example: Pillow's own convert() made this ramp 99.6% pure white.
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    img = load_rgb(str(tmp_path / "ramp16.png"))
    expected = np.rint(ramp * (255 / 65535)).astype(np.uint8)
    np.testing.assert_array_equal(img, np.repeat(expected[..., None], 3, axis=2))
    counts = np.bincount(img[..., 0].ravel(), minlength=256)
    assert (counts > 0).all() and counts.max() <= 258   # every grey level, evenly
    assert (img == 255).mean() < 0.01


def test_32_bit_integer_images_use_the_16_bit_scale_or_their_own_range(tmp_path):
    sixteen = np.array([[0, 257, 65535]], dtype=np.int32)
    Image.fromarray(sixteen).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    assert load_rgb(str(tmp_path / "i32.tif"))[0, :, 0].tolist() == [0, 1, 255]
    wide = np.array([[-1000, 500, 1000000]], dtype=np.int32)  # outside 0..65535: min..max
    out = images.to_rgb8(Image.fromarray(wide))[0, :, 0]
    assert out.tolist() == [0, round(1500 * 255 / 1001000), 255]


def test_float_images_are_read_as_0_to_1_and_clipped(tmp_path):
    values = np.array([[-0.5, 0.0, 0.5, 1.0, 2.0, np.nan]], dtype=np.float32)
    Image.fromarray(values).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    assert load_rgb(str(tmp_path / "f.tif"))[0, :, 1].tolist() == [0, 0, 128, 255, 255, 0]


def test_exif_orientation_is_applied_so_images_come_out_as_viewers_show_them(tmp_path):
    # Stored 40 wide x 20 high, left half red, right half blue, tagged "rotate 90 degrees
    # clockwise to display" (orientation 6): upright it is 20 wide x 40 high, red on top.
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    img = load_rgb(str(tmp_path / "phone.jpg")).astype(int)
    assert img.shape == (40, 20, 3)
    assert img[:15, :, 0].mean() > 200 and img[:15, :, 2].mean() < 50    # red on top
    assert img[25:, :, 2].mean() > 200 and img[25:, :, 0].mean() < 50    # blue below
    Image.fromarray(stored).save(tmp_path / "plain.jpg", quality=95)     # no tag: as stored
    assert load_rgb(str(tmp_path / "plain.jpg")).shape == (20, 40, 3)


@pytest.mark.parametrize("case, reason", [("missing", "no such file"),
                                          ("empty", "the file is empty"),
                                          ("folder", "it is a folder"),
                                          ("text", "not an image format"),
                                          ("truncated", "truncated")])
def test_unreadable_images_raise_oserror_naming_the_file_and_why(tmp_path, case, reason):
    path = tmp_path / f"{case}.png"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "folder":
        path.mkdir()
    elif case == "text":
        path.write_text("hello")
    elif case == "truncated":
        write_image(str(tmp_path / "ok.png"), "RGB", size=(64, 64))
        path.write_bytes((tmp_path / "ok.png").read_bytes()[:300])
    with pytest.raises(OSError) as info:
        load_rgb(str(path))
    assert str(info.value).startswith(f"cannot read image {path}: ") and reason in str(info.value)


def test_a_decompression_bomb_is_an_unreadable_image(tmp_path, monkeypatch):
    write_image(str(tmp_path / "big.png"), "RGB", size=(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 pixels > 2 x 1000
    with pytest.raises(OSError, match="cannot read image .*big.png: DecompressionBomb"):
        load_rgb(str(tmp_path / "big.png"))


# --- statistics: every image weighs the same ------------------------------------------------

def test_one_huge_odd_image_cannot_dominate_the_mean_colour_or_covariance(tmp_path):
    # 90 ordinary images and one 5000x20 strip of another colour. Per pixel, the strip
    # (a million pixels at smallest side 64) would outweigh the rest ~3:1.
    usual, odd = np.array([116.0, 112.0, 97.0]), np.array([0.0, 255.0, 0.0])
    for i in range(90):
        write_image(str(tmp_path / "a" / f"{i:02d}.png"), "RGB", size=(32, 24),
                    colour=tuple(usual.astype(int)))
    write_image(str(tmp_path / "a" / "strip.png"), "RGB", size=(5000, 20),
                colour=tuple(odd.astype(int)))
    stats = data.compute_stats(ImageFolder(str(tmp_path)))
    w = 1 / 91  # the strip's weight: one image of 91
    np.testing.assert_allclose(stats.mean_rgb, (1 - w) * usual + w * odd, atol=1e-9)
    # Two flat colours weighted (1-w, w): all variance w(1-w)|d|^2 along d = odd - usual.
    d = odd - usual
    np.testing.assert_allclose(stats.pca_eigval, [w * (1 - w) * d @ d, 0, 0], atol=1e-6)
    assert np.abs(np.asarray(stats.mean_rgb) - usual).max() < 2


def test_compute_stats_counts_unreadable_images_in_one_warning(tmp_path):
    write_image(str(tmp_path / "a" / "ok.png"), "RGB")
    (tmp_path / "a" / "bad.png").write_bytes(b"junk")
    (tmp_path / "a" / "worse.png").write_bytes(b"")
    warnings = []
    data.compute_stats(ImageFolder(str(tmp_path)), warn=warnings.append)
    assert len(warnings) == 1 and "2 of 3" in warnings[0]


# --- folders that are not classes -----------------------------------------------------------

def test_hidden_and_empty_folders_are_ignored_in_both_splits_with_one_warning(tmp_path):
    make_layout(str(tmp_path), ("n01", "n02"), 2)
    for split in ("train", "val"):  # would sort first and become class 0
        write_image(str(tmp_path / split / ".ipynb_checkpoints" / "x.JPEG"), "RGB")
        os.makedirs(tmp_path / split / "aaa_empty")
        (tmp_path / split / "aaa_empty" / "notes.txt").write_text("no images here")
        write_image(str(tmp_path / split / "n01" / "._n01_0.JPEG"), "RGB")  # macOS junk
    warnings = []
    train, val = open_imagenet(str(tmp_path), warn=warnings.append)
    assert train.classes == val.classes == ["n01", "n02"]
    assert train.labels.tolist() == val.labels.tolist() == [0, 0, 1, 1]
    assert all("._" not in p for p in train.paths + val.paths)
    assert len(warnings) == 1
    assert all(name in warnings[0] for name in (".ipynb_checkpoints", "aaa_empty", "train",
                                                "val"))


def test_image_folder_warns_once_about_the_folders_it_ignores(tmp_path, capsys):
    write_image(str(tmp_path / "n01" / "a.JPEG"), "RGB")
    os.makedirs(tmp_path / ".hidden")
    os.makedirs(tmp_path / "empty")
    assert ImageFolder(str(tmp_path)).classes == ["n01"]
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and ".hidden" in err and "empty" in err


def test_an_unreadable_class_folder_is_a_clear_error(tmp_path, monkeypatch):
    make_layout(str(tmp_path), ("n01", "n02"), 1)
    locked = str(tmp_path / "train" / "n02")
    real_listdir = os.listdir

    def listdir(path):  # as for a folder without read permission (tests may run as root)
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    with pytest.raises(DataError, match=f"cannot read folder '{locked}': Permission denied"):
        open_imagenet(str(tmp_path))


def test_a_class_with_images_in_one_split_only_is_a_clear_error(tmp_path):
    make_layout(str(tmp_path), ("n01", "n02"), 1)
    os.remove(tmp_path / "val" / "n02" / "n02_0.JPEG")  # an empty folder is no class
    with pytest.raises(DataError, match=r"only in train \['n02'\]"):
        open_imagenet(str(tmp_path), warn=lambda message: None)


def test_loader_can_start_an_epoch_part_way_with_the_same_batches():
    ds = SyntheticImages(30, 20, seed=0)
    loader = Loader(ds, TrainTransform(20, 16, IDENTITY_STATS), 4, seed=3)
    whole = list(loader.epoch(2))
    rest = list(loader.epoch(2, start=5))
    assert len(rest) == len(whole) - 5
    for (x, y), (x2, y2) in zip(whole[5:], rest):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)


def test_loader_abandoned_mid_epoch_gives_clean_batches_next_epoch():
    ds = SyntheticImages(40, 20, seed=0)
    t = EvalTransform(20, 16, IDENTITY_STATS)
    reference = [y for _, y in Loader(ds, t, 4, seed=1).epoch(1)]
    loader = Loader(ds, t, 4, seed=1, workers=2)
    try:
        for step, _ in enumerate(loader.epoch(0)):
            if step == 2:
                break  # results of batches in flight must not leak into the next epoch
        got = [y for _, y in loader.epoch(1)]
    finally:
        loader.close()
    assert len(got) == len(reference)
    for a, b in zip(got, reference):
        np.testing.assert_array_equal(a, b)
