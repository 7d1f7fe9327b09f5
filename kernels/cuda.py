"""The CUDA kernel table: the GPU twin of the `kernels/cpu/` package.

Its entry points (`common.ENTRY_POINTS`) have the names and parameters of the CPU's, so
`minivgg.backend.kernels_for(x)` can hand either table to an op. The conv drivers and the
whole-batch im2col/col2im are written once in `kernels/common.py`; this module gives them
the GPU's primitives (a serial `map_ranges`, one workspace, the conv.cu launchers) and is
handed to them through `common.Primitives`. Shape legend and layouts: see `kernels/common.py`.

Three kinds of work:

* memory moves and elementwise math (im2col, col2im, pooling, ReLU, LRN, dropout,
  softmax cross-entropy, SGD) are hand-written CUDA C in `kernels/cuda/*.cu`. Each kernel
  carries the name of the function here that launches it and the parameter names of the
  CPU twin, and a header comment saying how a thread index maps to (n, c, y, x);
* GEMMs go to cuBLAS through CuPy's 2-D `matmul`, one per chunk of the batch. TF32 is off
  unless `minivgg.backend.set_tf32(True)` was called;
* the rest (bias gradients, the loss's batch mean) is ordinary CuPy array math.

Each `.cu` file is compiled once per process, on first use, by NVRTC through
`cupy.RawModule` (CuPy also caches the binary on disk across processes). Its kernels are
C++ templates instantiated for float32 and float64 and fetched by name, e.g. "im2col_chunk<float>".
This module imports CuPy at the top: `backend` imports it only once a CuPy array exists.
"""

import os

import cupy as cp
import numpy as np

from minivgg.kernels import common

xp = cp

# Bytes of im2col matrix built at once. Larger than on the CPU (no cache to stay near): a
# GPU GEMM wants many columns. At 224×224 it holds 4 images of conv1_2 (115 MB each), 16
# and more of every later layer, and one buffer is reused by every layer.
IM2COL_CHUNK_BYTES = 512 * 2**20

SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda")

# The kernels of each source file. Every one is a template over the element type T.
KERNELS = {
    "conv.cu": ("im2col_chunk", "col2im_chunk", "cols_to_nchw", "nchw_to_cols"),
    "pool.cu": ("max_pool2d_forward", "max_pool2d_backward"),
    "activation.cu": ("relu_forward", "relu_backward", "dropout_mask"),
    "lrn.cu": ("lrn_forward", "lrn_backward"),
    "loss.cu": ("softmax_cross_entropy_forward", "softmax_cross_entropy_backward"),
    "sgd.cu": ("sgd_update",),
    "winograd.cu": ("tile_transform", "output_transform", "filter_transform",
                    "filter_grad_transform"),
    "direct.cu": ("direct_conv", "direct_weight_grad"),
}
C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
THREADS_PER_BLOCK = 256
MAX_BLOCKS = 65536  # kernels loop over the rest (grid-stride loops, see common.cuh)

_modules = {}  # source file -> cupy.RawModule, compiled once per process
_functions = {}  # "im2col_chunk<float>" -> cupy.RawKernel


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


# ----------------------------------------------------------------------------------------
# The primitives the shared drivers (kernels/common.py) ask of a device
# ----------------------------------------------------------------------------------------

# NOTE: reuse of a workspace buffer across kernels is safe because all of them run in order
# on one stream. Named buffers keep the big im2col matrices out of CuPy's pool size classes,
# so a step's peak memory stays predictable.
workspace = common.Workspace(cp, per_thread=False)


def num_parts():
    """One stream runs the chunks one after another: no need to cut more of them."""
    return 1


def map_ranges(job, n_items):
    """[job(0, n_items)]: the GPU parallelises inside each kernel, not across chunks."""
    return [job(0, n_items)] if n_items else []


# ----------------------------------------------------------------------------------------
# im2col / col2im on a chunk: images n0..n1-1, output rows oy0..oy1-1 of each (conv.cu)
# ----------------------------------------------------------------------------------------

def im2col_chunk(x, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, cols):
    """Fill cols (CKK, P) for a chunk of x (N, C, H, W); padding reads as zero."""
    N, C, H, W = x.shape
    OW = common.conv_output_size(W, KW, SW, PW)
    _launch("im2col_chunk", x.dtype, cols.size, cp.ascontiguousarray(x), n0, n1, oy0, oy1,
            KH, KW, SH, SW, PH, PW, cols, C, H, W, OW)


