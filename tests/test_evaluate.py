"""The testing protocol of Sec. 3.2: FC-to-conv conversion, crop grid, dense, fusion, errors."""

from pathlib import Path

import numpy as np
import pytest

from minivgg import functional as F
from minivgg import models
from minivgg import evaluate as E
from minivgg.metrics import topk_errors
from minivgg.tensor import Tensor, no_grad
from conftest import load_example

# A small net: VGG-A at 1/16 width, 64-pixel crops (pool5 map 2×2, so fc6 becomes a 2×2 conv).
SMALL = dict(config="A", num_classes=7, width=1 / 16, fc_width=16, input_size=64)


def small_vgg(dtype=np.float64, seed=0, **overrides):
    kwargs = dict(SMALL, **overrides)
    model = models.vgg(init="glorot", seed=seed, dtype=dtype, **kwargs).eval()
    # Non-zero biases, so the test also checks that biases are carried over.
    rng = np.random.default_rng(seed + 1)
    for p in model.parameters():
        if p.ndim == 1:
            p.data = rng.normal(0, 0.1, p.shape).astype(dtype)
    return model


def logits(net, x):
    with no_grad():
        return net(Tensor(x)).data


# ----------------------------------------------------------------------------------------
# Fully-convolutional conversion
# ----------------------------------------------------------------------------------------

def test_fully_convolutional_net_on_training_size_gives_the_same_logits():
    model = small_vgg()
    fcn = E.to_fully_convolutional(model)
    x = np.random.default_rng(2).normal(0, 50, (3, 3, 64, 64))
    scores = logits(fcn, x)
    assert scores.shape == (3, 7, 1, 1)
    np.testing.assert_allclose(scores[:, :, 0, 0], logits(model, x), rtol=1e-12, atol=1e-12)


def test_fully_convolutional_net_in_float32_agrees_to_rounding_error():
    model = small_vgg(dtype=np.float32)
    x = np.random.default_rng(2).normal(0, 1, (2, 3, 64, 64)).astype(np.float32)
    scores = logits(E.to_fully_convolutional(model), x)
    reference = logits(model, x)
    scale = np.abs(reference).max()
    np.testing.assert_allclose(scores[:, :, 0, 0], reference, rtol=0, atol=1e-5 * scale)


def test_fully_convolutional_conversion_has_the_paper_layer_shapes():
    fcn = E.to_fully_convolutional(small_vgg())
    assert fcn.fc6.weight.shape == (16, 32, 2, 2)  # 512/16 channels, 2×2 pool5 map at 64
    assert fcn.fc7.weight.shape == (16, 16, 1, 1)
    assert fcn.fc8.weight.shape == (7, 16, 1, 1)
    names = [name for name, _ in fcn.named_children()]
    assert "flatten" not in names and "drop6" not in names and "drop7" not in names


def test_fully_convolutional_net_shares_conv_weights_with_the_original():
    model = small_vgg()
    fcn = E.to_fully_convolutional(model)
    assert fcn.conv1_1 is model.conv1_1 and fcn.conv5_2 is model.conv5_2


def test_fully_convolutional_score_map_on_larger_image_has_pooling_arithmetic_size():
    # 96 -> 48 -> 24 -> 12 -> 6 -> 3 after five pools, 128 -> 4; the 2×2 fc6 conv leaves
    # 3 - 2 + 1 = 2 rows and 4 - 2 + 1 = 3 columns.
    fcn = E.to_fully_convolutional(small_vgg())
    scores = logits(fcn, np.zeros((1, 3, 96, 128)))
    assert scores.shape == (1, 7, 2, 3)
    assert E.score_map_size(96, 128, 64) == (2, 3)
    assert E.score_map_size(224, 224, 224) == (1, 1)
    assert E.score_map_size(256, 341, 224) == (2, 4)  # 256 -> 8, 341 -> 10; 7×7 fc6


