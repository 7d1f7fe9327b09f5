"""Plain NumPy im2col / col2im and max-pooling: the definitions the fast kernels are tested
against.

A dozen lines each of NumPy slicing, as Chainer's `im2col_cpu`: pad the input, then for each
kernel offset (ky, kx) take one strided slice of it, which holds that offset's input pixel
for every output pixel at once. Whole batch, any stride and padding; no chunks, no threads,
no speed. The fast versions are `kernels/cpu/conv.py` and `kernels/cuda/conv.cu`; the
walkthrough (docs/walkthrough.md, section 3) shows this one first. `conv2d_winograd` is
the same for Winograd's algorithm (section 8; fast versions in `kernels/winograd.py`).
"""

import numpy as np

from minivgg.kernels import winograd
from minivgg.kernels.shapes import pool_output_size


def im2col(x, KH, KW, SH, SW, PH, PW):
    """(N, C, H, W) -> cols (N, C*KH*KW, OH*OW); row c*KH*KW + ky*KW + kx, column oy*OW + ox.

    cols[n, (c, ky, kx), (oy, ox)] = x_padded[n, c, oy*SH + ky, ox*SW + kx].
    """
    N, C, H, W = x.shape
    OH, OW = (H + 2 * PH - KH) // SH + 1, (W + 2 * PW - KW) // SW + 1
    xp = np.pad(x, ((0, 0), (0, 0), (PH, PH), (PW, PW)))
    cols = np.empty((N, C, KH, KW, OH, OW), dtype=x.dtype)
    for ky in range(KH):
        for kx in range(KW):
            cols[:, :, ky, kx] = xp[:, :, ky:ky + SH * OH:SH, kx:kx + SW * OW:SW]
    return cols.reshape(N, C * KH * KW, OH * OW)


def col2im(cols, x_shape, KH, KW, SH, SW, PH, PW):
    """The adjoint of `im2col`: every entry of cols is added back to the pixel it copied.

    cols (N, C*KH*KW, OH*OW) -> (N, C, H, W); padding pixels are dropped at the end.
    """
    N, C, H, W = x_shape
    OH, OW = (H + 2 * PH - KH) // SH + 1, (W + 2 * PW - KW) // SW + 1
    cols = cols.reshape(N, C, KH, KW, OH, OW)
    gx = np.zeros((N, C, H + 2 * PH, W + 2 * PW), dtype=cols.dtype)
    for ky in range(KH):
        for kx in range(KW):
            gx[:, :, ky:ky + SH * OH:SH, kx:kx + SW * OW:SW] += cols[:, :, ky, kx]
    return gx[:, :, PH:PH + H, PW:PW + W]


def conv2d_winograd(x, W, b, m):
    """y = conv(x, W) + b, 3×3, stride 1, padding 1, by F(m×m, 3×3) on all tiles at once.

    x (N, C, H, W), W (OC, C, 3, 3), b (OC,) or None -> (N, OC, H, W). A dozen lines of
    NumPy, every tile at once, that the chunked kernels are tested against.
    """
    BT, G, AT = winograd.transforms(m)
    N, C, H, Wd = x.shape
    TH, TW = winograd.tile_grid(H, Wd, m)
    xp = np.zeros((N, C, TH * m + 2, TW * m + 2), dtype=x.dtype)
    xp[:, :, 1:H + 1, 1:Wd + 1] = x                    # padding 1, plus the overhang
    d = np.lib.stride_tricks.sliding_window_view(xp, (m + 2, m + 2), axis=(2, 3))
    d = d[:, :, ::m, ::m]                              # (N, C, TH, TW, α, α), overlap 2
    V = np.einsum("ai,nctuij,bj->nctuab", BT, d, BT)   # input transform  B^T d B
    U = np.einsum("ai,ocij,bj->ocab", G, W, G)         # filter transform G g G^T
    M = np.einsum("ocab,nctuab->notuab", U, V)         # α² products, summed over c
    Y = np.einsum("ia,notuab,jb->notuij", AT, M, AT)   # output transform A^T M A
    y = Y.transpose(0, 1, 2, 4, 3, 5).reshape(N, -1, TH * m, TW * m)[:, :, :H, :Wd]
    y = y + b[None, :, None, None] if b is not None else y
    return y.astype(x.dtype)


def max_pool2d(x, KH, KW, SH, SW, ceil_mode=False):
    """(N, C, H, W) -> y (N, C, OH, OW) and argmax (offset ky*KW + kx in the window).

    Window (oy, ox) holds rows oy*SH .. oy*SH+KH-1 and columns ox*SW .. ox*SW+KW-1. Floor
    mode keeps whole windows only; ceil mode (Caffe's) adds a last window, clipped to the
    input, where inputs are left over. Pixels outside a clipped window are padded with -inf,
    so they never win; on a tie the first offset in row-major order wins (np.argmax).
    """
    N, C, H, W = x.shape
    OH, OW = pool_output_size(H, KH, SH, ceil_mode), pool_output_size(W, KW, SW, ceil_mode)
    pad_h, pad_w = max(0, (OH - 1) * SH + KH - H), max(0, (OW - 1) * SW + KW - W)
    xp = np.pad(x, ((0, 0), (0, 0), (0, pad_h), (0, pad_w)), constant_values=-np.inf)
    windows = np.empty((N, C, KH * KW, OH, OW), dtype=x.dtype)
    for ky in range(KH):
        for kx in range(KW):
            windows[:, :, ky * KW + kx] = xp[:, :, ky:ky + SH * OH:SH, kx:kx + SW * OW:SW]
    return windows.max(axis=2), windows.argmax(axis=2).astype(np.int32)
