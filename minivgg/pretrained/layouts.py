"""torchvision's and timm's key layouts of a VGG, derived from Table 1, in both directions.

torchvision stores a VGG as two `nn.Sequential`s, so its state_dict keys are positions:

    features.{i}.weight / .bias     the i-th module of `features` (conv, ReLU or max-pool)
    classifier.{0,3,6}.weight/bias  fc6, fc7, fc8 (1, 2, 4, 5 are ReLU and Dropout)

timm (`vgg11/13/16/19.tv_in1k` on the Hugging Face hub) keeps the same `features` but stores
the first two FC layers as convolutions, the fully-convolutional form of Sec. 3.2:

    pre_logits.fc1.weight  (4096, 512, 7, 7)    fc6 as a 7×7 convolution
    pre_logits.fc2.weight  (4096, 4096, 1, 1)   fc7 as a 1×1 convolution
    head.fc.weight         (1000, 4096)         fc8

minivgg names the same layers as the original Caffe release (conv1_1 ... conv5_4, fc6, fc7,
fc8). `torchvision_key_map(config)` derives the correspondence from the Table 1 data in
`minivgg.models.CONFIGS` by replaying torchvision's `make_layers` (each conv adds two
modules, conv and ReLU; each block's max-pool adds one), so no index table is written out.

NOTE: a conv weight (out, C, KH, KW) flattens in the same (C, H, W) order as pool5's output
does before fc6, so timm's fc1 becomes minivgg's fc6 by a plain reshape, and back.
NOTE: these weights expect torchvision's preprocessing (RGB in [0, 1], then per-channel
mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225)), not the paper's mean-RGB
subtraction on 0-255 pixels (Sec. 2.1): `TORCHVISION_INPUT` says so on the 0-255 scale.
NOTE: torchvision's VGG has an `AdaptiveAvgPool2d((7, 7))` before the classifier that the
paper does not have. At 224×224 the last pool already gives 7×7, so it is the identity and
the imported model matches torchvision exactly there. For other sizes use dense evaluation
(Sec. 3.2), which turns fc6-fc8 into convolutions.
"""

import math
from collections import OrderedDict

import numpy as np

from minivgg import backend
from minivgg.models import ALIASES, CONFIGS, VGG, canonical_config, parse_layer

# The configurations torchvision and timm publish weights for (vgg11 ... vgg19).
TORCHVISION_NAMES = {config: name for name, config in ALIASES.items()}  # "D" -> "vgg16"

# Where the real files come from (downloaded by the user; nothing is fetched here).
TORCHVISION_URLS = {
    "A": "https://download.pytorch.org/models/vgg11-8a719046.pth",
    "B": "https://download.pytorch.org/models/vgg13-19584684.pth",
    "D": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "E": "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
}
TIMM_HUB_NAMES = {c: f"timm/{n}.tv_in1k" for c, n in TORCHVISION_NAMES.items()}

# torchvision's (and timm's) input normalisation, restated on the 0-255 pixel scale that
# minivgg's data pipeline uses: x = (pixel - mean_rgb) / std_rgb.
TORCHVISION_INPUT = {"mean_rgb": [255 * m for m in (0.485, 0.456, 0.406)],
                     "std_rgb": [255 * s for s in (0.229, 0.224, 0.225)]}

LAYOUTS = ("torchvision", "timm")


# ----------------------------------------------------------------------------------------
# Key correspondence, derived from Table 1
# ----------------------------------------------------------------------------------------

def _check_supported(config):
    """The canonical name of a config torchvision has weights for, or a clear error."""
    text = str(config)
    if text.lower().endswith("_bn"):
        raise ValueError(f"{text}: the batch-norm variants (vgg11_bn ... vgg19_bn) are not "
                         "supported: the paper's nets have no batch normalisation")
    name = canonical_config(text)
    if name not in TORCHVISION_NAMES:
        raise ValueError(f"torchvision publishes no weights for configuration {name}; "
                         f"it has {', '.join(f'{c} ({n})' for c, n in TORCHVISION_NAMES.items())}")
    return name


def _feature_keys(name):
    """[(features.{i}, conv{b}_{j})] in order: torchvision's `make_layers` replayed."""
    pairs, i = [], 0
    for b, block in enumerate(CONFIGS[name], start=1):
        for j, spec in enumerate(block, start=1):
            kind, _, _ = parse_layer(spec)
            assert kind == "conv", "A, B, D and E hold only convolutions"
            pairs.append((f"features.{i}", f"conv{b}_{j}"))
            i += 2  # Conv2d, ReLU
        i += 1  # MaxPool2d
    return pairs


