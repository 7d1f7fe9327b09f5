"""The data pipeline: layouts, decoding, the Sec. 3.1 augmentation, statistics, the loader."""

import os

import numpy as np
import pytest
from PIL import Image

from minivgg import data
from minivgg.data import (DataError, DataStats, EvalTransform, ImageFolder, Loader,
                          TrainTransform, load_rgb, open_imagenet, rescale_smallest_side,
                          to_chw_float32)
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
