"""Layers: `Module`s that hold `Parameter`s and call `minivgg.functional`.

A `Module` finds its parameters and sub-modules by looking at its attributes, as in PyTorch,
so `state_dict()` keys read like the original Caffe release: `conv1_1.weight`, `fc6.bias`.
"""

import contextlib
from collections import OrderedDict

import numpy as np

from minivgg import backend
from minivgg import functional as F
from minivgg.fused import conv2d_relu, relu_max_pool2d
from minivgg.tensor import Tensor


class Parameter(Tensor):
    """A tensor that a `Module` owns and an optimizer updates (requires_grad=True)."""

    def __init__(self, data, dtype=None):
        super().__init__(data, requires_grad=True, dtype=dtype)

    def __repr__(self):
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, device={self.device})"


_shapes_only = False


@contextlib.contextmanager
def shapes_only():
    """Build layers whose parameters have their shapes but hold no memory, as PyTorch's
    "meta" device does: for layer tables (`minivgg.summary`) of nets too big to hold.

    Inside the block, `Conv2d` and `Linear` get read-only zero-stride views of one zero
    (`np.broadcast_to`): `.shape` and `.size` are right, the bytes are never allocated, and
    such a model cannot be trained or run.
    """
    global _shapes_only
    before, _shapes_only = _shapes_only, True
    try:
        yield
    finally:
        _shapes_only = before


def _zeros(shape, dtype):
    """The initial (all-zero) value of a parameter; see `shapes_only`."""
    if _shapes_only:
        return np.broadcast_to(np.zeros((), dtype=dtype), shape)
    return np.zeros(shape, dtype=dtype)


class Module:
    training = True
    name = None  # set by the parent, used in error messages: "conv3_2: ..."

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def __setattr__(self, key, value):
        if isinstance(value, Module) and value.name is None:
            value.name = key  # a plain attribute: no recursion into this method
        super().__setattr__(key, value)

    # --- traversal ---------------------------------------------------------------------
    def named_children(self):
        for key, value in vars(self).items():
            if isinstance(value, Module):
                yield key, value

    def named_modules(self, prefix=""):
        yield prefix, self
        for key, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{key}" if prefix else key)

    def named_parameters(self, prefix=""):
        for key, value in vars(self).items():
            if isinstance(value, Parameter):
                yield (f"{prefix}.{key}" if prefix else key), value
        for key, child in self.named_children():
            yield from child.named_parameters(f"{prefix}.{key}" if prefix else key)

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def num_parameters(self):
        """Number of trainable scalars (weights and biases): Table 2 of the paper."""
        return int(sum(p.size for p in self.parameters()))

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    # --- modes and devices ---------------------------------------------------------------
    def train(self, mode=True):
        for _, m in self.named_modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    def to(self, device):
        """Move every parameter to `device` ("cpu" or "cuda") in place; returns self."""
        device = backend.check_device(device)
        for p in self.parameters():
            p.data = backend.to_device(p.data, device)
            if p.grad is not None:
                p.grad = backend.to_device(p.grad, device)
        return self

    def astype(self, dtype):
        """Cast every parameter (for example to float64 for gradient checks)."""
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            p.grad = None
        return self

    # --- state ---------------------------------------------------------------------------
    def state_dict(self):
        """Ordered {name: host array}, copies, so saving never aliases live weights."""
        return OrderedDict((k, backend.to_numpy(p.data).copy())
                           for k, p in self.named_parameters())

    def load_state_dict(self, state, strict=True):
        """Copy arrays into the parameters of the same name, checking keys and shapes.

        With `strict` (the default) a missing or unexpected key is an error. A shape
        mismatch is always an error. Nothing is copied unless every check passes.
        """
        own = dict(self.named_parameters())
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        problems = []
        if strict and missing:
            problems.append(f"missing keys: {missing}")
        if strict and unexpected:
            problems.append(f"unexpected keys: {unexpected}")
        for k, p in own.items():
            if k in state and tuple(np.shape(state[k])) != p.shape:
                problems.append(f"{k}: checkpoint shape {tuple(np.shape(state[k]))} != "
                                f"model shape {p.shape}")
        if problems:
            raise ValueError("load_state_dict: " + "; ".join(problems))
        for k, p in own.items():
            if k in state:
                value = backend.to_numpy(state[k]).astype(p.dtype, copy=False)
                p.data = backend.to_device(np.array(value), p.device)
                p.grad = None
        return self


# ----------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------

