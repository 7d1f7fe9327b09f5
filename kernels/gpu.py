"""The GPU kernel table: the twin of the `kernels/cpu/` package, on CuPy and CUDA C.

Its entry points (`common.ENTRY_POINTS`) have the names and parameters of the CPU's, so
`minivgg.backend.kernels_for(x)` can hand either table to an op. The conv drivers are
written once (`kernels/common.py`, `winograd.py`, `direct.py`); `CudaPrimitives` below is
what they call on the GPU (`common.Primitives` is the contract). Shape legend and layouts:
see `kernels/common.py`.

Three kinds of work:

* memory moves, transforms and elementwise math (im2col, col2im, Winograd's transforms,
  direct and register-blocked direct convolution, pooling, ReLU, LRN, dropout, softmax
  cross-entropy, SGD) are hand-written CUDA C in `kernels/cuda/*.cu`. Each kernel carries
  the name of the function here that launches it and the parameter names of the CPU twin,
  and a header comment saying how a thread index maps to (n, c, y, x);
* GEMMs go to cuBLAS (`gemm` below) through CuPy's public binding `cupy.cuda.cublas`, one
  per chunk of the batch, with the compute type chosen per call: TF32 only for float32
  im2col GEMMs after `minivgg.backend.set_tf32(True)`, never for Winograd's;
* the rest (bias gradients, the loss's batch mean) is ordinary CuPy array math.

Each `.cu` file is compiled once per process, on first use, by NVRTC through
`cupy.RawModule` (CuPy also caches the binary on disk across processes). Its kernels are
C++ templates instantiated for float32 and float64 and fetched by name, e.g. "im2col_chunk<float>".
This module imports CuPy at the top: `backend` imports it only once a CuPy array exists.
"""

import os

import cupy as cp
import numpy as np

from minivgg import backend  # loaded first: only `backend.kernels_for` imports this module
from minivgg.kernels import common, direct
from minivgg.kernels.shapes import conv_output_size, pool_output_size

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
    "blocked.cu": ("blocked_conv", "blocked_weight_grad", "blocked_weight_grad_sum"),
}
C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
THREADS_PER_BLOCK = 256
MAX_BLOCKS = 65536  # kernels loop over the rest (grid-stride loops, see common.cuh)
# blocked.cu's block shape: BLOCKED_THREADS threads, one per register block of a forward
# tile of TILE_H × TILE_W pixels × TILE_OC channels; GRAD_TILE² channel pairs a gW block.
BLOCKED_THREADS, BLOCKED_TILE, GRAD_TILE = 256, (8, 32, 16), 16
# Blocks the blocked weight gradient aims for: its (image, row) axis is cut into this many
# ranges, over the blocks of 16 × 16 channels, whose sums are then added in order.
BLOCKED_GRAD_BLOCKS = 512

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