def test_dense_posteriors_average_softmax_of_image_and_flip():
    model = small_vgg()
    fcn = E.to_fully_convolutional(model)
    x = np.random.default_rng(4).normal(0, 50, (3, 96, 128))
    probs = E.dense_posteriors(fcn, [x])
    expected = [F.softmax(logits(fcn, v[None]).mean(axis=(2, 3)))[0]
                for v in (x, x[:, :, ::-1].copy())]
    np.testing.assert_allclose(probs[0], np.mean(expected, axis=0), rtol=1e-12)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_dense_posteriors_batches_images_of_mixed_sizes_in_input_order():
    fcn = E.to_fully_convolutional(small_vgg(input_size=32))
    rng = np.random.default_rng(5)
    images = [rng.normal(0, 50, (3, h, w)) for h, w in [(32, 48), (40, 32), (32, 48)]]
    together = E.dense_posteriors(fcn, images, batch_size=2)
    alone = np.concatenate([E.dense_posteriors(fcn, [x]) for x in images])
    np.testing.assert_allclose(together, alone, rtol=1e-12)


@pytest.mark.parametrize("height,width,rows,cols", [(72, 80, (4, 68), (8, 72)),
                                                    (64, 64, (0, 64), (0, 64)),
                                                    (75, 96, (5, 69), (0, 96))])
def test_dense_crop_centres_the_32_pixel_window_grid(height, width, rows, cols):
    x = np.arange(height * width, dtype=np.float64).reshape(1, height, width)
    np.testing.assert_array_equal(E.dense_crop(x), x[:, rows[0]:rows[1], cols[0]:cols[1]])
    assert E.dense_crop(x, align="top-left") is x
    assert E.dense_crop(x, ceil_mode=True) is x  # ceil-mode pools cover every pixel


def test_dense_with_one_window_sees_the_centre_crop_not_the_top_left_corner():
    """At Q = 72 a 64-pixel net's score map is 1×1: centred, its window is the centre crop
    (rows and columns 4..67) and its flip, so dense equals "center-flip" exactly. The
    evidence in the bottom 4 rows / right 4 columns of that window (60..67) is outside a
    top-left window (0..63), which therefore gives other posteriors."""
    model = small_vgg()
    fcn = E.to_fully_convolutional(model)
    rng = np.random.default_rng(9)
    x = np.zeros((3, 72, 72))
    x[:, 60:68, :] = rng.normal(0, 50, (3, 8, 72))   # a bottom strip ...
    x[:, :, 60:68] = rng.normal(0, 50, (3, 72, 8))   # ... and a right strip of evidence
    centre = E.center_posteriors(model, [x], flip=True)
    np.testing.assert_allclose(E.dense_posteriors(fcn, [x]), centre, rtol=1e-10)
    top_left = E.dense_posteriors(fcn, [x], align="top-left")
    assert np.abs(top_left - centre).max() > 1e-3


def test_center_flip_averages_the_centre_crop_and_its_mirror():
    model = small_vgg()
    x = np.random.default_rng(10).normal(0, 50, (3, 70, 90))
    crop = x[:, 3:67, 13:77]
    want = np.mean([F.softmax(logits(model, v[None].copy()))[0]
                    for v in (crop, crop[:, :, ::-1])], axis=0)
    np.testing.assert_allclose(E.center_posteriors(model, [x], flip=True)[0], want,
                               rtol=1e-12)
    net = E.EvalNet(model)
    np.testing.assert_allclose(net.posteriors([x], "center-flip")[0], want, rtol=1e-12)


def test_ceil_mode_dense_map_covers_the_whole_image():
    model = small_vgg(ceil_mode=True)
    fcn = E.to_fully_convolutional(model)
    assert fcn.ceil_mode and model.pool5.ceil_mode
    assert E.score_map_size(72, 72, 64) == (1, 1)
    assert E.score_map_size(72, 72, 64, ceil_mode=True) == (2, 2)
    x = np.random.default_rng(11).normal(0, 50, (1, 3, 72, 72))
    assert logits(fcn, x).shape == (1, 7, 2, 2)
    # At the training size (a multiple of 32) the two modes agree.
    y = np.random.default_rng(12).normal(0, 50, (2, 3, 64, 64))
    floor = small_vgg()
    np.testing.assert_allclose(logits(model, y), logits(floor, y), rtol=1e-12)
    floor.ceil_mode = True  # the settable switch reaches every pool
    assert all(p.ceil_mode for p in floor.pools())


