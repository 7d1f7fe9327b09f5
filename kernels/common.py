"""What both devices share: output sizes, chunk planning, workspaces and the conv drivers.

Written once, parameterised by a device's kernel table (`kernels/cpu/conv.py` or
`kernels/cuda.py`), which supplies the array module `xp` and the few primitives that really
differ per device:

    IM2COL_CHUNK_BYTES, num_parts()          how big a chunk, how many threads to feed
    map_ranges(job, n_items)                 job(t0, t1) on contiguous ranges -> results
    workspace(name, shape, dtype)            a reused scratch buffer
    im2col_chunk, col2im_chunk               the hand-written data movers
    cols_to_nchw, nchw_to_cols, add_bias

Each table hands them over as `Primitives(globals())`, its own namespace.

Shape legend, used throughout the kernels:

    N  batch            C  input channels     H, W    input height, width
    OC output channels  KH, KW kernel size    SH, SW  stride      PH, PW padding
    OH, OW output height, width = (H + 2*PH - KH) // SH + 1, (W + 2*PW - KW) // SW + 1
    CKK = C*KH*KW, the length of one receptive field; P = a number of output pixels

Convolution is im2col + GEMM (Sec. 2.1's 3×3/s1/p1 convs, and C's 1×1 ones), one chunk of
the batch at a time: a chunk is images n0..n1-1, output rows oy0..oy1-1 of each, and its
im2col matrix cols (CKK, P) has P = (n1-n0) * (oy1-oy0) * OW columns in (image, oy, ox)
order. Row r = c*KH*KW + ky*KW + kx matches the (OC, C, KH, KW) weight layout, so the
chunk's output is one GEMM, W.reshape(OC, CKK) @ cols.
"""

import threading

import numpy as np

from minivgg.kernels import direct, winograd

# The entry points every device's kernel table offers, with the same parameters
# (tests/test_cuda_compile.py checks it). `minivgg.functional` calls nothing else.
ENTRY_POINTS = (
    "conv2d_forward", "conv2d_backward", "im2col", "col2im",
    "max_pool2d_forward", "max_pool2d_backward", "relu_forward", "relu_backward",
    "lrn_forward", "lrn_backward", "dropout_mask",
    "softmax_cross_entropy_forward", "softmax_cross_entropy_backward", "sgd_update",
)


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