def _launch(name, dtype, count, *args, blocks=None, threads=None):
    """Run kernel `name<dtype>` with one thread per element of `count` (capped grid), or,
    given `blocks`, that many blocks of THREADS_PER_BLOCK (or `threads`) threads (capped
    too).

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
    threads = threads or THREADS_PER_BLOCK
    if blocks is None:
        blocks = (count + threads - 1) // threads
    _kernel(name, dtype)((min(blocks, MAX_BLOCKS),), (threads,), tuple(typed))


# ----------------------------------------------------------------------------------------
# GEMMs: cuBLAS through CuPy's public binding, the compute type chosen per call
# ----------------------------------------------------------------------------------------
#
# cuBLAS is column-major and our arrays are row-major. A row-major (rows, cols) matrix with
# row stride ld is, read column-major with leading dimension ld, its transpose. So
# out = A @ B is asked as out^T = B^T @ A^T: cuBLAS's first operand is B, its second A, and
# each goes in untransposed (OP_N) when it is a row-major matrix, or as OP_T when it is a
# transposed view of one (its column stride is 1), with no copy.
# NOTE: CuPy's own batched (3-D) `matmul` ignores the TF32 setting, and its 2-D one follows
# it through private CuPy state; here every call says its compute type.

# The enums of cublas_api.h and library_types.h (part of the CUDA ABI).
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_COMPUTE_64F = 68, 77, 70
CUDA_DATA_TYPES = {np.dtype(np.float32): 0, np.dtype(np.float64): 1}  # CUDA_R_32F, _64F


def _operand(X):
    """(X, op, ld, batch stride) for a row-major operand of a GEMM (the last two axes are
    the matrix); a copy only when neither axis has unit stride."""
    rows, cols = X.shape[-2:]
    stride_row, stride_col = (s // X.itemsize for s in X.strides[-2:])
    batch = X.strides[0] // X.itemsize if X.ndim == 3 else 0
    if stride_col == 1 or cols == 1:
        ld = stride_row if rows > 1 else cols
        if ld >= max(1, cols):
            return X, CUBLAS_OP_N, ld, batch
    if stride_row == 1 or rows == 1:
        ld = stride_col if cols > 1 else rows
        if ld >= max(1, rows):
            return X, CUBLAS_OP_T, ld, batch
    return _operand(cp.ascontiguousarray(X))


def gemm(A, B, out, allow_tf32):
    """out = A @ B on cuBLAS: 2-D (gemmEx), or a stack of them (3-D, one
    gemmStridedBatchedEx for the whole stack). A (I, J) or (T, I, J); B likewise (J, K).

    The compute type is explicit: float64 in FP64; float32 in FP32, or in TF32 when
    `allow_tf32` and `backend.tf32_enabled()` (float32 inputs rounded to 10 mantissa bits).
    """
    M, N, K = A.shape[-2], B.shape[-1], A.shape[-1]
    if out.strides[-1] != out.itemsize or (M > 1 and out.strides[-2] < N * out.itemsize):
        result = cp.empty(out.shape, dtype=out.dtype)  # cuBLAS writes row-major only
        gemm(A, B, result, allow_tf32)
        out[...] = result
        return
    if M == 0 or N == 0:
        return
    if K == 0:
        out.fill(0)
        return
    dtype = np.dtype(out.dtype)
    if dtype == np.float64:
        compute, scalar = CUBLAS_COMPUTE_64F, np.float64
    else:
        fast = allow_tf32 and backend.tf32_enabled()
        compute, scalar = (CUBLAS_COMPUTE_32F_FAST_TF32 if fast else CUBLAS_COMPUTE_32F,
                           np.float32)
    A, op_a, lda, stride_a = _operand(A)
    B, op_b, ldb, stride_b = _operand(B)
    ldc = out.strides[-2] // out.itemsize if M > 1 else N
    alpha, beta = np.ones(1, dtype=scalar), np.zeros(1, dtype=scalar)  # host scalars
    data = CUDA_DATA_TYPES[dtype]
    handle = cp.cuda.device.get_cublas_handle()
    if out.ndim == 2:
        cp.cuda.cublas.gemmEx(
            handle, op_b, op_a, N, M, K, alpha.ctypes.data, B.data.ptr, data, ldb,
            A.data.ptr, data, lda, beta.ctypes.data, out.data.ptr, data, ldc, compute,
            CUBLAS_GEMM_DEFAULT)
    else:
        cp.cuda.cublas.gemmStridedBatchedEx(
            handle, op_b, op_a, N, M, K, alpha.ctypes.data, B.data.ptr, data, ldb, stride_b,
            A.data.ptr, data, lda, stride_a, beta.ctypes.data, out.data.ptr, data, ldc,
            out.strides[0] // out.itemsize, out.shape[0], compute, CUBLAS_GEMM_DEFAULT)


# ----------------------------------------------------------------------------------------
# The GPU's primitives (kernels/common.py: Primitives), and the conv entry points on them
# ----------------------------------------------------------------------------------------

# Bytes of transformed tiles per chunk: as for im2col, a GPU GEMM wants many columns.
WINOGRAD_CHUNK_BYTES = 256 * 2**20


class CudaPrimitives(common.Primitives):
    """The GPU's kernels, as the shared drivers call them: launchers of the `.cu` kernels
    and cuBLAS GEMMs. One stream runs everything in order, so the chunks of a layer run
    one after another (`map_ranges` is serial) and one workspace serves them all.
    Contract: `common.Primitives`."""

    xp = cp
    # NOTE: reuse of a workspace buffer across kernels is safe because all of them run in
    # order on one stream. Named buffers keep the big im2col matrices out of CuPy's pool
    # size classes, so a step's peak memory stays predictable.
    workspace = common.Workspace(cp, per_thread=False)

    @property
    def im2col_chunk_bytes(self):
        """IM2COL_CHUNK_BYTES of this module, read at each call (a test may change it)."""
        return IM2COL_CHUNK_BYTES

    @property
    def winograd_chunk_bytes(self):
        """WINOGRAD_CHUNK_BYTES of this module, read at each call."""
        return WINOGRAD_CHUNK_BYTES

    def num_parts(self):
        """One stream runs the chunks one after another: no need to cut more of them."""
        return 1

    def map_ranges(self, job, n_items, elements=None):
        """[job(0, n_items)]: the GPU parallelises inside each kernel, not across chunks."""
        return [job(0, n_items)] if n_items else []

    # --- im2col / col2im on a chunk: images n0..n1-1, output rows oy0..oy1-1 (conv.cu) ---
    def im2col_chunk(self, x, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, cols):
        """Fill cols (CKK, P) for a chunk of x (N, C, H, W); padding reads as zero."""
        N, C, H, W = x.shape
        OW = conv_output_size(W, KW, SW, PW)
        _launch("im2col_chunk", x.dtype, cols.size, cp.ascontiguousarray(x), n0, n1, oy0,
                oy1, KH, KW, SH, SW, PH, PW, cols, C, H, W, OW)

    def col2im_chunk(self, cols, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, gx):
        """The adjoint of `im2col_chunk`: add every entry of cols (CKK, P) back into gx.

        A gather (conv.cu): one thread per input pixel of the chunk's images sums what the
        windows copied from it, so no two threads write one pixel and no atomics are needed.
        """
        N, C, H, W = gx.shape
        OW = conv_output_size(W, KW, SW, PW)
        _launch("col2im_chunk", gx.dtype, (n1 - n0) * C * H * W, cp.ascontiguousarray(cols),
                n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, gx, C, H, W, OW)

    def cols_to_nchw(self, ycols, b, n0, n1, oy0, oy1, y):
        """y[n, oc, oy0:oy1, :] = ycols[oc, chunk columns of n] + b[oc], n in n0..n1-1."""
        N, OC, OH, OW = y.shape
        _launch("cols_to_nchw", y.dtype, (n1 - n0) * OC * (oy1 - oy0) * OW,
                cp.ascontiguousarray(ycols), cp.ascontiguousarray(b), n0, n1, oy0, oy1, y,
                OC, OH, OW)

    def nchw_to_cols(self, gy, n0, n1, oy0, oy1, gycols):
        """The inverse move: gycols (OC, P) = the chunk of gy (N, OC, OH, OW)."""
        N, OC, OH, OW = gy.shape
        _launch("nchw_to_cols", gy.dtype, gycols.size, cp.ascontiguousarray(gy), n0, n1,
                oy0, oy1, gycols, OC, OH, OW)

    def add_bias(self, ycols, b):
        """ycols (OC, P) += b[:, None], in place (ycols may be a strided view of y)."""
        ycols += b[:, None]

    def matmul(self, A, B, out):
        """out = A @ B, one cuBLAS call; float32 in TF32 when `backend.set_tf32(True)`."""
        gemm(A, B, out, allow_tf32=True)

    def im2col_operand(self, x, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, cols, transposed):
        """cols filled by `im2col_chunk`, as the GEMM reads it (cols.T with `transposed`)."""
        self.im2col_chunk(x, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, cols)
        return cols.T if transposed else cols

    def pack_weights(self, A):
        """A itself: cuBLAS reads the weights as they are (the GPU stays fp32/TF32)."""
        return A

    # --- Winograd (winograd.cu; its matrices are constants there) ------------------------
    def point_gemms(self, A, B, out):
        """out[t] = A[t] @ B[t] for every transform point t: one strided-batched cuBLAS
        call. NOTE: never TF32: F(4×4,3×3) amplifies rounding about 25×
        (benchmarks/winograd_accuracy.md)."""
        gemm(A, B, out, allow_tf32=False)

    def tile_transform(self, src, m, shift, r0, r1, TH, TW, out):
        """out (α, α, CH, P) = L d L^T for the window d of src[n, ch] of every tile q:
        L = B^T (shift -1, α×α windows) or A (shift 0, m×m blocks)."""
        N, CH, H, W = src.shape
        _launch("tile_transform", out.dtype, CH * (r1 - r0) * TW, cp.ascontiguousarray(src),
                m, shift, r0, r1, TH, TW, out, CH, H, W)

    def input_transform(self, x, m, r0, r1, TH, TW, V):
        """V (α, α, C, P) = B^T d B for the α×α input tile d of every tile and channel."""
        self.tile_transform(x, m, -1, r0, r1, TH, TW, V)

    def grad_output_transform(self, gy, m, r0, r1, TH, TW, Z):
        """Z (α, α, OC, P) = A g A^T for the m×m block g of gy of every tile."""
        self.tile_transform(gy, m, 0, r0, r1, TH, TW, Z)

    def output_transform(self, M, m, r0, r1, TH, TW, b, y):
        """y tile = A^T M[:, :, oc, q] A + b[oc], cropped to the image, for every tile q."""
        N, OC, H, W = y.shape
        _launch("output_transform", y.dtype, OC * (r1 - r0) * TW, cp.ascontiguousarray(M),
                m, r0, r1, TH, TW, cp.ascontiguousarray(b), y, OC, H, W)

    def filter_transform(self, W, m, rotate, U):
        """U (α, α, O, I) = G w G^T for every filter (rotated and swapped with `rotate`)."""
        O, I = U.shape[2], U.shape[3]
        _launch("filter_transform", U.dtype, O * I, cp.ascontiguousarray(W), m, int(rotate),
                U, O, I)

    def filter_grad_transform(self, dU, m, gW):
        """gW (OC, C, 3, 3) = G^T dU[:, :, oc, c] G, from dU (α, α, OC, C)."""
        OC, C = dU.shape[2], dU.shape[3]
        _launch("filter_grad_transform", gW.dtype, OC * C, cp.ascontiguousarray(dU), m, gW,
                OC, C)

    # --- direct convolution (direct.cu) ---------------------------------------------------
    def direct_conv(self, x, W, b, y):
        """y (N, OC, H, W) = conv(x, W) + b, 3×3/s1/p1: one thread per output."""
        N, C, H, Wd = x.shape
        _launch("direct_conv", y.dtype, y.size, cp.ascontiguousarray(x, dtype=y.dtype),
                cp.ascontiguousarray(W, dtype=y.dtype), cp.ascontiguousarray(b, dtype=y.dtype),
                y, N, C, H, Wd, y.shape[1])

    def direct_weight_grad(self, x, gy, gW):
        """gW (OC, C, 3, 3) = sum over images and pixels of gy[oc] · shifted x[c]: one block
        per entry, its threads' partial sums added by a fixed tree, in double."""
        N, C, H, Wd = x.shape
        _launch("direct_weight_grad", gW.dtype, gW.size,
                cp.ascontiguousarray(x, dtype=gW.dtype), cp.ascontiguousarray(gy, dtype=gW.dtype),
                gW, N, C, H, Wd, gy.shape[1], blocks=gW.size)

    # --- register-blocked direct convolution, 3×3/s1/p1 (blocked.cu) ----------------------
    def blocked_conv2d_forward(self, x, W, b):
        """y = conv(x, W) + b -> (N, OC, H, W): each thread a register block of 4 pixels ×
        4 output channels, the input tile and filter block staged in shared memory."""
        x = cp.ascontiguousarray(x)
        N, C, H, Wd = x.shape
        OC = W.shape[0]
        b = cp.zeros(OC, x.dtype) if b is None else cp.ascontiguousarray(b, dtype=x.dtype)
        y = cp.empty((N, OC, H, Wd), dtype=x.dtype)
        self.blocked_conv(x, cp.ascontiguousarray(W, dtype=x.dtype), b, y)
        return y

    def blocked_conv2d_backward(self, x, W, gy, need_gx):
        """(gx or None, gW, gb): gx by the forward kernel on the rotated filters, gW by
        16 × 16-channel blocks over fixed row ranges added in order (bit for bit repeatable)."""
        x = cp.ascontiguousarray(x)
        gy = cp.ascontiguousarray(gy, dtype=x.dtype)
        (N, C, H, _), OC = x.shape, gy.shape[1]
        gx = None
        if need_gx:
            gx = cp.empty(x.shape, dtype=x.dtype)
            self.blocked_conv(gy, direct.rotated_filters(cp, W.astype(x.dtype, copy=False)),
                              cp.zeros(C, x.dtype), gx)
        gW = cp.empty((OC, C, 3, 3), dtype=x.dtype)
        channel_blocks = -(-OC // GRAD_TILE) * -(-C // GRAD_TILE)
        splits = max(1, min(N * H, BLOCKED_GRAD_BLOCKS // channel_blocks))
        partial = gW[None] if splits == 1 else self.workspace(
            "blocked_partial", (splits, OC, C, 3, 3), x.dtype)
        self.blocked_weight_grad(x, gy, partial)
        if splits > 1:
            self.blocked_weight_grad_sum(partial, gW)
        return gx, gW, gy.sum(axis=(0, 2, 3))

    def blocked_conv(self, x, W, b, y):
        """y (N, OC, H, W) = conv(x, W) + b, one BLOCKED_TILE of y a block."""
        N, C, H, Wd = x.shape
        OC = y.shape[1]
        TH, TW, TOC = BLOCKED_TILE
        tiles = N * -(-H // TH) * -(-Wd // TW) * -(-OC // TOC)
        _launch("blocked_conv", x.dtype, tiles, x, W, b, y, N, C, H, Wd, OC, blocks=tiles,
                threads=BLOCKED_THREADS)

    def blocked_weight_grad(self, x, gy, partial):
        """partial (S, OC, C, 3, 3): gW summed over each of S ranges of the (image, row) axis."""
        N, C, H, Wd = x.shape
        splits, OC = partial.shape[:2]
        jobs = splits * -(-OC // GRAD_TILE) * -(-C // GRAD_TILE)
        _launch("blocked_weight_grad", x.dtype, jobs, x, gy, partial, N, C, H, Wd, OC, splits,
                blocks=jobs, threads=BLOCKED_THREADS)

    def blocked_weight_grad_sum(self, partial, gW):
        """gW = partial.sum(axis=0), the ranges added in order."""
        _launch("blocked_weight_grad_sum", gW.dtype, gW.size, partial, gW, partial.shape[0],
                gW.size)


PRIMITIVES = CudaPrimitives()


def fc_matmul(a, b):
    """a @ b for 2-D arrays (the fc layers) -> a new array, one cuBLAS call; float32 in TF32
    when `backend.set_tf32(True)`, as the im2col GEMMs."""
    out = cp.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a.dtype, b.dtype))
    gemm(a.astype(out.dtype, copy=False), b.astype(out.dtype, copy=False), out,
         allow_tf32=True)
    return out

# The conv entry points of the GPU table, written once in `common.Primitives`: whole-batch
# im2col / col2im and conv2d_forward / conv2d_backward by the chosen algorithm.
im2col, col2im = PRIMITIVES.im2col, PRIMITIVES.col2im
conv2d_forward, conv2d_backward = PRIMITIVES.conv2d_forward, PRIMITIVES.conv2d_backward


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
    OH = pool_output_size(H, KH, SH, ceil_mode)
    OW = pool_output_size(W, KW, SW, ceil_mode)
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


def relu_max_pool2d_forward(x, kernel_size, stride, ceil_mode=False):
    """max_pool2d_forward(relu_forward(x), ...): the CPU table's fused pass, in two."""
    return max_pool2d_forward(relu_forward(x), kernel_size, stride, ceil_mode)


def relu_max_pool2d_backward(gy, argmax, y, x_shape, kernel_size, stride):
    """The gradient with respect to x of relu_max_pool2d_forward(x) -> (y, argmax), as the
    CPU table's general path computes it: ReLU's backward with relu(x) > 0 replaced by the
    winners of a window with y > 0 (the only places the pool's gradient can be nonzero)."""
    gx = max_pool2d_backward(gy, argmax, x_shape, kernel_size, stride)
    positive = max_pool2d_backward((y > 0).astype(gy.dtype), argmax, x_shape, kernel_size,
                                   stride)
    return relu_backward(positive, gx)


# ----------------------------------------------------------------------------------------
# ReLU
# ----------------------------------------------------------------------------------------

def relu_forward(x, y=None):
    """max(x, 0) -> a new array, or into `y` (which may be x itself: in place)."""
    x = cp.ascontiguousarray(x)
    if y is None:
        y = cp.empty_like(x)
    elif not (y.flags.c_contiguous and y.shape == x.shape and y.dtype == x.dtype):
        raise ValueError(f"relu_forward: the output must be a C-contiguous {x.dtype} array "
                         f"of shape {x.shape}, got {y.dtype} {y.shape}")
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

_tables = {}  # (what, dtype) -> (host values, device copy): the last table of each kind


def _device_table(what, dtype, values, table_dtype):
    """A device array of `values` (device addresses, or offsets), uploaded only when they
    differ from the last table of this kind: a training step's parameters, velocities and
    (from CuPy's pool, usually) gradients keep their addresses, so steady training uploads
    nothing here."""
    values = tuple(int(v) for v in values)
    cached = _tables.get((what, dtype))
    if cached is None or cached[0] != values:
        cached = _tables[(what, dtype)] = (values, cp.asarray(np.array(values, table_dtype)))
    return cached[1]


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
        tables = [_device_table(what, dtype, [a.data.ptr for a in arrays], np.uint64)
                  for what, arrays in (("params", ws), ("grads", gs), ("velocities", vs))]
        _launch("sgd_update", dtype, int(offsets[-1]), *tables,
                _device_table("offsets", dtype, offsets, np.int64), len(ws), float(lr),
                float(momentum), float(weight_decay))