# The classifier's module names in each layout, for fc6, fc7, fc8.
_CLASSIFIER_KEYS = {
    "torchvision": ("classifier.0", "classifier.3", "classifier.6"),  # Linear, ReLU, Dropout
    "timm": ("pre_logits.fc1", "pre_logits.fc2", "head.fc"),
}


def key_map(config, layout="torchvision"):
    """OrderedDict {file key: minivgg key} for configuration A, B, D or E in `layout`."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown weight layout {layout!r}; expected one of {LAYOUTS}")
    name = _check_supported(config)
    modules = _feature_keys(name) + list(zip(_CLASSIFIER_KEYS[layout], ("fc6", "fc7", "fc8")))
    return OrderedDict((f"{theirs}.{part}", f"{ours}.{part}")
                       for theirs, ours in modules for part in ("weight", "bias"))


def torchvision_key_map(config):
    """OrderedDict {torchvision key: minivgg key} for configuration A, B, D or E.

    Replays torchvision's `make_layers` over Table 1: a conv occupies `features.{i}` and its
    ReLU `features.{i+1}`; the max-pool closing a block takes one more index.
    """
    return key_map(config, "torchvision")


def timm_key_map(config):
    """OrderedDict {timm key: minivgg key}: torchvision's features, timm's conv head."""
    return key_map(config, "timm")


def guess_layout(state):
    """(layout, config) whose key map matches `state`'s keys exactly, or (None, None)."""
    keys = set(state)
    for layout in LAYOUTS:
        for name in TORCHVISION_NAMES:
            if set(key_map(name, layout)) == keys:
                return layout, name
    return None, None


def guess_config(state):
    """The config (A, B, D or E) whose torchvision or timm keys match `state`, or None."""
    return guess_layout(state)[1]


# ----------------------------------------------------------------------------------------
# Reading: a torchvision- or timm-layout state_dict -> a minivgg VGG
# ----------------------------------------------------------------------------------------

def _check_state(state, config, layout):
    """The key map of (config, layout) after checking every key: errors that say what to do."""
    if any(k.endswith(("running_mean", "running_var")) for k in state):
        raise ValueError(f"{config}: this file holds batch-norm statistics (a vgg*_bn "
                         "model); the batch-norm variants are not supported")
    name = _check_supported(config)
    mapping = key_map(name, layout)
    missing = [k for k in mapping if k not in state]
    unexpected = [k for k in state if k not in mapping]
    if missing or unexpected:
        guess = guess_config(state)
        hint = (f"; the keys match configuration {guess} ({TORCHVISION_NAMES[guess]}): "
                f"pass config={guess!r}" if guess else "")
        raise ValueError(f"configuration {name} ({TORCHVISION_NAMES[name]}): "
                         f"missing keys {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                         f"unexpected keys {unexpected[:6]}"
                         f"{'...' if len(unexpected) > 6 else ''}{hint}")
    return name, mapping


def _as_minivgg_arrays(state, mapping):
    """{minivgg key: array}, with timm's conv fc6/fc7 weights flattened to matrices."""
    out = OrderedDict()
    for theirs, ours in mapping.items():
        value = np.asarray(state[theirs])
        if ours in ("fc6.weight", "fc7.weight", "fc8.weight") and value.ndim == 4:
            value = value.reshape(value.shape[0], -1)  # (out, C, KH, KW) -> (out, C*KH*KW)
        out[ours] = value
    return out


