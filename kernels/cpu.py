"""CPU kernels: the array-level work behind every op in `minivgg.functional`.

Every function here has a twin of the same name and signature in `kernels/cuda.py`, so the
two can be read side by side. Shape legend, used throughout:

    N  batch            C  input channels     H, W    input height, width
    OC output channels  KH, KW kernel size    SH, SW  stride      PH, PW padding
    OH, OW output height, width = (H + 2*PH - KH) // SH + 1, (W + 2*PW - KW) // SW + 1

Convolution is im2col + GEMM. The im2col matrix of one image is (C*KH*KW, OH*OW): column
(oy, ox) holds the KH×KW×C patch that output pixel reads. For the first VGG-16 layer at 224
that is 27 × 50,176 floats per image, and 576 × 50,176 (115 MB) for conv1_2, so it is built
for a chunk of images at a time and never stored for backward: backward rebuilds it.
"""

import numpy as np

# Bytes of im2col buffer to build at once; the batch is cut into chunks that fit.
IM2COL_CHUNK_BYTES = 64 * 2**20


def conv_output_size(size, k, s, p):
    return (size + 2 * p - k) // s + 1


# ----------------------------------------------------------------------------------------
# im2col / col2im
# ----------------------------------------------------------------------------------------

def im2col(x, KH, KW, SH, SW, PH, PW):
    """(N, C, H, W) -> cols (N, C*KH*KW, OH*OW).

    Row index is c*KH*KW + ky*KW + kx, matching the (OC, C, KH, KW) weight layout, so a
    convolution is `W.reshape(OC, -1) @ cols[n]`. A Python loop over the KH*KW kernel
    offsets only; each step copies one strided slice of every image at once.
    """
    N, C, H, W = x.shape
    OH, OW = conv_output_size(H, KH, SH, PH), conv_output_size(W, KW, SW, PW)
    xp = np.pad(x, ((0, 0), (0, 0), (PH, PH), (PW, PW))) if (PH or PW) else x
    cols = np.empty((N, C, KH, KW, OH, OW), dtype=x.dtype)
    for ky in range(KH):
        y_end = ky + SH * OH
        for kx in range(KW):
            x_end = kx + SW * OW
            cols[:, :, ky, kx] = xp[:, :, ky:y_end:SH, kx:x_end:SW]
    return cols.reshape(N, C * KH * KW, OH * OW)


def col2im(cols, x_shape, KH, KW, SH, SW, PH, PW):
    """The adjoint of `im2col`: cols (N, C*KH*KW, OH*OW) -> (N, C, H, W).

    Each input pixel receives the sum of every column entry that copied it.
    """
    N, C, H, W = x_shape
    OH, OW = conv_output_size(H, KH, SH, PH), conv_output_size(W, KW, SW, PW)
    cols = cols.reshape(N, C, KH, KW, OH, OW)
    gx = np.zeros((N, C, H + 2 * PH, W + 2 * PW), dtype=cols.dtype)
    for ky in range(KH):
        y_end = ky + SH * OH
        for kx in range(KW):
            x_end = kx + SW * OW
            # NOTE: one (ky, kx) slice never hits the same pixel twice, so += is safe here.
            gx[:, :, ky:y_end:SH, kx:x_end:SW] += cols[:, :, ky, kx]
    return gx[:, :, PH:PH + H, PW:PW + W]


