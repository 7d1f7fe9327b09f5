"""Differentiable ops: each is a `Function` with forward directly above backward.

The heavy lifting (im2col, pooling windows, LRN sums) lives in the device kernel tables,
the `kernels/cpu/` package and `kernels/gpu.py`; `backend.kernels_for(x)` picks one, so no
op here knows which device it runs on. Layout is NCHW; conv weights are (OC, C, KH, KW) and
linear weights (out, in), as in PyTorch. Shape legend: see `kernels/common.py`.

Every op checks its arguments once; a layer passes its name as `where=`, so the message
names it ("conv3_2: input has 64 channels but ...").
"""

import numpy as np

from minivgg import backend
from minivgg.tensor import Function, Tensor, as_tensor


# ----------------------------------------------------------------------------------------
# Input checks: errors that name the op (or layer) and the shapes involved
# ----------------------------------------------------------------------------------------

def pair(v, what):
    """3 -> (3, 3); (3, 1) -> (3, 1); anything that is not one or two integers is an error."""
    values = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if len(values) != 2 or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool)
                                   for n in values):
        raise TypeError(f"{what} must be an int or a pair of ints, got {v!r}")
    return int(values[0]), int(values[1])


def check_float_input(x, where, ndim):
    """`x` must be a floating-point array of rank `ndim`."""
    if x.ndim != ndim:
        layout = {4: "(N, C, H, W)", 2: "(N, features)"}.get(ndim, f"rank {ndim}")
        raise ValueError(f"{where}: expected a {ndim}-d input {layout}, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{where}: expected a floating-point input, got {x.dtype} with shape "
                        f"{x.shape}; convert images with .astype(np.float32) first")


def check_conv2d_input(x, W, where="conv2d"):
    """Rank, dtype and channel checks of a convolution input against its weight."""
    if W.ndim != 4:
        raise ValueError(f"{where}: weight must be (OC, C, KH, KW), got shape {W.shape}")
    if x.ndim != 4:
        raise ValueError(f"{where}: expected a 4-d input (N, C, H, W) for weight shape "
                         f"{W.shape}, got shape {x.shape}")
    check_float_input(x, where, 4)
    if x.shape[1] != W.shape[1]:
        raise ValueError(f"{where}: input has {x.shape[1]} channels but the weight expects "
                         f"{W.shape[1]} (input shape {x.shape}, weight shape {W.shape})")
    if x.dtype != W.dtype:
        raise TypeError(f"{where}: input dtype {x.dtype} differs from weight dtype {W.dtype}")


def check_conv2d_args(x, W, b, stride, padding, where="conv2d"):
    """All checks of a convolution call -> (stride, padding) as pairs."""
    check_conv2d_input(x, W, where)
    _check_bias(b, W, where)
    stride, padding = pair(stride, "stride"), pair(padding, "padding")
    if min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"{where}: stride must be >= 1 and padding >= 0, got "
                         f"stride={stride}, padding={padding}")
    H, Wd = x.shape[2] + 2 * padding[0], x.shape[3] + 2 * padding[1]
    if H < W.shape[2] or Wd < W.shape[3]:
        raise ValueError(f"{where}: padded input {H}x{Wd} (input shape {x.shape}) is smaller "
                         f"than the kernel {W.shape[2]}x{W.shape[3]} (weight shape {W.shape})")
    return stride, padding


def _check_bias(b, W, where):
    if b is None:
        return
    if b.shape != (W.shape[0],):
        raise ValueError(f"{where}: bias must have shape ({W.shape[0]},) for weight shape "
                         f"{W.shape}, got {b.shape}")
    if b.dtype != W.dtype:
        raise TypeError(f"{where}: bias dtype {b.dtype} differs from weight dtype {W.dtype}")


def check_linear_input(x, W, where="linear"):
    if W.ndim != 2:
        raise ValueError(f"{where}: weight must be (out, in), got shape {W.shape}")
    if x.ndim != 2:
        raise ValueError(f"{where}: expected a 2-d input (N, features) for weight shape "
                         f"{W.shape}, got shape {x.shape}")
    check_float_input(x, where, 2)
    if x.shape[1] != W.shape[1]:
        raise ValueError(f"{where}: input has {x.shape[1]} features but the weight expects "
                         f"{W.shape[1]} (input shape {x.shape}, weight shape {W.shape})")
    if x.dtype != W.dtype:
        raise TypeError(f"{where}: input dtype {x.dtype} differs from weight dtype {W.dtype}")


