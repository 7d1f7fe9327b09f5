"""What both devices share: chunk planning, workspaces, the conv drivers, and `Primitives`,
the contract a device's kernels fulfil.

Written once for both devices. Each device is one object, a subclass of `Primitives`
(`CpuPrimitives` in `kernels/cpu/conv.py`, `CudaPrimitives` in `kernels/gpu.py`): its
methods are the few pieces that really differ per device (the hand-written data movers and
transforms, its GEMMs, how work is spread over threads), and the drivers here, in
`kernels/winograd.py` and in `kernels/direct.py` call them as `dev.im2col_chunk(...)`, so a
reader (or an editor's go-to-definition) follows `dev` to the loop.

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
from minivgg.kernels.shapes import conv_output_size, is_3x3_same

# The entry points every device's kernel table offers, with the same parameters
# (tests/test_cuda_compile.py checks it). `minivgg.functional` calls nothing else.
ENTRY_POINTS = (
    "conv2d_forward", "conv2d_backward", "im2col", "col2im",
    "max_pool2d_forward", "max_pool2d_backward", "relu_max_pool2d_forward",
    "relu_max_pool2d_backward", "relu_forward", "relu_backward",
    "lrn_forward", "lrn_backward", "dropout_mask",
    "softmax_cross_entropy_forward", "softmax_cross_entropy_backward", "sgd_update",
    "fc_matmul",
)


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

def im2col(dev: "Primitives", x, KH, KW, SH, SW, PH, PW):
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


def col2im(dev: "Primitives", cols, x_shape, KH, KW, SH, SW, PH, PW):
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
# NOTE: every GEMM here is 2-D and goes through `dev.matmul`: on the GPU, cuBLAS with the
# compute type `backend.set_tf32` chooses (TF32 allowed), see `kernels/gpu.py`.

def _plan(dev, x, W, OH, OW):
    CKK = W.shape[1] * W.shape[2] * W.shape[3]
    return conv_chunks(x.shape[0], OH, OW, CKK, x.itemsize, dev.im2col_chunk_bytes,
                       dev.num_parts())


def conv2d_forward(dev: "Primitives", x, W, b, stride, padding):
    """y = conv(x, W) + b.  x (N, C, H, W), W (OC, C, KH, KW), b (OC,) or None -> (N, OC, OH, OW).

    Per chunk: im2col into a reused buffer, then one GEMM (OC, CKK) @ (CKK, P). A band of
    one image is written by the GEMM straight into y (a row band of y[n] seen as
    (OC, OH*OW) is a strided matrix BLAS and cuBLAS accept); a
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
    Wmat = dev.pack_weights(Wmat)  # once per call, not per chunk

    def job(t0, t1):
        for n0, n1, oy0, oy1 in chunks[t0:t1]:
            P = (n1 - n0) * (oy1 - oy0) * OW
            cols = dev.workspace("cols", (Wmat.shape[1], P), x.dtype)
            cols = dev.im2col_operand(x, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, cols, False)
            if n1 - n0 == 1:
                ycols = y[n0].reshape(OC, OH * OW)[:, oy0 * OW:oy1 * OW]
                dev.matmul(Wmat, cols, ycols)
                dev.add_bias(ycols, b)
            else:
                ycols = dev.workspace("ycols", (OC, P), x.dtype)
                dev.matmul(Wmat, cols, ycols)
                dev.cols_to_nchw(ycols, b, n0, n1, oy0, oy1, y)

    dev.map_ranges(job, len(chunks))
    return y


def conv2d_backward(dev: "Primitives", x, W, gy, stride, padding, need_gx=True):
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
    Wmat, CKK = xp.ascontiguousarray(W).reshape(OC, -1), C * KH * KW
    WmatT = dev.pack_weights(Wmat.T) if need_gx else None  # once per call, not per chunk
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
            colsT = dev.im2col_operand(x, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, cols, True)
            if k == 0:
                dev.matmul(gycols, colsT, gW)
            else:
                part = dev.workspace("gW", (OC, CKK), x.dtype)
                dev.matmul(gycols, colsT, part)
                gW += part
            if need_gx:
                gcols = cols  # cols is spent: its buffer takes W^T @ gy (and is scratch)
                dev.matmul(WmatT, gycols, gcols)
                dev.col2im_chunk(gcols, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, gx)
        return gW

    # whole images: no two chunks touch the same gx row; neighbouring bands share halo rows
    # of gx: never run two of them at once
    whole = all(oy1 - oy0 == OH for _, _, oy0, oy1 in chunks)
    phases = [chunks] if whole else [chunks[0::2], chunks[1::2]]
    partials = [g for phase in phases
                for g in dev.map_ranges(lambda t0, t1, ph=phase: job(ph, t0, t1), len(phase))]
    gW = partials[0]
    for part in partials[1:]:  # in range order, whatever order the threads finished in
        gW += part
    gb = gy.sum(axis=(0, 2, 3))
    return gx, gW.reshape(W.shape), gb