def test_ceil_mode_net_trained_at_a_size_not_a_multiple_of_32_sizes_fc6_by_ceil():
    # 72 -> 36 -> 18 -> 9 -> 5 -> 3 in ceil mode (2 in floor mode): fc6 takes 3×3 maps.
    model = small_vgg(ceil_mode=True, input_size=72)
    assert model.fc6.weight.shape == (16, 32 * 3 * 3)
    fcn = E.to_fully_convolutional(model)
    x = np.random.default_rng(13).normal(0, 50, (2, 3, 72, 72))
    np.testing.assert_allclose(logits(fcn, x)[:, :, 0, 0], logits(model, x), rtol=1e-10)


def test_unknown_dense_alignment_is_rejected():
    with pytest.raises(ValueError, match="unknown dense alignment 'middle'"):
        E.EvalNet(small_vgg(), dense_align="middle")


# ----------------------------------------------------------------------------------------
# Crops
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("height,width", [(64, 64), (64, 65), (72, 96), (100, 64), (81, 333)])
def test_crop_grid_covers_image_corner_to_corner_evenly(height, width):
    grid = E.crop_grid(height, width, 64)
    assert len(grid) == 25
    tops = sorted({t for t, _ in grid})
    lefts = sorted({left for _, left in grid})
    for offsets, size in ((tops, height), (lefts, width)):
        assert offsets[0] == 0 and offsets[-1] == size - 64  # both edges touched
        ideal = np.arange(5) * (size - 64) / 4
        assert np.all(np.abs(np.array(E.grid_offsets(size, 64)) - ideal) <= 0.5)
    # Row by row: the 5 lefts repeat for each top.
    assert grid[:5] == [(0, left) for left in E.grid_offsets(width, 64)]


def test_crop_grid_of_exact_crop_size_is_25_copies_of_the_image():
    assert E.crop_grid(64, 64, 64) == [(0, 0)] * 25


def test_grid_offsets_rounds_halves_up():
    # 66 - 64 = 2 pixels of slack: ideal offsets 0, 0.5, 1, 1.5, 2.
    assert E.grid_offsets(66, 64) == [0, 1, 1, 2, 2]


def test_center_offset_is_in_the_middle():
    assert E.center_offset(72, 96, 64) == (4, 16)
    assert E.center_offset(65, 64, 64) == (0, 0)


def test_multicrop_posteriors_average_50_crops_and_flips():
    model = small_vgg(input_size=32)
    x = np.random.default_rng(6).normal(0, 50, (3, 34, 38))
    probs = E.multicrop_posteriors(model, [x], batch_size=7)
    crops = []
    for top, left in E.crop_grid(34, 38, 32):
        crop = x[:, top:top + 32, left:left + 32]
        crops += [crop, crop[:, :, ::-1]]
    expected = F.softmax(logits(model, np.stack(crops))).mean(axis=0)
    np.testing.assert_allclose(probs[0], expected, rtol=1e-12)


def test_multicrop_of_exact_crop_size_image_equals_crop_and_flip_average():
    model = small_vgg(input_size=32)
    x = np.random.default_rng(7).normal(0, 50, (3, 32, 32))
    probs = E.multicrop_posteriors(model, [x])
    expected = F.softmax(logits(model, np.stack([x, x[:, :, ::-1]]))).mean(axis=0)
    np.testing.assert_allclose(probs[0], expected, rtol=1e-12)
    # ... which is also what dense evaluation gives on a training-size image.
    dense = E.dense_posteriors(E.to_fully_convolutional(model), [x])
    np.testing.assert_allclose(dense, probs, rtol=1e-10)


# ----------------------------------------------------------------------------------------
# Combining: multi-scale, dense+multi-crop, fusion; error counts
# ----------------------------------------------------------------------------------------

def test_average_is_the_elementwise_mean_of_posteriors():
    a = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    b = np.array([[0.1, 0.6, 0.3], [0.3, 0.3, 0.4]])
    fused = E.average([a, b])
    np.testing.assert_allclose(fused, [[0.4, 0.4, 0.2], [0.2, 0.2, 0.6]])
    np.testing.assert_allclose(fused.sum(axis=1), 1.0)


