"""Direct convolution: the 3×3/stride-1/padding-1 sum written out, with no im2col matrix.

Every VGG conv layer but config C's 1×1s is this shape (Sec. 2.1: 3×3 filters, stride 1,
padding 1, so the spatial size is kept).

im2col + GEMM (kernels/common.py) first copies every 3×3 window of the input into a
column, a matrix 9× the input, then hands the multiplications to BLAS. When a layer has
few input channels (conv1_1 sees the 3 colours; the small recipe's thin layers 16-32), that
copy costs as much as the GEMM it feeds, and the GEMM itself is thin (its inner dimension
is 9·C = 27 for conv1_1), so BLAS runs far below its peak. A direct convolution reads each
input row where it lies:

    y[n, oc, i, j] = b[oc] + sum over c, ky, kx of  W[oc, c, ky, kx] · x[n, c, i+ky-1, j+kx-1]

(zeros outside the image). Done a row at a time, this is nine shifted multiply-adds of
three input rows into one output row, which the compiler vectorises along the row, with
the rows in L1 cache; the only buffer besides the output is one zero-bordered copy of the
image being convolved, per thread, on the CPU.

Its gradients are the same kind of sums (Sec. 3.1 trains by back-propagation):

    gx = the same "same" convolution of gy with every filter rotated by 180° and the
         channel axes swapped (W[oc, c, ky, kx] -> W'[c, oc, 2-ky, 2-kx]): the forward
         kernel again;
    gW[oc, c, ky, kx] = sum over n, i, j of gy[n, oc, i, j] · x[n, c, i+ky-1, j+kx-1]
    gb[oc] = sum over n, i, j of gy[n, oc, i, j]

It does 9·C multiply-adds per output, like im2col: it saves the memory traffic, not the
arithmetic (that is Winograd's saving, kernels/winograd.py). These drivers run only the
3×3/s1/p1 shape (`shapes.is_3x3_same`, which the entry points check). `kernels/cpu/direct.py`
(Numba) and `kernels/cuda/direct.cu` supply the two kernels they call:

    direct_conv(x, W, b, y)          y = conv(x, W) + b, for all images and channels
    direct_weight_grad(x, gy, gW)    gW as above, each entry summed in a fixed order

NOTE: every output entry, and every entry of gW, is summed in an order fixed by the shapes
alone (on the GPU, a gW entry by one block's threads and a fixed tree), so results are the
same from run to run whatever the thread count.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for the annotations: a device's kernels, as the drivers call them
    from minivgg.kernels.common import Primitives


def rotated_filters(xp, W):
    """W (OC, C, 3, 3) -> W' (C, OC, 3, 3): each filter turned by 180°, channel axes swapped.

    Convolving gy with W' (padding 1) gives the input gradient of a 3×3/s1/p1 conv."""
    return xp.ascontiguousarray(W[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))


def conv2d_forward(dev: "Primitives", x, W, b):
    """y = conv(x, W) + b -> (N, OC, H, W) by direct convolution (3×3, stride 1, padding 1)."""
    xp = dev.xp
    x = xp.ascontiguousarray(x)
    N, C, H, Wd = x.shape
    OC = W.shape[0]
    b = xp.zeros(OC, dtype=x.dtype) if b is None else xp.ascontiguousarray(b, dtype=x.dtype)
    y = xp.empty((N, OC, H, Wd), dtype=x.dtype)
    dev.direct_conv(x, xp.ascontiguousarray(W, dtype=x.dtype), b, y)
    return y


def conv2d_backward(dev: "Primitives", x, W, gy, need_gx):
    """Gradients of `conv2d_forward` -> (gx or None, gW, gb); see the module docstring."""
    xp = dev.xp
    x = xp.ascontiguousarray(x)
    gy = xp.ascontiguousarray(gy, dtype=x.dtype)  # the kernels take one element type
    OC, C = W.shape[0], W.shape[1]
    gx = None
    if need_gx:
        gx = xp.empty(x.shape, dtype=x.dtype)
        dev.direct_conv(gy, rotated_filters(xp, W.astype(x.dtype, copy=False)),
                        xp.zeros(C, dtype=x.dtype), gx)
    gW = xp.empty((OC, C, 3, 3), dtype=x.dtype)
    dev.direct_weight_grad(x, gy, gW)
    gb = gy.sum(axis=(0, 2, 3))
    return gx, gW, gb
