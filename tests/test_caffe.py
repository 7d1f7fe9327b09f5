"""The authors' Caffe release, read without Caffe: logits must equal PyTorch's on BGR input.

Each test writes a `.caffemodel` with the protobuf library (tests/support/caffe_files.py),
in the old `layers` format the VGG files use and in the new `layer` format, from a torch
net of torchvision's layout. That net fed BGR pixels is what Caffe computes; the imported model fed
the same pixels in RGB must give the same logits (conv1_1's channels reversed on import).

Sizes: the logits tests run every format at 1/8 width (8-64 channels, fc 32) on 224×224,
where the fc6 weight still flattens a (C, 7, 7) map. The full-size tests build D and E as
published (138,357,544 and 143,667,240 parameters, Table 2), write each format in turn and
delete the file once read, so a test holds one net (~0.6 GB as float32, ~3 GB at the peak
of writing and reading) and one file on disk; they take ~20 s each (2 shared cores).
"""

import os

import numpy as np
import pytest

pytest.importorskip("google.protobuf")
torch = pytest.importorskip("torch")

from minivgg import models, no_grad, pretrained  # noqa: E402
from minivgg.pretrained import caffe  # noqa: E402
from minivgg.pretrained.cli import main  # noqa: E402
from caffe_files import NetWriter, write_vgg  # noqa: E402
from torch_vgg import make_torch_vgg, torch_logits  # noqa: E402

SMALL = dict(width=8, fc_width=32, num_classes=10)
TABLE2 = {"D": 138_357_544, "E": 143_667_240}


def bgr_batch(n=2, size=224, seed=0):
    """Mean-subtracted pixels, 0-255 scale, BGR: what Caffe's VGG takes."""
    return np.random.default_rng(seed).normal(0, 60, (n, 3, size, size)).astype(np.float32)


def minivgg_logits(model, bgr):
    with no_grad():
        return model(np.ascontiguousarray(bgr[:, ::-1])).numpy()  # the same pixels, RGB


def assert_logits_close(got, expected):
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * scale)


# ----------------------------------------------------------------------------------------
# Logits against PyTorch, both formats, D and E
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["layers", "layer"])
@pytest.mark.parametrize("config", ["D", "E"])
def test_caffemodel_logits_match_pytorch_fed_bgr(config, fmt, tmp_path):
    net = make_torch_vgg(config, **SMALL)
    path, _ = write_vgg(tmp_path / "vgg.caffemodel", net, config, fmt)
    model = pretrained.load_pretrained(path)
    assert (model.config, model.width, model.fc_width, model.num_classes,
            model.input_size) == (config, 1 / 8, 32, 10, 224)
    x = bgr_batch()
    assert_logits_close(minivgg_logits(model, x), torch_logits(net, x))
    assert not model.training


def test_conv1_1_filters_are_reversed_to_rgb_and_the_mean_with_them(tmp_path):
    net = make_torch_vgg("D", **SMALL)
    path, _ = write_vgg(tmp_path / "vgg.caffemodel", net, "D", "layers")
    model = pretrained.load_caffe_vgg(path)
    bgr_filters = net.features[0].weight.detach().numpy()
    np.testing.assert_array_equal(model.conv1_1.weight.numpy(), bgr_filters[:, ::-1])
    np.testing.assert_array_equal(model.conv1_2.weight.numpy(),
                                  net.features[2].weight.detach().numpy())
    meta = model.pretrained_meta
    assert meta["mean_rgb"] == [123.68, 116.779, 103.939] and meta["std_rgb"] is None
    assert model.ceil_mode and meta["pool_ceil_mode"] and meta["layout"] == "caffe"


