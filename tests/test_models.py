"""VGG A-E (Table 1): parameter counts (Table 2), names, sizes, init (Sec. 3.1) and an
independent PyTorch twin of every configuration."""

import numpy as np
import pytest

from minivgg import Tensor, functional as F, models, nn
from conftest import assert_close, tensor, to_numpy

CONFIGS = ["A", "A-LRN", "B", "C", "D", "E"]

# Table 2, exact counts with biases and 1000 classes (paper.md).
TABLE_2 = {"A": 132_863_336, "A-LRN": 132_863_336, "B": 133_047_848, "C": 133_638_952,
           "D": 138_357_544, "E": 143_667_240}

# An independent transcription of Table 1, torchvision style: an int is a 3x3 conv with
# that many outputs, ("1x1", n) a 1x1 conv, "M" a 2x2/s2 max-pool, "LRN" AlexNet's LRN.
TORCH_TABLE = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "A-LRN": [64, "LRN", "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "C": [64, 64, "M", 128, 128, "M", 256, 256, ("1x1", 256), "M",
          512, 512, ("1x1", 512), "M", 512, 512, ("1x1", 512), "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
          512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"],
}


@pytest.mark.parametrize("config", CONFIGS)
def test_parameter_count_equals_table_2(config):
    # models.VGG allocates zeros without initialising them, so this is cheap.
    assert models.VGG(config).num_parameters() == TABLE_2[config]


@pytest.mark.parametrize("alias, config", [("vgg11", "A"), ("vgg13", "B"), ("vgg16", "D"),
                                           ("vgg19", "E"), ("VGG16", "D"), ("a-lrn", "A-LRN"),
                                           ("d", "D")])
def test_aliases_build_the_same_configuration(alias, config):
    model = models.VGG(alias, width=1 / 16, fc_width=8, input_size=32)
    assert model.config == config
    assert models.canonical_config(alias) == config
    reference = models.VGG(config, width=1 / 16, fc_width=8, input_size=32)
    assert [k for k, _ in model.named_parameters()] == \
        [k for k, _ in reference.named_parameters()]


# ----------------------------------------------------------------------------------------
# The same logits and gradients as an equivalent PyTorch model
# ----------------------------------------------------------------------------------------

