"""Bad input gets a ValueError or TypeError that names the layer (or op) and the shapes."""

import re

import numpy as np
import pytest

from minivgg import Tensor, functional as F, models, nn
from conftest import tensor


@pytest.fixture(scope="module")
def model():
    return models.vgg("A", num_classes=10, width=1 / 16, fc_width=8, input_size=32, seed=0)


def shapes_in(message, *shapes):
    return all(str(tuple(s)) in message for s in shapes)


# ----------------------------------------------------------------------------------------
# Images into a VGG
# ----------------------------------------------------------------------------------------

def test_wrong_channel_count_names_conv1_1_and_both_shapes(model):
    x = np.zeros((2, 4, 32, 32), np.float32)
    with pytest.raises(ValueError) as e:
        model(x)
    msg = str(e.value)
    assert "conv1_1" in msg and "4 channels" in msg and "expects 3" in msg
    assert shapes_in(msg, (2, 4, 32, 32), (4, 3, 3, 3))


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 2, 3, 32, 32), (32,)])
def test_wrong_rank_names_the_layer_and_both_shapes(model, shape):
    with pytest.raises(ValueError) as e:
        model(np.zeros(shape, np.float32))
    msg = str(e.value)
    assert "conv1_1" in msg and "4-d input (N, C, H, W)" in msg
    assert shapes_in(msg, shape, (4, 3, 3, 3))


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.bool_])
def test_integer_images_raise_type_error_naming_layer_dtype_and_shape(model, dtype):
    with pytest.raises(TypeError) as e:
        model(np.zeros((1, 3, 32, 32), dtype))
    msg = str(e.value)
    assert "conv1_1" in msg and np.dtype(dtype).name in msg and "floating-point" in msg
    assert shapes_in(msg, (1, 3, 32, 32))


def test_float64_images_into_float32_model_name_both_dtypes(model):
    with pytest.raises(TypeError, match=r"conv1_1: input dtype float64 differs from weight "
                                        r"dtype float32"):
        model(np.zeros((1, 3, 32, 32)))


def test_image_of_other_size_says_which_input_size_the_model_was_built_for(model):
    with pytest.raises(ValueError) as e:
        model(np.zeros((2, 3, 64, 64), np.float32))
    msg = str(e.value)
    assert "fc6" in msg and "input_size=32" in msg and "input_size=64" in msg
    assert shapes_in(msg, (2, 3, 64, 64), model.fc6.weight.shape)


def test_image_smaller_than_32_is_rejected_before_the_conv_stack(model):
    with pytest.raises(ValueError, match=r"\(1, 3, 16, 16\) is smaller than 32x32"):
        model(np.zeros((1, 3, 16, 16), np.float32))


def test_wrong_feature_count_into_an_fc_layer_names_it(model):
    with pytest.raises(ValueError) as e:
        model.fc7(np.zeros((2, 9), np.float32))
    msg = str(e.value)
    assert msg.startswith("fc7:") and shapes_in(msg, (2, 9), (8, 8))


def test_pool_layer_input_smaller_than_window_names_the_layer(model):
    with pytest.raises(ValueError, match=r"pool1: input shape \(1, 4, 1, 5\) is smaller than "
                                         r"the 2x2 window"):
        model.pool1(np.zeros((1, 4, 1, 5), np.float32))


# ----------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------

LOGITS = np.zeros((3, 10), np.float32)


@pytest.mark.parametrize("labels, shown", [([0, 10, 2], "max 10"), ([-1, 0, 2], "min -1")])
def test_labels_out_of_range_name_the_range_and_logits_shape(labels, shown):
    with pytest.raises(ValueError) as e:
        F.cross_entropy(LOGITS, np.array(labels))
    msg = str(e.value)
    assert "[0, 10)" in msg and shown in msg and shapes_in(msg, (3, 10))


@pytest.mark.parametrize("labels", [np.zeros((3, 1), np.int64), np.zeros(2, np.int64),
                                    np.zeros((), np.int64)])
def test_labels_of_wrong_shape_name_both_shapes(labels):
    with pytest.raises(ValueError) as e:
        F.cross_entropy(LOGITS, labels)
    msg = str(e.value)
    assert "(3,)" in msg and shapes_in(msg, (3, 10), labels.shape)


def test_float_labels_raise_type_error():
    with pytest.raises(TypeError, match="labels must be an integer array.*float32"):
        F.cross_entropy(LOGITS, np.zeros(3, np.float32))


def test_logits_of_wrong_rank_are_rejected():
    with pytest.raises(ValueError, match=r"cross_entropy: expected a 2-d input.*\(3, 10, 1\)"):
        F.cross_entropy(np.zeros((3, 10, 1), np.float32), np.zeros(3, np.int64))


# ----------------------------------------------------------------------------------------
# state_dict
# ----------------------------------------------------------------------------------------

def test_load_state_dict_names_missing_unexpected_and_mismatched_keys(model):
    state = model.state_dict()
    del state["fc8.bias"]
    state["fc9.weight"] = np.zeros((3, 3), np.float32)
    state["conv2_1.weight"] = np.zeros((8, 4, 1, 1), np.float32)
    before = model.state_dict()
    with pytest.raises(ValueError) as e:
        model.load_state_dict(state)
    msg = str(e.value)
    assert "missing keys: ['fc8.bias']" in msg
    assert "unexpected keys: ['fc9.weight']" in msg
    assert "conv2_1.weight" in msg and shapes_in(msg, (8, 4, 1, 1), (8, 4, 3, 3))
    for k, v in model.state_dict().items():  # nothing was copied
        np.testing.assert_array_equal(v, before[k])


