"""CUDA kernels: the GPU twin of `kernels/cpu.py`, function for function.

Every public function here has the name, signature and parameter names of its CPU twin, so
`minivgg.backend.kernels_for(x)` can hand either module to an op. Shape legend and layouts
are those of `kernels/cpu.py` (NCHW; im2col matrix (N, C*KH*KW, OH*OW)).

Three kinds of work:

* memory shuffles and elementwise math (im2col, col2im, pooling, ReLU, LRN, dropout,
  softmax cross-entropy, SGD) are hand-written CUDA C in `kernels/cuda/*.cu`. Each kernel
  carries the name of the function here that launches it and the parameter names of the
  CPU twin, and a header comment saying how a thread index maps to (n, c, y, x);
* GEMMs go to cuBLAS through CuPy's `matmul`/`tensordot`. TF32 is off unless
  `minivgg.backend.set_tf32(True)` was called;
* the rest (bias add, sums, means) is ordinary CuPy array math.

Each `.cu` file is compiled once per process, on first use, by NVRTC through
`cupy.RawModule` (CuPy also caches the binary on disk across processes). Its kernels are
C++ templates instantiated for float32 and float64 and fetched by name, e.g. "im2col<float>".
This module imports CuPy at the top: `backend` imports it only once a CuPy array exists.
"""

import os

import cupy as cp
import numpy as np

# Bytes of im2col buffer to build at once. Larger than on the CPU: GEMMs on a GPU want many
# columns, and the whole buffer lives in device memory only for one chunk of the batch.
IM2COL_CHUNK_BYTES = 512 * 2**20

SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda")

# The kernels of each source file. Every one is a template over the element type T.
KERNELS = {
    "conv.cu": ("im2col", "col2im"),
    "pool.cu": ("max_pool2d_forward", "max_pool2d_backward"),
    "activation.cu": ("relu_forward", "relu_backward", "dropout_mask"),
    "lrn.cu": ("lrn_forward", "lrn_backward"),
    "loss.cu": ("softmax_cross_entropy_forward", "softmax_cross_entropy_backward"),
    "sgd.cu": ("sgd_update",),
}
C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
THREADS_PER_BLOCK = 256
MAX_BLOCKS = 65536  # kernels loop over the rest (grid-stride loops, see common.cuh)

_modules = {}  # source file -> cupy.RawModule, compiled once per process
_functions = {}  # "im2col<float>" -> cupy.RawKernel


def read_source(filename):
    """The text of `kernels/cuda/<filename>` with `common.cuh` pasted in place of its include.

    NOTE: pasted rather than found through `-I`, because CuPy's on-disk cache of compiled
    kernels is keyed by the source text: an edit to the header must change that key.
    """
    with open(os.path.join(SOURCE_DIR, "common.cuh")) as f:
        common = f.read()
    with open(os.path.join(SOURCE_DIR, filename)) as f:
        return f.read().replace('#include "common.cuh"', common)


def _kernel(name, dtype):
    """The compiled kernel `name<T>` for element type `dtype`, compiled on first use."""
    expression = f"{name}<{C_TYPES[np.dtype(dtype)]}>"
    if expression not in _functions:
        filename = next(f for f, names in KERNELS.items() if name in names)
        if filename not in _modules:
            _modules[filename] = cp.RawModule(
                code=read_source(filename),
                name_expressions=[f"{n}<{t}>" for n in KERNELS[filename]
                                  for t in C_TYPES.values()])
        _functions[expression] = _modules[filename].get_function(expression)
    return _functions[expression]