def model_sizes(arrays, where="weights"):
    """VGG(...) size arguments read from minivgg-named arrays: width, fc_width, classes, input.

    width = conv1_1's outputs / 64 (Table 1); fc6 has C×p×p inputs for pool5's C channels
    and p×p map, so the input size is 32·p (224 for p = 7, five 2×2 pools).
    """
    conv1, fc6, fc8 = (np.shape(arrays[k]) for k in ("conv1_1.weight", "fc6.weight",
                                                     "fc8.weight"))
    last_conv = [k for k in arrays if k.startswith("conv") and k.endswith(".weight")][-1]
    channels = np.shape(arrays[last_conv])[0]
    if len(fc6) != 2 or len(fc8) != 2:
        raise ValueError(f"{where}: fc6 and fc8 weights must be matrices, got shapes "
                         f"{fc6} and {fc8}")
    p = math.isqrt(fc6[1] // channels) if fc6[1] % channels == 0 else 0
    if p < 1 or channels * p * p != fc6[1]:
        raise ValueError(f"{where}: fc6 has {fc6[1]} inputs, which is not the {channels} "
                         f"channels of {last_conv.split('.')[0]} times a square map p×p")
    return {"width": conv1[0] / 64, "fc_width": fc6[0], "num_classes": fc8[0],
            "input_size": 32 * p}


def build_model(config, arrays, where, dtype=np.float32, file_keys=None):
    """A VGG of `config` sized by `arrays` (minivgg names), holding them, in eval mode.

    Every shape is checked against the model Table 1 builds for those sizes first; an error
    names the layers and both shapes (`file_keys` maps our names back to the file's).
    """
    model = VGG(config, dtype=dtype, **model_sizes(arrays, where))
    own = dict(model.named_parameters())
    problems = []
    for key, value in arrays.items():
        got, want = tuple(np.shape(value)), own[key].shape
        if got != want:
            label = f"{file_keys[key]} ({key})" if file_keys else key
            problems.append(f"{label}: file has shape {got}, configuration {config} "
                            f"expects {want}")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems[:4])
                         + ("..." if len(problems) > 4 else "")
                         + " (these shapes fit no Table 1 column at one width)")
    model.load_state_dict(arrays)
    return model.eval()  # dropout off: these are trained weights


def from_state_dict(state, config=None, layout=None, dtype=np.float32, device="cpu"):
    """A minivgg `VGG` holding a torchvision- or timm-layout state_dict, in eval mode.

    `config` and `layout` are read from the keys when not given. The conv width, the FC
    width, `num_classes` and the input size are read from the arrays (1.0, 4096, 1000 and
    224 for the published files); every shape is then checked against the model that
    Table 1 builds.
    """
    guessed_layout, guessed = guess_layout(state)
    layout = layout or guessed_layout or "torchvision"
    if config is None:
        if guessed is None:
            if any(k.endswith(("running_mean", "running_var")) for k in state):
                _check_state(state, "vgg_bn", layout)
            raise ValueError(f"the keys ({', '.join(list(state)[:4])}, ...) match neither "
                             "torchvision's nor timm's VGG-11/13/16/19; pass config=")
        config = guessed
    name, mapping = _check_state(state, config, layout)
    arrays = _as_minivgg_arrays(state, mapping)
    inverse = {ours: theirs for theirs, ours in mapping.items()}
    try:
        model = build_model(name, arrays, f"{layout} weights", dtype, inverse)
    except ValueError as e:
        if guessed and guessed != name:
            raise ValueError(f"{e} (is this the right configuration? the file's keys match "
                             f"{guessed})") from e
        raise
    model.pretrained_meta = dict(TORCHVISION_INPUT, layout=layout, pool_ceil_mode=False)
    return model.to(device) if device != "cpu" else model


def from_torchvision_state_dict(state, config, dtype=np.float32, device="cpu"):
    """A minivgg `VGG` holding the arrays of a torchvision-layout state_dict, in eval mode."""
    return from_state_dict(state, config, "torchvision", dtype, backend.check_device(device))


# ----------------------------------------------------------------------------------------
# Writing: a minivgg VGG -> torchvision's (or timm's) keys
# ----------------------------------------------------------------------------------------

def to_state_dict(model, layout="torchvision"):
    """OrderedDict {file key: float array} of `model` in torchvision's (or timm's) layout.

    The result loads into `torchvision.models.vgg16()` (after `torch.from_numpy`) when the
    model has its sizes: width 1, fc_width 4096, 1000 classes, input 224 (fc6 7×7).
    """
    if model.config not in TORCHVISION_NAMES:
        raise ValueError(f"torchvision and timm have no layout for configuration "
                         f"{model.config}: only A, B, D and E (vgg11/13/16/19)")
    state = model.state_dict()
    out = OrderedDict()
    for theirs, ours in key_map(model.config, layout).items():
        value = state[ours]
        if layout == "timm" and ours in ("fc6.weight", "fc7.weight"):
            p = 1 if ours == "fc7.weight" else math.isqrt(value.shape[1] // _pool5(model))
            value = value.reshape(value.shape[0], -1, p, p)  # back to a conv weight
        out[theirs] = np.ascontiguousarray(value)
    return out


def _pool5(model):
    """Channels of the last conv, i.e. of pool5's output."""
    return model.conv_layers()[-1][1].out_channels