# ----------------------------------------------------------------------------------------
# The contract: what the drivers ask of a device, and the conv entry points built on it
# ----------------------------------------------------------------------------------------

class Primitives:
    """One device's kernels, as the shared drivers call them: the contract.

    Each device subclasses it and gives every method below (`CpuPrimitives` in
    `kernels/cpu/conv.py`, `CudaPrimitives` in `kernels/gpu.py`), with these parameters
    (tests/test_cuda_compile.py checks the two agree). The conv entry points at the end are
    written here once; each kernel table exports them bound to its device. Chunks, tiles
    and shapes as in the module docstring, `kernels/winograd.py` and `kernels/direct.py`.
    """

    xp = None  # the array module: numpy or cupy

    # --- how work is cut and spread -----------------------------------------------------
    im2col_chunk_bytes = property(doc="Bytes of im2col matrix built at once (per thread).")
    winograd_chunk_bytes = property(doc="Bytes of transformed tiles (V and M, or V and Z) "
                                        "per chunk.")

    def num_parts(self):
        """Chunks a layer is cut into at least (one per thread)."""
        raise NotImplementedError

    def map_ranges(self, job, n_items, elements=None):
        """[job(t0, t1) for contiguous ranges covering range(n_items)], in range order."""
        raise NotImplementedError

    def workspace(self, name, shape, dtype):
        """An uninitialised array of `shape` in a buffer reused from call to call."""
        raise NotImplementedError

    # --- im2col + GEMM --------------------------------------------------------------------
    def im2col_chunk(self, x, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, cols):
        """Fill cols (CKK, P) for a chunk of x (N, C, H, W); padding reads as zero."""
        raise NotImplementedError

    def col2im_chunk(self, cols, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, gx):
        """The adjoint of `im2col_chunk`: add every entry of cols (CKK, P) into gx.
        cols may be used as scratch."""
        raise NotImplementedError

    def cols_to_nchw(self, ycols, b, n0, n1, oy0, oy1, y):
        """y[n, oc, oy0:oy1, :] = ycols[oc, chunk columns of n] + b[oc]."""
        raise NotImplementedError

    def nchw_to_cols(self, gy, n0, n1, oy0, oy1, gycols):
        """The inverse move: gycols (OC, P) = the chunk of gy (N, OC, OH, OW)."""
        raise NotImplementedError

    def add_bias(self, ycols, b):
        """ycols (OC, P) += b[:, None], in place (ycols may be a strided view of y)."""
        raise NotImplementedError

    def matmul(self, A, B, out):
        """out = A @ B for 2-D A, B (either may be a transposed view): the im2col GEMMs."""
        raise NotImplementedError

    def im2col_operand(self, x, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, cols, transposed):
        """The chunk's im2col matrix as the GEMM operand `matmul` takes (its transpose with
        `transposed`): cols filled by `im2col_chunk`, or (the CPU in bf16) packed tiles."""
        raise NotImplementedError

    def pack_weights(self, A):
        """A (I, J) or a stack (T, I, J), made ready to be the left operand of `matmul` or
        `point_gemms` in every chunk of a layer call (the CPU packs bf16 tiles once here; A
        itself in fp32 and on the GPU)."""
        raise NotImplementedError

    # --- Winograd F(m×m, 3×3) (kernels/winograd.py); each device holds the matrices -----
    def point_gemms(self, A, B, out):
        """out[t] = A[t] @ B[t] for every transform point t: A (α², I, J), B (α², J, K);
        B may be a view with its last two axes swapped. Always full float32 precision."""
        raise NotImplementedError

    def input_transform(self, x, m, r0, r1, TH, TW, V):
        """V (α, α, C, P) = B^T d B for the α×α input tile d of every tile and channel."""
        raise NotImplementedError

    def grad_output_transform(self, gy, m, r0, r1, TH, TW, Z):
        """Z (α, α, OC, P) = A g A^T for the m×m block g of gy of every tile."""
        raise NotImplementedError

    def output_transform(self, M, m, r0, r1, TH, TW, b, y):
        """y tile = A^T M[:, :, oc, q] A + b[oc], cropped to the image, for every tile q."""
        raise NotImplementedError

    def filter_transform(self, W, m, rotate, U):
        """U (α, α, O, I) = G w G^T for every filter (rotated and swapped with `rotate`)."""
        raise NotImplementedError

    def filter_grad_transform(self, dU, m, gW):
        """gW (OC, C, 3, 3) = G^T dU[:, :, oc, c] G, from dU (α, α, OC, C)."""
        raise NotImplementedError

    # --- direct convolution, 3×3/s1/p1 (kernels/direct.py) --------------------------------
    def direct_conv(self, x, W, b, y):
        """y (N, OC, H, W) = conv(x, W) + b."""
        raise NotImplementedError

    def direct_weight_grad(self, x, gy, gW):
        """gW (OC, C, 3, 3) = sum over images and pixels of gy[oc] · shifted x[c], each
        entry in an order fixed by the shapes."""
        raise NotImplementedError

    # --- blocked direct convolution, 3×3/s1/p1, channels in blocks inside -----------------
    def blocked_conv2d_forward(self, x, W, b):
        """y (N, OC, H, W) = conv(x, W) + b, from x (N, C, H, W), W (OC, C, 3, 3) and b
        (OC,) or None, by a direct convolution on channels blocked by 16 (the CPU's
        `kernels/cpu/blocked.py`); NCHW in and out, whatever layout it uses inside."""
        raise NotImplementedError

    def blocked_conv2d_backward(self, x, W, gy, need_gx):
        """(gx or None, gW, gb) of `blocked_conv2d_forward`, gy (N, OC, H, W); gx only with
        `need_gx`; every sum in an order fixed by the shapes."""
        raise NotImplementedError

    # --- the conv entry points of the kernel tables, written once -------------------------
    def im2col(self, x, KH, KW, SH, SW, PH, PW):
        """(N, C, H, W) -> cols (N, C*KH*KW, OH*OW), the whole batch at once (tests,
        teaching)."""
        return im2col(self, x, KH, KW, SH, SW, PH, PW)

    def col2im(self, cols, x_shape, KH, KW, SH, SW, PH, PW):
        """The adjoint of `im2col`: cols (N, C*KH*KW, OH*OW) -> (N, C, H, W)."""
        return col2im(self, cols, x_shape, KH, KW, SH, SW, PH, PW)

    def conv2d_forward(self, x, W, b, stride, padding, algorithm="im2col"):
        """y = conv(x, W) + b -> (N, OC, OH, OW) by `algorithm`: "im2col" (the driver
        `conv2d_forward` above), "winograd"/"winograd4" (`kernels/winograd.py`), "direct"
        (`kernels/direct.py`) or "blocked" (the device's `blocked_conv2d_forward`)."""
        if algorithm == "im2col":
            return conv2d_forward(self, x, W, b, stride, padding)
        _check_3x3_same(algorithm, W, stride, padding)
        if algorithm == "direct":
            return direct.conv2d_forward(self, x, W, b)
        if algorithm == "blocked":
            return self.blocked_conv2d_forward(x, W, b)
        return winograd.conv2d_forward(self, x, W, b, winograd.ALGORITHMS[algorithm])

    def conv2d_backward(self, x, W, gy, stride, padding, need_gx=True, algorithm="im2col"):
        """(gx or None, gW, gb) by the forward's `algorithm`; see the driver
        `conv2d_backward` above (its sums' fixed order), `kernels/winograd.py` and
        `kernels/direct.py`, or the device's `blocked_conv2d_backward`."""
        if algorithm == "im2col":
            return conv2d_backward(self, x, W, gy, stride, padding, need_gx)
        _check_3x3_same(algorithm, W, stride, padding)
        if algorithm == "direct":
            return direct.conv2d_backward(self, x, W, gy, need_gx)
        if algorithm == "blocked":
            return self.blocked_conv2d_backward(x, W, gy, need_gx)
        return winograd.conv2d_backward(self, x, W, gy, need_gx,
                                        winograd.ALGORITHMS[algorithm])


# The methods above that each device must give (its kernels); the twin test compares them.
CONTRACT = tuple(name for name, value in vars(Primitives).items()
                 if not name.startswith("_") and name not in ENTRY_POINTS + ("xp",))


def _check_3x3_same(algorithm, W, stride, padding):
    if not is_3x3_same(W.shape, stride, padding):
        raise ValueError(f"conv algorithm {algorithm!r} runs 3×3 convolutions with stride 1 "
                         f"and padding 1 only, not {tuple(W.shape[2:])}, stride {stride}, "
                         f"padding {padding}")
