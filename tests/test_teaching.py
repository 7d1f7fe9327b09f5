"""The teaching material stays true: the walkthrough's outputs, links and named functions,
and the example scripts that draw pictures.

`docs/walkthrough.md` shows outputs that `examples/walkthrough.py` prints; every shown block
is regenerated here and must match character for character.
"""

import csv
import importlib
import os
import re
import sys

import numpy as np
import pytest
from PIL import Image

from minivgg import checkpoint, models, no_grad
from conftest import load_example

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "walkthrough.md")


def read_doc():
    with open(DOC, encoding="utf-8") as f:
        return f.read()


def assert_valid_png(path, min_side=50):
    """The file is a PNG that decodes, and is not a degenerate sliver."""
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()
    with Image.open(path) as img:
        img.load()
        assert min(img.size) >= min_side, img.size
        assert len(set(np.asarray(img.convert("L")).ravel().tolist())) > 1  # not blank
    return path


# ----------------------------------------------------------------------------------------
# docs/walkthrough.md
# ----------------------------------------------------------------------------------------

def test_walkthrough_shows_exactly_what_the_script_prints():
    walkthrough = load_example("walkthrough")
    blocks = walkthrough.doc_blocks(read_doc())
    assert sorted(name for name, _ in blocks) == sorted(walkthrough.SECTIONS)
    for name, shown in blocks:
        printed = walkthrough.output_of(name)
        assert printed == shown, (f"docs/walkthrough.md, section {name!r} is out of date; "
                                  "run: python examples/walkthrough.py --update "
                                  f"docs/walkthrough.md\n--- shown\n{shown}--- printed\n"
                                  f"{printed}")


def test_walkthrough_code_listing_is_the_scripts_code():
    with open(os.path.join(REPO, "examples", "walkthrough.py"), encoding="utf-8") as f:
        source = {line.split("#")[0].strip() for line in f}
    listings = re.findall(r"```python\n(.*?)```", read_doc(), re.DOTALL)
    assert listings
    for listing in listings:
        for line in listing.splitlines():
            code = line.split("#")[0].strip()
            assert not code or code in source, f"doc line not in the script: {line!r}"


def test_walkthrough_check_mode_reports_a_stale_block(tmp_path):
    walkthrough = load_example("walkthrough")
    doc = "".join(f"Text.\n\n<!-- walkthrough.py: {name} -->\n```text\n"
                  f"{walkthrough.output_of(name)}```\n" for name in ("maxpool", "table1"))
    path = tmp_path / "walkthrough.md"
    path.write_text(doc.replace("tie (four 2s)", "tie"), encoding="utf-8")
    assert walkthrough.check(path) == ["maxpool"]
    assert walkthrough.main(["--check", str(path)]) == 1
    walkthrough.update(path)
    assert walkthrough.check(path) == []
    assert path.read_text(encoding="utf-8") == doc


def test_walkthrough_links_point_to_existing_files_and_headings():
    doc = read_doc()
    targets = re.findall(r"\]\(([^)\s]+)\)", doc)
    anchors = {_github_anchor(h) for h in re.findall(r"^#+ (.+)$", doc, re.MULTILINE)}
    assert len(targets) > 20
    for target in targets:
        if target.startswith("http"):
            continue
        if target.startswith("#"):
            assert target[1:] in anchors, target
        else:
            assert os.path.exists(os.path.join(REPO, "docs", target)), target
    for png in ("receptive_fields.png", "vgg_blocks.png", "feature_maps.png"):
        assert f"]({png})" in doc
        assert_valid_png(os.path.join(REPO, "docs", png))


def _github_anchor(heading):
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


