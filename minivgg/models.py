"""The six VGG configurations of Table 1, as data, and the one factory that builds them.

Each configuration is a list of five blocks in the paper's own notation: "conv3-64" is a
3×3 convolution with 64 outputs (stride 1, padding 1), "conv1-256" a 1×1 convolution
(padding 0), "LRN" local response normalisation. Every block ends with a 2×2 max-pool and
every conv with a ReLU (Sec. 2.1), so neither is written in the table.
"""

from collections import OrderedDict

import numpy as np

from minivgg import backend
from minivgg import nn
from minivgg.tensor import as_tensor

# Table 1 (Sec. 2.2). One row per block: 64, 128, 256, 512, 512 channels.
CONFIGS = {
    "A": [["conv3-64"],
          ["conv3-128"],
          ["conv3-256", "conv3-256"],
          ["conv3-512", "conv3-512"],
          ["conv3-512", "conv3-512"]],
    "A-LRN": [["conv3-64", "LRN"],
              ["conv3-128"],
              ["conv3-256", "conv3-256"],
              ["conv3-512", "conv3-512"],
              ["conv3-512", "conv3-512"]],
    "B": [["conv3-64", "conv3-64"],
          ["conv3-128", "conv3-128"],
          ["conv3-256", "conv3-256"],
          ["conv3-512", "conv3-512"],
          ["conv3-512", "conv3-512"]],
    "C": [["conv3-64", "conv3-64"],
          ["conv3-128", "conv3-128"],
          ["conv3-256", "conv3-256", "conv1-256"],
          ["conv3-512", "conv3-512", "conv1-512"],
          ["conv3-512", "conv3-512", "conv1-512"]],
    "D": [["conv3-64", "conv3-64"],
          ["conv3-128", "conv3-128"],
          ["conv3-256", "conv3-256", "conv3-256"],
          ["conv3-512", "conv3-512", "conv3-512"],
          ["conv3-512", "conv3-512", "conv3-512"]],
    "E": [["conv3-64", "conv3-64"],
          ["conv3-128", "conv3-128"],
          ["conv3-256", "conv3-256", "conv3-256", "conv3-256"],
          ["conv3-512", "conv3-512", "conv3-512", "conv3-512"],
          ["conv3-512", "conv3-512", "conv3-512", "conv3-512"]],
}

# torchvision's names for the same nets.
ALIASES = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}


def canonical_config(config):
    """'vgg16' -> 'D', 'a-lrn' -> 'A-LRN'; a clear error for anything else."""
    name = ALIASES.get(str(config).lower(), str(config).upper())
    if name not in CONFIGS:
        known = ", ".join(list(CONFIGS) + list(ALIASES))
        raise ValueError(f"unknown VGG configuration {config!r}; expected one of {known}")
    return name


def parse_layer(spec):
    """'conv3-256' -> ('conv', 3, 256); 'LRN' -> ('lrn', None, None)."""
    if spec == "LRN":
        return "lrn", None, None
    kind, channels = spec.split("-")
    if kind not in ("conv1", "conv3"):
        raise ValueError(f"unknown layer {spec!r} in a VGG configuration")
    return "conv", int(kind[4:]), int(channels)


def pooled_size(size, blocks=5, ceil_mode=False):
    """Spatial size after `blocks` 2×2/s2 max-pools, e.g. 224 -> 7, 64 -> 2, 72 -> 2.

    Floor mode (default) drops an odd last row at each pool; ceil mode (Caffe) keeps it as
    a half window, e.g. 72 -> 36 -> 18 -> 9 -> 5 -> 3.
    """
    for _ in range(blocks):
        size = (size + 1) // 2 if ceil_mode else size // 2
    return size