# ----------------------------------------------------------------------------------------
# Elementwise arithmetic with NumPy broadcasting
# ----------------------------------------------------------------------------------------

def _sum_to(g, shape):
    """Undo broadcasting: sum `g` down to `shape`."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        i + lead for i, n in enumerate(shape) if n == 1 and g.shape[i + lead] != 1)
    g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


class Add(Function):
    def forward(self, a, b):
        self.save_for_backward(a.shape, b.shape)
        return a + b

    def backward(self, gy):
        a_shape, b_shape = self.saved
        return _sum_to(gy, a_shape), _sum_to(gy, b_shape)


class Sub(Function):
    def forward(self, a, b):
        self.save_for_backward(a.shape, b.shape)
        return a - b

    def backward(self, gy):
        a_shape, b_shape = self.saved
        return _sum_to(gy, a_shape), _sum_to(-gy, b_shape)


class Mul(Function):
    def forward(self, a, b):
        self.save_for_backward(a, b)
        return a * b

    def backward(self, gy):
        a, b = self.saved
        return _sum_to(gy * b, a.shape), _sum_to(gy * a, b.shape)


class Div(Function):
    def forward(self, a, b):
        self.save_for_backward(a, b)
        return a / b

    def backward(self, gy):
        a, b = self.saved
        ga = gy / b
        return _sum_to(ga, a.shape), _sum_to(-ga * a / b, b.shape)


class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, gy):
        return -gy


def _like(x, other):
    """Wrap a Python scalar so that it takes the tensor's dtype (no float64 surprises)."""
    if isinstance(x, Tensor) or backend.is_array(x):
        return x
    other = other.data if isinstance(other, Tensor) else other
    if not backend.is_array(other):
        raise TypeError(f"arithmetic needs at least one Tensor or array, got "
                        f"{type(x).__name__} and {type(other).__name__}")
    xp = backend.array_module(other)
    # NOTE: only a floating tensor lends its dtype; 0.5 * an int array must not become 0.
    if not np.issubdtype(other.dtype, np.floating) and isinstance(x, float):
        return xp.asarray(x)
    return xp.asarray(x, dtype=other.dtype)


def add(a, b):
    return Add()(_like(a, b), _like(b, a))


def sub(a, b):
    return Sub()(_like(a, b), _like(b, a))


def mul(a, b):
    return Mul()(_like(a, b), _like(b, a))


def div(a, b):
    return Div()(_like(a, b), _like(b, a))


def neg(a):
    return Neg()(a)


# ----------------------------------------------------------------------------------------
# Reductions and shapes
# ----------------------------------------------------------------------------------------

class Sum(Function):
    def __init__(self, axis, keepdims):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.save_for_backward(x.shape)
        return x.sum(axis=self.axis, keepdims=self.keepdims)

    def backward(self, gy):
        (x_shape,) = self.saved
        if self.axis is not None and not self.keepdims:  # put the summed axes back
            axes = (self.axis,) if isinstance(self.axis, int) else self.axis
            for a in sorted(ax % len(x_shape) for ax in axes):
                gy = backend.array_module(gy).expand_dims(gy, a)
        return backend.array_module(gy).broadcast_to(gy, x_shape).copy()


def sum(x, axis=None, keepdims=False):  # noqa: A001  (mirrors Tensor.sum)
    if isinstance(axis, list):
        axis = tuple(axis)  # NumPy takes an int or a tuple of axes, not a list
    return Sum(axis, keepdims)(x)


def mean(x, axis=None, keepdims=False):
    x = as_tensor(x)
    if axis is None:
        count = x.size
    else:
        axes = (axis,) if isinstance(axis, int) else axis
        count = int(np.prod([x.shape[a] for a in axes]))
    return sum(x, axis, keepdims) * (1.0 / count)


class Reshape(Function):
    def __init__(self, shape):
        self.shape = shape

    def forward(self, x):
        self.save_for_backward(x.shape)
        return x.reshape(self.shape)

    def backward(self, gy):
        (x_shape,) = self.saved
        return gy.reshape(x_shape)


def reshape(x, shape):
    return Reshape(tuple(shape))(x)


def flatten(x, start_dim=1):
    """(N, C, H, W) -> (N, C*H*W): the bridge from the last pool to fc6."""
    x = as_tensor(x)
    return reshape(x, x.shape[:start_dim] + (-1,))