# The functions the walkthrough tells students to open, by module: renaming one must update
# the tour.
NAMED_IN_WALKTHROUGH = {
    "minivgg.tensor": ["Tensor", "Tensor.backward", "Function", "Function.save_for_backward",
                       "no_grad", "_topological_order"],
    "minivgg.gradcheck": ["gradcheck", "numerical_grad"],
    "minivgg.functional": ["conv2d", "max_pool2d", "MaxPool2d", "local_response_norm",
                           "cross_entropy"],
    "minivgg.kernels.reference": ["im2col", "col2im"],
    "minivgg.kernels.common": ["conv_chunks", "conv2d_forward", "conv2d_backward"],
    "minivgg.kernels.cpu.conv": ["im2col_chunk", "col2im_chunk"],
    "minivgg.kernels.cpu": ["im2col", "col2im", "conv2d_forward", "conv2d_backward",
                            "max_pool2d_forward", "max_pool2d_backward", "lrn_forward",
                            "lrn_backward", "sgd_update"],
    "minivgg.models": ["CONFIGS", "parse_layer", "VGG", "vgg", "init_weights", "init_from_a"],
    "minivgg.nn": ["Module", "Parameter", "Sequential", "Conv2d", "Linear"],
    "minivgg.summary": ["layer_table", "format_table"],
    "minivgg.optim": ["SGD", "ReduceLROnPlateau"],
    "minivgg.evaluate": ["to_fully_convolutional"],
    "minivgg.pretrained": ["load_torchvision_vgg", "load_caffe_vgg", "save_pretrained"],
    "minivgg.kernels.winograd": ["transforms", "conv2d_forward", "conv2d_backward"],
    "minivgg.kernels.reference": ["conv2d_winograd"],
}


@pytest.mark.parametrize("module", sorted(NAMED_IN_WALKTHROUGH))
def test_walkthrough_names_functions_that_exist(module):
    doc, mod = read_doc(), importlib.import_module(module)
    for name in NAMED_IN_WALKTHROUGH[module]:
        obj = mod
        for part in name.split("."):
            assert hasattr(obj, part), f"{module}.{name} is gone"
            obj = getattr(obj, part)
        assert name.split(".")[-1] in doc, f"{name} is no longer mentioned in the walkthrough"


# ----------------------------------------------------------------------------------------
# examples/inspect_vgg.py
# ----------------------------------------------------------------------------------------