def test_fusion_can_fix_a_mistake_that_one_model_makes():
    confident_right = np.array([[0.1, 0.9]])
    slightly_wrong = np.array([[0.6, 0.4]])
    assert topk_errors(slightly_wrong, np.array([1]), ks=(1,)) == {1: 1}
    assert topk_errors(E.average([confident_right, slightly_wrong]), np.array([1]),
                         ks=(1,)) == {1: 0}


def test_combine_dense_multicrop_averages_each_method_over_scales_then_methods():
    rng = np.random.default_rng(8)
    parts = {(m, q): rng.dirichlet(np.ones(4), size=3)
             for m in E.BASE_METHODS for q in (64, 72, 80)}
    got = E.combine(parts, "dense+multicrop", [64, 72, 80])
    dense = (parts[("dense", 64)] + parts[("dense", 72)] + parts[("dense", 80)]) / 3
    crops = (parts[("multicrop", 64)] + parts[("multicrop", 72)]
             + parts[("multicrop", 80)]) / 3
    np.testing.assert_allclose(got, (dense + crops) / 2)
    np.testing.assert_allclose(E.combine(parts, "center", [72]), parts[("center", 72)])


def test_topk_errors_counts_misses_and_breaks_ties_by_class_index():
    probs = np.array([[0.5, 0.3, 0.2],
                      [0.2, 0.3, 0.5],
                      [0.4, 0.4, 0.2]])
    labels = np.array([0, 0, 1])
    # Image 1: true class ranked last; image 2: tie between 0 and 1, class 0 wins.
    assert topk_errors(probs, labels, ks=(1, 2, 3)) == {1: 2, 2: 1, 3: 0}


# ----------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------

def test_image_smaller_than_the_crop_is_a_clear_error():
    model = small_vgg()
    small = np.zeros((3, 63, 100))
    with pytest.raises(ValueError, match="smaller than the 64x64 training crop"):
        E.dense_posteriors(E.to_fully_convolutional(model), [small])
    with pytest.raises(ValueError, match="smaller than the 64x64 training crop"):
        E.multicrop_posteriors(model, [small])
    with pytest.raises(ValueError, match="smaller than the 64x64 training crop"):
        E.center_posteriors(model, [small])


def test_unknown_protocol_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown protocol 'tencrop'"):
        E.parse_protocol("tencrop")


def test_fusing_models_with_different_class_sets_is_a_clear_error():
    with pytest.raises(ValueError, match="different class sets"):
        E.check_same_classes([["n01", "n02"], ["n01", "n03"]], ["a.npz", "b.npz"])
    with pytest.raises(ValueError, match="different order"):
        E.check_same_classes([["n01", "n02"], ["n02", "n01"]], ["a.npz", "b.npz"])
    assert E.check_same_classes([["n01", "n02"]] * 2, ["a", "b"]) == ["n01", "n02"]


def test_averaging_posteriors_of_different_shapes_is_a_clear_error():
    with pytest.raises(ValueError, match="different shapes"):
        E.average([np.ones((2, 3)), np.ones((2, 4))])


# ----------------------------------------------------------------------------------------
# A whole (tiny, in-memory) test set
# ----------------------------------------------------------------------------------------

def _nearest_rescale(img, q):
    """Test-only stand-in for minivgg.data's rescale: nearest neighbour, smallest side q."""
    h, w = img.shape[:2]
    oh, ow = (q, round(w * q / h)) if h <= w else (round(h * q / w), q)
    rows = np.arange(oh) * h // oh
    cols = np.arange(ow) * w // ow
    return img[rows][:, cols]


def _to_input(img):
    return (img.astype(np.float64) - 120.0).transpose(2, 0, 1)


def _tiny_test_set(n=3, low=30, high=50):
    rng = np.random.default_rng(9)
    shapes = rng.integers(low, high, (n, 2))
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    items = [(i, int(rng.integers(0, 7))) for i in range(n)]
    return images, items


