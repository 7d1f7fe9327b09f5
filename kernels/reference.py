"""Plain NumPy im2col / col2im: the definition the fast kernels are tested against.

A dozen lines each of NumPy slicing, as Chainer's `im2col_cpu`: pad the input, then for each
kernel offset (ky, kx) take one strided slice of it, which holds that offset's input pixel
for every output pixel at once. Whole batch, any stride and padding; no chunks, no threads,
no speed. The fast versions are `kernels/cpu/conv.py` and `kernels/cuda/conv.cu`; the
walkthrough (docs/walkthrough.md, section 3) shows this one first.
"""

import numpy as np


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