def torch_vgg(torch, config, width, fc_width, num_classes, input_size):
    """Build config from TORCH_TABLE with torch.nn layers (float64)."""
    tnn = torch.nn
    layers, c = [], 3
    for spec in TORCH_TABLE[config]:
        if spec == "M":
            layers.append(tnn.MaxPool2d(2, 2))
        elif spec == "LRN":
            # paper convention k + alpha * sum  ==  torch's k + (alpha * n) / n * sum
            layers.append(tnn.LocalResponseNorm(5, alpha=1e-4 * 5, beta=0.75, k=2.0))
        else:
            k, n = (1, spec[1]) if isinstance(spec, tuple) else (3, spec)
            out = max(1, round(n * width))
            layers += [tnn.Conv2d(c, out, k, padding=k // 2), tnn.ReLU()]
            c = out
    side = input_size // 32
    layers += [tnn.Flatten(), tnn.Linear(c * side * side, fc_width), tnn.ReLU(),
               tnn.Dropout(0.5), tnn.Linear(fc_width, fc_width), tnn.ReLU(), tnn.Dropout(0.5),
               tnn.Linear(fc_width, num_classes)]
    return tnn.Sequential(*layers).double()


def copy_weights_into_torch(torch, model, tmodel):
    """Copy minivgg's weights layer by layer, in order; returns the paired layers."""
    ours = [m for _, m in model.named_children() if isinstance(m, (nn.Conv2d, nn.Linear))]
    theirs = [m for m in tmodel if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(ours) == len(theirs)
    with torch.no_grad():
        for a, b in zip(ours, theirs):
            assert a.weight.shape == tuple(b.weight.shape)
            b.weight.copy_(torch.from_numpy(to_numpy(a.weight)))
            b.bias.copy_(torch.from_numpy(to_numpy(a.bias)))
    return list(zip(ours, theirs))


@pytest.mark.parametrize("config", CONFIGS)
def test_small_vgg_matches_torch_logits_and_gradients(config, device, torch):
    width, fc_width, classes, size = 1 / 16, 32, 10, 32
    model = models.vgg(config, classes, width, fc_width, size, init="glorot",
                       dtype=np.float64, seed=0).to(device).eval()
    tmodel = torch_vgg(torch, config, width, fc_width, classes, size).eval()
    pairs = copy_weights_into_torch(torch, model, tmodel)

    rng = np.random.default_rng(1)
    # Large pixel values so that LRN's alpha * sum term (A-LRN) is far from negligible.
    x = rng.normal(size=(2, 3, size, size)) * 50
    r = rng.normal(size=(2, classes))
    logits = model(tensor(x, device))
    logits.backward(r)
    tlogits = tmodel(torch.from_numpy(x))
    tlogits.backward(torch.from_numpy(r))

    assert_close(logits, tlogits.detach().numpy(), "model", np.float64, f"{config} logits")
    for (ours, theirs), name in zip(pairs, [n for n, m in model.named_children()
                                            if isinstance(m, (nn.Conv2d, nn.Linear))]):
        assert_close(ours.weight.grad, theirs.weight.grad.numpy(), "model", np.float64,
                     f"{config} {name}.weight grad")
        assert_close(ours.bias.grad, theirs.bias.grad.numpy(), "model", np.float64,
                     f"{config} {name}.bias grad")


def test_small_vgg_cross_entropy_loss_and_gradient_match_torch_in_float32(device, torch):
    model = models.vgg("A", 10, 1 / 16, 32, 32, init="glorot", seed=3).to(device).eval()
    tmodel = torch_vgg(torch, "A", 1 / 16, 32, 10, 32).eval()
    pairs = copy_weights_into_torch(torch, model, tmodel)
    rng = np.random.default_rng(2)
    x, labels = rng.normal(size=(4, 3, 32, 32)).astype(np.float32), np.array([1, 0, 9, 4])
    loss = F.cross_entropy(model(tensor(x, device)), labels)
    loss.backward()
    tloss = torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(x.astype(np.float64))),
                                              torch.from_numpy(labels))
    tloss.backward()
    assert loss.dtype == np.float32
    assert_close(loss, tloss.item(), "model", np.float32)
    for ours, theirs in pairs:
        scale = float(np.abs(theirs.weight.grad.numpy()).max())
        np.testing.assert_allclose(to_numpy(ours.weight.grad) / scale,
                                   theirs.weight.grad.numpy() / scale, atol=1e-4)


# ----------------------------------------------------------------------------------------
# Structure: names, LRN position, widths, input size
# ----------------------------------------------------------------------------------------

def test_a_lrn_layer_names_follow_caffe_with_norm1_after_relu1_1():
    names = [k for k, _ in models.VGG("A-LRN", width=1 / 16, fc_width=8,
                                      input_size=32).named_children()]
    assert names == ["conv1_1", "relu1_1", "norm1", "pool1", "conv2_1", "relu2_1", "pool2",
                     "conv3_1", "relu3_1", "conv3_2", "relu3_2", "pool3",
                     "conv4_1", "relu4_1", "conv4_2", "relu4_2", "pool4",
                     "conv5_1", "relu5_1", "conv5_2", "relu5_2", "pool5",
                     "flatten", "fc6", "relu6", "drop6", "fc7", "relu7", "drop7", "fc8"]


@pytest.mark.parametrize("config, per_block", [("A", [1, 1, 2, 2, 2]), ("B", [2, 2, 2, 2, 2]),
                                               ("C", [2, 2, 3, 3, 3]), ("D", [2, 2, 3, 3, 3]),
                                               ("E", [2, 2, 4, 4, 4])])
def test_conv_layer_names_and_kernel_sizes_follow_table_1(config, per_block):
    model = models.VGG(config, width=1 / 16, fc_width=8, input_size=32)
    expected = [f"conv{b}_{i}" for b, n in enumerate(per_block, 1) for i in range(1, n + 1)]
    convs = model.conv_layers()
    assert [k for k, _ in convs] == expected
    assert [k for k, _ in model.fc_layers()] == ["fc6", "fc7", "fc8"]
    one_by_one = [k for k, m in convs if m.kernel_size == (1, 1)]
    assert one_by_one == (["conv3_3", "conv4_3", "conv5_3"] if config == "C" else [])
    for name, m in convs:
        assert m.padding == (0 if m.kernel_size == (1, 1) else 1) and m.stride == 1, name
        assert model[name] is m and m.name == name
    assert not any(isinstance(m, nn.LocalResponseNorm) for m in model)


def test_a_lrn_uses_the_papers_lrn_parameters():
    norm = models.VGG("A-LRN", width=1 / 16, fc_width=8, input_size=32).norm1
    assert (norm.size, norm.alpha, norm.beta, norm.k, norm.alpha_over_n) == \
        (5, 1e-4, 0.75, 2.0, False)


@pytest.mark.parametrize("width, channels", [(1.0, [64, 128, 256, 512, 512]),
                                             (0.25, [16, 32, 64, 128, 128]),
                                             (1 / 64, [1, 2, 4, 8, 8])])
def test_width_scales_every_conv_block(width, channels):
    model = models.VGG("B", width=width, fc_width=8, input_size=32)
    outs = {k[:5]: m.out_channels for k, m in model.conv_layers()}
    assert [outs[f"conv{b}"] for b in range(1, 6)] == channels


@pytest.mark.parametrize("input_size, side", [(32, 1), (64, 2), (100, 3), (224, 7), (255, 7)])
def test_fc6_input_follows_input_size(input_size, side):
    model = models.VGG("D", num_classes=7, width=1 / 16, fc_width=12, input_size=input_size)
    assert model.fc6.weight.shape == (12, 32 * side * side)
    assert model.fc7.weight.shape == (12, 12)
    assert model.fc8.weight.shape == (7, 12)


def test_forward_at_64_gives_logits_of_the_right_shape_and_dtype():
    model = models.vgg("A", num_classes=5, width=1 / 16, fc_width=16, input_size=64, seed=0)
    y = model(Tensor(np.zeros((3, 3, 64, 64), np.float32)))
    assert y.shape == (3, 5) and y.dtype == np.float32


def test_train_and_eval_switch_dropout():
    model = models.vgg("A", num_classes=4, width=1 / 16, fc_width=64, input_size=32,
                       init="glorot", seed=0)
    x = Tensor(np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32))
    model.eval()
    assert not model.drop6.training
    np.testing.assert_array_equal(model(x).data, model(x).data)
    model.train()
    assert model.drop6.training and model.training
    assert not np.array_equal(model(x).data, model(x).data)