def test_evaluate_images_rows_match_the_parts_computed_directly():
    # Two fused 32-pixel nets keep this fast: 3 images x 2 scales x 50 crops per net.
    images, items = _tiny_test_set()
    nets = [E.EvalNet(small_vgg(seed=s, input_size=32), _to_input, batch_size=100)
            for s in (0, 10)]
    rows = [("center", (32,)), ("dense", (40,)), ("dense+multicrop", (32, 40))]
    results = E.evaluate_images(nets, images.__getitem__, items, rows, _nearest_rescale,
                                chunk_size=2)
    labels = np.array([label for _, label in items])

    def inputs(net, q):
        return [net.to_input(_nearest_rescale(img, q)) for img in images]

    center = E.average([E.center_posteriors(n.model, inputs(n, 32)) for n in nets])
    dense = E.average([E.dense_posteriors(n.fcn, inputs(n, 40)) for n in nets])
    both = E.average([E.average([
        E.average([E.dense_posteriors(n.fcn, inputs(n, q)) for q in (32, 40)]),
        E.average([E.multicrop_posteriors(n.model, inputs(n, q), 100) for q in (32, 40)])])
        for n in nets])
    for result, probs in zip(results, (center, dense, both)):
        errors = topk_errors(probs, labels)
        assert result["images"] == 3 and result["skipped"] == 0
        assert result["top1_err"] == pytest.approx(100 * errors[1] / 3)
        assert result["top5_err"] == pytest.approx(100 * errors[5] / 3)
        assert result["images_per_s"] > 0
    # The multi-scale combined row pays for more network passes than the single-scale rows.
    assert results[2]["seconds"] > results[1]["seconds"]


def test_evaluate_images_skips_and_counts_unreadable_images():
    images, items = _tiny_test_set()

    def load(i):
        if i == 1:
            raise OSError("truncated file")
        return images[i]

    nets = [E.EvalNet(small_vgg(input_size=32), _to_input)]
    with pytest.warns(UserWarning, match="skipping unreadable image 1"):
        results = E.evaluate_images(nets, load, items, [("center", (32,))],
                                    _nearest_rescale)
    assert results[0]["images"] == 2 and results[0]["skipped"] == 1


def test_evaluate_images_rejects_a_test_scale_below_the_crop():
    images, items = _tiny_test_set(1)
    nets = [E.EvalNet(small_vgg(), _to_input)]
    with pytest.raises(ValueError, match="Q=56 is smaller than the 64x64 training crop"):
        E.evaluate_images(nets, images.__getitem__, items, [("dense", (56, 64))],
                          _nearest_rescale)


def test_a_rows_time_counts_decoding_and_the_stages_of_its_scales_and_methods():
    stages = E.row_stages("dense+multicrop", (32, 40), num_nets=2)
    assert stages[0] == E.Stage("decode") and len(stages) == 1 + 2 * (1 + 2 * (1 + 2))
    assert E.Stage("rescale", 40) in stages and E.Stage("input", 32, 1) in stages
    assert E.Stage("multicrop", 40, 0) in stages and E.Stage("center", 32, 0) not in stages
    clock = E.Stopwatch()
    clock.seconds = {E.Stage("decode"): 1.0, E.Stage("dense", 32, 0): 2.0,
                     E.Stage("dense", 40, 0): 4.0}
    assert clock.total(E.row_stages("dense", (32,), 1)) == 3.0
    with clock(E.Stage("decode")):
        pass
    assert clock.seconds[E.Stage("decode")] >= 1.0


def test_chunk_posteriors_computes_each_method_and_scale_once_per_net():
    images, items = _tiny_test_set(2)
    nets = [E.EvalNet(small_vgg(seed=s, input_size=32), _to_input, batch_size=100)
            for s in (0, 1)]
    loaded, labels = E.decode(images.__getitem__, items)
    assert labels.dtype == np.int64 and len(loaded) == 2
    needed = [("center", 32), ("dense", 32), ("dense", 40)]
    parts = E.chunk_posteriors(nets, loaded, needed, _nearest_rescale, E.Stopwatch())
    assert [sorted(p) for p in parts] == [sorted(needed)] * 2
    direct = E.dense_posteriors(nets[1].fcn, [_to_input(_nearest_rescale(img, 40))
                                              for img in loaded])
    np.testing.assert_array_equal(parts[1][("dense", 40)], direct)