class Conv2d(Module):
    """Convolution layer; VGG uses 3×3/s1/p1 ("conv3-N") and 1×1/s1/p0 ("conv1-N")."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 bias=True, dtype=np.float32):
        kh, kw = F.pair(kernel_size, "kernel_size")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = (kh, kw), stride, padding
        # Real initial values come from minivgg.models.init_weights (Sec. 3.1).
        self.weight = Parameter(_zeros((out_channels, in_channels, kh, kw), dtype))
        self.bias = Parameter(_zeros((out_channels,), dtype)) if bias else None

    def forward(self, x, relu=False):
        """The convolution; with `relu`, the ReLU after it too, as one op (`fused.py`)."""
        conv = conv2d_relu if relu else F.conv2d
        return conv(x, self.weight, self.bias, self.stride, self.padding,
                    where=self.name or "Conv2d")

    def __repr__(self):
        return (f"Conv2d({self.in_channels}, {self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding})")


class Linear(Module):
    def __init__(self, in_features, out_features, bias=True, dtype=np.float32):
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(_zeros((out_features, in_features), dtype))
        self.bias = Parameter(_zeros((out_features,), dtype)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias, where=self.name or "Linear")

    def __repr__(self):
        return f"Linear({self.in_features}, {self.out_features})"


class ReLU(Module):
    def forward(self, x):
        return F.relu(x)

    def __repr__(self):
        return "ReLU()"


class MaxPool2d(Module):
    """Max-pooling (Sec. 2.1: 2×2, stride 2); `ceil_mode` as in `F.max_pool2d` (Caffe's)."""

    def __init__(self, kernel_size=2, stride=None, ceil_mode=False):
        self.kernel_size, self.stride, self.ceil_mode = kernel_size, stride, ceil_mode

    def forward(self, x, relu=False):
        """The pool; with `relu`, of max(x, 0): the ReLU before it as one op (`fused.py`)."""
        pool = relu_max_pool2d if relu else F.max_pool2d
        return pool(x, self.kernel_size, self.stride, self.ceil_mode,
                    where=self.name or "MaxPool2d")

    def __repr__(self):
        ceil = ", ceil_mode=True" if self.ceil_mode else ""
        return f"MaxPool2d(kernel_size={self.kernel_size}, stride={self.stride}{ceil})"


class LocalResponseNorm(Module):
    """LRN with the paper's parameters by default (Sec. 2.1); see functional's NOTE."""

    def __init__(self, size=5, alpha=1e-4, beta=0.75, k=2.0, alpha_over_n=False):
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k
        self.alpha_over_n = alpha_over_n

    def forward(self, x):
        return F.local_response_norm(x, self.size, self.alpha, self.beta, self.k,
                                     self.alpha_over_n, where=self.name or "LocalResponseNorm")

    def __repr__(self):
        return (f"LocalResponseNorm(size={self.size}, alpha={self.alpha}, beta={self.beta}, "
                f"k={self.k}, alpha_over_n={self.alpha_over_n})")


class Dropout(Module):
    def __init__(self, p=0.5):
        F.check_dropout_p(p, "Dropout")  # now, not at the first forward
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)

    def __repr__(self):
        return f"Dropout(p={self.p})"


class Flatten(Module):
    def forward(self, x):
        return F.flatten(x, 1)

    def __repr__(self):
        return "Flatten()"


class Sequential(Module):
    """Layers applied in order. Accepts modules (named "0", "1", ...) or an OrderedDict."""

    def __init__(self, *layers):
        if len(layers) == 1 and isinstance(layers[0], (dict, OrderedDict)):
            items = list(layers[0].items())
        else:
            items = [(str(i), layer) for i, layer in enumerate(layers)]
        for key, layer in items:
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential: {key!r} is a {type(layer).__name__}, "
                                f"not a Module")
            setattr(self, key, layer)

    def __iter__(self):
        return (m for _, m in self.named_children())

    def __len__(self):
        return len(list(self.named_children()))

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return list(self)[key]

    def forward(self, x):
        """The layers in order.

        NOTE: a ReLU directly followed by a MaxPool2d, and else a Conv2d directly followed
        by a ReLU, run as one op each (`minivgg.fused`: bit for bit the two layers, less
        memory traffic); the ReLU layer's own forward is then not called. `activations()`
        calls every layer's.
        """
        layers = list(self) + [None]
        i = 0
        while layers[i] is not None:
            layer, after = layers[i], layers[i + 1]
            if type(layer) is ReLU and type(after) is MaxPool2d:
                x, i = after(x, relu=True), i + 2
            elif type(layer) is Conv2d and type(after) is ReLU and \
                    type(layers[i + 2]) is not MaxPool2d:
                x, i = layer(x, relu=True), i + 2
            else:
                x, i = layer(x), i + 1
        return x

    def layer_names(self):
        """The layers' names in order, e.g. ['conv1_1', 'relu1_1', 'pool1', ...]."""
        return [k for k, _ in self.named_children()]

    def activations(self, x, names):
        """{name: output Tensor of that layer} for each of `names`, from one forward pass.

        The pass stops after the deepest layer asked for. The outputs stay in the autograd
        graph: a loss built from them (a perceptual or style loss) sends gradients back to
        `x` when x requires them. An unknown name is a ValueError listing the valid ones.
        """
        names = [names] if isinstance(names, str) else list(names)
        order = self.layer_names()
        unknown = [n for n in names if n not in order]
        if unknown or not names:
            raise ValueError(f"{type(self).__name__}: no layer named "
                             f"{', '.join(map(repr, unknown)) or '(none given)'}; "
                             f"valid names: {', '.join(order)}")
        last, out = max(order.index(n) for n in names), {}
        for name, layer in list(self.named_children())[:last + 1]:
            x = layer(x)
            if name in names:
                out[name] = x
        return {n: out[n] for n in names}

    def __repr__(self):
        lines = [f"  ({k}): {m!r}" for k, m in self.named_children()]
        return f"{type(self).__name__}(\n" + "\n".join(lines) + "\n)"