class Transpose(Function):
    def forward(self, x):
        return x.T

    def backward(self, gy):
        return gy.T


def transpose(x):
    return Transpose()(x)


class MatMul(Function):
    def forward(self, a, b):
        self.save_for_backward(a, b)
        return a @ b

    def backward(self, gy):
        a, b = self.saved
        return gy @ b.T, a.T @ gy


def matmul(a, b):
    return MatMul()(a, b)


# ----------------------------------------------------------------------------------------
# Convolution (Sec. 2.1: 3x3, stride 1, padding 1; config C also uses 1x1)
# ----------------------------------------------------------------------------------------

class Conv2d(Function):
    """y = x * W + b by im2col + GEMM, any kernel size, stride and padding; 3×3/s1/p1 convs
    by Winograd's algorithm instead when `backend.set_conv_algorithm` asks for it."""

    def __init__(self, stride, padding):
        self.stride, self.padding = stride, padding

    def forward(self, x, W, b=None):
        # NOTE: chosen once here and saved: backward must run the same algorithm.
        algorithm = backend.conv_algorithm_for(x, W, self.stride, self.padding)
        self.save_for_backward(x, W, b is not None, algorithm)
        kern = backend.kernels_for(x)
        return kern.conv2d_forward(x, W, b, self.stride, self.padding, algorithm)

    def backward(self, gy):
        x, W, has_bias, algorithm = self.saved[:4]  # minivgg.fused.Conv2dReLU saves more
        kern = backend.kernels_for(x)
        need_gx = self.inputs[0].requires_grad  # conv1_1 never needs d loss / d image
        gx, gW, gb = kern.conv2d_backward(x, W, gy, self.stride, self.padding, need_gx,
                                          algorithm)
        return (gx, gW, gb) if has_bias else (gx, gW)


def conv2d(x, W, b=None, stride=1, padding=0, where="conv2d"):
    """2-D convolution (cross-correlation, as every framework computes it).

    x (N, C, H, W), W (OC, C, KH, KW), b (OC,) -> (N, OC, OH, OW), with
    OH = (H + 2*padding - KH) // stride + 1. `stride` and `padding` are ints or pairs.
    `where` names the caller in error messages (a layer passes its name, "conv3_2").
    """
    x, W = as_tensor(x), as_tensor(W)
    b = None if b is None else as_tensor(b)
    stride, padding = check_conv2d_args(x, W, b, stride, padding, where)
    fn = Conv2d(stride, padding)
    return fn(x, W) if b is None else fn(x, W, b)


# ----------------------------------------------------------------------------------------
# Max-pooling (Sec. 2.1: 2x2 windows, stride 2)
# ----------------------------------------------------------------------------------------

class MaxPool2d(Function):
    def __init__(self, kernel_size, stride, ceil_mode=False):
        self.kernel_size, self.stride, self.ceil_mode = kernel_size, stride, ceil_mode

    def forward(self, x):
        y, argmax = backend.kernels_for(x).max_pool2d_forward(x, self.kernel_size, self.stride,
                                                              self.ceil_mode)
        self.save_for_backward(x.shape, argmax)
        return y

    def backward(self, gy):
        x_shape, argmax = self.saved
        return backend.kernels_for(gy).max_pool2d_backward(
            gy, argmax, x_shape, self.kernel_size, self.stride)


def max_pool2d(x, kernel_size=2, stride=None, ceil_mode=False, where="max_pool2d"):
    """Max over KH×KW windows, no padding; `stride` defaults to the kernel size.

    Floor mode (default): OH = (H - KH) // SH + 1 whole windows, so the last (H - KH) % SH
    rows and columns are in no window (a 2×2/s2 pool drops the last row of an odd H).
    `ceil_mode=True` (Caffe's pooling, PyTorch's flag of the same name): one more, partial
    window at the bottom/right when inputs are left over, so every pixel is in a window;
    the partial window takes the max of the pixels it holds.

    NOTE: a tie sends the whole gradient to the first maximum in the window. `where` names
    the caller in error messages.
    """
    x = as_tensor(x)
    kernel_size, stride = check_pool_args(x, kernel_size, stride, where)
    return MaxPool2d(kernel_size, stride, bool(ceil_mode))(x)


