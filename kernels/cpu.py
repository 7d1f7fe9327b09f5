"""CPU kernels: the array-level work behind every op in `minivgg.functional`.

Every public function here has a twin of the same name and signature in `kernels/cuda.py`,
so the two can be read side by side. Shape legend, used throughout:

    N  batch            C  input channels     H, W    input height, width
    OC output channels  KH, KW kernel size    SH, SW  stride      PH, PW padding
    OH, OW output height, width = (H + 2*PH - KH) // SH + 1, (W + 2*PW - KW) // SW + 1
    CKK = C*KH*KW, the length of one receptive field; P = a number of output pixels

Convolution is im2col + GEMM (Sec. 2.1's 3×3/s1/p1 convs, and C's 1×1 ones). The loops that
move data (im2col, col2im, pooling, LRN, ReLU, the SGD update) are Numba kernels compiled
once and cached on disk (`cache=True`); the GEMMs are NumPy's BLAS. One thread pool of our
own spreads the work over the cores (see "Threads" below).

Set `NUMBA_DISABLE_JIT=1` to run (and step through) every kernel as plain Python.
"""

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

# Bytes of im2col matrix built at once, per thread. The GEMM streams this buffer, so it
# should be large enough to keep the GEMM efficient and small enough to stay near the cache
# and to keep the step's peak memory low: conv1_2's full im2col matrix is 115 MB per image.
IM2COL_CHUNK_BYTES = 16 * 2**20

# Numba's options for every kernel. The kernels are serial; `_parallel_for` runs pieces of
# one on several threads (`nogil` lets them run at once). NOTE: fastmath stays off, so float
# results do not depend on the compiler's reassociation and the tests can compare against
# plain loops tightly.
_JIT = dict(cache=True, fastmath=False, nogil=True)


def conv_output_size(size, k, s, p):
    return (size + 2 * p - k) // s + 1


# ----------------------------------------------------------------------------------------
# Threads: one pool of our own, single-threaded BLAS and kernels inside it
# ----------------------------------------------------------------------------------------
#
# NOTE: the obvious setup, a multi-threaded BLAS plus Numba's `parallel=True` kernels, is two
# thread pools that spin-wait and meet at a barrier after every GEMM and every kernel. On a
# busy 2-core machine one descheduled thread then stalls the other: we measured training
# steps 5-15x slower than with one thread. Here every piece of work (an im2col chunk and its
# GEMMs, a range of pooling planes) runs start to finish on one thread of one pool, with a
# single-threaded BLAS call inside, and the threads only meet when an op is done.

def _num_threads():
    """Threads used by the CPU kernels: NUMBA_NUM_THREADS, else OMP_NUM_THREADS, else all
    cores (so `torch.set_num_threads`-style comparisons can pin both to the same count)."""
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(var, "").isdigit() and int(os.environ[var]) > 0:
            return int(os.environ[var])
    return os.cpu_count() or 1


def _openblas_set_threads_local():
    """`openblas_set_num_threads_local` of the OpenBLAS that NumPy loaded, or None.

    It sets the BLAS thread count of the calling thread only (OpenBLAS >= 0.3.27), so the
    pool's threads run one-thread GEMMs while the main thread keeps BLAS's own threads for
    NumPy code elsewhere (the FC layers).
    """
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
        for path in paths:
            fn = getattr(ctypes.CDLL(path), "openblas_set_num_threads_local", None)
            if fn is not None:
                return fn
    except OSError:
        pass
    return None


_pool = None


def _init_worker():
    set_local = _openblas_set_threads_local()
    if set_local is not None:
        set_local(1)


def _get_pool():
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(_num_threads(), thread_name_prefix="minivgg",
                                   initializer=_init_worker)
    return _pool


def _forget_pool_after_fork():
    # NOTE: a forked child (a data-loader worker) inherits the pool object but not its
    # threads; it must start its own pool, and its own per-thread workspace, when needed.
    global _pool
    _pool = None
    _workspace.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _run_jobs(job, items):
    """job(item) for every item, spread over the pool; returns when all are done."""
    if _num_threads() == 1 or len(items) == 1:
        for item in items:
            job(item)
        return
    for _ in _get_pool().map(job, items):  # iterating re-raises a job's exception here
        pass