def _launch(name, dtype, count, *args):
    """Run kernel `name<dtype>` with one thread per element of `count` (capped grid).

    Arguments are passed as the kernel declares them: CuPy arrays as pointers, Python ints
    as `int`, Python floats as `T`; NumPy scalars (np.int64 for `long long`, np.float32,
    np.uint64) pass through with their own type.
    NOTE: CuPy would pass a bare Python int as a 64-bit integer and a float as a double,
    which an `int` or `float` parameter would misread, hence the conversion here.
    """
    if count == 0:
        return
    typed = [np.int32(a) if isinstance(a, int) else
             np.dtype(dtype).type(a) if isinstance(a, float) else a for a in args]
    blocks = min((count + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK, MAX_BLOCKS)
    _kernel(name, dtype)((blocks,), (THREADS_PER_BLOCK,), tuple(typed))


def conv_output_size(size, k, s, p):
    return (size + 2 * p - k) // s + 1


# ----------------------------------------------------------------------------------------
# im2col / col2im
# ----------------------------------------------------------------------------------------

def im2col(x, KH, KW, SH, SW, PH, PW):
    """(N, C, H, W) -> cols (N, C*KH*KW, OH*OW), row c*KH*KW + ky*KW + kx (conv.cu)."""
    N, C, H, W = x.shape
    OH, OW = conv_output_size(H, KH, SH, PH), conv_output_size(W, KW, SW, PW)
    x = cp.ascontiguousarray(x)  # NOTE: raw kernels ignore strides
    cols = cp.empty((N, C * KH * KW, OH * OW), dtype=x.dtype)
    _launch("im2col", x.dtype, cols.size, x, cols, N, C, H, W, KH, KW, SH, SW, PH, PW, OH, OW)
    return cols


def col2im(cols, x_shape, KH, KW, SH, SW, PH, PW):
    """The adjoint of `im2col`: cols (N, C*KH*KW, OH*OW) -> (N, C, H, W), as a gather."""
    N, C, H, W = x_shape
    OH, OW = conv_output_size(H, KH, SH, PH), conv_output_size(W, KW, SW, PW)
    cols = cp.ascontiguousarray(cols)
    gx = cp.empty((N, C, H, W), dtype=cols.dtype)
    _launch("col2im", cols.dtype, gx.size, cols, gx, N, C, H, W, KH, KW, SH, SW, PH, PW,
            OH, OW)
    return gx


def _chunks(N, bytes_per_image):
    """Batch slices whose im2col buffers stay under IM2COL_CHUNK_BYTES."""
    step = max(1, IM2COL_CHUNK_BYTES // max(1, bytes_per_image))
    return [slice(i, min(i + step, N)) for i in range(0, N, step)]


# ----------------------------------------------------------------------------------------
# Convolution: im2col + cuBLAS GEMM
# ----------------------------------------------------------------------------------------

def conv2d_forward(x, W, b, stride, padding):
    """y = conv(x, W) + b.  x (N, C, H, W), W (OC, C, KH, KW), b (OC,) or None -> (N, OC, OH, OW)."""
    N, C, H, Wd = x.shape
    OC, _, KH, KW = W.shape
    (SH, SW), (PH, PW) = stride, padding
    OH, OW = conv_output_size(H, KH, SH, PH), conv_output_size(Wd, KW, SW, PW)
    y = cp.empty((N, OC, OH * OW), dtype=x.dtype)
    Wmat = cp.ascontiguousarray(W).reshape(OC, C * KH * KW)
    for sl in _chunks(N, C * KH * KW * OH * OW * x.itemsize):
        cols = im2col(x[sl], KH, KW, SH, SW, PH, PW)
        cp.matmul(Wmat, cols, out=y[sl])  # (OC, CKK) @ (n, CKK, OHOW) -> (n, OC, OHOW)
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
    gy = cp.ascontiguousarray(gy).reshape(N, OC, OH * OW)
    Wmat = cp.ascontiguousarray(W).reshape(OC, C * KH * KW)
    gW = cp.zeros((OC, C * KH * KW), dtype=x.dtype)
    gx = cp.empty_like(x) if need_gx else None
    for sl in _chunks(N, C * KH * KW * OH * OW * x.itemsize):
        cols = im2col(x[sl], KH, KW, SH, SW, PH, PW)
        # one GEMM over the chunk: contract the batch and pixel axes of gy and cols
        gW += cp.tensordot(gy[sl], cols, axes=([0, 2], [0, 2]))
        if need_gx:
            gcols = cp.matmul(Wmat.T, gy[sl])  # (CKK, OC) @ (n, OC, OHOW)
            gx[sl] = col2im(gcols, x[sl].shape, KH, KW, SH, SW, PH, PW)
    gb = gy.sum(axis=(0, 2))
    return gx, gW.reshape(W.shape), gb


# ----------------------------------------------------------------------------------------
# Max-pooling
# ----------------------------------------------------------------------------------------

def max_pool2d_forward(x, kernel_size, stride):
    """(N, C, H, W) -> y (N, C, OH, OW) and int32 argmax (offset ky*KW + kx in the window).

    NOTE: on a tie the first offset in row-major order wins, as on the CPU (pool.cu).
    """
    (KH, KW), (SH, SW) = kernel_size, stride
    N, C, H, W = x.shape
    OH, OW = (H - KH) // SH + 1, (W - KW) // SW + 1
    x = cp.ascontiguousarray(x)
    y = cp.empty((N, C, OH, OW), dtype=x.dtype)
    argmax = cp.empty((N, C, OH, OW), dtype=np.int32)
    _launch("max_pool2d_forward", x.dtype, y.size, x, y, argmax, N, C, H, W, KH, KW, SH, SW,
            OH, OW)
    return y, argmax


def max_pool2d_backward(gy, argmax, x_shape, kernel_size, stride):
    """Route each output gradient to the input that won its window (a gather, pool.cu)."""
    (KH, KW), (SH, SW) = kernel_size, stride
    N, C, H, W = x_shape
    OH, OW = gy.shape[2], gy.shape[3]
    gy = cp.ascontiguousarray(gy)
    gx = cp.empty((N, C, H, W), dtype=gy.dtype)
    _launch("max_pool2d_backward", gy.dtype, gx.size, gy, cp.ascontiguousarray(argmax), gx,
            N, C, H, W, KH, KW, SH, SW, OH, OW)
    return gx


# ----------------------------------------------------------------------------------------
# ReLU
# ----------------------------------------------------------------------------------------

def relu_forward(x):
    x = cp.ascontiguousarray(x)
    y = cp.empty_like(x)
    _launch("relu_forward", x.dtype, x.size, x, y, np.int64(x.size))
    return y


def relu_backward(y, gy):
    """NOTE: the gradient at exactly 0 is 0 (a dead unit), as in PyTorch; we test y > 0."""
    y, gy = cp.ascontiguousarray(y), cp.ascontiguousarray(gy)
    gx = cp.empty_like(gy)
    _launch("relu_backward", gy.dtype, gy.size, y, gy, gx, np.int64(gy.size))
    return gx


# ----------------------------------------------------------------------------------------
# Local response normalisation across channels (AlexNet Sec. 3.3; VGG Sec. 2.1, A-LRN)
# ----------------------------------------------------------------------------------------

def lrn_forward(x, size, alpha, beta, k):
    """b_c = a_c / (k + alpha * sum_{c' near c} a_c'^2)^beta  ->  (y, scale)  (lrn.cu)."""
    N, C, H, W = x.shape
    x = cp.ascontiguousarray(x)
    y, scale = cp.empty_like(x), cp.empty_like(x)
    _launch("lrn_forward", x.dtype, x.size, x, y, scale, N, C, H, W, size, float(alpha),
            float(beta), float(k))
    return y, scale


def lrn_backward(x, y, scale, gy, size, alpha, beta):
    """gx_c = gy_c s_c^-b - 2 alpha b x_c sum_{c': c in window(c')} gy_c' y_c' / s_c'."""
    N, C, H, W = x.shape
    x, y, scale, gy = (cp.ascontiguousarray(a) for a in (x, y, scale, gy))
    gx = cp.empty_like(x)
    _launch("lrn_backward", x.dtype, x.size, x, y, scale, gy, gx, N, C, H, W, size,
            float(alpha), float(beta))
    return gx


# ----------------------------------------------------------------------------------------
# Dropout, softmax cross-entropy
# ----------------------------------------------------------------------------------------

def dropout_mask(shape, p, dtype, rng):
    """Inverted dropout mask: 0 with probability p, 1/(1-p) otherwise.

    `rng` is the host generator (`backend.rng()`): one 64-bit seed drawn from it feeds a
    counter-based generator on the GPU (activation.cu), so `manual_seed` makes GPU runs
    repeatable. The mask differs from the CPU's for the same seed; its distribution does not.
    """
    dtype = np.dtype(dtype)
    seed = rng.integers(0, 2**64, dtype=np.uint64)
    mask = cp.empty(shape, dtype=dtype)
    _launch("dropout_mask", dtype, mask.size, mask, np.int64(mask.size), np.uint64(seed),
            np.float32(p), float(1.0 / (1.0 - p)))
    return mask


def softmax_cross_entropy_forward(logits, labels):
    """Mean over the batch of -log softmax(logits)[label] -> (loss, probs)  (loss.cu).

    NOTE: each row's max is subtracted before exp, so logits of +-1000 stay finite.
    """
    N, K = logits.shape
    logits = cp.ascontiguousarray(logits)
    labels = cp.ascontiguousarray(labels, dtype=np.int64)
    probs = cp.empty_like(logits)
    losses = cp.empty(N, dtype=logits.dtype)
    _launch("softmax_cross_entropy_forward", logits.dtype, N, logits, labels, probs, losses,
            N, K)
    return losses.mean(), probs


def softmax_cross_entropy_backward(probs, labels, gloss):
    """d loss / d logits = (softmax - onehot) / N, times the incoming scalar gradient."""
    N, K = probs.shape
    probs = cp.ascontiguousarray(probs)
    labels = cp.ascontiguousarray(labels, dtype=np.int64)
    gloss = cp.asarray(gloss, dtype=probs.dtype).reshape(1)
    glogits = cp.empty_like(probs)
    _launch("softmax_cross_entropy_backward", probs.dtype, probs.size, probs, labels, gloss,
            glogits, N, K)
    return glogits


# ----------------------------------------------------------------------------------------
# SGD with momentum and weight decay (Sec. 3.1), PyTorch's convention
# ----------------------------------------------------------------------------------------

def _pointer_table(arrays):
    """A device array of the arrays' device addresses (a `T**` for a kernel)."""
    return cp.asarray(np.array([a.data.ptr for a in arrays], dtype=np.uint64))


def sgd_update(params, grads, velocities, lr, momentum, weight_decay):
    """In place, for every parameter: g = grad + wd*w; v = momentum*v + g; w -= lr*v.

    One kernel launch for all parameters (sgd.cu): tables of device pointers and the
    parameters' offsets in one virtual concatenated vector.
    """
    if not params:
        return
    dtype = params[0].dtype
    for w, g, v in zip(params, grads, velocities):
        if not (w.dtype == g.dtype == v.dtype == dtype):
            raise TypeError(f"sgd_update: every parameter, gradient and velocity must be "
                            f"{dtype}, got {w.dtype}, {g.dtype}, {v.dtype} for shape {w.shape}")
        if not (w.flags.c_contiguous and v.flags.c_contiguous):
            raise ValueError("sgd_update: parameters and velocities are updated in place and "
                             "must be C-contiguous")
    grads = [cp.ascontiguousarray(g) for g in grads]  # read only, so a copy is fine
    offsets = np.concatenate([[0], np.cumsum([w.size for w in params])]).astype(np.int64)
    _launch("sgd_update", dtype, int(offsets[-1]), _pointer_table(params),
            _pointer_table(grads), _pointer_table(velocities), cp.asarray(offsets),
            len(params), float(lr), float(momentum), float(weight_decay))