def check_pool_args(x, kernel_size, stride, where="max_pool2d"):
    """All checks of a max-pool call -> (kernel_size, stride) as pairs."""
    check_float_input(x, where, 4)
    kernel_size = pair(kernel_size, "kernel_size")
    stride = kernel_size if stride is None else pair(stride, "stride")
    if min(kernel_size) < 1 or min(stride) < 1:
        raise ValueError(f"{where}: kernel_size and stride must be >= 1, got "
                         f"kernel_size={kernel_size}, stride={stride}")
    if x.shape[2] < kernel_size[0] or x.shape[3] < kernel_size[1]:
        raise ValueError(f"{where}: input shape {x.shape} is smaller than the "
                         f"{kernel_size[0]}x{kernel_size[1]} window")
    return kernel_size, stride


# ----------------------------------------------------------------------------------------
# ReLU (Sec. 2.1: every hidden layer)
# ----------------------------------------------------------------------------------------

class ReLU(Function):
    def forward(self, x):
        y = backend.kernels_for(x).relu_forward(x)
        self.save_for_backward(y)  # the output is enough: y > 0 exactly where x > 0
        return y

    def backward(self, gy):
        (y,) = self.saved
        return backend.kernels_for(y).relu_backward(y, gy)


def relu(x):
    return ReLU()(x)


# ----------------------------------------------------------------------------------------
# Local response normalisation (Sec. 2.1, configuration A-LRN only)
# ----------------------------------------------------------------------------------------

class LocalResponseNorm(Function):
    def __init__(self, size, alpha, beta, k):
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def forward(self, x):
        kern = backend.kernels_for(x)
        y, scale = kern.lrn_forward(x, self.size, self.alpha, self.beta, self.k)
        self.save_for_backward(x, y, scale)
        return y

    def backward(self, gy):
        x, y, scale = self.saved
        return backend.kernels_for(x).lrn_backward(x, y, scale, gy, self.size, self.alpha,
                                                   self.beta)


def local_response_norm(x, size=5, alpha=1e-4, beta=0.75, k=2.0, alpha_over_n=False,
                        where="local_response_norm"):
    """b_c = a_c / (k + alpha * sum_{c'} a_c'^2)^beta over `size` neighbouring channels.

    The defaults are the paper's (AlexNet's) k=2, n=5, alpha=1e-4, beta=0.75 (Sec. 2.1),
    with alpha multiplying the plain sum, as the AlexNet paper writes it.
    NOTE: Caffe and PyTorch divide alpha by n. Pass `alpha_over_n=True` for that convention
    (then this equals `torch.nn.functional.local_response_norm(x, size, alpha, beta, k)`).
    The window spans channels c - size//2 ... c + (size-1)//2, as in PyTorch. `where` names
    the caller in error messages.
    """
    x = as_tensor(x)
    check_float_input(x, where, 4)
    if size < 1:
        raise ValueError(f"{where}: size must be >= 1, got {size}")
    a = alpha / size if alpha_over_n else alpha
    return LocalResponseNorm(int(size), float(a), float(beta), float(k))(x)


# ----------------------------------------------------------------------------------------
# Fully connected layers (fc6, fc7, fc8)
# ----------------------------------------------------------------------------------------

class Linear(Function):
    def forward(self, x, W, b=None):
        self.save_for_backward(x, W, b is not None)
        y = backend.kernels_for(x).fc_matmul(x, W.T)
        if b is not None:
            y += b
        return y

    def backward(self, gy):
        x, W, has_bias = self.saved
        matmul = backend.kernels_for(gy).fc_matmul
        gx = matmul(gy, W)
        gW = matmul(gy.T, x)
        return (gx, gW, gy.sum(axis=0)) if has_bias else (gx, gW)


def linear(x, W, b=None, where="linear"):
    """y = x W^T + b.  x (N, in), W (out, in), b (out,) -> (N, out). `where` names the caller
    in error messages."""
    x, W = as_tensor(x), as_tensor(W)
    b = None if b is None else as_tensor(b)
    check_linear_input(x, W, where)
    _check_bias(b, W, where)
    fn = Linear()
    return fn(x, W) if b is None else fn(x, W, b)


# ----------------------------------------------------------------------------------------
# Dropout (Sec. 3.1: p = 0.5 on fc6 and fc7)
# ----------------------------------------------------------------------------------------

class Dropout(Function):
    def __init__(self, p):
        self.p = p

    def forward(self, x):
        kern = backend.kernels_for(x)
        mask = kern.dropout_mask(x.shape, self.p, x.dtype, backend.rng())
        self.save_for_backward(mask)
        return x * mask

    def backward(self, gy):
        (mask,) = self.saved
        return gy * mask


