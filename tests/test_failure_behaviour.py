"""Failure behaviour of the command-line tools: one `error:` line, the right exit status,
nothing lost (issue 15). Training interrupts, SIGTERM and divergence are tested on a real
subprocess; image and weight problems through the scripts' own `main`."""

import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

from minivgg import checkpoint, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example(name):
    """Import examples/<name>.py as a module (the examples folder is not a package)."""
    path = os.path.join(REPO, "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_error_line(capsys):
    """The captured stderr, checked to be exactly one line starting with 'error: '."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "allow_pickle" not in err
    return lines[0]


# --- examples/classify.py -------------------------------------------------------------------

@pytest.fixture(scope="module")
def classify():
    return load_example("classify")


def _bad_image(tmp_path, case):
    path = tmp_path / f"{case}.jpg"
    if case == "not an image":
        path.write_text("just text")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "folder":
        path.mkdir()
    elif case in ("truncated", "decompression bomb"):
        rgb = np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(path, quality=90)
        if case == "truncated":
            path.write_bytes(path.read_bytes()[:400])
    return path


@pytest.mark.parametrize("case, why", [("missing", "no such file"),
                                       ("not an image", "not an image format"),
                                       ("empty", "the file is empty"),
                                       ("truncated", "truncated"),
                                       ("folder", "it is a folder"),
                                       ("decompression bomb", "DecompressionBomb")])
def test_classify_reports_a_bad_image_in_one_line_before_loading_weights(
        tmp_path, capsys, monkeypatch, classify, case, why):
    path = _bad_image(tmp_path, case)
    if case == "decompression bomb":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 100x100 > twice the limit
    # The weights do not exist: an error about the image proves it was read first.
    assert classify.main([str(path), "--weights", str(tmp_path / "none.npz")]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: cannot read image {path}: ") and why in line


@pytest.mark.parametrize("top", ["-3", "0"])
def test_classify_rejects_a_top_below_one(tmp_path, capsys, classify, top):
    assert classify.main([str(tmp_path / "x.jpg"), "--weights", "w.npz", "--top", top]) == 2
    assert f"--top must be at least 1, got {top}" in one_error_line(capsys)


@pytest.mark.parametrize("kind", ["garbage", "object array", "huge header"])
def test_classify_reports_a_damaged_weights_file_without_the_pickle_hint(
        tmp_path, capsys, classify, kind):
    image = tmp_path / "ok.png"
    Image.new("RGB", (40, 30), (10, 20, 30)).save(image)
    weights = tmp_path / "w.npz"
    if kind == "garbage":
        weights.write_bytes(b"PK\x03\x04" + bytes(100))
    elif kind == "object array":
        np.savez(weights, w=np.array([{"code": "run me"}], dtype=object))
    else:
        import io
        import zipfile
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buf, {"descr": "<f4", "fortran_order": False, "shape": (10**11,)})
        with zipfile.ZipFile(weights, "w") as z:
            z.writestr("features.0.weight.npy", buf.getvalue() + bytes(8))
    assert classify.main([str(image), "--weights", str(weights), "--config", "A"]) == 2
    assert f"weights file {str(weights)!r}" in one_error_line(capsys)


def test_classify_refuses_to_rank_with_nan_weights(tmp_path, capsys, monkeypatch, classify):
    image = tmp_path / "ok.png"
    Image.new("RGB", (40, 30), (10, 20, 30)).save(image)
    model = models.vgg("A", num_classes=3, width=1 / 16, fc_width=8, input_size=224)
    model.parameters()[4].data[...] = np.nan
    monkeypatch.setattr(classify.pretrained, "load_torchvision_vgg", lambda *a: model)
    assert classify.main([str(image), "--weights", "w.npz", "--config", "A"]) == 2
    line = one_error_line(capsys)
    assert "hold NaN or Inf" in line and "refusing" in line
    assert capsys.readouterr().out == ""  # no percentages printed as if all were fine


# --- examples/evaluate_imagenet.py ----------------------------------------------------------

def test_evaluate_refuses_a_checkpoint_with_nan_weights(tmp_path, capsys):
    evaluate_imagenet = load_example("evaluate_imagenet")
    model = models.vgg("A", num_classes=2, width=1 / 16, fc_width=8, input_size=32)
    state = model.state_dict()
    state["fc8.weight"][0, 0] = np.inf
    meta = {"model": {"config": "A", "num_classes": 2, "width": 1 / 16, "fc_width": 8,
                      "input_size": 32}, "classes": ["a", "b"],
            "data_stats": {"mean_rgb": [0, 0, 0], "pca_eigval": [0, 0, 0],
                           "pca_eigvec": np.eye(3).tolist()}}
    path = tmp_path / "diverged.npz"
    checkpoint.save(path, state, meta=meta)
    assert evaluate_imagenet.cli([str(path), "--data", str(tmp_path)]) == 2
    line = one_error_line(capsys)
    assert str(path) in line and "fc8.weight hold NaN or Inf" in line
    assert capsys.readouterr().out == ""
