"""ONNX export (minivgg.pretrained.onnx_export), with ONNX Runtime as the oracle: the logits
of the exported graph must equal minivgg's, for A, A-LRN (both LRN α conventions), C (1×1
convs) and D, each at small width and at full size, ceil-mode pools, and the fully-convolutional
head; the CLI's refusals leave every file the user had as it was."""

import json
import os

import numpy as np
import pytest

from minivgg import checkpoint, models, no_grad, pretrained, run_state
from minivgg.evaluate import to_fully_convolutional
from minivgg.pretrained import CAFFE_INPUT, onnx_export
from minivgg.pretrained.cli import main as pretrained_main

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# ONNX Runtime and minivgg sum in different orders: float32 rounding over a whole net.
RTOL, ATOL_SCALE = 1e-4, 1e-5


def small(config, input_size=64, seed=0, num_classes=10):
    model = models.vgg(config, num_classes, 1 / 16, 16, input_size, init="glorot", seed=seed)
    rng = np.random.default_rng(seed + 7)
    for name, p in model.named_parameters():
        if name.endswith("bias"):  # non-zero biases, so a dropped bias shows
            p.data = rng.normal(0, 0.1, size=p.shape).astype(np.float32)
    return model.eval()


def session(path_or_proto):
    source = path_or_proto if isinstance(path_or_proto, (str, os.PathLike)) else \
        path_or_proto.SerializeToString()
    return ort.InferenceSession(str(source) if isinstance(source, os.PathLike) else source,
                                providers=["CPUExecutionProvider"])


def images(shape, seed=1):
    return np.random.default_rng(seed).normal(0, 60, size=shape).astype(np.float32)


def assert_same_logits(got, expected):
    scale = np.abs(expected).max()
    assert scale > 1e-3, "logits too small for the comparison to mean anything"
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL_SCALE * scale)


@pytest.mark.parametrize("config", ["A", "A-LRN", "C", "D"])
def test_exported_net_gives_minivgg_logits_in_onnx_runtime(config, tmp_path):
    model = small(config)
    path = tmp_path / f"{config}.onnx"
    proto = onnx_export.export_onnx(model, path)
    onnx.checker.check_model(str(path))
    ops = {n.op_type for n in proto.graph.node}
    assert ops == {"Conv", "Relu", "MaxPool", "Flatten", "Gemm"} | (
        {"LRN"} if config == "A-LRN" else set())
    x = images((3, 3, 64, 64))
    with no_grad():
        expected = model(x).numpy()
    for batch in (x, x[:1]):  # the batch dimension is dynamic
        (got,) = session(path).run(None, {"input": batch})
        assert_same_logits(got, expected[:len(batch)])


@pytest.mark.parametrize("alpha_over_n", [False, True])
def test_lrn_alpha_follows_the_layers_convention(alpha_over_n, tmp_path):
    """ONNX's LRN divides alpha by size: the paper's α (a plain sum) exports as α·n."""
    model = small("A-LRN")
    model.norm1.alpha_over_n = alpha_over_n
    model.norm1.alpha = 1e-3  # large enough to matter after conv1_1
    proto = onnx_export.build_onnx(model)
    lrn = next(n for n in proto.graph.node if n.op_type == "LRN")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in lrn.attribute}
    assert attrs["size"] == 5 and attrs["beta"] == pytest.approx(0.75)
    assert attrs["bias"] == pytest.approx(2.0)
    assert attrs["alpha"] == pytest.approx(1e-3 if alpha_over_n else 5e-3)
    x = images((2, 3, 64, 64))
    with no_grad():
        expected = model(x).numpy()
        model.norm1.alpha_over_n = not alpha_over_n
        other = model(x).numpy()
    assert np.abs(expected - other).max() > 1e-3 * np.abs(expected).max()
    assert_same_logits(session(proto).run(None, {"input": x})[0], expected)


def test_ceil_mode_pools_export_as_ceil_mode(tmp_path):
    model = small("A")
    model.ceil_mode = True
    proto = onnx_export.build_onnx(model, head="dense")
    pools = [n for n in proto.graph.node if n.op_type == "MaxPool"]
    assert len(pools) == 5 and all(
        onnx.helper.get_attribute_value(a) == 1 for n in pools for a in n.attribute
        if a.name == "ceil_mode")
    x = images((1, 3, 80, 112))  # odd sides after the pools: floor and ceil differ here
    with no_grad():
        expected = to_fully_convolutional(model)(x).numpy()
    logits, score_map = session(proto).run(None, {"input": x})
    assert score_map.shape == expected.shape == (1, 10, 2, 3)  # floor mode: 1×2
    assert_same_logits(score_map, expected)


