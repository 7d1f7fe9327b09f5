"""safetensors in (torchvision's and timm's layouts) and out (torchvision's names), and
`load_pretrained` telling every format apart by content.

The PyTorch oracle is torchvision's module layout in plain torch.nn (tests/support/torch_vgg.py);
its state_dict keys and shapes are `torchvision.models.vgg16()`'s at the default sizes.
"""

import json
import os

import numpy as np
import pytest

safetensors = pytest.importorskip("safetensors")
torch = pytest.importorskip("torch")
pytest.importorskip("google.protobuf")

from safetensors.numpy import save_file  # noqa: E402
from safetensors.torch import load_file as torch_load_file  # noqa: E402
from safetensors.torch import save_file as torch_save_file  # noqa: E402

from minivgg import checkpoint, models, no_grad, pretrained  # noqa: E402
from minivgg.pretrained import cli as pretrained_cli  # noqa: E402
from minivgg.pretrained import files  # noqa: E402
from caffe_files import write_vgg  # noqa: E402
from torch_vgg import TorchvisionLayoutVGG, make_torch_vgg, torch_logits  # noqa: E402
from conftest import load_example  # noqa: E402

SMALL = dict(width=8, fc_width=32, num_classes=10)


def batch(n=2, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3, 224, 224)).astype(np.float32)


def logits(model, x):
    with no_grad():
        return model(x).numpy()


def assert_logits_close(got, expected):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def timm_state(net):
    """A torchvision-layout torch net's weights under timm's names (timm's `_filter_fn`)."""
    state = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    renamed = {"classifier.0": "pre_logits.fc1", "classifier.3": "pre_logits.fc2",
               "classifier.6": "head.fc"}
    out = {}
    for key, value in state.items():
        module, part = key.rsplit(".", 1)
        if module == "classifier.0" and part == "weight":
            value = value.reshape(value.shape[0], -1, 7, 7)  # fc6 as a 7×7 conv
        if module == "classifier.3" and part == "weight":
            value = value.reshape(value.shape[0], -1, 1, 1)  # fc7 as a 1×1 conv
        out[f"{renamed.get(module, module)}.{part}"] = value
    return out


# ----------------------------------------------------------------------------------------
# In: torchvision's and timm's layouts
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", ["A", "E"])
def test_torchvision_safetensors_give_pytorch_logits(config, tmp_path):
    net = make_torch_vgg(config, **SMALL)
    path = tmp_path / "model.safetensors"
    torch_save_file(net.state_dict(), str(path))  # as the Hugging Face hub stores them
    model = pretrained.load_pretrained(path)
    assert (model.config, model.pretrained_meta["layout"]) == (config, "torchvision")
    assert model.pretrained_meta["std_rgb"] == pytest.approx([58.395, 57.12, 57.375])
    x = batch()
    assert_logits_close(logits(model, x), torch_logits(net, x))


@pytest.mark.parametrize("config", ["B", "D"])
def test_timm_safetensors_with_conv_head_give_pytorch_logits(config, tmp_path):
    net = make_torch_vgg(config, **SMALL)
    path = tmp_path / "model.safetensors"
    save_file(timm_state(net), str(path), metadata={"format": "pt"})
    model = pretrained.load_pretrained(path)
    assert (model.config, model.pretrained_meta["layout"]) == (config, "timm")
    assert model.fc6.weight.shape == (32, 64 * 7 * 7)
    x = batch()
    assert_logits_close(logits(model, x), torch_logits(net, x))


# ----------------------------------------------------------------------------------------
# Out: torchvision's names, and round trips
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["torchvision", "timm"])
@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_round_trip_keeps_every_array(layout, suffix, tmp_path):
    model = models.vgg("D", width=1 / 8, fc_width=32, num_classes=10, seed=3)
    path = tmp_path / f"d{suffix}"
    assert pretrained.save_pretrained(model, path, layout) == 32
    back = pretrained.load_pretrained(path)
    assert back.pretrained_meta["layout"] == layout
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[key], value)


