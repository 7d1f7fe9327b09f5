"""The blocked direct convolution (kernels/cpu/blocked.py, blocked_grad.py) with NCHW arrays
in and out: the CPU's `blocked_conv2d_forward` and `blocked_conv2d_backward`, which
`CpuPrimitives` gives the conv entry points for the algorithm "blocked" (3×3/s1/p1).

    blocked_conv2d_forward(x, W, b)              -> y (N, OC, H, W)
    blocked_conv2d_backward(x, W, gy, need_gx)   -> (gx or None, gW, gb)

The layers around a convolution (ReLU, pooling, LRN, the FC layers) and `Tensor` keep NCHW,
so each call converts its activations into the nChw16c layout and back.
"""

import numpy as np

from minivgg.kernels.cpu.blocked import (block_bias, block_filters, conv2d_forward_blocked,
                                         from_blocked, to_blocked)
from minivgg.kernels.cpu.blocked_grad import (conv2d_input_grad_blocked,
                                              conv2d_weight_grad_blocked)


def blocked_conv2d_forward(x, W, b):
    """y (N, OC, H, W) = conv(x, W) + b, 3×3/s1/p1, by the blocked kernel."""
    OC = W.shape[0]
    xb = to_blocked(x)
    wb = block_filters(np.asarray(W, xb.dtype))
    yb = conv2d_forward_blocked(xb, wb, block_bias(b, OC, xb.dtype))
    return from_blocked(yb, OC)


def blocked_conv2d_backward(x, W, gy, need_gx):
    """(gx or None, gW, gb) of `blocked_conv2d_forward`, in x's dtype."""
    OC, C = W.shape[:2]
    gyb = to_blocked(np.asarray(gy, x.dtype))
    gx = None
    if need_gx:
        gx = from_blocked(conv2d_input_grad_blocked(gyb, np.asarray(W, gyb.dtype)), C)
    gW, gb = conv2d_weight_grad_blocked(to_blocked(x), gyb, C, OC)
    return gx, gW, gb
