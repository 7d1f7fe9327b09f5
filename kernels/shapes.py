"""Output sizes and the shape test of the 3×3 algorithms: facts of a layer's shapes alone.

Shape legend as in `kernels/common.py`.
"""


def conv_output_size(size, k, s, p):
    """Output length of a window of k, stride s, padding p, over `size` inputs (floor mode)."""
    return (size + 2 * p - k) // s + 1


def pool_output_size(size, k, s, ceil_mode=False):
    """Number of k-wide, stride-s pooling windows over `size` inputs, no padding.

    Floor mode (the default, and minivgg's training layout) keeps only whole windows and
    leaves the last (size - k) % s inputs out. Ceil mode (Caffe's only mode, PyTorch's
    `ceil_mode=True`) adds one partial window at the end when inputs are left over, so every
    input is covered; the partial window is clipped to the input, as in PyTorch.
    NOTE: PyTorch drops a last window that would *start* past the input; with no padding
    that can only happen when s > k, and we follow it.
    """
    if not ceil_mode:
        return (size - k) // s + 1
    out = -(-(size - k) // s) + 1
    if (out - 1) * s >= size:
        out -= 1
    return out


def is_3x3_same(W_shape, stride, padding):
    """Whether a conv is 3×3, stride 1, padding 1 (every VGG conv but config C's 1×1s,
    Sec. 2.1): the only shape Winograd (`kernels/winograd.py`) and direct convolution
    (`kernels/direct.py`) run."""
    return tuple(W_shape[2:]) == (3, 3) and tuple(stride) == (1, 1) and tuple(padding) == (1, 1)
