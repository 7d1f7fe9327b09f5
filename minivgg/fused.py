"""Two ops of `minivgg.functional` run as one: bit for bit the same results and gradients.

Every VGG layer is a convolution followed by a ReLU, and every block ends in ReLU then
max-pool (Sec. 2.1). Run as separate ops, the ReLU reads the convolution's output and
writes a second array of the same size, which it keeps for backward, and its backward
writes a third. Fused:

* `ReLUMaxPool2d` pools max(x, 0) without writing it (`relu_max_pool2d_forward`) and in
  backward routes the gradient and applies the ReLU's mask in one pass, taking the mask at
  each window's winner from the pool's own output. The convolution's output before it is
  freed as soon as the pool has read it.
* `Conv2dReLU`, for a convolution whose ReLU is not followed by a pool, applies the ReLU in
  place on the convolution's fresh output, and masks the gradient before the
  convolution's backward.

Measured on the small recipe's step (VGG-A width 0.25, batch 32, 64×64; 1 thread, CPU time,
`benchmarks/profile_step.py` run in turns with the unfused tree, 2026-12-05, load average
4.4-4.6): the ReLU and max-pool passes, forward and backward, took 7.3 ms a step instead of
13.6, and the step 94 ms instead of 100 (medians); the step's peak memory above the
imports was 229 MB instead of 249 (`benchmarks/bench_step.py`).

`nn.Sequential.forward` picks them for a `ReLU` layer directly followed by a `MaxPool2d`
layer and for a `Conv2d` layer directly followed by a `ReLU` layer. The layers, their names
and parameters stay as they are (checkpoints, ONNX export, `minivgg.summary`), and
`activations()` still runs each layer on its own, so every layer's output can be asked for.
"""

from minivgg import backend
from minivgg.functional import Conv2d, MaxPool2d, check_conv2d_args, check_pool_args
from minivgg.tensor import as_tensor


class Conv2dReLU(Conv2d):
    """max(conv2d(x, W, b), 0), the ReLU in place on the convolution's output."""

    def forward(self, x, W, b=None):
        y = super().forward(x, W, b)
        # NOTE: the convolution's output is a new array no one else holds yet, so the ReLU
        # may overwrite it (a view that is not contiguous would get a new array instead).
        y = backend.kernels_for(y).relu_forward(y, y if y.flags.c_contiguous else None)
        self.saved = self.saved + (y,)  # the output is enough: y > 0 exactly where x > 0
        return y

    def backward(self, gy):
        y = self.saved[-1]
        return super().backward(backend.kernels_for(y).relu_backward(y, gy))


def conv2d_relu(x, W, b=None, stride=1, padding=0, where="conv2d"):
    """`relu(conv2d(x, W, b, stride, padding))` as one op (`Conv2dReLU`): the same checks
    and arguments as `functional.conv2d`, the same bits."""
    x, W = as_tensor(x), as_tensor(W)
    b = None if b is None else as_tensor(b)
    stride, padding = check_conv2d_args(x, W, b, stride, padding, where)
    fn = Conv2dReLU(stride, padding)
    return fn(x, W) if b is None else fn(x, W, b)


class ReLUMaxPool2d(MaxPool2d):
    """max_pool2d(max(x, 0)); saves the argmax and its own output (a quarter of x)."""

    def forward(self, x):
        y, argmax = backend.kernels_for(x).relu_max_pool2d_forward(
            x, self.kernel_size, self.stride, self.ceil_mode)
        self.save_for_backward(x.shape, argmax, y)
        return y

    def backward(self, gy):
        x_shape, argmax, y = self.saved
        return backend.kernels_for(gy).relu_max_pool2d_backward(
            gy, argmax, y, x_shape, self.kernel_size, self.stride)


def relu_max_pool2d(x, kernel_size=2, stride=None, ceil_mode=False, where="max_pool2d"):
    """`max_pool2d(relu(x), ...)` as one op (`ReLUMaxPool2d`): the same checks and arguments
    as `functional.max_pool2d`, the same bits."""
    x = as_tensor(x)
    kernel_size, stride = check_pool_args(x, kernel_size, stride, where)
    return ReLUMaxPool2d(kernel_size, stride, bool(ceil_mode))(x)