def _chunks(N, bytes_per_image):
    """Batch slices whose im2col buffers stay under IM2COL_CHUNK_BYTES."""
    step = max(1, IM2COL_CHUNK_BYTES // max(1, bytes_per_image))
    return [slice(i, min(i + step, N)) for i in range(0, N, step)]


# ----------------------------------------------------------------------------------------
# Convolution
# ----------------------------------------------------------------------------------------

def conv2d_forward(x, W, b, stride, padding):
    """y = conv(x, W) + b.  x (N, C, H, W), W (OC, C, KH, KW), b (OC,) or None -> (N, OC, OH, OW)."""
    N, C, H, Wd = x.shape
    OC, _, KH, KW = W.shape
    (SH, SW), (PH, PW) = stride, padding
    OH, OW = conv_output_size(H, KH, SH, PH), conv_output_size(Wd, KW, SW, PW)
    y = np.empty((N, OC, OH * OW), dtype=x.dtype)
    Wmat = W.reshape(OC, C * KH * KW)
    for sl in _chunks(N, C * KH * KW * OH * OW * x.itemsize):
        cols = im2col(x[sl], KH, KW, SH, SW, PH, PW)
        np.matmul(Wmat, cols, out=y[sl])  # (OC, CKK) @ (n, CKK, OHOW) -> (n, OC, OHOW)
    if b is not None:
        y += b.reshape(1, OC, 1)
    return y.reshape(N, OC, OH, OW)


def conv2d_backward(x, W, gy, stride, padding, need_gx=True):
    """Gradients of `conv2d_forward` -> (gx or None, gW, gb).

    gW = sum_n gy[n] @ cols[n]^T,   gcols[n] = W^T @ gy[n],   gx = col2im(gcols).
    """
    N, C, H, Wd = x.shape
    OC, _, KH, KW = W.shape
    (SH, SW), (PH, PW) = stride, padding
    OH, OW = gy.shape[2], gy.shape[3]
    gy = gy.reshape(N, OC, OH * OW)
    Wmat = W.reshape(OC, C * KH * KW)
    gW = np.zeros((OC, C * KH * KW), dtype=x.dtype)
    gx = np.empty_like(x) if need_gx else None
    for sl in _chunks(N, C * KH * KW * OH * OW * x.itemsize):
        cols = im2col(x[sl], KH, KW, SH, SW, PH, PW)
        for n in range(cols.shape[0]):
            gW += gy[sl][n] @ cols[n].T
        if need_gx:
            gcols = np.matmul(Wmat.T, gy[sl])  # (CKK, OC) @ (n, OC, OHOW)
            gx[sl] = col2im(gcols, x[sl].shape, KH, KW, SH, SW, PH, PW)
    gb = gy.sum(axis=(0, 2))
    return gx, gW.reshape(W.shape), gb


# ----------------------------------------------------------------------------------------
# Max-pooling
# ----------------------------------------------------------------------------------------

def max_pool2d_forward(x, kernel_size, stride):
    """(N, C, H, W) -> y (N, C, OH, OW) and argmax (N, C, OH, OW), no padding, floor mode.

    argmax holds the winner's offset ky*KW + kx inside its window.
    NOTE: on a tie the first offset in row-major order wins (strict `>`), so the gradient
    goes to exactly one input, as in Caffe and cuDNN.
    """
    (KH, KW), (SH, SW) = kernel_size, stride
    N, C, H, W = x.shape
    OH, OW = (H - KH) // SH + 1, (W - KW) // SW + 1
    y = x[:, :, 0:SH * OH:SH, 0:SW * OW:SW].copy()
    argmax = np.zeros((N, C, OH, OW), dtype=np.int32)
    for ky in range(KH):
        for kx in range(KW):
            if ky == 0 and kx == 0:
                continue
            window = x[:, :, ky:ky + SH * OH:SH, kx:kx + SW * OW:SW]
            better = window > y
            np.copyto(y, window, where=better)
            argmax[better] = ky * KW + kx
    return y, argmax


def max_pool2d_backward(gy, argmax, x_shape, kernel_size, stride):
    """Route each output gradient to the input that won its window."""
    (KH, KW), (SH, SW) = kernel_size, stride
    OH, OW = gy.shape[2], gy.shape[3]
    gx = np.zeros(x_shape, dtype=gy.dtype)
    for ky in range(KH):
        for kx in range(KW):
            # NOTE: overlapping windows (stride < kernel) can send two gradients to one
            # pixel, but never within one (ky, kx) slice, so += on the slice is exact.
            gx[:, :, ky:ky + SH * OH:SH, kx:kx + SW * OW:SW] += np.where(
                argmax == ky * KW + kx, gy, 0)
    return gx


# ----------------------------------------------------------------------------------------
# ReLU
# ----------------------------------------------------------------------------------------

def relu_forward(x):
    return np.maximum(x, 0)


def relu_backward(y, gy):
    """NOTE: the gradient at exactly 0 is 0 (a dead unit), as in PyTorch; we test y > 0."""
    return gy * (y > 0)


# ----------------------------------------------------------------------------------------
# Local response normalisation across channels (AlexNet Sec. 3.3; VGG Sec. 2.1, A-LRN)
# ----------------------------------------------------------------------------------------

def _window_sum_over_channels(a, size, before):
    """s[:, c] = sum of a[:, c - before : c - before + size], clipped at the channel ends.

    A loop over the `size` channel offsets (5 for VGG), each adding one shifted slice.
    """
    C = a.shape[1]
    s = np.zeros_like(a)
    for d in range(-before, size - before):  # s[:, c] += a[:, c + d]
        lo, hi = max(0, -d), min(C, C - d)
        if lo < hi:
            s[:, lo:hi] += a[:, lo + d:hi + d]
    return s


def lrn_forward(x, size, alpha, beta, k):
    """b_c = a_c / (k + alpha * sum_{c' near c} a_c'^2)^beta  ->  (y, scale).

    The window covers channels c - size//2 ... c + (size-1)//2. `alpha` here is the
    coefficient of the plain sum; `functional.local_response_norm` divides it by `size`
    first when the Caffe/PyTorch convention is asked for.
    """
    scale = k + alpha * _window_sum_over_channels(x * x, size, size // 2)
    return x * scale ** -beta, scale


def lrn_backward(x, y, scale, gy, size, alpha, beta):
    """gx_c = gy_c s_c^-b - 2 alpha b x_c sum_{c': c in window(c')} gy_c' y_c' / s_c'."""
    t = gy * y / scale
    # c lies in window(c') exactly when c' lies in c - (size-1)//2 ... c + size//2
    back = _window_sum_over_channels(t, size, (size - 1) // 2)
    return gy * scale ** -beta - 2.0 * alpha * beta * x * back


# ----------------------------------------------------------------------------------------
# Dropout, softmax cross-entropy
# ----------------------------------------------------------------------------------------

def dropout_mask(shape, p, dtype, rng):
    """Inverted dropout mask: 0 with probability p, 1/(1-p) otherwise."""
    keep = rng.random(shape, dtype=np.float32) >= p
    return keep.astype(dtype) * dtype.type(1.0 / (1.0 - p))


def softmax_cross_entropy_forward(logits, labels):
    """Mean over the batch of -log softmax(logits)[label] -> (loss, probs).

    NOTE: subtract each row's max before exp, so logits of +-1000 stay finite.
    """
    N = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    log_probs = shifted - log_z
    loss = -log_probs[np.arange(N), labels].mean()
    return np.asarray(loss, dtype=logits.dtype), np.exp(log_probs)


def softmax_cross_entropy_backward(probs, labels, gloss):
    """d loss / d logits = (softmax - onehot) / N, times the incoming scalar gradient."""
    N = probs.shape[0]
    g = probs.copy()
    g[np.arange(N), labels] -= 1
    g *= gloss / N
    return g


# ----------------------------------------------------------------------------------------
# SGD with momentum and weight decay (Sec. 3.1), PyTorch's convention
# ----------------------------------------------------------------------------------------

def sgd_update(params, grads, velocities, lr, momentum, weight_decay):
    """In place, for every parameter: g = grad + wd*w; v = momentum*v + g; w -= lr*v."""
    for w, g, v in zip(params, grads, velocities):
        v *= momentum
        v += g
        if weight_decay:
            v += weight_decay * w
        w -= lr * v
