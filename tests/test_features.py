"""minivgg.features (App. B) and model.activations: values against a forward written out in
plain NumPy, the flip / scales / normalize semantics, layer-name errors, and gradients to
the input against float64 central differences."""

import numpy as np
import pytest

from conftest import assert_close
from minivgg import features, models
from minivgg.evaluate import to_fully_convolutional
from minivgg.tensor import Tensor, no_grad

C = 32  # input size of the tiny nets


def tiny(config="A", dtype=np.float32, seed=0):
    """VGG-`config` at 1/16 width (4..32 channels), fc6/fc7 of 8, 10 classes, 32x32 input,
    biases random too (init_weights makes them zero, which would hide a bias mistake)."""
    model = models.vgg(config, 10, 1 / 16, 8, C, init="glorot", seed=seed).astype(dtype)
    rng = np.random.default_rng(seed + 100)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.data = rng.normal(0, 0.1, size=p.shape).astype(dtype)
    return model.eval()


# ----------------------------------------------------------------------------------------
# The forward pass written out in NumPy, float64, independent of minivgg's kernels
# ----------------------------------------------------------------------------------------

def np_conv(x, W, b, pad):
    N, _, H, Wd = x.shape
    k = W.shape[2]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.zeros((N, W.shape[0], H + 2 * pad - k + 1, Wd + 2 * pad - k + 1))
    for ky in range(k):
        for kx in range(k):
            window = xp[:, :, ky:ky + out.shape[2], kx:kx + out.shape[3]]
            out += np.einsum("nchw,oc->nohw", window, W[:, :, ky, kx])
    return out + b[None, :, None, None]