# ----------------------------------------------------------------------------------------
# Initialisation (Sec. 3.1)
# ----------------------------------------------------------------------------------------

def test_gaussian_init_has_std_0_01_and_zero_biases():
    model = models.vgg("A", num_classes=10, width=0.25, fc_width=256, input_size=32, seed=0)
    for name, p in model.named_parameters():
        w = to_numpy(p)
        if name.endswith("bias"):
            assert not w.any(), name
        elif w.size >= 10_000:
            assert abs(w.std() - 0.01) < 0.01 * 0.05, (name, w.std())
            assert abs(w.mean()) < 0.01 * 5 / np.sqrt(w.size), (name, w.mean())


def test_glorot_init_is_uniform_within_the_fan_bound():
    model = models.vgg("A", num_classes=10, width=0.25, fc_width=256, input_size=32,
                       init="glorot", seed=0)
    for name, m in model.named_children():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        w = to_numpy(m.weight)
        area = int(np.prod(w.shape[2:])) if w.ndim == 4 else 1
        bound = np.sqrt(6.0 / ((w.shape[0] + w.shape[1]) * area))
        assert np.abs(w).max() <= bound, name
        if w.size >= 10_000:
            assert np.abs(w).max() > 0.99 * bound, name
            assert abs(w.std() - bound / np.sqrt(3)) < 0.05 * bound / np.sqrt(3), name
        assert not to_numpy(m.bias).any()


def test_init_with_a_seed_is_repeatable_and_unknown_init_is_rejected():
    a = models.vgg("A", width=1 / 16, fc_width=8, input_size=32, seed=5).state_dict()
    b = models.vgg("A", width=1 / 16, fc_width=8, input_size=32, seed=5).state_dict()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(ValueError, match="unknown init 'he'"):
        models.vgg("A", width=1 / 16, fc_width=8, input_size=32, init="he")


def test_float64_models_hold_float64_parameters():
    model = models.vgg("B", width=1 / 16, fc_width=8, input_size=32, dtype=np.float64)
    assert {p.dtype for p in model.parameters()} == {np.dtype(np.float64)}


# ----------------------------------------------------------------------------------------
# Warm start from a trained A (Sec. 3.1)
# ----------------------------------------------------------------------------------------