def test_inspect_vgg_prints_tables_and_writes_pngs(tmp_path, capsys):
    inspect_vgg = load_example("inspect_vgg")
    assert inspect_vgg.main(["--configs", "A", "C", "--input-size", "32", "--channels", "2",
                             "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for config in ("A", "C"):
        total = models.VGG(config, input_size=32).num_parameters()
        assert f"VGG {config} (Table 1), input 3x32x32" in out
        assert f"{total:,}" in out  # layer table and block table totals
    assert re.search(r"3 x conv3 +108 +27C\^2 +3 +7x7", out)  # 3 * 9 * 2^2 = 108
    assert re.search(r"1 x conv7 +196 +49C\^2 +1 +7x7", out)
    assert_valid_png(tmp_path / "vgg_blocks.png")
    assert_valid_png(tmp_path / "receptive_fields.png")


@pytest.mark.parametrize("kernel, depth, field", [(3, 1, 3), (3, 2, 5), (3, 3, 7), (5, 1, 5),
                                                  (3, 4, 9), (1, 2, 1)])
def test_measured_receptive_field_is_depth_times_k_minus_1_plus_1(kernel, depth, field):
    inspect_vgg = load_example("inspect_vgg")
    stack = inspect_vgg.conv_stack(2, kernel, depth)
    h, w, weight = inspect_vgg.measured_receptive_field(stack, 2, size=13)
    assert (h, w) == (field, field)
    assert (weight > 0).sum() == field * field  # a full square, no holes


def test_block_costs_add_up_to_the_layer_table():
    inspect_vgg = load_example("inspect_vgg")
    costs = inspect_vgg.block_costs("E", input_size=32)
    assert list(costs) == ["block 1", "block 2", "block 3", "block 4", "block 5",
                           "fc6", "fc7", "fc8"]
    assert sum(p for p, _ in costs.values()) == models.VGG("E", input_size=32).num_parameters()
    # block 1 of E: conv1_1 (3->64) and conv1_2 (64->64) at 32x32, weights times pixels
    assert costs["block 1"][1] == (64 * 3 * 9 + 64 * 64 * 9) * 32 * 32


# ----------------------------------------------------------------------------------------
# examples/visualize.py
# ----------------------------------------------------------------------------------------

@pytest.fixture
def small_checkpoint(tmp_path):
    """A minivgg training checkpoint of a small VGG-A (as minivgg.train writes it)."""
    from minivgg.run_state import model_meta
    model = models.vgg("A", num_classes=10, width=0.125, fc_width=32, input_size=32, seed=0,
                       init="glorot")
    path = tmp_path / "small.npz"
    checkpoint.save(path, model.state_dict(),
                    meta={"model": model_meta(model), "data_stats": {"mean_rgb": [127.5] * 3}})
    return str(path), model


@pytest.fixture
def image_file(tmp_path):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:40]
    img = np.stack([xx * 6, yy * 5, (xx + yy) * 3], axis=-1) + rng.integers(0, 20, (48, 40, 3))
    path = tmp_path / "picture.png"
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    return str(path)


def test_visualize_filters_and_features_write_pngs(tmp_path, small_checkpoint, image_file):
    visualize = load_example("visualize")
    weights, model = small_checkpoint
    out = tmp_path / "filters.png"
    assert visualize.main(["filters", "--weights", weights, "--out", str(out)]) == 0
    assert_valid_png(out)
    out = tmp_path / "features.png"
    assert visualize.main(["features", image_file, "--weights", weights, "--layer", "relu2_1",
                           "--scale", "32", "--out", str(out)]) == 0
    assert_valid_png(out)
    with pytest.raises(SystemExit):  # argparse rejects a missing image
        visualize.main(["features"])
    assert visualize.main(["features", image_file, "--weights", weights, "--layer", "fc7",
                           "--out", str(out)]) == 2


def test_first_layer_filters_are_conv1_1_weights_rescaled(small_checkpoint):
    visualize = load_example("visualize")
    _, model = small_checkpoint
    filters = visualize.first_layer_filters(model)
    W = model.conv1_1.weight.numpy()
    assert filters.shape == (W.shape[0], 3, 3, 3)  # (OC, KH, KW, RGB)
    assert filters.min() == 0 and filters.max() == 1
    k = 2  # each filter is stretched to [0, 1] on its own, so order is kept
    np.testing.assert_array_equal(np.argsort(filters[k].ravel(), kind="stable"),
                                  np.argsort(W[k].transpose(1, 2, 0).ravel(), kind="stable"))


def test_score_map_of_a_training_size_image_is_the_models_logits(small_checkpoint):
    visualize = load_example("visualize")
    _, model = small_checkpoint
    model.eval()
    x = np.random.default_rng(3).normal(size=(3, 32, 32)).astype(np.float32)
    scores = visualize.class_score_map(model, x)
    assert scores.shape == (10, 1, 1)
    with no_grad():
        logits = model(x[None]).numpy()[0]
    np.testing.assert_allclose(scores[:, 0, 0], logits, rtol=1e-4, atol=1e-5)
    assert visualize.class_score_map(model, np.zeros((3, 64, 96), np.float32)).shape == (
        10, 2, 3)


def test_visualize_scoremap_and_curves_write_pngs(tmp_path, small_checkpoint, image_file):
    visualize = load_example("visualize")
    weights, _ = small_checkpoint
    out = tmp_path / "scoremap.png"
    assert visualize.main(["scoremap", image_file, "--weights", weights, "--scale", "64",
                           "--out", str(out)]) == 0
    assert_valid_png(out)

    metrics = tmp_path / "metrics.csv"
    columns = ["epoch", "train_loss", "train_top1_err", "val_loss", "val_top1_err",
               "val_top5_err", "lr", "images_per_s", "seconds"]
    with open(metrics, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for epoch in range(1, 6):
            lr = 0.01 if epoch < 4 else 0.001
            writer.writerow([epoch, 2.3 / epoch, 0.9 / epoch ** 0.5, 2.4 / epoch,
                             0.95 / epoch ** 0.5, 0.7 / epoch ** 0.5, lr, 50.0, 60.0 * epoch])
    out = tmp_path / "curves.png"
    assert visualize.main(["curves", str(metrics), "--out", str(out)]) == 0
    assert_valid_png(out)

    bad = tmp_path / "bad.csv"
    bad.write_text("epoch,loss\n1,2.0\n")
    assert visualize.main(["curves", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()


def test_scripts_say_clearly_when_matplotlib_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    inspect_vgg = load_example("inspect_vgg")
    assert inspect_vgg.main(["--configs", "A", "--input-size", "32", "--no-tables",
                             "--channels", "1", "--out-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "matplotlib is not installed" in captured.err
    assert "VGG A: parameters and multiply-adds per block" in captured.out  # text still there
    assert not list(tmp_path.iterdir())

    visualize = load_example("visualize")
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,train_loss,train_top1_err,val_loss,val_top1_err,val_top5_err,"
                       "lr,images_per_s,seconds\n1,2.3,0.9,2.3,0.9,0.5,0.01,10,60\n")
    assert visualize.main(["curves", str(metrics), "--out", str(tmp_path / "c.png")]) == 2
    assert "needs matplotlib: pip install matplotlib" in capsys.readouterr().err