def col2im_chunk(cols, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, gx):
    """The adjoint of `im2col_chunk`: add every entry of cols (CKK, P) back into gx.

    A gather (conv.cu): one thread per input pixel of the chunk's images sums what the
    windows copied from it, so no two threads write one pixel and no atomics are needed.
    """
    N, C, H, W = gx.shape
    OW = common.conv_output_size(W, KW, SW, PW)
    _launch("col2im_chunk", gx.dtype, (n1 - n0) * C * H * W, cp.ascontiguousarray(cols),
            n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, gx, C, H, W, OW)


# ----------------------------------------------------------------------------------------
# Moving a chunk of outputs between the GEMM's (OC, P) layout and NCHW (conv.cu)
# ----------------------------------------------------------------------------------------

def cols_to_nchw(ycols, b, n0, n1, oy0, oy1, y):
    """y[n, oc, oy0:oy1, :] = ycols[oc, chunk columns of n] + b[oc], for n in n0..n1-1."""
    N, OC, OH, OW = y.shape
    _launch("cols_to_nchw", y.dtype, (n1 - n0) * OC * (oy1 - oy0) * OW,
            cp.ascontiguousarray(ycols), cp.ascontiguousarray(b), n0, n1, oy0, oy1, y,
            OC, OH, OW)


def nchw_to_cols(gy, n0, n1, oy0, oy1, gycols):
    """The inverse move: gycols (OC, P) = the chunk of gy (N, OC, OH, OW)."""
    N, OC, OH, OW = gy.shape
    _launch("nchw_to_cols", gy.dtype, gycols.size, cp.ascontiguousarray(gy), n0, n1, oy0,
            oy1, gycols, OC, OH, OW)


def add_bias(ycols, b):
    """ycols (OC, P) += b[:, None], in place (ycols may be a strided view of y)."""
    ycols += b[:, None]


# ----------------------------------------------------------------------------------------
# Winograd transforms (winograd.cu), for the drivers of kernels/winograd.py
# ----------------------------------------------------------------------------------------

# Bytes of transformed tiles per chunk: as for im2col, a GPU GEMM wants many columns.
WINOGRAD_CHUNK_BYTES = 256 * 2**20


def point_gemms(A, B, out):
    """out[t] = A[t] @ B[t] for every transform point t: A (α², I, J), B (α², J, K).

    NOTE: 2-D products, one per point: CuPy's batched matmul ignores the TF32 setting
    (see kernels/common.py).
    """
    for t in range(A.shape[0]):
        cp.matmul(A[t], B[t], out=out[t])


def tile_transform(src, L, m, shift, r0, r1, TH, TW, out):
    """out (r, r, CH, P) = L d L^T for the k×k window d of src[n, ch] of every tile q."""
    N, CH, H, W = src.shape
    r, k = L.shape
    _launch("tile_transform", out.dtype, CH * (r1 - r0) * TW, cp.ascontiguousarray(src),
            cp.ascontiguousarray(L), m, shift, r0, r1, TH, TW, out, CH, H, W, r, k)


def input_transform(x, BT, m, r0, r1, TH, TW, V):
    """V (α, α, C, P) = B^T d B for the α×α input tile d of every tile and channel."""
    tile_transform(x, BT, m, -1, r0, r1, TH, TW, V)


def grad_output_transform(gy, A, m, r0, r1, TH, TW, Z):
    """Z (α, α, OC, P) = A g A^T for the m×m block g of gy of every tile."""
    tile_transform(gy, A, m, 0, r0, r1, TH, TW, Z)


def output_transform(M, AT, m, r0, r1, TH, TW, b, y):
    """y tile = A^T M[:, :, oc, q] A + b[oc], cropped to the image, for every tile q."""
    N, OC, H, W = y.shape
    _launch("output_transform", y.dtype, OC * (r1 - r0) * TW, cp.ascontiguousarray(M),
            cp.ascontiguousarray(AT), m, r0, r1, TH, TW, cp.ascontiguousarray(b), y, OC, H, W)


def filter_transform(W, G, rotate, U):
    """U (α, α, O, I) = G w G^T for every filter (rotated and swapped with `rotate`)."""
    alpha, O, I = U.shape[0], U.shape[2], U.shape[3]
    _launch("filter_transform", U.dtype, O * I, cp.ascontiguousarray(W),
            cp.ascontiguousarray(G, dtype=np.float64), int(rotate), U, O, I, alpha)


