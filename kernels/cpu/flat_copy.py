"""Index arithmetic of the flat-copy im2col for "same" stride-1 convolutions, shared by the
float32 kernels (`conv.py`) and the bf16 tile writer (`im2col_bf16.py`).

A "same" convolution (stride 1, OW == W: VGG's 3×3/p1 and 1×1/p0) has output rows as long
as its input rows, so row r = (c, ky, kx) of a chunk's im2col matrix is, image by image, a
flat copy of input plane c shifted by (ky - PH) * W + (kx - PW), with zeros where the window
hangs over the top or bottom padding and the wrapped columns (left and right padding) zeroed
afterwards. See the comment above `conv._im2col_same_chunk`.
"""

from numba import njit

from minivgg.kernels.cpu.runtime import JIT


@njit(**JIT)
def wrapped_columns(kx, PW, W):
    """Columns ox whose input column ox + kx - PW falls outside 0..W-1: [0, lo) and [hi, W)."""
    return min(W, max(0, PW - kx)), max(0, min(W, W + PW - kx))


@njit(**JIT)
def flat_span(oy0, oy1, ky, kx, PH, PW, H, W):
    """(a, b, shift, lo, hi) for kernel offset (ky, kx) and output rows oy0..oy1-1 of one
    image: columns [a, b) of its block of cols have their input row inside the image; entry
    p reads the flat plane at p + shift; [lo, hi) is the part of [a, b) whose flat index
    lies inside the plane (the rest is zero, or wrapped and zeroed later).

    NOTE: a wrapped entry at either end of the plane would read outside it (index -1 means
    the last element to NumPy); lo and hi clip them.
    """
    oy_lo = min(oy1, max(oy0, PH - ky))  # rows whose input row oy + ky - PH is in 0..H-1
    oy_hi = max(oy_lo, min(oy1, H + PH - ky))
    a, b = (oy_lo - oy0) * W, (oy_hi - oy0) * W
    shift = oy0 * W + (ky - PH) * W + (kx - PW)
    lo = max(a, -shift)
    return a, b, shift, lo, max(lo, min(b, H * W - shift))