def test_blob_bytes_view_reads_what_caffe_proto_writes():
    """The packed floats of caffe.proto and the bytes view are the same bytes on the wire."""
    values = np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)
    faithful, fast = NetWriter("layer", faithful=True), NetWriter("layer", faithful=False)
    blobs = []
    for writer in (faithful, fast):
        blob = writer.schema["BlobProto"]()
        writer.add_blob(blob, values)
        blobs.append(blob.SerializeToString())
    assert blobs[0] == blobs[1]
    read = caffe.build_schema()["BlobProto"].FromString(blobs[0])
    np.testing.assert_array_equal(caffe._blob_array(read, "test"), values)


def test_deploy_prototxt_picks_the_layers_from_a_training_caffemodel(tmp_path):
    from google.protobuf import text_format
    net = make_torch_vgg("D", **SMALL)
    _, deploy = write_vgg(tmp_path / "deploy.caffemodel", net, "D", "layers")
    for layer in deploy.net.layers:
        del layer.blobs[:]
    prototxt = tmp_path / "deploy.prototxt"
    prototxt.write_text(text_format.MessageToString(deploy.net))
    # A training net: a data layer first, a loss and an accuracy layer at the end.
    train = NetWriter("layers", faithful=True)
    train.add("DATA", "data")
    for layer in write_vgg(tmp_path / "x.caffemodel", net, "D", "layers")[1].net.layers:
        train.net.layers.add().CopyFrom(layer)
    train.add("SOFTMAX_LOSS", "loss")
    train.add("ACCURACY", "accuracy")
    path = train.save(tmp_path / "train.caffemodel")
    model = pretrained.load_caffe_vgg(path, prototxt)
    x = bgr_batch(1)
    assert_logits_close(minivgg_logits(model, x), torch_logits(net, x))