def filter_grad_transform(dU, G, gW):
    """gW (OC, C, 3, 3) = G^T dU[:, :, oc, c] G, from dU (α, α, OC, C)."""
    alpha, OC, C = dU.shape[0], dU.shape[2], dU.shape[3]
    _launch("filter_grad_transform", gW.dtype, OC * C, cp.ascontiguousarray(dU),
            cp.ascontiguousarray(G, dtype=np.float64), gW, OC, C, alpha)


# ----------------------------------------------------------------------------------------
# Direct convolution (direct.cu), for the drivers of kernels/direct.py
# ----------------------------------------------------------------------------------------

def direct_conv(x, W, b, y):
    """y (N, OC, H, W) = conv(x, W) + b, 3×3/s1/p1: one thread per output."""
    N, C, H, Wd = x.shape
    _launch("direct_conv", y.dtype, y.size, cp.ascontiguousarray(x, dtype=y.dtype),
            cp.ascontiguousarray(W, dtype=y.dtype), cp.ascontiguousarray(b, dtype=y.dtype), y,
            N, C, H, Wd, y.shape[1])


def direct_weight_grad(x, gy, gW):
    """gW (OC, C, 3, 3) = sum over images and pixels of gy[oc] · shifted x[c]: one thread
    per entry, a fixed-order sum in double."""
    N, C, H, Wd = x.shape
    _launch("direct_weight_grad", gW.dtype, gW.size, cp.ascontiguousarray(x, dtype=gW.dtype),
            cp.ascontiguousarray(gy, dtype=gW.dtype), gW, N, C, H, Wd, gy.shape[1])


# ----------------------------------------------------------------------------------------
# Entry points: whole-batch im2col / col2im and the convolution drivers (kernels/common.py)
# ----------------------------------------------------------------------------------------

_this = common.Primitives(globals())  # what the shared drivers receive


# The conv entry points of this table (`common.ConvEntryPoints`, written once for both
# devices): whole-batch im2col / col2im and conv2d_forward / conv2d_backward by the chosen
# algorithm: im2col + GEMM (`common.conv2d_forward`), Winograd (`kernels/winograd.py`) or
# direct (`kernels/direct.py`).
im2col, col2im, conv2d_forward, conv2d_backward = common.ConvEntryPoints(
    _this, _this, _this).methods()


# ----------------------------------------------------------------------------------------
# Max-pooling
# ----------------------------------------------------------------------------------------

def max_pool2d_forward(x, kernel_size, stride, ceil_mode=False):
    """(N, C, H, W) -> y (N, C, OH, OW) and int32 argmax (offset ky*KW + kx in the window).

    OH = `pool_output_size(H, KH, SH, ceil_mode)`, as on the CPU.
    NOTE: on a tie the first offset in row-major order wins, as on the CPU (pool.cu).
    """
    (KH, KW), (SH, SW) = kernel_size, stride
    N, C, H, W = x.shape
    OH = common.pool_output_size(H, KH, SH, ceil_mode)
    OW = common.pool_output_size(W, KW, SW, ceil_mode)
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

    One kernel launch for all parameters (sgd.cu), through tables of device pointers and
    the parameters' offsets in one virtual concatenated vector; one launch per dtype when a
    model mixes float32 and float64 parameters.
    """
    groups = {}  # dtype -> (params, grads, velocities)
    for w, g, v in zip(params, grads, velocities):
        if not (w.flags.c_contiguous and v.flags.c_contiguous):
            raise ValueError("sgd_update: parameters and velocities must be contiguous")
        ws, gs, vs = groups.setdefault(w.dtype, ([], [], []))
        ws.append(w)
        gs.append(cp.ascontiguousarray(g, dtype=w.dtype))  # read only: a copy is fine
        vs.append(v)
    for dtype, (ws, gs, vs) in groups.items():
        offsets = np.cumsum([0] + [w.size for w in ws], dtype=np.int64)
        _launch("sgd_update", dtype, int(offsets[-1]), _pointer_table(ws), _pointer_table(gs),
                _pointer_table(vs), cp.asarray(offsets), len(ws), float(lr), float(momentum),
                float(weight_decay))