def test_dense_head_takes_any_size_and_averages_the_score_map(tmp_path):
    model = small("D")
    path = tmp_path / "dense.onnx"
    onnx_export.export_onnx(model, path, head="dense", softmax=True)
    onnx.checker.check_model(str(path))
    fcn = to_fully_convolutional(model)
    sess = session(path)
    assert [o.name for o in sess.get_outputs()] == ["probs", "score_map"]
    for shape in [(2, 3, 64, 64), (1, 3, 96, 130), (2, 3, 128, 100)]:
        x = images(shape)
        with no_grad():
            expected = fcn(x).numpy()
        probs, score_map = sess.run(None, {"input": x})
        assert_same_logits(score_map, expected)
        scores = expected.mean(axis=(2, 3))
        soft = np.exp(scores - scores.max(1, keepdims=True))
        np.testing.assert_allclose(probs, soft / soft.sum(1, keepdims=True), rtol=1e-4,
                                   atol=1e-6)


def test_softmax_output_and_classifier_head_shapes(tmp_path):
    model = small("A")
    proto = onnx_export.build_onnx(model, softmax=True)
    (probs,) = session(proto).run(None, {"input": images((2, 3, 64, 64))})
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 64, 64]
    assert proto.opset_import[0].version == onnx_export.OPSET
    assert "Dropout" not in {n.op_type for n in proto.graph.node}


def test_caffe_born_weights_export_as_the_authors_bgr_net(tmp_path):
    model = small("D")
    model.pretrained_meta = dict(CAFFE_INPUT, layout="caffe", pool_ceil_mode=False)
    proto = onnx_export.build_onnx(model)
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["minivgg.channel_order"] == "BGR"
    assert json.loads(props["minivgg.mean"]) == pytest.approx([103.939, 116.779, 123.68])
    x = images((2, 3, 64, 64))  # RGB
    with no_grad():
        expected = model(x).numpy()
    bgr = np.ascontiguousarray(x[:, ::-1])
    assert_same_logits(session(proto).run(None, {"input": bgr})[0], expected)
    rgb = onnx_export.build_onnx(model, channel_order="rgb")
    assert_same_logits(session(rgb).run(None, {"input": x})[0], expected)


def test_trained_weights_export_with_the_same_logits_and_predictions(tmp_path):
    """The 12-epoch reproduction study's trained A-s0 (docs/archive/)."""
    from conftest import REPO
    from minivgg.pretrained import load_pretrained
    model = load_pretrained(os.path.join(REPO, "docs", "archive", "reproduction-12-epochs",
                                         "A-s0", "weights.npz"))
    path = tmp_path / "a.onnx"
    onnx_export.export_onnx(model, path)
    x = images((16, 3, 64, 64))
    with no_grad():
        expected = model(x).numpy()
    (got,) = session(path).run(None, {"input": x})
    assert_same_logits(got, expected)
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["A", "A-LRN", "C", "D"])
def test_full_size_nets_export_and_match(config, tmp_path):
    """Table 1's nets at 224 (133-138M parameters, files of 530-553 MB): about 15 s each."""
    model = models.vgg(config, init="glorot", seed=0).eval()
    path = tmp_path / f"{config}.onnx"
    onnx_export.export_onnx(model, path, check=False)
    onnx.checker.check_model(str(path))  # the file, as a user's tool would check it
    assert os.path.getsize(path) > model.num_parameters() * 4
    x = images((1, 3, 224, 224))
    with no_grad():
        expected = model(x).numpy()
    assert_same_logits(session(path).run(None, {"input": x})[0], expected)


# ----------------------------------------------------------------------------------------
# The CLI: convert by extension, info, refusals
# ----------------------------------------------------------------------------------------

@pytest.fixture
def trained(tmp_path):
    """A training checkpoint of A-LRN with its classes and mean colour."""
    return save_checkpoint(small("A-LRN", num_classes=3), tmp_path / "best.npz")


def save_checkpoint(model, path):
    meta = {"model": run_state.model_meta(model), "classes": ["n01", "n02", "n03"],
            "data_stats": {"mean_rgb": [120.5, 115.25, 100.0], "pca_eigval": [0, 0, 0],
                           "pca_eigvec": np.eye(3).tolist()}}
    checkpoint.save(path, model.state_dict(), meta=meta)
    return str(path), model