def test_export_loads_into_torchvision_layout_and_gives_the_same_logits(tmp_path):
    model = models.vgg("E", width=1 / 8, fc_width=32, num_classes=10, init="glorot", seed=4).eval()
    path = tmp_path / "e.safetensors"
    pretrained.save_pretrained(model, path)
    net = TorchvisionLayoutVGG("E", **SMALL).eval()
    net.load_state_dict(torch_load_file(str(path)))  # strict: same keys, same shapes
    x = batch(seed=5)
    assert_logits_close(torch_logits(net, x), logits(model, x))


@pytest.mark.slow
def test_full_size_export_is_torchvision_vgg16s_state_dict(tmp_path):
    """vgg16() of torchvision takes the file: TorchvisionLayoutVGG('D') has its keys/shapes."""
    model = models.vgg("D", init="glorot", seed=6).eval()
    path = tmp_path / "vgg16.safetensors"
    pretrained.save_pretrained(model, path)
    state = torch_load_file(str(path))
    os.remove(path)
    net = TorchvisionLayoutVGG("D").eval()
    net.load_state_dict(state)
    assert sum(p.numel() for p in net.parameters()) == 138_357_544
    x = batch(1, seed=7)
    assert_logits_close(torch_logits(net, x), logits(model, x))


def test_caffe_to_safetensors_keeps_its_preprocessing_and_logits(tmp_path, capsys):
    net = make_torch_vgg("D", **SMALL)
    caffemodel, _ = write_vgg(tmp_path / "vgg.caffemodel", net, "D", "layers")
    out = tmp_path / "vgg16.safetensors"
    assert pretrained_cli.main(["convert", str(caffemodel), str(out)]) == 0
    assert "wrote 32 arrays" in capsys.readouterr().out
    a, b = pretrained.load_pretrained(caffemodel), pretrained.load_pretrained(out)
    assert b.ceil_mode and b.pretrained_meta["mean_rgb"] == a.pretrained_meta["mean_rgb"]
    assert b.pretrained_meta["std_rgb"] is None
    x = batch()
    np.testing.assert_array_equal(logits(a, x), logits(b, x))
    assert pretrained_cli.main(["info", str(out)]) == 0
    line = capsys.readouterr().out
    assert "VGG D" in line and "pool ceil mode: True" in line and "123.68" in line


# ----------------------------------------------------------------------------------------
# Every format by content, and bad files
# ----------------------------------------------------------------------------------------

def test_load_pretrained_reads_pth_npz_and_checkpoints_by_content(tmp_path):
    net = make_torch_vgg("A", **SMALL)
    x = batch(1)
    expected = torch_logits(net, x)
    zip_pth, legacy_pth = tmp_path / "weights.bin", tmp_path / "old.pth"
    torch.save(net.state_dict(), zip_pth)  # the name says nothing: the content decides
    torch.save(net.state_dict(), legacy_pth, _use_new_zipfile_serialization=False)
    npz = tmp_path / "a.npz"
    pretrained.convert(zip_pth, npz)
    for path in (zip_pth, legacy_pth, npz):
        assert files.sniff_format(path) in ("pth", "npz")
        assert_logits_close(logits(pretrained.load_pretrained(path), x), expected)
    trained = pretrained.load_pretrained(npz)
    ckpt = tmp_path / "best.npz"
    checkpoint.save(ckpt, trained.state_dict(), meta={
        "model": {"config": "A", "num_classes": 10, "width": 1 / 8, "fc_width": 32,
                  "input_size": 224},
        "classes": [f"n{i:08d}" for i in range(10)], "data_stats": {"mean_rgb": [1, 2, 3]}})
    model = pretrained.load_pretrained(ckpt)
    assert model.pretrained_meta["classes"][0] == "n00000000"
    assert model.pretrained_meta["mean_rgb"] == [1, 2, 3]
    assert_logits_close(logits(model, x), expected)


def _lying_header(tmp_path):
    """A safetensors file whose header claims more bytes than the file holds."""
    path = tmp_path / "lies.safetensors"
    save_file({"features.0.weight": np.zeros((4, 3, 3, 3), np.float32)}, str(path))
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["features.0.weight"]["shape"] = [64, 3, 3, 3]
    header["features.0.weight"]["data_offsets"] = [0, 64 * 27 * 4]
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    return path