def test_load_state_dict_non_strict_allows_missing_but_never_shape_mismatch(model):
    state = {"fc8.bias": np.ones(10, np.float32)}
    fresh = models.vgg("A", num_classes=10, width=1 / 16, fc_width=8, input_size=32, seed=1)
    fresh.load_state_dict(state, strict=False)
    np.testing.assert_array_equal(fresh.fc8.bias.data, np.ones(10))
    with pytest.raises(ValueError, match=r"fc8\.bias: checkpoint shape \(4,\)"):
        fresh.load_state_dict({"fc8.bias": np.ones(4)}, strict=False)


# ----------------------------------------------------------------------------------------
# Op arguments
# ----------------------------------------------------------------------------------------

X = np.zeros((1, 2, 5, 5), np.float32)
W = np.zeros((3, 2, 3, 3), np.float32)


@pytest.mark.parametrize("kwargs, error, text", [
    (dict(stride=0), ValueError, "stride must be >= 1"),
    (dict(stride=(1, -2)), ValueError, "stride must be >= 1"),
    (dict(padding=-1), ValueError, "padding >= 0"),
    (dict(stride=1.5), TypeError, "stride must be an int or a pair of ints, got 1.5"),
    (dict(padding=(1, 2, 3)), TypeError, "padding must be an int or a pair"),
    (dict(stride="2"), TypeError, "stride must be an int"),
])
def test_bad_stride_or_padding_is_rejected(kwargs, error, text):
    with pytest.raises(error, match=re.escape(text)):
        F.conv2d(X, W, **kwargs)


def test_bad_stride_in_a_layer_names_the_layer():
    layer = nn.Sequential({"conv9_9": nn.Conv2d(2, 3, 3, stride=0)})
    with pytest.raises(ValueError, match="conv9_9: stride must be >= 1"):
        layer(X)


def test_image_smaller_than_kernel_names_both_shapes():
    with pytest.raises(ValueError) as e:
        F.conv2d(np.zeros((1, 2, 2, 4), np.float32), W)
    msg = str(e.value)
    assert "smaller than the kernel 3x3" in msg
    assert shapes_in(msg, (1, 2, 2, 4), (3, 2, 3, 3))


def test_conv_bias_of_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\).*got \(2,\)"):
        F.conv2d(X, W, np.zeros(2, np.float32))


def test_linear_with_wrong_features_names_both_shapes():
    with pytest.raises(ValueError, match=r"linear: input has 4 features but the weight "
                                         r"expects 5 \(input shape \(2, 4\), weight shape "
                                         r"\(3, 5\)\)"):
        F.linear(np.zeros((2, 4)), np.zeros((3, 5)))


@pytest.mark.parametrize("kwargs, text", [(dict(kernel_size=0), "kernel_size and stride"),
                                          (dict(kernel_size=2, stride=0), "kernel_size and"),
                                          (dict(kernel_size=6), "smaller than the 6x6")])
def test_bad_pool_arguments_are_rejected(kwargs, text):
    with pytest.raises(ValueError, match=text):
        F.max_pool2d(X, **kwargs)


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_dropout_probability_outside_0_1_is_rejected(p):
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        F.dropout(Tensor(np.ones(3)), p)
    with pytest.raises(ValueError, match=r"^drop6: p must be in"):
        F.dropout(Tensor(np.ones(3)), p, where="drop6")


def test_lrn_size_below_one_is_rejected():
    with pytest.raises(ValueError, match="size must be >= 1"):
        F.local_response_norm(X, size=0)


def test_sequential_of_a_non_module_is_a_type_error():
    with pytest.raises(TypeError, match="'1' is a function, not a Module"):
        nn.Sequential(nn.ReLU(), lambda x: x)


# ----------------------------------------------------------------------------------------
# Configurations and devices
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["F", "vgg15", "", "A_LRN"])
def test_unknown_config_lists_the_known_ones(name):
    with pytest.raises(ValueError, match=r"unknown VGG configuration.*A, A-LRN, B, C, D, E"):
        models.vgg(name, width=1 / 16, fc_width=8, input_size=32)


@pytest.mark.parametrize("kwargs, text", [(dict(width=0), "width"),
                                          (dict(fc_width=0), "fc_width"),
                                          (dict(num_classes=0), "num_classes"),
                                          (dict(input_size=31), "at least 32")])
def test_bad_model_sizes_are_rejected(kwargs, text):
    args = dict(width=1 / 16, fc_width=8, input_size=32) | kwargs
    with pytest.raises(ValueError, match=text):
        models.VGG("A", **args)


def test_unknown_device_is_rejected(device):
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        tensor(np.ones(2), device).to("tpu")


@pytest.mark.parametrize("kwargs, text", [(dict(input_size=224.0), "input_size must be an int"),
                                          (dict(fc_width="8"), "fc_width must be an int")])
def test_non_integer_model_sizes_are_type_errors(kwargs, text):
    args = dict(width=1 / 16, fc_width=8, input_size=32) | kwargs
    with pytest.raises(TypeError, match=text):
        models.VGG("A", **args)


def test_dropout_layer_rejects_bad_p_when_built():
    with pytest.raises(ValueError, match=r"Dropout: p must be in \[0, 1\), got 1.2"):
        nn.Dropout(1.2)
