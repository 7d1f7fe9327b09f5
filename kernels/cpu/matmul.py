"""The CPU's matrix products in the chosen precision: fp32 by NumPy's BLAS, or bf16 operands
with fp32 sums on the AMX tiles (`amx.py`), for the conv drivers and the fc layers.

`minivgg.backend.set_precision` sets `PRECISION` here; every GEMM of the CPU kernel table
reads it: the im2col drivers' `matmul` (forward and both backward products), Winograd's
`point_gemms`, the fc layers' `fc_matmul`. Under "fp32" each is the NumPy call it always
was, so switching back gives the same bits as never having switched.

Under "bf16" the float32 operands are rounded to bf16 (round to nearest even) and the products
summed in fp32; the output stays fp32, and so does everything around the GEMMs (activations
between layers, master weights, SGD, loss, soft-max, LRN, pooling, reductions). The left operand
a driver multiplies by in every chunk (the conv weights, Winograd's transformed filters) is
packed once per layer call by `pack_weights`, not once per chunk. Without AMX the same rounded
operands go through NumPy's fp32 matmul (`amx.gemm_bf16`'s fallback, which warns once). float64
arrays (gradient checks, the accuracy references) are multiplied in float64 always. NOTE: the fc
layers run on the calling thread with all the pool's threads (`parallel=True`); the conv GEMMs
run inside a pool job, on that thread alone (`parallel=False`).
"""

import numpy as np

from minivgg.kernels.cpu import amx, amx_stream
from minivgg.kernels.cpu.amx_isa import amx_available
from minivgg.kernels.cpu.bf16 import round_to_bf16
from minivgg.kernels.cpu.runtime import single_threaded_blas
from minivgg.kernels.cpu.winograd import point_gemms as point_gemms_fp32

PRECISIONS = ("fp32", "bf16")
PRECISION = "fp32"


def set_precision(name):
    """Run the CPU's GEMMs in `name`, one of PRECISIONS, from now on (backend.set_precision)."""
    global PRECISION
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}: expected one of {', '.join(PRECISIONS)}")
    PRECISION = name


def _bf16(a):
    """Whether a product with float32 `a` (an operand or the output) runs in bf16."""
    return PRECISION == "bf16" and a.dtype == np.float32


def packs_bf16(a):
    """Whether a GEMM operand made from float32 `a` is packed for AMX (bf16 and AMX here)."""
    return _bf16(a) and amx_available()[0]


# bf16 tiles of the fc layers' right operand packed at once: fc6's weights (25088 x 4096)
# packed whole would be a 205 MB transient on top of the step's peak; in column blocks of
# at most this many bytes they are 32 MB. (At batch <= amx_stream.STREAM_MAX_M the forward
# and the input gradient stream instead, with 2 MB at most per thread.)
FC_PACK_BYTES = 32 * 2**20


def fc_matmul(a, b):
    """a @ b for 2-D arrays (either may be a transposed view) -> a new float32 array.

    NOTE: unlike the conv GEMMs, which run single-threaded inside the pool's threads
    (`runtime.py`), these run on the calling thread: NumPy's BLAS on that thread alone in
    fp32 (`runtime.single_threaded_blas` says why), the pool's threads in bf16. In bf16, b is
    packed a block of columns at a time (FC_PACK_BYTES); every output is still one sum over all
    of K in the kernel's fixed order, so the blocks do not change the bits. With few rows in a
    (the forward x W.T and the input gradient gy W at small batch) b is packed in small blocks
    in cache as it is multiplied instead (`amx_stream.gemm_stream`, the same bits); the weight
    gradient gy.T x (a with 4096 rows) keeps the path above.
    """
    if not (_bf16(a) and _bf16(b)):
        with single_threaded_blas():  # no OpenBLAS thread left spinning (runtime.py)
            return np.matmul(a, b)
    (M, K), N = a.shape, b.shape[1]
    if packs_bf16(a) and M <= amx_stream.STREAM_MAX_M and b.itemsize in b.strides:
        return amx_stream.gemm_stream(a, b)  # x W.T and gy W at small batch: see there
    step = max(32, FC_PACK_BYTES // (2 * K) // 32 * 32)
    if step >= N:
        return amx.gemm_bf16(a, b)
    out = np.empty((M, N), np.float32)
    for j0 in range(0, N, step):
        out[:, j0:j0 + step] = amx.gemm_bf16(a, b[:, j0:j0 + step])
    return out


def pack_weights(A):
    """A (I, J), or a stack (T, I, J), made ready to be the left operand of `matmul` /
    `point_gemms` in every chunk of one layer call: A itself in fp32; in bf16 its `pack_a`
    tiles (one per matrix of a stack), or without AMX A rounded to bf16 once."""
    if not _bf16(A):
        return A
    if not packs_bf16(A):
        return round_to_bf16(A)
    if A.ndim == 3:
        return [amx.pack_a(a) for a in A]
    return amx.pack_a(A)


def matmul(A, B, out):
    """out = A @ B for 2-D A (or `pack_weights(A)`), B (either may be a transposed view):
    the im2col GEMMs, run on the calling thread (a pool job)."""
    if _bf16(out):
        amx.gemm_bf16(A, B, out=out, parallel=False)
    else:
        np.matmul(A, B, out=out)


def point_gemms(A, B, out):
    """out[t] = A[t] @ B[t] for every Winograd transform point t: A (α², I, J) (or
    `pack_weights(A)`), B (α², J, K), possibly with its last two axes swapped."""
    if not _bf16(out):
        point_gemms_fp32(A, B, out)
        return
    for t in range(out.shape[0]):
        amx.gemm_bf16(A[t], B[t], out=out[t], parallel=False)


def round_operand(x):
    """x rounded to bf16 (as float32) under "bf16", else x itself: the operands of the
    kernels that multiply without a GEMM (direct convolution)."""
    return round_to_bf16(x) if _bf16(x) else x