# Below this many array elements, a memory-bound kernel (ReLU, pooling, the SGD update of one
# parameter) runs on the calling thread. NOTE: handing work to the pool and waiting for it
# costs about 0.1 ms (more on a loaded machine), while a pass over 64K floats takes tens of
# microseconds; the small recipe's fc layers, late pools and most of its parameters are
# below it.
INLINE_ELEMENTS = 1 << 16


def _parallel_for(kernel, n_tasks, *args, elements=None):
    """kernel(*args, t0, t1) on contiguous ranges of range(n_tasks), one per thread.

    `elements`, the number of array elements the whole call touches: below
    `INLINE_ELEMENTS` the kernel runs once, on this thread, over all the tasks.
    """
    if n_tasks == 0:
        return
    if elements is not None and elements < INLINE_ELEMENTS:
        kernel(*args, 0, n_tasks)
        return
    T = min(_num_threads(), n_tasks)
    bounds = [n_tasks * k // T for k in range(T + 1)]
    _run_jobs(lambda k: kernel(*args, bounds[k], bounds[k + 1]), list(range(T)))


# ----------------------------------------------------------------------------------------
# Workspace: big scratch buffers reused from one call (and one training step) to the next
# ----------------------------------------------------------------------------------------

_workspace = {}


def workspace(name, shape, dtype):
    """An uninitialised array of `shape` backed by a cached buffer `name` of this thread.

    Allocating and page-faulting a fresh 16 MB im2col buffer for every chunk of every layer
    costs more than filling it, so each named buffer is kept and only grows. NOTE: two live
    views of the same name on one thread alias each other; callers use distinct names.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    key = (name, threading.get_ident())
    buf = _workspace.get(key)
    if buf is None or buf.nbytes < nbytes:
        buf = _workspace[key] = np.empty(nbytes, dtype=np.uint8)
    return buf[:nbytes].view(dtype).reshape(shape)


def free_workspace():
    """Release every cached scratch buffer (e.g. after training, before evaluation)."""
    _workspace.clear()


# ----------------------------------------------------------------------------------------
# im2col / col2im on a chunk: images n0..n1-1, output rows oy0..oy1-1 of each
# ----------------------------------------------------------------------------------------
#
# A chunk's im2col matrix is cols (CKK, P) with P = (n1-n0) * (oy1-oy0) * OW, columns in
# (image, oy, ox) order. Row r = c*KH*KW + ky*KW + kx matches the (OC, C, KH, KW) weight
# layout, so the chunk's output is one GEMM, W.reshape(OC, CKK) @ cols.

@njit(**_JIT)
def im2col_chunk(x, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, cols):
    """Fill cols (CKK, P) for a chunk of x (N, C, H, W); padding reads as zero.

    Row by row of cols, one output row (OW columns) at a time: zeros where the window hangs
    over the padding, a plain copy of an input row (strided by SW) in between. "Same"
    stride-1 convolutions (every VGG conv) take `_im2col_same_chunk` instead.
    """
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    OW = (W + 2 * PW - KW) // SW + 1
    if SH == 1 and SW == 1 and OW == W:
        _im2col_same_chunk(x, n0, n1, oy0, oy1, KH, KW, PH, PW, cols)
        return
    rows = oy1 - oy0
    KK = KH * KW
    for task in range((n1 - n0) * C * KK):
        i, r = task // (C * KK), task % (C * KK)
        c, ky, kx = r // KK, (r % KK) // KW, r % KW
        # output columns whose input column ix = ox*SW + kx - PW lies inside 0..W-1
        ox_lo = min(OW, max(0, (PW - kx + SW - 1) // SW))
        ox_hi = max(ox_lo, min(OW, (W - 1 + PW - kx) // SW + 1))
        for oy in range(oy0, oy1):
            iy = oy * SH + ky - PH
            dst = cols[r, (i * rows + oy - oy0) * OW:(i * rows + oy - oy0 + 1) * OW]
            if iy < 0 or iy >= H:
                dst[:] = 0
                continue
            src = x[n0 + i, c, iy]
            for ox in range(ox_lo):
                dst[ox] = 0
            if SW == 1:  # the VGG case: a contiguous copy, which LLVM vectorises
                dst[ox_lo:ox_hi] = src[ox_lo + kx - PW:ox_hi + kx - PW]
            else:
                for ox in range(ox_lo, ox_hi):
                    dst[ox] = src[ox * SW + kx - PW]
            for ox in range(ox_hi, OW):
                dst[ox] = 0


# "Same" convolutions, stride 1 and OW == W (VGG's 3×3/p1 and 1×1/p0): an output row and
# its input row have the same length W, so a whole band of rows of one (image, c, ky, kx)
# is one flat copy of the input plane, shifted by (ky - PH) * W + (kx - PW). The shift
# wraps around the row ends: where the window hangs over the left or right padding, the
# flat copy reads the neighbouring row's edge instead of a zero, so those columns (at most
# PW on each side) are zeroed afterwards. On the small recipe's 4-32 pixel rows this is
# 2-5x faster than copying row by row (each short row costs a slice and its bounds).

@njit(**_JIT)
def _wrapped_columns(kx, PW, W):
    """Columns ox whose input column ox + kx - PW falls outside 0..W-1: [0, lo) and [hi, W)."""
    return min(W, max(0, PW - kx)), max(0, min(W, W + PW - kx))


@njit(**_JIT)
def _im2col_same_chunk(x, n0, n1, oy0, oy1, KH, KW, PH, PW, cols):
    """`im2col_chunk` for SH = SW = 1 and OW = W, by flat copies (see above)."""
    N, C, H, W = x.shape
    xf = x.reshape(N, C, H * W)
    block = (oy1 - oy0) * W  # columns of one image in cols
    KK = KH * KW
    for r in range(C * KK):
        c, ky, kx = r // KK, (r % KK) // KW, r % KW
        # output rows oy0 <= oy < oy1 whose input row oy + ky - PH lies inside 0..H-1
        oy_lo = min(oy1, max(oy0, PH - ky))
        oy_hi = max(oy_lo, min(oy1, H + PH - ky))
        a, b = (oy_lo - oy0) * W, (oy_hi - oy0) * W
        shift = oy0 * W + (ky - PH) * W + (kx - PW)  # cols entry p reads xf[..., p + shift]
        # NOTE: a wrapped entry at either end of the plane would read outside it (index -1
        # means the last element to NumPy); clip them: they are zeroed below anyway.
        lo = max(a, -shift)
        hi = max(lo, min(b, H * W - shift))
        ox_lo, ox_hi = _wrapped_columns(kx, PW, W)
        for i in range(n1 - n0):
            dst = cols[r, i * block:(i + 1) * block]
            dst[:a] = 0
            dst[a:lo] = 0
            dst[lo:hi] = xf[n0 + i, c, lo + shift:hi + shift]
            dst[hi:b] = 0
            dst[b:] = 0
            for q in range(a, b, W):  # scalar loops: a strided slice per column costs more
                for ox in range(ox_lo):
                    dst[q + ox] = 0
                for ox in range(ox_hi, W):
                    dst[q + ox] = 0


@njit(**_JIT)
def _col2im_same_chunk(cols, n0, n1, oy0, oy1, KH, KW, PH, PW, gx):
    """`col2im_chunk` for SH = SW = 1 and OW = W, by flat adds.

    NOTE: it zeroes the wrapped entries of cols first (they hold gradients for padding
    pixels, which have no gx), so cols must be scratch. Every gx pixel then receives its
    (ky, kx) terms in the same order as in `col2im_chunk`, so the sums are bit for bit equal.
    """
    N, C, H, W = gx.shape
    gxf = gx.reshape(N, C, H * W)
    block = (oy1 - oy0) * W
    KK = KH * KW
    for task in range((n1 - n0) * C):
        i, c = task // C, task % C
        for k in range(KK):
            ky, kx = k // KW, k % KW
            oy_lo = min(oy1, max(oy0, PH - ky))
            oy_hi = max(oy_lo, min(oy1, H + PH - ky))
            a, b = (oy_lo - oy0) * W, (oy_hi - oy0) * W
            shift = oy0 * W + (ky - PH) * W + (kx - PW)
            lo = max(a, -shift)
            hi = max(lo, min(b, H * W - shift))
            src = cols[c * KK + k, i * block:(i + 1) * block]
            ox_lo, ox_hi = _wrapped_columns(kx, PW, W)
            for q in range(a, b, W):  # scalar loops: a strided slice per column costs more
                for ox in range(ox_lo):
                    src[q + ox] = 0
                for ox in range(ox_hi, W):
                    src[q + ox] = 0
            # NOTE: indexed through the C-contiguous 3-D and 2-D arrays, not through 1-D
            # slices of them: measured 1.3-1.6x faster here (the loop is the same; what
            # Numba knows about the arrays' layout is not).
            r, j, n = c * KK + k, i * block, n0 + i
            for p in range(lo, hi):
                gxf[n, c, p + shift] += cols[r, j + p]


@njit(**_JIT)
def col2im_chunk(cols, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, gx):
    """The adjoint of `im2col_chunk`: add every entry of cols (CKK, P) back into gx.

    A gather: each input row of gx collects, while it sits in L1, the KH*KW column rows
    that copied it. It adds into gx, so the rows a band shares with its neighbour band (the
    KH-1 halo rows) receive both bands' parts.
    NOTE: two bands next to each other write the same halo rows, so `conv2d_backward` never
    runs them at the same time (it runs even chunks, then odd ones).
    """
    C, H, W = gx.shape[1], gx.shape[2], gx.shape[3]
    OW = (W + 2 * PW - KW) // SW + 1
    rows = oy1 - oy0
    KK = KH * KW
    # Input rows that some output row of this band reads (the band's halo included).
    iy_lo = max(0, oy0 * SH - PH)
    iy_hi = min(H, (oy1 - 1) * SH - PH + KH)
    for task in range((n1 - n0) * C):
        i, c = task // C, task % C
        for iy in range(iy_lo, iy_hi):
            dst = gx[n0 + i, c, iy]
            for ky in range(KH):
                t = iy + PH - ky  # = oy * SH for the output row oy that reads iy via ky
                if t % SH != 0 or t // SH < oy0 or t // SH >= oy1:
                    continue
                j = (i * rows + t // SH - oy0) * OW
                for kx in range(KW):
                    src = cols[c * KK + ky * KW + kx, j:j + OW]
                    ox_lo = min(OW, max(0, (PW - kx + SW - 1) // SW))
                    ox_hi = max(ox_lo, min(OW, (W - 1 + PW - kx) // SW + 1))
                    if SW == 1:  # the VGG case: one contiguous, vectorisable add
                        off = kx - PW
                        for ox in range(ox_lo, ox_hi):
                            dst[ox + off] += src[ox]
                    else:
                        for ox in range(ox_lo, ox_hi):
                            dst[ox * SW + kx - PW] += src[ox]


def im2col(x, KH, KW, SH, SW, PH, PW):
    """(N, C, H, W) -> cols (N, C*KH*KW, OH*OW), the whole batch at once (tests, teaching).

    Row index is c*KH*KW + ky*KW + kx, matching the (OC, C, KH, KW) weight layout, so a
    convolution is `W.reshape(OC, -1) @ cols[n]`.
    """
    N, C, H, W = x.shape
    OH, OW = conv_output_size(H, KH, SH, PH), conv_output_size(W, KW, SW, PW)
    out = np.empty((N, C * KH * KW, OH * OW), dtype=x.dtype)
    x = np.ascontiguousarray(x)
    _run_jobs(lambda n: im2col_chunk(x, n, n + 1, 0, OH, KH, KW, SH, SW, PH, PW, out[n]),
             list(range(N)))
    return out


def col2im(cols, x_shape, KH, KW, SH, SW, PH, PW):
    """The adjoint of `im2col`: cols (N, C*KH*KW, OH*OW) -> (N, C, H, W).

    Each input pixel receives the sum of every column entry that copied it.
    """
    N, C, H, W = x_shape
    gx = np.zeros(x_shape, dtype=cols.dtype)
    OH = conv_output_size(H, KH, SH, PH)
    cols = np.ascontiguousarray(cols)
    _run_jobs(lambda n: col2im_chunk(cols[n], n, n + 1, 0, OH, KH, KW, SH, SW, PH, PW, gx),
             list(range(N)))
    return gx


def conv_chunks(N, OH, OW, CKK, itemsize, chunk_bytes=None):
    """Cut the batch into (n0, n1, oy0, oy1) chunks whose im2col matrix fits the budget.

    Small layers take several whole images per chunk (one big GEMM instead of many thin
    ones); big layers take a band of output rows of one image. There are at least as many
    chunks as threads where the layer allows it, so every thread has work.
    """
    budget = IM2COL_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    parts = _num_threads()
    row_bytes = CKK * OW * itemsize
    budget = max(row_bytes, min(budget, row_bytes * OH * N // parts))
    image_bytes = row_bytes * OH
    if image_bytes <= budget:
        step = max(1, budget // image_bytes)
        return [(n, min(n + step, N), 0, OH) for n in range(0, N, step)]
    band = max(1, budget // row_bytes)
    return [(n, n + 1, oy, min(oy + band, OH)) for n in range(N) for oy in range(0, OH, band)]


# ----------------------------------------------------------------------------------------
# Moving a chunk of outputs between the GEMM's (OC, P) layout and NCHW
# ----------------------------------------------------------------------------------------

@njit(**_JIT)
def cols_to_nchw(ycols, b, n0, n1, oy0, oy1, y):
    """y[n, oc, oy0:oy1, :] = ycols[oc, chunk columns of n] + b[oc], for n in n0..n1-1.

    The GEMM writes a chunk of several images as (OC, P); this moves it into y
    (N, OC, OH, OW) and adds the bias in the same pass.
    """
    OC, OW = y.shape[1], y.shape[3]
    band = (oy1 - oy0) * OW
    for i in range(n1 - n0):
        for oc in range(OC):
            dst = y[n0 + i, oc].reshape(-1)
            for p in range(band):
                dst[oy0 * OW + p] = ycols[oc, i * band + p] + b[oc]


@njit(**_JIT)
def nchw_to_cols(gy, n0, n1, oy0, oy1, gycols):
    """The inverse move: gycols (OC, P) = the chunk of gy (N, OC, OH, OW)."""
    OC, OW = gy.shape[1], gy.shape[3]
    band = (oy1 - oy0) * OW
    for i in range(n1 - n0):
        for oc in range(OC):
            src = gy[n0 + i, oc].reshape(-1)
            for p in range(band):
                gycols[oc, i * band + p] = src[oy0 * OW + p]


@njit(**_JIT)
def add_bias(ycols, b):
    """ycols (OC, P) += b[:, None], while the GEMM's output is still in cache."""
    for oc in range(ycols.shape[0]):
        for p in range(ycols.shape[1]):
            ycols[oc, p] += b[oc]


# ----------------------------------------------------------------------------------------
# Convolution
# ----------------------------------------------------------------------------------------

def conv2d_forward(x, W, b, stride, padding):
    """y = conv(x, W) + b.  x (N, C, H, W), W (OC, C, KH, KW), b (OC,) or None -> (N, OC, OH, OW).

    Per chunk, on one thread: im2col into that thread's buffer, then one GEMM
    (OC, CKK) @ (CKK, P). A band of one image is written by the GEMM straight into y (a row
    band of y[n] seen as (OC, OH*OW) is a strided matrix BLAS accepts); a chunk of several
    images goes through a scratch buffer and one pass that moves it into NCHW order.
    """
    N, C, H, Wd = x.shape
    OC, _, KH, KW = W.shape
    (SH, SW), (PH, PW) = stride, padding
    OH, OW = conv_output_size(H, KH, SH, PH), conv_output_size(Wd, KW, SW, PW)
    CKK = C * KH * KW
    x = np.ascontiguousarray(x)
    Wmat = np.ascontiguousarray(W).reshape(OC, CKK)
    b = np.zeros(OC, dtype=x.dtype) if b is None else np.ascontiguousarray(b, dtype=x.dtype)
    y = np.empty((N, OC, OH, OW), dtype=x.dtype)

    def job(chunk):
        n0, n1, oy0, oy1 = chunk
        P = (n1 - n0) * (oy1 - oy0) * OW
        cols = workspace("cols", (CKK, P), x.dtype)
        im2col_chunk(x, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, cols)
        if n1 - n0 == 1:
            ycols = y[n0].reshape(OC, OH * OW)[:, oy0 * OW:oy1 * OW]
            np.matmul(Wmat, cols, out=ycols)
            add_bias(ycols, b)
        else:
            ycols = workspace("ycols", (OC, P), x.dtype)
            np.matmul(Wmat, cols, out=ycols)
            cols_to_nchw(ycols, b, n0, n1, oy0, oy1, y)

    _run_jobs(job, conv_chunks(N, OH, OW, CKK, x.itemsize))
    return y


def conv2d_backward(x, W, gy, stride, padding, need_gx=True):
    """Gradients of `conv2d_forward` -> (gx or None, gW, gb).

    Per chunk, with cols rebuilt from x (storing them for backward would cost 9× the
    activations):  gW += gy_chunk @ cols^T,  gcols = W^T @ gy_chunk,  gx += col2im(gcols).
    Each thread sums its chunks' gW into its own (OC, CKK) buffer; the buffers are added at
    the end, so no two threads ever write the same array element.
    """
    N, C, H, Wd = x.shape
    OC, _, KH, KW = W.shape
    (SH, SW), (PH, PW) = stride, padding
    OH, OW = gy.shape[2], gy.shape[3]
    CKK = C * KH * KW
    x, gy = np.ascontiguousarray(x), np.ascontiguousarray(gy)
    Wmat = np.ascontiguousarray(W).reshape(OC, CKK)
    # NOTE: zeros, not empty: a band's col2im adds into the halo rows it shares with the
    # neighbouring band.
    gx = np.zeros_like(x) if need_gx else None
    partial_gW = {}  # thread id -> that thread's sum of gy_chunk @ cols^T
    same = SH == 1 and SW == 1 and OW == Wd

    def job(chunk):
        n0, n1, oy0, oy1 = chunk
        P = (n1 - n0) * (oy1 - oy0) * OW
        if n1 - n0 == 1:  # a band of one image: a strided view, no copy
            gycols = gy[n0].reshape(OC, OH * OW)[:, oy0 * OW:oy1 * OW]
        else:
            gycols = workspace("ycols", (OC, P), x.dtype)
            nchw_to_cols(gy, n0, n1, oy0, oy1, gycols)
        cols = workspace("cols", (CKK, P), x.dtype)
        im2col_chunk(x, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, cols)
        me = threading.get_ident()
        if me not in partial_gW:
            partial_gW[me] = np.matmul(gycols, cols.T)
        else:
            part = workspace("gW", (OC, CKK), x.dtype)
            np.matmul(gycols, cols.T, out=part)
            partial_gW[me] += part
        if need_gx:
            gcols = cols  # cols is spent: its buffer takes W^T @ gy
            np.matmul(Wmat.T, gycols, out=gcols)
            if same:  # gcols is scratch, as `_col2im_same_chunk` needs
                _col2im_same_chunk(gcols, n0, n1, oy0, oy1, KH, KW, PH, PW, gx)
            else:
                col2im_chunk(gcols, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, gx)

    chunks = conv_chunks(N, OH, OW, CKK, x.itemsize)
    if all(oy1 - oy0 == OH for _, _, oy0, oy1 in chunks):
        _run_jobs(job, chunks)  # whole images: no two chunks touch the same gx row
    else:
        _run_jobs(job, chunks[0::2])  # neighbouring bands share halo rows of gx: never
        _run_jobs(job, chunks[1::2])  # run two of them at once
    parts = list(partial_gW.values())
    gW = parts[0]
    for part in parts[1:]:
        gW += part
    gb = gy.sum(axis=(0, 2, 3))
    return gx, gW.reshape(W.shape), gb


# ----------------------------------------------------------------------------------------
# Max-pooling (Sec. 2.1: 2×2 windows, stride 2)
# ----------------------------------------------------------------------------------------

@njit(**_JIT)
def _max_pool2d_forward_kernel(x, KH, KW, SH, SW, y, argmax, t0, t1):
    """Planes t0..t1-1 of the N*C (n, c) planes; argmax gets the winner's ky*KW + kx."""
    C, OH, OW = y.shape[1], y.shape[2], y.shape[3]
    for task in range(t0, t1):
        n, c = task // C, task % C
        for oy in range(OH):
            for ox in range(OW):
                best = x[n, c, oy * SH, ox * SW]
                best_k = 0
                for ky in range(KH):
                    for kx in range(KW):
                        v = x[n, c, oy * SH + ky, ox * SW + kx]
                        # NOTE: strict `>`: on a tie the first offset in row-major order
                        # wins, so the gradient goes to exactly one input, as in Caffe and
                        # cuDNN.
                        if v > best:
                            best, best_k = v, ky * KW + kx
                y[n, c, oy, ox] = best
                argmax[n, c, oy, ox] = best_k


def max_pool2d_forward(x, kernel_size, stride):
    """(N, C, H, W) -> y (N, C, OH, OW) and argmax (N, C, OH, OW), no padding, floor mode.

    argmax (int32) holds the winner's offset ky*KW + kx inside its window.
    """
    (KH, KW), (SH, SW) = kernel_size, stride
    N, C, H, W = x.shape
    OH, OW = (H - KH) // SH + 1, (W - KW) // SW + 1
    y = np.empty((N, C, OH, OW), dtype=x.dtype)
    argmax = np.empty((N, C, OH, OW), dtype=np.int32)
    _parallel_for(_max_pool2d_forward_kernel, N * C, np.ascontiguousarray(x), KH, KW, SH, SW,
                 y, argmax, elements=x.size)
    return y, argmax


@njit(**_JIT)
def _max_pool2d_backward_kernel(gy, argmax, KW, SH, SW, gx, t0, t1):
    """Route each output gradient of planes t0..t1-1 to its window's winner.

    gx must start at zero. NOTE: overlapping windows (stride < kernel) can send two
    gradients to one pixel; one task owns a whole (n, c) plane, so those += never race.
    """
    C, OH, OW = gy.shape[1], gy.shape[2], gy.shape[3]
    for task in range(t0, t1):
        n, c = task // C, task % C
        for oy in range(OH):
            for ox in range(OW):
                k = argmax[n, c, oy, ox]
                gx[n, c, oy * SH + k // KW, ox * SW + k % KW] += gy[n, c, oy, ox]


def max_pool2d_backward(gy, argmax, x_shape, kernel_size, stride):
    """Route each output gradient to the input that won its window."""
    (KH, KW), (SH, SW) = kernel_size, stride
    gx = np.zeros(x_shape, dtype=gy.dtype)
    N, C = gy.shape[0], gy.shape[1]
    _parallel_for(_max_pool2d_backward_kernel, N * C, np.ascontiguousarray(gy),
                 np.ascontiguousarray(argmax), KW, SH, SW, gx, elements=gx.size)
    return gx


# ----------------------------------------------------------------------------------------
# ReLU (Sec. 2.1: every hidden layer)
# ----------------------------------------------------------------------------------------

def _split(n_items):
    """Contiguous slices of range(n_items), one per thread (one slice if it is small)."""
    T = max(1, min(_num_threads(), n_items))
    if n_items < INLINE_ELEMENTS:
        T = 1
    return [slice(n_items * k // T, n_items * (k + 1) // T) for k in range(T)]


def relu_forward(x):
    # NOTE: NumPy's maximum, not a Numba loop: it is vectorised (a Numba loop that stores to
    # one array and loads from another is not, since Numba cannot prove they never alias),
    # and it keeps NaN as NaN, as PyTorch does. The pool runs it on one slice per thread.
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    xf, yf = x.reshape(-1), y.reshape(-1)
    _run_jobs(lambda s: np.maximum(xf[s], 0, out=yf[s]), _split(x.size))
    return y


def relu_backward(y, gy):
    """NOTE: the gradient at exactly 0 is 0 (a dead unit), as in PyTorch; we test y > 0."""
    y, gy = np.ascontiguousarray(y), np.ascontiguousarray(gy)
    gx = np.empty_like(gy)
    yf, gyf, gxf = y.reshape(-1), gy.reshape(-1), gx.reshape(-1)
    _run_jobs(lambda s: np.multiply(gyf[s], yf[s] > 0, out=gxf[s]), _split(y.size))
    return gx


# ----------------------------------------------------------------------------------------
# Local response normalisation across channels (AlexNet Sec. 3.3; VGG Sec. 2.1, A-LRN)
# ----------------------------------------------------------------------------------------
#
# Both passes walk the channels of one pixel with a running window sum, so each costs O(C)
# per pixel whatever the window size. One task per (n, row h).

@njit(**_JIT)
def _lrn_forward_kernel(x, size, alpha, beta, k, y, scale, t0, t1):
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    before = size // 2  # the window of c is c - before ... c - before + size - 1
    after = size - 1 - before
    for task in range(t0, t1):
        n, h = task // H, task % H
        for w in range(W):
            s = 0.0  # float64 sum of x^2 over the window of channel c, kept as c moves up
            for c in range(min(after, C)):
                s += x[n, c, h, w] * x[n, c, h, w]
            for c in range(C):
                if c + after < C:
                    s += x[n, c + after, h, w] * x[n, c + after, h, w]
                if c - before - 1 >= 0:
                    s -= x[n, c - before - 1, h, w] * x[n, c - before - 1, h, w]
                sc = k + alpha * s
                scale[n, c, h, w] = sc
                y[n, c, h, w] = x[n, c, h, w] * sc ** -beta


def lrn_forward(x, size, alpha, beta, k):
    """b_c = a_c / (k + alpha * sum_{c' near c} a_c'^2)^beta  ->  (y, scale).

    The window covers channels c - size//2 ... c + (size-1)//2. `alpha` here is the
    coefficient of the plain sum; `functional.local_response_norm` divides it by `size`
    first when the Caffe/PyTorch convention is asked for.
    NOTE: the running window sum adds and subtracts squares; it is kept in float64, so the
    cancellation costs nothing visible in float32 (the tests compare with the direct sum).
    """
    x = np.ascontiguousarray(x)
    y, scale = np.empty_like(x), np.empty_like(x)
    _parallel_for(_lrn_forward_kernel, x.shape[0] * x.shape[2], x, size, alpha, beta, k, y,
                 scale)
    return y, scale


@njit(**_JIT)
def _lrn_backward_kernel(x, y, scale, gy, size, alpha, beta, gx, t0, t1):
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    # c lies in window(c') exactly when c' lies in c - after ... c + before
    before = size // 2
    after = size - 1 - before
    for task in range(t0, t1):
        n, h = task // H, task % H
        for w in range(W):
            t = 0.0  # sum over c' with c in window(c') of gy_c' y_c' / scale_c'
            for c in range(min(before, C)):
                t += gy[n, c, h, w] * y[n, c, h, w] / scale[n, c, h, w]
            for c in range(C):
                if c + before < C:
                    cc = c + before
                    t += gy[n, cc, h, w] * y[n, cc, h, w] / scale[n, cc, h, w]
                if c - after - 1 >= 0:
                    cc = c - after - 1
                    t -= gy[n, cc, h, w] * y[n, cc, h, w] / scale[n, cc, h, w]
                gx[n, c, h, w] = (gy[n, c, h, w] * scale[n, c, h, w] ** -beta
                                  - 2.0 * alpha * beta * x[n, c, h, w] * t)


def lrn_backward(x, y, scale, gy, size, alpha, beta):
    """gx_c = gy_c s_c^-b - 2 alpha b x_c sum_{c': c in window(c')} gy_c' y_c' / s_c'."""
    x, y, scale, gy = (np.ascontiguousarray(a) for a in (x, y, scale, gy))
    gx = np.empty_like(x)
    _parallel_for(_lrn_backward_kernel, x.shape[0] * x.shape[2], x, y, scale, gy, size, alpha,
                 beta, gx)
    return gx


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

@njit(**_JIT)
def _sgd_update_kernel(w, g, v, lr, momentum, weight_decay, t0, t1):
    """One pass over memory: VGG-16's 138M parameters are 553 MB per array, so the four
    NumPy passes this replaces cost more than the arithmetic."""
    for i in range(t0, t1):
        vi = momentum * v[i] + (g[i] + weight_decay * w[i])
        v[i] = vi
        w[i] -= lr * vi


def sgd_update(params, grads, velocities, lr, momentum, weight_decay):
    """In place, for every parameter: g = grad + wd*w; v = momentum*v + g; w -= lr*v."""
    for w, g, v in zip(params, grads, velocities):
        if not (w.flags.c_contiguous and v.flags.c_contiguous):
            raise ValueError("sgd_update: parameters and velocities must be contiguous")
        g = np.ascontiguousarray(g, dtype=w.dtype)
        t = w.dtype.type
        _parallel_for(_sgd_update_kernel, w.size, w.reshape(-1), g.reshape(-1), v.reshape(-1),
                     t(lr), t(momentum), t(weight_decay), elements=w.size)