def one_error_line(capsys):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_cli_converts_a_checkpoint_and_info_prints_its_preprocessing(trained, tmp_path,
                                                                     capsys):
    ckpt, model = trained
    out = tmp_path / "model.onnx"
    assert pretrained_main(["convert", ckpt, str(out)]) == 0
    assert "ONNX opset 17, VGG A-LRN, fc head, input RGB" in capsys.readouterr().out
    x = images((2, 3, 64, 64))
    with no_grad():
        assert_same_logits(session(out).run(None, {"input": x})[0], model(x).numpy())
    assert pretrained_main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "inputs: input (batch, 3, 64, 64)" in text
    assert "outputs: logits (batch, 3)" in text
    assert "RGB pixels on the 0-255 scale minus the mean [120.5, 115.25, 100.0]" in text
    assert "classes: n01, n02, n03" in text and "VGG A-LRN, fc head" in text
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_cli_keeps_an_existing_output_unless_overwrite(tmp_path, capsys):
    ckpt, _ = save_checkpoint(small("A", num_classes=3), tmp_path / "a.npz")
    for name in ("model.onnx", "weights.npz", "weights.safetensors"):
        out = tmp_path / name
        out.write_bytes(b"the user's own file")
        assert pretrained_main(["convert", ckpt, str(out)]) == 2
        assert f"{out} exists; it was left as it is (add --overwrite" in one_error_line(capsys)
        assert out.read_bytes() == b"the user's own file"
        assert pretrained_main(["convert", ckpt, str(out), "--overwrite"]) == 0
        assert out.read_bytes() != b"the user's own file"
    onnx.checker.check_model(str(tmp_path / "model.onnx"))
    with pytest.raises(FileExistsError, match="exists"):
        onnx_export.export_onnx(small("A"), tmp_path / "model.onnx")


@pytest.mark.parametrize("args, message", [
    (["convert", "CKPT", "OUT/model.onx"], "the output must end in .npz, .safetensors or .onnx"),
    (["convert", "OUT/model.onnx", "OUT/x.npz"], "an ONNX file is an export"),
    (["convert", "OUT/none.npz", "OUT/m.onnx"], "no such file"),
    (["info", "OUT/junk.onnx"], "not a readable ONNX file"),
    (["info", "OUT/none.onnx"], "no such file"),
])
def test_cli_mistakes_get_one_error_line(trained, tmp_path, capsys, args, message):
    ckpt, _ = trained
    (tmp_path / "junk.onnx").write_bytes(b"\xff\xfe not protobuf \x00\x01" * 10)
    (tmp_path / "model.onnx").write_bytes(b"")
    args = [a.replace("CKPT", ckpt).replace("OUT", str(tmp_path)) for a in args]
    before = sorted(os.listdir(tmp_path))
    assert pretrained_main(args) == 2
    assert message in one_error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == before


def test_an_interrupted_export_leaves_no_file_and_keeps_the_old_one(trained, tmp_path,
                                                                    monkeypatch):
    ckpt, model = trained
    out = tmp_path / "model.onnx"

    def crash(tmp, path, overwrite):
        assert os.path.getsize(tmp) > 0  # the whole model was written under a temporary name
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_publish", crash)  # the one atomic write's last step
    with pytest.raises(OSError, match=f"no space left on the disk holding {tmp_path} while "
                                      f"writing {out}; no earlier file"):
        onnx_export.export_onnx(model, out)
    assert os.listdir(tmp_path) == ["best.npz"]
    out.write_bytes(b"old")
    with pytest.raises(OSError, match=f"the previous file {out} is intact"):
        onnx_export.export_onnx(model, out, overwrite=True)
    assert out.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["best.npz", "model.onnx"]


def test_info_on_an_onnx_file_from_elsewhere(tmp_path, capsys):
    helper = onnx.helper
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])])
    onnx.save(helper.make_model(graph), str(tmp_path / "other.onnx"))
    assert pretrained_main(["info", str(tmp_path / "other.onnx")]) == 0
    assert "no minivgg metadata" in capsys.readouterr().out


def test_bfloat16_weights_are_refused_alike_once_onnx_is_imported(tmp_path):
    """onnx imports ml_dtypes, which teaches NumPy bfloat16: the weight readers must still
    refuse such files with the same message (tests/test_safetensors.py, without onnx)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file
    import ml_dtypes  # noqa: F401  (what onnx brings)
    path = tmp_path / "bf16.safetensors"
    save_file({"features.0.weight": torch.zeros(4, 3, 3, 3, dtype=torch.bfloat16)}, str(path))
    with pytest.raises(ValueError, match="NumPy cannot represent"):
        pretrained.load_pretrained(path)