def test_bad_files_get_one_clear_error_line(tmp_path, capsys):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 4)
    cases = {
        _lying_header(tmp_path): "lies.safetensors: not a readable safetensors file",
        junk: "junk.bin: not a Caffe .caffemodel",
        tmp_path / "missing.caffemodel": "does not exist; the authors' Caffe files are on "
                                         "the VGG project page",
    }
    for path, message in cases.items():
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            pretrained.load_pretrained(path)
        assert pretrained_cli.main(["convert", str(path), str(tmp_path / "out.npz")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out.npz").exists()


def test_bfloat16_and_batch_norm_files_are_refused_clearly(tmp_path):
    path = tmp_path / "bf16.safetensors"
    torch_save_file({"features.0.weight": torch.zeros(4, 3, 3, 3, dtype=torch.bfloat16)},
                    str(path))
    with pytest.raises(ValueError, match="NumPy cannot represent"):
        pretrained.load_pretrained(path)
    state = {k: v.detach().numpy() for k, v in make_torch_vgg("A", **SMALL).state_dict()
             .items()}
    state["features.1.running_mean"] = np.zeros(8, np.float32)
    save_file(state, str(tmp_path / "bn.safetensors"))
    with pytest.raises(ValueError, match="batch-norm"):
        pretrained.load_pretrained(tmp_path / "bn.safetensors")


def test_nothing_is_unpickled_from_a_pth_holding_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"features.0.weight": torch.zeros(1), "hook": print}, path)
    with pytest.raises(ValueError, match="not a state_dict torch can load safely"):
        pretrained.load_pretrained(path)


# ----------------------------------------------------------------------------------------
# The scripts take any of them
# ----------------------------------------------------------------------------------------

def test_init_from_warm_starts_from_a_safetensors_export(tmp_path):
    from minivgg.train import fit, synthetic_config
    a = models.vgg("A", width=0.125, fc_width=16, num_classes=10, input_size=32, seed=8)
    path = tmp_path / "a.safetensors"
    pretrained.save_pretrained(a, path)
    lines = []
    fit(synthetic_config(output=str(tmp_path / "b"), arch="B", epochs=1, batch_size=10,
                         width=0.125, fc_width=16, synthetic_train=20, synthetic_val=10,
                         init_from=str(path)), log=lines.append)
    assert any("warm start from" in line and "VGG-A" in line for line in lines)


def test_imagenette_classes_sit_at_their_ilsvrc_indices():
    names = pretrained.imagenet_classes()
    found = {names[k] for k in pretrained.IMAGENETTE_INDEX.values()}
    assert found == {"tench", "English springer", "cassette player", "chain saw", "church",
                     "French horn", "garbage truck", "gas pump", "golf ball", "parachute"}
    classes = pretrained.ilsvrc_classes(["n03888257", "n01440764"])
    assert len(classes) == 1000 and classes[701] == "n03888257" and classes[0] == "n01440764"
    full = [f"n{i:08d}" for i in range(1000)][::-1]
    assert pretrained.ilsvrc_classes(full) == sorted(full)
    with pytest.raises(ValueError, match="not among the ten Imagenette classes"):
        pretrained.ilsvrc_classes(["n99999999"])


def test_evaluate_script_scores_caffe_weights_on_imagenette_wnids(tmp_path, capsys):
    """fc8's bias makes 'tench' (class 0) win every image: half of 2+2 images are right."""
    from PIL import Image
    net = make_torch_vgg("D", width=8, fc_width=32, num_classes=1000)
    with torch.no_grad():
        net.classifier[6].bias[0] = 1e3
    caffemodel, _ = write_vgg(tmp_path / "vgg16.caffemodel", net, "D", "layers")
    rng = np.random.default_rng(9)
    for wnid in ("n01440764", "n03888257"):  # tench, parachute
        (tmp_path / "val" / wnid).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (60, 70, 3), dtype=np.uint8)).save(
                tmp_path / "val" / wnid / f"{i}.JPEG")
    module = load_example("evaluate_imagenet")
    assert module.cli([str(caffemodel), "--data", str(tmp_path), "--protocol", "center",
                       "--scales", "224", "-p", "0"]) == 0
    row = [line.split() for line in capsys.readouterr().out.splitlines()
           if line.startswith("D ")][0]
    assert row[3:6] == ["center", "50.00", "50.00"]  # top-5 too: parachute is not in it