def np_pool(x):
    N, Cc, H, W = x.shape
    x = x[:, :, :H // 2 * 2, :W // 2 * 2]
    return x.reshape(N, Cc, H // 2, 2, W // 2, 2).max(axis=(3, 5))


def np_forward(model, x):
    """{layer name: output} of every layer of a VGG without LRN, by hand."""
    p = {k: v.astype(np.float64) for k, v in model.state_dict().items()}
    out, x = {}, x.astype(np.float64)
    for name in model.layer_names():
        if name.startswith("conv"):
            W = p[name + ".weight"]
            x = np_conv(x, W, p[name + ".bias"], W.shape[2] // 2)
        elif name.startswith("relu"):
            x = np.maximum(x, 0)
        elif name.startswith("pool"):
            x = np_pool(x)
        elif name == "flatten":
            x = x.reshape(len(x), -1)
        elif name.startswith("fc"):
            x = x @ p[name + ".weight"].T + p[name + ".bias"]
        out[name] = x
    return out


@pytest.fixture
def images(rng):
    return rng.normal(0, 50, size=(3, 3, C, C)).astype(np.float32)


# ----------------------------------------------------------------------------------------
# One crop
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer", ["conv3_1", "pool5", "fc6", "fc7", "relu7", "fc8"])
def test_single_crop_features_match_a_numpy_forward(layer, images):
    model = tiny("A")
    expected = np_forward(model, images)[layer].reshape(len(images), -1)
    got = features.extract(model, images, layer, normalize=False)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert_close(got, expected, "model", np.float32, layer)


def test_fc7_is_before_its_relu_and_relu7_after(images):
    model = tiny("A")
    fc7 = features.extract(model, images, "fc7", normalize=False)
    relu7 = features.extract(model, images, "relu7", normalize=False)
    assert (fc7 < 0).any()
    np.testing.assert_array_equal(relu7, np.maximum(fc7, 0))


def test_normalize_gives_unit_rows_in_the_same_direction(images):
    model = tiny("D")
    raw = features.extract(model, images, "fc6", normalize=False)
    unit = features.extract(model, images, "fc6")
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(features.l2_normalize(np.zeros((2, 3))), np.zeros((2, 3)))


def test_flip_averages_with_the_mirrored_image(images):
    model = tiny("A")
    plain = features.extract(model, images, "fc7", normalize=False)
    mirrored = features.extract(model, images[:, :, :, ::-1].copy(), "fc7", normalize=False)
    both = features.extract(model, images, "fc7", flip=True, normalize=False)
    np.testing.assert_allclose(both, (plain + mirrored) / 2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(plain, mirrored)


def test_extract_leaves_a_training_model_in_training_mode(images):
    model = tiny("A").train()
    a = features.extract(model, images, "relu6")  # dropout would make these differ
    b = features.extract(model, images, "relu6")
    np.testing.assert_array_equal(a, b)
    assert model.training and model.drop6.training


# ----------------------------------------------------------------------------------------
# Dense, several scales (App. B)
# ----------------------------------------------------------------------------------------

def to_input(img):
    return img.transpose(2, 0, 1).astype(np.float32) - 110.0


@pytest.fixture
def photos(rng):
    """uint8 RGB images of two shapes (one not square)."""
    return [rng.integers(0, 256, (C, C, 3), dtype=np.uint8) for _ in range(2)] + \
           [rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)]


def test_dense_at_the_crop_size_equals_the_single_crop(photos):
    """A c×c image gives a 1×1 score map: dense fc7 is the crop's fc7."""
    model = tiny("A")
    square = photos[:2]
    dense = features.extract(model, square, "fc7", scales=[C], to_input=to_input,
                             normalize=False)
    crop = features.extract(model, np.stack([to_input(p) for p in square]), "fc7",
                            normalize=False)
    assert_close(dense, crop, "model", np.float32)


def test_dense_is_the_global_average_of_the_map_averaged_over_scales(photos):
    from minivgg.images import rescale_smallest_side
    from minivgg.evaluate import dense_crop
    model = tiny("D")
    fcn = to_fully_convolutional(model)
    scales = [C, 64]
    per_scale = []
    for q in scales:
        rows = []
        for img in photos:
            x = dense_crop(to_input(rescale_smallest_side(img, q)))
            with no_grad():
                m = fcn.activations(Tensor(x[None]), ["relu7"])["relu7"].numpy()
            assert m.ndim == 4
            rows.append(m.mean(axis=(2, 3))[0])
        per_scale.append(np.array(rows))
    assert per_scale[1].shape == (3, 8)
    mean = features.extract(model, photos, "relu7", scales=scales, to_input=to_input,
                            normalize=False)
    assert_close(mean, (per_scale[0] + per_scale[1]) / 2, "model", np.float32)
    stacked = features.extract(model, photos, "relu7", scales=scales, to_input=to_input,
                               normalize=False, combine="stack")
    assert_close(stacked, np.concatenate(per_scale, axis=1), "model", np.float32)
    normed = features.extract(model, photos, "relu7", scales=scales, to_input=to_input)
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, rtol=1e-6)


def test_dense_flip_and_conv_layers_on_any_size(photos):
    model = tiny("C")  # 1×1 convs in the stack
    one = features.extract(model, photos, "conv5_3", scales=[48], to_input=to_input,
                           normalize=False)
    mirrored = features.extract(model, [p[:, ::-1] for p in photos], "conv5_3", scales=[48],
                                to_input=to_input, normalize=False)
    both = features.extract(model, photos, "conv5_3", scales=[48], flip=True,
                            to_input=to_input, normalize=False)
    assert one.shape == (3, model.conv5_3.out_channels)
    np.testing.assert_allclose(both, (one + mirrored) / 2, rtol=1e-4, atol=1e-6)
    # dropout is the identity at test time; flatten's dense features are pool5's
    np.testing.assert_array_equal(
        features.extract(model, photos, "drop7", scales=[C], to_input=to_input),
        features.extract(model, photos, "relu7", scales=[C], to_input=to_input))


def test_dense_refuses_images_smaller_than_the_crop_for_fc_layers(photos):
    model = tiny("A")
    small = [np.zeros((20, 20, 3), np.uint8)]
    features.extract(model, [np.zeros((40, 40, 3), np.uint8)], "pool5", scales=[C],
                     to_input=to_input)
    with pytest.raises(ValueError, match="smaller than the 32x32 training crop"):
        features.extract(model, small, "fc7", scales=[16], to_input=to_input)


def test_dense_uses_the_models_recorded_preprocessing(photos):
    model = tiny("A")
    with pytest.raises(ValueError, match="no mean_rgb"):
        features.extract(model, photos, "fc7", scales=[C])
    model.pretrained_meta = {"mean_rgb": [110.0] * 3, "std_rgb": None}
    np.testing.assert_allclose(
        features.extract(model, photos, "fc7", scales=[C]),
        features.extract(model, photos, "fc7", scales=[C], to_input=to_input), rtol=1e-6)


# ----------------------------------------------------------------------------------------
# Mistakes
# ----------------------------------------------------------------------------------------

def test_a_bad_layer_name_lists_the_valid_ones(images):
    model = tiny("A-LRN")
    with pytest.raises(ValueError, match=r"no layer named 'fc9'.*valid names: conv1_1, "
                                         r"relu1_1, norm1, pool1, .*relu7, drop7, fc8$"):
        features.extract(model, images, "fc9")
    with pytest.raises(ValueError, match=r"no layer named 'conv6_1', 'x'; valid names: "):
        model.activations(images, ["conv6_1", "fc7", "x"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(scales=[0]), "scales must be positive integers"),
    (dict(scales=[32.5]), "scales must be positive integers"),
    (dict(combine="max"), "unknown combine 'max'"),
])
def test_bad_arguments_are_one_clear_error(kwargs, message, images):
    with pytest.raises(ValueError, match=message):
        features.extract(tiny("A"), images, "fc7", to_input=to_input, **kwargs)


def test_uint8_images_without_scales_are_refused_clearly():
    with pytest.raises(ValueError, match=r"expected a float array \(N, 3, H, W\).*scales="):
        features.extract(tiny("A"), np.zeros((1, C, C, 3), np.uint8), "fc7")


def test_fc_activations_check_the_input_size(images):
    with pytest.raises(ValueError, match="built for input_size=32"):
        tiny("A").activations(np.zeros((1, 3, 64, 64), np.float32), ["conv1_1", "fc6"])
    maps = tiny("A").activations(np.zeros((1, 3, 64, 64), np.float32), "pool5")
    assert maps["pool5"].shape == (1, 32, 2, 2)  # conv layers take any size


# ----------------------------------------------------------------------------------------
# activations(): several maps from one pass, gradients to the input
# ----------------------------------------------------------------------------------------

def test_activations_match_the_forward_and_the_numpy_forward(images):
    model = tiny("A")
    with no_grad():
        acts = model.activations(images, ["relu1_1", "conv4_2", "fc8"])
        logits = model(images)
    assert list(acts) == ["relu1_1", "conv4_2", "fc8"]
    np.testing.assert_array_equal(acts["fc8"].numpy(), logits.numpy())
    ref = np_forward(model, images)
    for name, t in acts.items():
        assert_close(t, ref[name], "model", np.float32, name)


def test_gradients_through_activations_reach_the_input(rng):
    """A style-loss-like objective on two maps at once: float64 central differences on 24
    random input pixels against the backward pass."""
    model = tiny("D", dtype=np.float64)
    x0 = rng.normal(0, 1, size=(1, 3, C, C))
    names = ["relu2_2", "conv4_1", "fc7"]
    shapes = {n: a.shape for n, a in model.activations(x0, names).items()}
    proj = {n: rng.normal(size=s) for n, s in shapes.items()}

    def loss(x):
        acts = model.activations(x, names)
        total = (acts[names[0]] * proj[names[0]]).sum()
        for n in names[1:]:
            total = total + (acts[n] * proj[n]).sum()
        return total

    x = Tensor(x0.copy(), requires_grad=True)
    loss(x).backward()
    grad = x.grad
    assert grad.shape == x0.shape and np.abs(grad).max() > 0
    flat = x0.reshape(-1)
    eps = 1e-6
    for i in rng.choice(flat.size, 24, replace=False):
        old = flat[i]
        flat[i] = old + eps
        with no_grad():
            plus = loss(Tensor(x0)).item()
        flat[i] = old - eps
        with no_grad():
            minus = loss(Tensor(x0)).item()
        flat[i] = old
        numeric = (plus - minus) / (2 * eps)
        np.testing.assert_allclose(grad.reshape(-1)[i], numeric, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------
# Trained weights: the 12-epoch reproduction study's A-s0 (docs/archive/)
# ----------------------------------------------------------------------------------------

def test_trained_features_separate_imagenette_classes_far_better_than_untrained(imagenette):
    """relu7 features of A-s0 (62% top-1 as a classifier) against an untrained A: a linear
    SVM on 20 val images per class, scored on 20 others. Measured: 57.5% and 25.5%."""
    import os
    svm = pytest.importorskip("sklearn.svm")
    from minivgg import data
    from minivgg.images import load_rgb, to_chw_float32
    from minivgg.pretrained import load_pretrained
    from conftest import REPO
    val = data.ImageFolder(os.path.join(imagenette, "val"), warn=False)
    idx = np.concatenate([np.flatnonzero(val.labels == c)[:40] for c in range(10)])
    images, y = [load_rgb(val.paths[i]) for i in idx], val.labels[idx]
    train = np.arange(len(idx)) % 40 < 20
    mean = np.array([124, 116, 104], np.float32)  # weights.npz records no mean colour

    def accuracy(model):
        X = features.extract(model, images, "relu7", scales=[72], flip=True,
                             to_input=lambda img: to_chw_float32(img, mean))
        clf = svm.LinearSVC(random_state=0).fit(X[train], y[train])
        return np.mean(clf.predict(X[~train]) == y[~train])

    trained = accuracy(load_pretrained(os.path.join(
        REPO, "docs", "archive", "reproduction-12-epochs", "A-s0", "weights.npz")))
    untrained = accuracy(models.vgg("A", 10, 0.25, 512, 64, init="glorot", seed=0))
    assert trained > 0.45 and trained > untrained + 0.15, (trained, untrained)