def conv_chunks(N, OH, OW, CKK, itemsize, chunk_bytes, parts=1):
    """Cut the batch into (n0, n1, oy0, oy1) chunks whose im2col matrix fits `chunk_bytes`.

    Small layers take several whole images per chunk (one big GEMM instead of many thin
    ones); big layers take a band of output rows of one image. There are at least `parts`
    chunks where the layer allows it, so every thread has work. The plan depends on the
    sizes and `parts` only, never on timing.
    """
    row_bytes = CKK * OW * itemsize
    budget = max(row_bytes, min(chunk_bytes, row_bytes * OH * N // parts))
    image_bytes = row_bytes * OH
    if image_bytes <= budget:
        step = max(1, budget // image_bytes)
        return [(n, min(n + step, N), 0, OH) for n in range(0, N, step)]
    band = max(1, budget // row_bytes)
    return [(n, n + 1, oy, min(oy + band, OH)) for n in range(N) for oy in range(0, OH, band)]


class Primitives:
    """A kernel-table module's primitives, looked up in its namespace at call time (so a test
    may set the module's IM2COL_CHUNK_BYTES). Each table passes `Primitives(globals())`.
    """

    def __init__(self, namespace):
        self._namespace = namespace

    def __getattr__(self, name):
        try:
            return self._namespace[name]
        except KeyError:
            raise AttributeError(f"the kernel table has no primitive {name!r}") from None


class Workspace:
    """Big scratch buffers reused from one call (and one training step) to the next.

    Allocating (and on the CPU page-faulting) a fresh 16 MB im2col buffer for every chunk
    costs more than filling it, so each named buffer is kept and only grows. With
    `per_thread`, each thread has its own buffers (the CPU's pool threads work at once).
    NOTE: two live views of the same name (on one thread) alias each other; callers use
    distinct names.
    """

    def __init__(self, xp, per_thread):
        self.xp, self.per_thread, self.buffers = xp, per_thread, {}

    def __call__(self, name, shape, dtype):
        """An uninitialised array of `shape` backed by the cached buffer `name`."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        key = (name, threading.get_ident()) if self.per_thread else (name,)
        buf = self.buffers.get(key)
        if buf is None or buf.nbytes < nbytes:
            self.buffers.pop(key, None)  # give the old buffer back (to a pool) first
            buf = self.buffers[key] = self.xp.empty(nbytes, dtype=np.uint8)
        return buf[:nbytes].view(dtype).reshape(shape)

    def clear(self):
        self.buffers.clear()


# ----------------------------------------------------------------------------------------
# Whole-batch im2col / col2im (tests, teaching), built from a device's chunk kernels
# ----------------------------------------------------------------------------------------

def im2col(dev, x, KH, KW, SH, SW, PH, PW):
    """(N, C, H, W) -> cols (N, C*KH*KW, OH*OW), one image per chunk, on device `dev`."""
    xp = dev.xp
    N, C, H, W = x.shape
    OH, OW = conv_output_size(H, KH, SH, PH), conv_output_size(W, KW, SW, PW)
    out = xp.empty((N, C * KH * KW, OH * OW), dtype=x.dtype)
    x = xp.ascontiguousarray(x)

    def job(n0, n1):
        for n in range(n0, n1):
            dev.im2col_chunk(x, n, n + 1, 0, OH, KH, KW, SH, SW, PH, PW, out[n])

    dev.map_ranges(job, N)
    return out


def col2im(dev, cols, x_shape, KH, KW, SH, SW, PH, PW):
    """The adjoint of `im2col`: cols (N, C*KH*KW, OH*OW) -> (N, C, H, W).

    Each input pixel receives the sum of every column entry that copied it.
    NOTE: a copy of cols, since `col2im_chunk` may use its input as scratch.
    """
    xp = dev.xp
    N, C, H, W = x_shape
    gx = xp.zeros(x_shape, dtype=cols.dtype)
    OH = conv_output_size(H, KH, SH, PH)
    cols = xp.array(cols, copy=True, order="C")

    def job(n0, n1):
        for n in range(n0, n1):
            dev.col2im_chunk(cols[n], n, n + 1, 0, OH, KH, KW, SH, SW, PH, PW, gx)

    dev.map_ranges(job, N)
    return gx


# ----------------------------------------------------------------------------------------
# Convolution drivers: im2col + one GEMM per chunk
# ----------------------------------------------------------------------------------------
#
# NOTE: every GEMM here is 2-D. On the GPU, CuPy sends 2-D products to cublasGemmEx with the
# compute type that `backend.set_tf32` chooses; its batched (3-D) matmul ignores it.

def _plan(dev, x, W, OH, OW):
    CKK = W.shape[1] * W.shape[2] * W.shape[3]
    return conv_chunks(x.shape[0], OH, OW, CKK, x.itemsize, dev.IM2COL_CHUNK_BYTES,
                       dev.num_parts())


def conv2d_forward(dev, x, W, b, stride, padding):
    """y = conv(x, W) + b.  x (N, C, H, W), W (OC, C, KH, KW), b (OC,) or None -> (N, OC, OH, OW).

    Per chunk: im2col into a reused buffer, then one GEMM (OC, CKK) @ (CKK, P). A band of
    one image is written by the GEMM straight into y (a row band of y[n] seen as
    (OC, OH*OW) is a strided matrix BLAS accepts; CuPy copies through a temporary); a
    chunk of several images goes through a scratch buffer and one pass that moves it into
    NCHW order and adds the bias. Chunks write disjoint parts of y.
    """
    xp = dev.xp
    N, C, H, Wd = x.shape
    OC, _, KH, KW = W.shape
    (SH, SW), (PH, PW) = stride, padding
    OH, OW = conv_output_size(H, KH, SH, PH), conv_output_size(Wd, KW, SW, PW)
    x = xp.ascontiguousarray(x)
    Wmat = xp.ascontiguousarray(W).reshape(OC, -1)
    b = xp.zeros(OC, dtype=x.dtype) if b is None else xp.ascontiguousarray(b, dtype=x.dtype)
    y = xp.empty((N, OC, OH, OW), dtype=x.dtype)
    chunks = _plan(dev, x, W, OH, OW)

    def job(t0, t1):
        for n0, n1, oy0, oy1 in chunks[t0:t1]:
            P = (n1 - n0) * (oy1 - oy0) * OW
            cols = dev.workspace("cols", (Wmat.shape[1], P), x.dtype)
            dev.im2col_chunk(x, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, cols)
            if n1 - n0 == 1:
                ycols = y[n0].reshape(OC, OH * OW)[:, oy0 * OW:oy1 * OW]
                xp.matmul(Wmat, cols, out=ycols)
                dev.add_bias(ycols, b)
            else:
                ycols = dev.workspace("ycols", (OC, P), x.dtype)
                xp.matmul(Wmat, cols, out=ycols)
                dev.cols_to_nchw(ycols, b, n0, n1, oy0, oy1, y)

    dev.map_ranges(job, len(chunks))
    return y


def conv2d_backward(dev, x, W, gy, stride, padding, need_gx=True):
    """Gradients of `conv2d_forward` -> (gx or None, gW, gb).

    Per chunk, with cols rebuilt from x (storing them for backward would cost 9× the
    activations):  gW += gy_chunk @ cols^T,  gcols = W^T @ gy_chunk,  gx += col2im(gcols).

    Determinism: every sum has a fixed order. `map_ranges` hands each thread a fixed,
    contiguous range of the chunk list; the thread sums its chunks' gW in chunk order into
    a buffer of its own, and those buffers are added in range order. So two calls with the
    same thread count give bit-identical results at every size. A different thread count
    cuts the batch into other chunks (`conv_chunks`' `parts`), which may change gW's last
    bits; y and gx do not depend on it (each element is one GEMM dot product, and gx's
    sums run in a fixed (ky, kx) order inside col2im).
    """
    xp = dev.xp
    OC, C, KH, KW = W.shape
    (SH, SW), (PH, PW) = stride, padding
    OH, OW = gy.shape[2], gy.shape[3]
    x, gy = xp.ascontiguousarray(x), xp.ascontiguousarray(gy)
    Wmat = xp.ascontiguousarray(W).reshape(OC, -1)
    CKK = Wmat.shape[1]
    # NOTE: zeros, not empty: a band's col2im adds into the halo rows it shares with the
    # neighbouring band.
    gx = xp.zeros_like(x) if need_gx else None
    chunks = _plan(dev, x, W, OH, OW)

    def job(chunk_list, t0, t1):
        gW = xp.empty((OC, CKK), dtype=x.dtype)
        for k, (n0, n1, oy0, oy1) in enumerate(chunk_list[t0:t1]):
            P = (n1 - n0) * (oy1 - oy0) * OW
            if n1 - n0 == 1:  # a band of one image: a strided view, no copy
                gycols = gy[n0].reshape(OC, OH * OW)[:, oy0 * OW:oy1 * OW]
            else:
                gycols = dev.workspace("ycols", (OC, P), x.dtype)
                dev.nchw_to_cols(gy, n0, n1, oy0, oy1, gycols)
            cols = dev.workspace("cols", (CKK, P), x.dtype)
            dev.im2col_chunk(x, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, cols)
            if k == 0:
                xp.matmul(gycols, cols.T, out=gW)
            else:
                part = dev.workspace("gW", (OC, CKK), x.dtype)
                xp.matmul(gycols, cols.T, out=part)
                gW += part
            if need_gx:
                gcols = cols  # cols is spent: its buffer takes W^T @ gy (and is scratch)
                xp.matmul(Wmat.T, gycols, out=gcols)
                dev.col2im_chunk(gcols, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, gx)
        return gW

    if all(oy1 - oy0 == OH for _, _, oy0, oy1 in chunks):
        phases = [chunks]  # whole images: no two chunks touch the same gx row
    else:
        phases = [chunks[0::2], chunks[1::2]]  # neighbouring bands share halo rows of gx:
        # never run two of them at once
    partials = [g for phase in phases
                for g in dev.map_ranges(lambda t0, t1, ph=phase: job(ph, t0, t1), len(phase))]
    gW = partials[0]
    for part in partials[1:]:  # in range order, whatever order the threads finished in
        gW += part
    gb = gy.sum(axis=(0, 2, 3))
    return gx, gW.reshape(W.shape), gb


# ----------------------------------------------------------------------------------------
# A device's conv entry points, built once from its primitives
# ----------------------------------------------------------------------------------------

class ConvEntryPoints:
    """The conv entry points of one device's kernel table, written once for both devices.

    `dev` holds the device's im2col primitives, `winograd_dev` its Winograd ones and
    `direct_dev` its direct-convolution ones (all `Primitives`); each table exports the
    bound methods under the entry-point names:

        im2col, col2im, conv2d_forward, conv2d_backward = ConvEntryPoints(...).methods()

    Their parameters are the table's: `tests/test_cuda_compile.py` checks both tables agree.
    """

    def __init__(self, dev, winograd_dev, direct_dev):
        self.dev, self.winograd_dev, self.direct_dev = dev, winograd_dev, direct_dev

    def im2col(self, x, KH, KW, SH, SW, PH, PW):
        """(N, C, H, W) -> cols (N, C*KH*KW, OH*OW), the whole batch at once (tests,
        teaching)."""
        return im2col(self.dev, x, KH, KW, SH, SW, PH, PW)

    def col2im(self, cols, x_shape, KH, KW, SH, SW, PH, PW):
        """The adjoint of `im2col`: cols (N, C*KH*KW, OH*OW) -> (N, C, H, W)."""
        return col2im(self.dev, cols, x_shape, KH, KW, SH, SW, PH, PW)

    def conv2d_forward(self, x, W, b, stride, padding, algorithm="im2col"):
        """y = conv(x, W) + b -> (N, OC, OH, OW) by `algorithm`: "im2col" (the driver
        `conv2d_forward` above), "winograd"/"winograd4" (`kernels/winograd.py`) or
        "direct" (`kernels/direct.py`)."""
        if algorithm == "im2col":
            return conv2d_forward(self.dev, x, W, b, stride, padding)
        if algorithm == "direct":
            return direct.conv2d_forward(self.direct_dev, x, W, b)
        return winograd.conv2d_forward(self.winograd_dev, x, W, b,
                                       winograd.ALGORITHMS[algorithm])

    def conv2d_backward(self, x, W, gy, stride, padding, need_gx=True, algorithm="im2col"):
        """(gx or None, gW, gb) by the forward's `algorithm`; see the driver
        `conv2d_backward` above (its sums' fixed order), `kernels/winograd.py` and
        `kernels/direct.py`."""
        if algorithm == "im2col":
            return conv2d_backward(self.dev, x, W, gy, stride, padding, need_gx)
        if algorithm == "direct":
            return direct.conv2d_backward(self.direct_dev, x, W, gy, need_gx)
        return winograd.conv2d_backward(self.winograd_dev, x, W, gy, need_gx,
                                        winograd.ALGORITHMS[algorithm])

    def methods(self):
        """(im2col, col2im, conv2d_forward, conv2d_backward), bound to this device."""
        return self.im2col, self.col2im, self.conv2d_forward, self.conv2d_backward