def test_other_columns_come_from_their_layer_lists(tmp_path):
    """C (1×1 convs in blocks 3-5) and A-LRN (LRN in block 1, Caffe's alpha / n)."""
    for config, extra in (("C", None), ("A-LRN", "LRN")):
        reference = models.VGG(config, width=1 / 8, fc_width=32, num_classes=10)
        w = NetWriter("layer")
        for name, layer in reference.named_children():
            if name.startswith("conv"):
                k = layer.weight.shape[-1]
                w.add("CONVOLUTION", name, [layer.weight.numpy(), layer.bias.numpy()],
                      num_output=layer.out_channels, kernel_size=[k], pad=[k // 2])
            elif name.startswith("pool"):
                w.add("POOLING", name, pool=0, kernel_size=2, stride=2)
            elif name.startswith("norm"):
                w.add(extra, name, local_size=5, alpha=1e-4, beta=0.75)
            elif name.startswith("fc"):
                w.add("INNER_PRODUCT", name, [layer.weight.numpy(), layer.bias.numpy()],
                      num_output=layer.out_features)
        model = pretrained.load_pretrained(w.save(tmp_path / f"{config}.caffemodel"))
        assert model.config == config
        expected = reference.state_dict()
        expected["conv1_1.weight"] = expected["conv1_1.weight"][:, ::-1]  # read as BGR
        for key, value in model.state_dict().items():
            np.testing.assert_array_equal(value, expected[key])
    assert (model.norm1.alpha_over_n, model.norm1.k, model.norm1.size) == (True, 1.0, 5)


# ----------------------------------------------------------------------------------------
# Full size: D and E as published
# ----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("config", ["D", "E"])
def test_full_size_release_in_both_formats(config, tmp_path):
    net = make_torch_vgg(config)
    fc6 = net.classifier[0].weight.detach()
    # Sentinels: where fc6's (C, H, W) flattening puts channel 3, row 5, column 6.
    fc6[:, 3 * 49 + 5 * 7 + 6] = 0.5
    x = bgr_batch(1, seed=1)
    expected = torch_logits(net, x)
    for fmt in ("layers", "layer"):
        path, _ = write_vgg(tmp_path / f"{fmt}.caffemodel", net, config, fmt, faithful=False)
        model = pretrained.load_pretrained(path, config)
        os.remove(path)
        assert model.num_parameters() == TABLE2[config]
        assert (model.width, model.fc_width, model.num_classes) == (1.0, 4096, 1000)
        fc6_ours = model.fc6.weight.numpy()
        assert fc6_ours.shape == (4096, 512 * 7 * 7)
        assert np.all(fc6_ours[:, 3 * 49 + 5 * 7 + 6] == 0.5)
        assert_logits_close(minivgg_logits(model, x), expected)
        del model


# ----------------------------------------------------------------------------------------
# Bad files: one clear error
# ----------------------------------------------------------------------------------------

@pytest.fixture
def small_d(tmp_path):
    net = make_torch_vgg("D", **SMALL)
    return write_vgg(tmp_path / "vgg.caffemodel", net, "D", "layers")[1]


def test_truncated_caffemodel_is_one_clear_error(small_d, tmp_path, capsys):
    data = small_d.net.SerializeToString()
    path = tmp_path / "cut.caffemodel"
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="cut.caffemodel: not a Caffe .caffemodel, or a "
                                         "truncated one"):
        pretrained.load_pretrained(path)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def _drop(writer, name):
    layers = writer.net.layers
    del layers[[layer.name for layer in layers].index(name)]
    return writer


@pytest.mark.parametrize("change, message", [
    (lambda w: _drop(w, "pool3"), "4 max-pools"),
    (lambda w: _drop(w, "fc8"), "2 inner products"),
    (lambda w: _drop(_drop(w, "conv3_3"), "relu3_3"), "fit no column of Table 1"),
])
def test_wrong_layer_counts_are_refused(small_d, tmp_path, change, message):
    path = change(small_d).save(tmp_path / "bad.caffemodel")
    with pytest.raises(ValueError, match=message):
        pretrained.load_pretrained(path)


def test_shapes_that_fit_no_column_are_refused(tmp_path):
    net = make_torch_vgg("D", **SMALL)
    _, w = write_vgg(tmp_path / "vgg.caffemodel", net, "D", "layers")
    conv2_1 = next(layer for layer in w.net.layers if layer.name == "conv2_1")
    del conv2_1.blobs[:]  # 24 outputs where width 1/8 has 16
    w.add_blob(conv2_1.blobs.add(), np.zeros((24, 8, 3, 3), np.float32))
    w.add_blob(conv2_1.blobs.add(), np.zeros(24, np.float32))
    conv2_1.convolution_param.num_output = 24
    with pytest.raises(ValueError, match=r"conv2_1.weight: file has shape \(24, 8, 3, 3\), "
                                         r"configuration D expects \(16, 8, 3, 3\).*fit no "
                                         "Table 1 column"):
        pretrained.load_pretrained(w.save(tmp_path / "bad.caffemodel"))


def test_layers_outside_a_vgg_are_refused(small_d, tmp_path):
    small_d.add("ELTWISE", "sum")
    with pytest.raises(ValueError, match="layer 'sum' of type ELTWISE is not part of a VGG"):
        pretrained.load_pretrained(small_d.save(tmp_path / "bad.caffemodel"))
    w = NetWriter("layer")
    w.add("CONVOLUTION", "conv1_1", [np.zeros((8, 3, 5, 5)), np.zeros(8)], num_output=8,
          kernel_size=[5], pad=[2])
    with pytest.raises(ValueError, match="5×5 convolution .* is not a Table 1 conv"):
        pretrained.load_pretrained(w.save(tmp_path / "conv5.caffemodel"))


def test_config_given_must_agree_and_prototxt_alone_is_refused(small_d, tmp_path):
    path = small_d.save(tmp_path / "vgg.caffemodel")
    with pytest.raises(ValueError, match="holds configuration D, not E"):
        pretrained.load_pretrained(path, "vgg19")
    prototxt = tmp_path / "deploy.prototxt"
    prototxt.write_text('name: "VGG"\nlayers { name: "conv1_1" type: CONVOLUTION }\n')
    with pytest.raises(ValueError, match="holds no weights; pass the .caffemodel"):
        pretrained.load_pretrained(prototxt)