# ----------------------------------------------------------------------------------------
# examples/evaluate_imagenet.py
# ----------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "imagenette2-224"


def _save_checkpoint(path, classes, seed=0):
    from minivgg import checkpoint
    from minivgg.run_state import model_meta
    model = small_vgg(dtype=np.float32, seed=seed, input_size=32, num_classes=len(classes))
    meta = {"model": model_meta(model), "classes": list(classes),
            "data_stats": {"mean_rgb": [0.5, 0.5, 0.5]},
            "config": {"scale": 36, "scale_jitter": None, "test_scale": None}}
    checkpoint.save(path, model.state_dict(), None, meta)
    return str(path)


@pytest.fixture
def tiny_imagenet(tmp_path):
    """root/val/<wnid>/*.JPEG with 2 classes of 2 small images, and two checkpoints."""
    from PIL import Image
    rng = np.random.default_rng(11)
    classes = ["n00000001", "n00000002"]
    for wnid in classes:
        (tmp_path / "val" / wnid).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "val" / wnid / f"{i}.JPEG")
    ckpts = [_save_checkpoint(tmp_path / f"m{s}.npz", classes, seed=s) for s in (0, 1)]
    return tmp_path, ckpts


def test_script_prints_a_row_per_protocol_and_scale_setting(tiny_imagenet, capsys):
    root, ckpts = tiny_imagenet
    script = load_example("evaluate_imagenet")
    code = script.cli([*ckpts, "--data", str(root), "--protocol", "center", "dense",
                       "--scales", "36", "32,36", "-p", "0"])
    out = capsys.readouterr().out
    assert code == 0
    rows = [line.split() for line in out.splitlines() if line.startswith("A + A")]
    rows = [r[2:] for r in rows]  # drop "A +"
    assert [(r[2], r[3]) for r in rows] == [("36", "center"), ("36", "dense"),
                                            ("32,36", "center"), ("32,36", "dense")]
    for r in rows:  # top-1 and top-5 errors are percentages of 4 images
        assert float(r[4]) in (0.0, 25.0, 50.0, 75.0, 100.0) and float(r[5]) == 0.0


def test_script_default_report_shows_centre_crop_with_and_without_flip(tiny_imagenet, capsys):
    root, ckpts = tiny_imagenet
    for extra in ([], ["--dense-align", "top-left", "--ceil-mode"]):
        script = load_example("evaluate_imagenet")
        assert script.cli([ckpts[0], "--data", str(root), "-p", "0", *extra]) == 0
        out = capsys.readouterr().out
        protocols = [line.split()[3] for line in out.splitlines() if line.startswith("A ")]
        assert protocols == ["center", "center-flip", "dense"]


@pytest.mark.parametrize("case,message", [
    ("unknown protocol", "invalid choice: 'tencrop'"),
    ("scale below crop", "Q=30 is smaller than the 32x32 training crop"),
    ("other classes", "different class sets"),
    ("missing checkpoint", "does not exist"),
    ("missing data", "does not exist"),
])
def test_script_bad_input_exits_2_with_one_line_error(tiny_imagenet, capsys, case, message):
    root, ckpts = tiny_imagenet
    args = [ckpts[0], "--data", str(root)]
    if case == "unknown protocol":
        args += ["--protocol", "tencrop"]
    elif case == "scale below crop":
        args += ["--scales", "30,36"]
    elif case == "other classes":
        args.insert(1, _save_checkpoint(root / "other.npz", ["n00000001", "n00000003"]))
    elif case == "missing checkpoint":
        args[0] = str(root / "nope.npz")
    elif case == "missing data":
        args[2] = str(root / "nope")
    try:
        code = load_example("evaluate_imagenet").cli(args)
    except SystemExit as e:  # argparse reports bad choices itself, also with code 2
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="Imagenette not in ../shared/data")
def test_script_limit_takes_an_evenly_spread_subset_with_every_class():
    script = load_example("evaluate_imagenet")
    classes = sorted(p.name for p in (SHARED_DATA / "val").iterdir())
    items = script.val_items(str(SHARED_DATA), classes, 50)
    assert len(items) == 50
    assert sorted({label for _, label in items}) == list(range(len(classes)))