class VGG(nn.Sequential):
    """A VGG net: conv blocks, fc6, fc7, fc8, with the Caffe release's layer names.

    `config` names the column of Table 1; `width` scales every conv's channel count and
    `fc_width` sets fc6/fc7's width (the paper: 1.0 and 4096). The logits are returned
    before the soft-max; `minivgg.functional.cross_entropy` applies it.

    `ceil_mode` switches all five max-pools to Caffe's ceil mode (a partial window at the
    bottom/right when a side is odd), for nets trained that way, such as the authors' Caffe
    release; minivgg trains in floor mode. It is a settable attribute: `model.ceil_mode =
    True` switches every pool at once. At the training crop (a multiple of 32) the two modes
    give the same result; they differ on other image sizes (dense evaluation, Sec. 3.2).

    `pretrained_meta` is None for a net built here; `minivgg.pretrained.load_pretrained`
    sets it to a dict saying how the loaded weights expect their input: `mean_rgb` and
    `std_rgb` (x = (pixel - mean_rgb) / std_rgb on 0-255 RGB; std_rgb None: no division),
    `layout` ("caffe", "torchvision", "timm", "checkpoint"), `pool_ceil_mode` and, for a
    training checkpoint, `classes`.
    """

    def __init__(self, config="D", num_classes=1000, width=1.0, fc_width=4096,
                 input_size=224, dropout=0.5, dtype=np.float32, ceil_mode=False):
        config = canonical_config(config)
        for name, value in (("num_classes", num_classes), ("fc_width", fc_width),
                            ("input_size", input_size)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise TypeError(f"vgg: {name} must be an int, got {value!r}")
        if width <= 0 or fc_width < 1 or num_classes < 1:
            raise ValueError(f"vgg: width, fc_width and num_classes must be positive, got "
                             f"width={width}, fc_width={fc_width}, num_classes={num_classes}")
        side = pooled_size(input_size, ceil_mode=ceil_mode)
        if side < 1:
            raise ValueError(f"vgg: input_size must be at least 32 (five 2×2 pools), "
                             f"got {input_size}")
        layers, in_ch = OrderedDict(), 3
        for b, block in enumerate(CONFIGS[config], start=1):
            i = 0
            for spec in block:
                kind, k, channels = parse_layer(spec)
                if kind == "lrn":
                    layers[f"norm{b}"] = nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0)
                    continue
                i += 1
                out_ch = max(1, int(round(channels * width)))
                layers[f"conv{b}_{i}"] = nn.Conv2d(in_ch, out_ch, k, 1, k // 2, dtype=dtype)
                layers[f"relu{b}_{i}"] = nn.ReLU()
                in_ch = out_ch
            layers[f"pool{b}"] = nn.MaxPool2d(2, 2)
        layers["flatten"] = nn.Flatten()
        layers["fc6"] = nn.Linear(in_ch * side * side, fc_width, dtype=dtype)
        layers["relu6"] = nn.ReLU()
        layers["drop6"] = nn.Dropout(dropout)
        layers["fc7"] = nn.Linear(fc_width, fc_width, dtype=dtype)
        layers["relu7"] = nn.ReLU()
        layers["drop7"] = nn.Dropout(dropout)
        layers["fc8"] = nn.Linear(fc_width, num_classes, dtype=dtype)
        super().__init__(layers)
        self.config, self.input_size, self.num_classes = config, input_size, num_classes
        self.width, self.fc_width = width, fc_width
        self.ceil_mode = ceil_mode
        self.pretrained_meta = None  # set by minivgg.pretrained when weights are loaded

    @property
    def ceil_mode(self):
        """True when the max-pools run in Caffe's ceil mode (see the class docstring)."""
        return self.pools()[0].ceil_mode

    @ceil_mode.setter
    def ceil_mode(self, value):
        for pool in self.pools():
            pool.ceil_mode = bool(value)

    def pools(self):
        return [m for _, m in self.named_children() if isinstance(m, nn.MaxPool2d)]

    def forward(self, x):
        """Logits (N, num_classes) of images x (N, 3, H, W), checked against fc6 first."""
        x = as_tensor(x)
        if x.ndim == 4:
            self._check_fc6_input(x.shape)
        return super().forward(x)

    def activations(self, x, names):
        """{name: Tensor} of several layers at once ('conv3_1', 'relu5_3', 'fc7', ...), with
        gradients flowing back to x; see `nn.Sequential.activations`."""
        x = as_tensor(x)
        names = [names] if isinstance(names, str) else list(names)
        order = self.layer_names()
        if x.ndim == 4 and any(n in order and order.index(n) >= order.index("fc6")
                               for n in names):
            self._check_fc6_input(x.shape)
        return super().activations(x, names)

    def _check_fc6_input(self, shape):
        """Fail before the conv stack runs when fc6 could not take what it would produce."""
        H, W = shape[2], shape[3]
        if min(H, W) < 32:
            raise ValueError(f"VGG-{self.config}: input shape {tuple(shape)} is smaller than "
                             f"32x32, the least that five 2x2 max-pools accept")
        C = self.conv_layers()[-1][1].out_channels
        ceil = self.ceil_mode
        h, w = pooled_size(H, ceil_mode=ceil), pooled_size(W, ceil_mode=ceil)
        side = pooled_size(self.input_size, ceil_mode=ceil)
        if C * h * w != self.fc6.in_features:
            raise ValueError(
                f"fc6: input shape {tuple(shape)} reaches fc6 as {C}x{h}x{w} = {C * h * w} "
                f"features, but this VGG-{self.config} was built for input_size="
                f"{self.input_size} (fc6 weight shape {self.fc6.weight.shape} expects "
                f"{C}x{side}x{side}); resize the images or build the model with "
                f"input_size={H}")

    def conv_layers(self):
        return [(k, m) for k, m in self.named_children() if isinstance(m, nn.Conv2d)]

    def fc_layers(self):
        return [(k, m) for k, m in self.named_children() if isinstance(m, nn.Linear)]


def vgg(config, num_classes=1000, width=1.0, fc_width=4096, input_size=224, init="gaussian",
        dropout=0.5, dtype=np.float32, seed=None, ceil_mode=False):
    """Build configuration `config` ("A", "A-LRN", "B", "C", "D", "E" or vgg11/13/16/19).

    With the defaults `num_parameters()` equals Table 2 exactly (D: 138,357,544).
    `init` is "gaussian" (Sec. 3.1, sigma = 0.01) or "glorot"; see `init_weights`.
    `ceil_mode`: Caffe-style pooling, see `VGG`.
    """
    model = VGG(config, num_classes, width, fc_width, input_size, dropout, dtype, ceil_mode)
    init_weights(model, init, seed=seed)
    return model


# ----------------------------------------------------------------------------------------
# Initialisation (Sec. 3.1)
# ----------------------------------------------------------------------------------------

GAUSSIAN_STD = 0.01


def init_weights(model, method="gaussian", seed=None):
    """Initialise every conv and FC weight in place; biases become zero.

    "gaussian": N(0, sigma=0.01). The paper says "zero mean and 10^-2 variance"; we read
    10^-2 as the standard deviation, as the Caffe-era ports, Chainer and torchvision's FC
    init do (a variance of 10^-2 would be sigma = 0.1, which makes a deep ReLU net's
    activations explode).
    "glorot": Glorot & Bengio (2010) uniform, U(-a, a) with a = sqrt(6 / (fan_in + fan_out)),
    fan = channels × kernel area. The paper's authors found it trains deep nets without the
    warm start from A.
    """
    rng = backend.rng() if seed is None else np.random.default_rng(seed)
    for name, layer in model.named_modules():
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        W = layer.weight
        shape, dtype = W.shape, W.dtype
        if method == "gaussian":
            value = rng.normal(0.0, GAUSSIAN_STD, size=shape)
        elif method == "glorot":
            receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
            fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
            a = np.sqrt(6.0 / (fan_in + fan_out))
            value = rng.uniform(-a, a, size=shape)
        else:
            raise ValueError(f"unknown init {method!r}: expected 'gaussian' or 'glorot'")
        W.data = backend.to_device(value.astype(dtype), W.device)
        if layer.bias is not None:
            layer.bias.data = backend.array_module(layer.bias.data).zeros_like(layer.bias.data)
    return model


# The layers a deeper net takes from a trained net A (Sec. 3.1): "the first four
# convolutional layers and the last three fully-connected layers". We match them by name:
# A's first four convs are conv1_1, conv2_1, conv3_1 and conv3_2, and the layers of the same
# names in B-E have the same shapes (e.g. conv3_2 is 256 -> 256 in every column).
WARM_START_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8")


def init_from_a(model, a_state):
    """Warm-start `model` from a trained A's state_dict (Sec. 3.1); the rest stays as is.

    Returns the list of copied layer names. Shapes are checked before anything is copied.
    """
    own = dict(model.named_parameters())
    copies, problems = {}, []
    for layer in WARM_START_LAYERS:
        for part in ("weight", "bias"):
            key = f"{layer}.{part}"
            if key not in a_state:
                problems.append(f"{key} is missing from net A's state")
                continue
            if key not in own:
                problems.append(f"{key} is missing from the target model")
                continue
            src_shape, dst_shape = tuple(np.shape(a_state[key])), own[key].shape
            if src_shape != dst_shape:
                problems.append(f"{key}: net A has shape {src_shape}, target has {dst_shape}")
                continue
            copies[key] = a_state[key]
    if problems:
        raise ValueError("init_from_a: " + "; ".join(problems))
    for key, value in copies.items():
        p = own[key]
        p.data = backend.to_device(np.array(backend.to_numpy(value), dtype=p.dtype), p.device)
    return list(WARM_START_LAYERS)