def check_dropout_p(p, where="dropout"):
    """A dropout ratio (Sec. 3.1 uses 0.5) must lie in [0, 1); `where` names the caller."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{where}: p must be in [0, 1), got {p}")


def dropout(x, p=0.5, training=True, where="dropout"):
    """Inverted dropout: zero each unit with probability p and scale the rest by 1/(1-p),
    so evaluation needs no rescaling. The identity when not training or p == 0.
    `where` names the caller in error messages, as for the other ops."""
    check_dropout_p(p, where)
    x = as_tensor(x)
    if not training or p == 0.0:
        return x
    return Dropout(float(p))(x)


# ----------------------------------------------------------------------------------------
# Softmax cross-entropy (the training objective, Sec. 3.1)
# ----------------------------------------------------------------------------------------

class CrossEntropy(Function):
    def __init__(self, labels):
        self.labels = labels

    def forward(self, logits):
        kern = backend.kernels_for(logits)
        loss, probs = kern.softmax_cross_entropy_forward(logits, self.labels)
        self.save_for_backward(probs)
        return loss

    def backward(self, gloss):
        (probs,) = self.saved
        return backend.kernels_for(probs).softmax_cross_entropy_backward(
            probs, self.labels, gloss)


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy. logits (N, K) float; labels (N,) integers in [0, K).

    NOTE: the labels' range is checked where they are. Host labels (a NumPy array, as the
    data loader makes them) are checked on the host and then moved to the logits' device,
    so a GPU step waits for nothing; labels already on the GPU cost one read of their
    minimum and maximum together.
    """
    logits = as_tensor(logits)
    check_float_input(logits, "cross_entropy", 2)
    labels = labels.data if isinstance(labels, Tensor) else labels
    xp = backend.array_module(logits.data)
    host = np if not backend.is_array(labels) or backend.device_of(labels) == "cpu" else xp
    labels = host.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"cross_entropy: labels must have shape ({logits.shape[0]},) for "
                         f"logits of shape {logits.shape}, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"cross_entropy: labels must be an integer array (class indices), "
                        f"got dtype {labels.dtype}")
    if labels.shape[0] == 0:
        raise ValueError(f"cross_entropy: empty batch (logits of shape {logits.shape})")
    K = logits.shape[1]
    low, high = (int(v) for v in backend.to_numpy(host.stack([labels.min(), labels.max()])))
    if low < 0 or high >= K:
        raise ValueError(f"cross_entropy: labels must be in [0, {K}) for logits of shape "
                         f"{logits.shape}, got min {low}, max {high}")
    labels = backend.to_device(labels.astype(np.int64), backend.device_of(logits.data))
    return CrossEntropy(labels)(logits)


def softmax(x, axis=1):
    """Softmax of an array or tensor, as a plain array (used by evaluation, not training)."""
    x = x.data if isinstance(x, Tensor) else x
    xp = backend.array_module(x)
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ----------------------------------------------------------------------------------------
# Tensor's operators are these ops
# ----------------------------------------------------------------------------------------

def _bind_operators():
    """Attach the ops above to `Tensor` as its operators and methods, once, at import.

    NOTE: tensor.py cannot import this module (this module imports it), so the binding is
    made here, as DeZero's `setup_variable()` does: `a + b` is `add(a, b)`, `x.sum()` is
    `sum(x)`, `x.T` is `transpose(x)`.
    """
    Tensor.__add__, Tensor.__radd__ = add, lambda self, other: add(other, self)
    Tensor.__sub__, Tensor.__rsub__ = sub, lambda self, other: sub(other, self)
    Tensor.__mul__, Tensor.__rmul__ = mul, lambda self, other: mul(other, self)
    Tensor.__truediv__, Tensor.__rtruediv__ = div, lambda self, other: div(other, self)
    Tensor.__neg__, Tensor.__matmul__ = neg, matmul
    Tensor.sum, Tensor.mean, Tensor.flatten = sum, mean, flatten
    Tensor.reshape = _reshape_method
    Tensor.T = property(transpose)


def _reshape_method(x, *shape):
    """`x.reshape(2, 3)` and `x.reshape((2, 3))`, as NumPy and PyTorch take both."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return reshape(x, shape)


_bind_operators()