WARM = ["conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8"]


@pytest.mark.parametrize("target", ["B", "C", "D", "E"])
def test_init_from_a_copies_exactly_the_seven_layers(target):
    kwargs = dict(num_classes=10, width=1 / 16, fc_width=16, input_size=32)
    a_state = models.vgg("A", seed=1, **kwargs).state_dict()
    model = models.vgg(target, seed=2, **kwargs)
    before = model.state_dict()
    copied = models.init_from_a(model, a_state)
    assert sorted(copied) == sorted(WARM)
    after = model.state_dict()
    for key in after:
        layer = key.split(".")[0]
        if layer in WARM:
            np.testing.assert_array_equal(after[key], a_state[key], err_msg=key)
        else:
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    # Of D's conv layers, only the four named ones changed.
    changed = {k.split(".")[0] for k in after if not np.array_equal(after[k], before[k])}
    assert changed == set(WARM)


def test_init_from_a_rejects_shape_mismatch_and_copies_nothing():
    a_state = models.vgg("A", num_classes=10, width=1 / 16, fc_width=16, input_size=32,
                         seed=1).state_dict()
    model = models.vgg("D", num_classes=10, width=1 / 8, fc_width=16, input_size=32, seed=2)
    before = model.state_dict()
    with pytest.raises(ValueError, match=r"conv1_1\.weight: net A has shape \(4, 3, 3, 3\), "
                                         r"target has \(8, 3, 3, 3\)"):
        models.init_from_a(model, a_state)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_init_from_a_reports_missing_layers():
    a_state = models.vgg("A", width=1 / 16, fc_width=16, input_size=32, seed=1).state_dict()
    del a_state["fc7.bias"]
    model = models.vgg("D", width=1 / 16, fc_width=16, input_size=32, seed=2)
    with pytest.raises(ValueError, match=r"fc7\.bias is missing from net A"):
        models.init_from_a(model, a_state)


# ----------------------------------------------------------------------------------------
# The Module API the models rest on
# ----------------------------------------------------------------------------------------

def test_named_parameters_use_caffe_names_in_layer_order():
    model = models.VGG("C", width=1 / 16, fc_width=8, input_size=32)
    names = [k for k, _ in model.named_parameters()]
    assert names[:4] == ["conv1_1.weight", "conv1_1.bias", "conv1_2.weight", "conv1_2.bias"]
    assert names[-2:] == ["fc8.weight", "fc8.bias"] and len(names) == 2 * 16
    assert [p for _, p in model.named_parameters()] == model.parameters()


def test_state_dict_copies_and_load_state_dict_does_not_alias_its_input(device):
    model = models.vgg("A", width=1 / 16, fc_width=8, input_size=32, seed=0).to(device)
    state = model.state_dict()
    state["fc8.bias"] += 1.0  # editing the copy leaves the model alone
    assert not to_numpy(model.fc8.bias).any()
    model.load_state_dict(state)
    state["fc8.bias"] += 1.0  # and the model does not hold the caller's array
    np.testing.assert_array_equal(to_numpy(model.fc8.bias), np.ones(1000))
    assert model.fc8.bias.grad is None and model.fc8.bias.device == device


def test_nn_layers_equal_their_functional_ops(device, rng):
    x = tensor(rng.normal(size=(2, 3, 6, 5)), device, np.float32)
    conv = nn.Conv2d(3, 4, (3, 1), stride=(2, 1), padding=(1, 0), bias=False).to(device)
    conv.weight.data = tensor(rng.normal(size=(4, 3, 3, 1)), device, np.float32).data
    np.testing.assert_array_equal(to_numpy(conv(x)),
                                  to_numpy(F.conv2d(x, conv.weight, None, (2, 1), (1, 0))))
    assert conv.bias is None and len(conv.parameters()) == 1
    pool = nn.MaxPool2d(3, 2)
    np.testing.assert_array_equal(to_numpy(pool(x)), to_numpy(F.max_pool2d(x, 3, 2)))
    lrn = nn.LocalResponseNorm(3, 1e-2, 0.75, 1.0, alpha_over_n=True)
    np.testing.assert_array_equal(to_numpy(lrn(x)), to_numpy(
        F.local_response_norm(x, 3, 1e-2, 0.75, 1.0, alpha_over_n=True)))
    assert nn.Flatten()(x).shape == (2, 90)
