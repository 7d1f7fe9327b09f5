"""Importing torchvision-layout VGG weights: logits must equal PyTorch's.

The published files cannot be downloaded here, so each test builds the same layout in
torch (torchvision's `features` / `avgpool` / `classifier`, from torchvision's own `cfgs`
notation, in tests/support/torch_vgg.py, independently of minivgg's Table 1 data), with
random weights, and saves it as `.pth` and `.npz`. fc6/fc7 are 64 wide instead of 4096 to
keep the files small; the loader reads the widths from the arrays.
"""

import numpy as np
import pytest

from minivgg import models, no_grad, pretrained
from minivgg.pretrained import cli as pretrained_cli

torch = pytest.importorskip("torch")

from torch_vgg import TorchvisionLayoutVGG  # noqa: E402
from conftest import load_example  # noqa: E402

FC_WIDTH, NUM_CLASSES = 64, 1000


def make_torch_vgg(config, seed=0):
    torch.manual_seed(seed)
    return TorchvisionLayoutVGG(config, FC_WIDTH, NUM_CLASSES).eval()


def save_pth_and_npz(net, tmp_path, stem):
    pth, npz = tmp_path / f"{stem}.pth", tmp_path / f"{stem}.npz"
    torch.save(net.state_dict(), pth)
    assert pretrained.convert(pth, npz) == len(net.state_dict())
    return pth, npz


@pytest.mark.parametrize("config", ["A", "D"])
def test_imported_weights_give_pytorch_logits_at_224(config, tmp_path):
    net = make_torch_vgg(config)
    pth, npz = save_pth_and_npz(net, tmp_path, config)
    x = np.random.default_rng(1).normal(size=(1, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    model = pretrained.load_torchvision_vgg(str(pth), config)
    with no_grad():
        logits = model(x).numpy()
    assert logits.shape == (1, NUM_CLASSES)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5 * scale)
    # The .npz holds the same arrays, so it builds the same model (hence the same logits).
    from_npz = pretrained.load_torchvision_vgg(str(npz), config).state_dict()
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(from_npz[key], value)


@pytest.mark.parametrize("config", ["A", "B", "D", "E"])
def test_key_map_follows_torchvision_feature_indices(config):
    net = make_torch_vgg(config)
    mapping = pretrained.torchvision_key_map(config)
    assert list(mapping) == list(net.state_dict())  # same keys, same order
    model = models.VGG(config, num_classes=NUM_CLASSES, fc_width=FC_WIDTH)
    own = dict(model.named_parameters())
    for tv_key, key in mapping.items():
        assert tuple(net.state_dict()[tv_key].shape) == own[key].shape, (tv_key, key)


def test_every_array_lands_in_the_right_layer(tmp_path):
    net = make_torch_vgg("B")
    _, npz = save_pth_and_npz(net, tmp_path, "B")
    model = pretrained.load_torchvision_vgg(npz, "vgg13")
    state = model.state_dict()
    np.testing.assert_array_equal(state["conv2_2.weight"],
                                  net.features[7].weight.detach().numpy())
    np.testing.assert_array_equal(state["fc8.bias"], net.classifier[6].bias.detach().numpy())
    assert not model.training  # dropout is off in an imported model


def test_file_of_another_config_names_the_config_it_matches(tmp_path):
    _, npz = save_pth_and_npz(make_torch_vgg("A"), tmp_path, "A")
    with pytest.raises(ValueError, match=r"configuration D \(vgg16\).*match configuration A"):
        pretrained.load_torchvision_vgg(npz, "D")


def test_wrong_shape_error_names_both_layers_and_shapes():
    state = numpy_state(make_torch_vgg("A"))
    state["features.3.weight"] = np.zeros((128, 32, 3, 3), np.float32)
    expected = (r"features\.3\.weight \(conv2_1\.weight\): file has shape \(128, 32, 3, 3\), "
                r"configuration A expects \(128, 64, 3, 3\)")
    with pytest.raises(ValueError, match=expected):
        pretrained.from_torchvision_state_dict(state, "A")


@pytest.mark.parametrize("config, message", [("C", "no weights for configuration C"),
                                             ("A-LRN", "no weights for configuration A-LRN"),
                                             ("vgg16_bn", "batch-norm variants"),
                                             ("F", "unknown VGG configuration")])
def test_unsupported_configs_are_refused_clearly(config, message):
    with pytest.raises(ValueError, match=message):
        pretrained.from_torchvision_state_dict(numpy_state(make_torch_vgg("A")), config)


def test_batch_norm_file_is_refused_clearly():
    state = numpy_state(make_torch_vgg("A"))
    state["features.1.running_mean"] = np.zeros(64, np.float32)
    with pytest.raises(ValueError, match="batch-norm"):
        pretrained.from_torchvision_state_dict(state, "A")


def test_missing_file_and_cli_convert(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="download.pytorch.org"):
        pretrained.read_state_dict(tmp_path / "vgg16.pth")
    pth = tmp_path / "a.pth"
    torch.save(make_torch_vgg("A").state_dict(), pth)
    convert = ["convert", str(pth)]
    assert pretrained_cli.main(convert + [str(tmp_path / "a.npz"), "--config", "A"]) == 0
    assert "wrote 22 arrays" in capsys.readouterr().out
    assert pretrained_cli.main(convert + [str(tmp_path / "b.npz"), "--config", "E"]) == 2
    assert "match configuration A" in capsys.readouterr().err
    assert not (tmp_path / "b.npz").exists()
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a state_dict torch can load"):
        pretrained.read_state_dict(junk)


def test_imagenet_class_names_are_in_weight_order():
    names = pretrained.imagenet_classes()
    assert len(names) == 1000 and len(set(names)) >= 998  # "crane" and "maillot" repeat
    assert (names[0], names[1], names[281], names[999]) == (
        "tench", "goldfish", "tabby", "toilet tissue")


def numpy_state(net):
    """A torch module's state_dict as NumPy arrays (what `read_state_dict` returns)."""
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def test_classify_example_prints_top5_names_matching_pytorch(tmp_path, capsys):
    from PIL import Image
    classify = load_example("classify")

    rng = np.random.default_rng(2)
    image = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)).save(image)
    x = classify.preprocess(image)
    assert x.shape == (1, 3, 224, 224)
    net = make_torch_vgg("A")
    _, npz = save_pth_and_npz(net, tmp_path, "A")
    with torch.no_grad():
        probs = torch.softmax(net(torch.from_numpy(x)), 1).numpy()[0]
    best = np.argsort(probs)[::-1][:5]

    assert classify.main([str(image), "--weights", str(npz), "--config", "A"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = pretrained.imagenet_classes()
    assert len(lines) == 6
    for line, i in zip(lines[1:], best):
        assert line.endswith(f"{names[i]} ({i})")
        assert f"{probs[i] * 100:6.2f}%" in line
