"""Direct convolution on the CPU (the twin of `cuda/direct.cu`): 3×3, stride 1, padding 1.

The drivers are `kernels/direct.py`'s, written once for both devices; `CpuPrimitives`
(kernels/cpu/conv.py) hands them `direct_conv` and `direct_weight_grad`, each a Python loop
over images that gives a thread's share of the work to serial Numba kernels, on
`runtime`'s pool.

Each thread copies one image at a time into a zero-bordered buffer of its own,
(C, H+2, W+2), so the kernels' inner loops read x[i+ky-1, j+kx-1] with no edge tests: an
output row is then nine shifted multiply-adds of three rows of that buffer, a loop LLVM
vectorises along the row. One padded image per thread, not the 9× copy of a chunk of
images that im2col makes: 600 KB for conv1_1's input at 224×224; the input gradient pads
gy, OC channels (13 MB for 64 channels at 224×224, kept as a workspace like im2col's).
"""

from numba import njit

from minivgg.kernels.cpu.runtime import JIT, map_ranges, workspace

# Output channels one job of the forward computes, image by image: enough jobs for every
# thread even at batch 1, and each job's output rows (OC_BLOCK × W floats) stay in L1.
OC_BLOCK = 8

# Bytes of the weight gradient's per-lane partial sums a thread keeps at once (see
# `weight_grad_image`): near the size of L2, whatever the layer.
GRAD_LANE_BYTES = 256 * 1024


@njit(**JIT)
def pad_image(x, n, p):
    """p (C, H+2, W+2) = image n of x (N, C, H, W) inside a border of zeros."""
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    for c in range(C):
        for j in range(W + 2):
            p[c, 0, j] = 0.0
            p[c, H + 1, j] = 0.0
        for i in range(H):
            p[c, i + 1, 0] = 0.0
            p[c, i + 1, W + 1] = 0.0
            for j in range(W):
                p[c, i + 1, j + 1] = x[n, c, i, j]


@njit(**JIT)
def conv_image(p, W, b, n, oc0, oc1, y):
    """y[n, oc0:oc1] = conv(padded image p, W[oc0:oc1]) + b, row by row.

    For each output row i: start from the bias, then for every input channel add the nine
    taps of the 3×3 window (three rows of p, each at three shifts). The row of y and the
    three rows of p stay in L1 while all channels are added, in the order c = 0, 1, ...
    """
    C = p.shape[0]
    H, Wd = y.shape[2], y.shape[3]
    for i in range(H):
        for oc in range(oc0, oc1):
            for j in range(Wd):
                y[n, oc, i, j] = b[oc]
        for c in range(C):
            for oc in range(oc0, oc1):
                w00, w01, w02 = W[oc, c, 0, 0], W[oc, c, 0, 1], W[oc, c, 0, 2]
                w10, w11, w12 = W[oc, c, 1, 0], W[oc, c, 1, 1], W[oc, c, 1, 2]
                w20, w21, w22 = W[oc, c, 2, 0], W[oc, c, 2, 1], W[oc, c, 2, 2]
                for j in range(Wd):
                    y[n, oc, i, j] += (w00 * p[c, i, j] + w01 * p[c, i, j + 1]
                                       + w02 * p[c, i, j + 2]
                                       + w10 * p[c, i + 1, j] + w11 * p[c, i + 1, j + 1]
                                       + w12 * p[c, i + 1, j + 2]
                                       + w20 * p[c, i + 2, j] + w21 * p[c, i + 2, j + 1]
                                       + w22 * p[c, i + 2, j + 2])


@njit(**JIT)
def weight_grad_image(p, gy, n, oc0, lanes):
    """lanes (OCB, C, 9, W) += gy[n, oc] · shifted rows of p, lane by lane along the row.

    lanes[o, c, 3*ky + kx, j] collects gy[n, oc0+o, i, j] · p[c, i+ky, j+kx] over the rows
    i of every image: one partial sum per column j ("lane"), so the loop over j is an
    elementwise multiply-add that vectorises without reordering any sum (fastmath stays
    off). `reduce_lanes` adds the lanes up at the end.
    """
    OCB, C = lanes.shape[0], lanes.shape[1]
    H, Wd = gy.shape[2], gy.shape[3]
    for i in range(H):
        for o in range(OCB):
            for c in range(C):
                for ky in range(3):
                    for kx in range(3):
                        k = 3 * ky + kx
                        for j in range(Wd):
                            lanes[o, c, k, j] += gy[n, oc0 + o, i, j] * p[c, i + ky, j + kx]


@njit(**JIT)
def reduce_lanes(lanes, oc0, gW):
    """gW[oc0 + o, c, ky, kx] = the sum of lanes[o, c, 3*ky + kx, :], j = 0, 1, ...

    Each lane holds N·H products summed in the data's dtype; the lanes are added up in
    float64 (the CUDA twin sums everything in double, so the two differ by rounding)."""
    OCB, C, Wd = lanes.shape[0], lanes.shape[1], lanes.shape[3]
    for o in range(OCB):
        for c in range(C):
            for k in range(9):
                s = 0.0
                for j in range(Wd):
                    s += lanes[o, c, k, j]
                gW[oc0 + o, c, k // 3, k % 3] = s


def _padded(x):
    N, C, H, W = x.shape
    return workspace("direct_pad", (C, H + 2, W + 2), x.dtype)


def direct_conv(x, W, b, y):
    """y (N, OC, H, W) = conv(x, W) + b, 3×3/s1/p1. Jobs are (image, block of OC_BLOCK
    output channels), in that order, spread over the threads in contiguous ranges."""
    N, OC = y.shape[0], y.shape[1]
    blocks = -(-OC // OC_BLOCK)

    def job(t0, t1):
        p, last = _padded(x), -1
        for t in range(t0, t1):
            n, oc0 = divmod(t, blocks)
            oc0 *= OC_BLOCK
            if n != last:  # consecutive jobs of one image share its padded copy
                pad_image(x, n, p)
                last = n
            conv_image(p, W, b, n, oc0, min(oc0 + OC_BLOCK, OC), y)

    map_ranges(job, N * blocks)


def direct_weight_grad(x, gy, gW):
    """gW (OC, C, 3, 3) = sum over images and pixels of gy[oc] · shifted x[c].

    Each thread owns a contiguous range of output channels and sums their entries alone
    (over images in order, then lanes in order): no sum crosses threads, so gW does not
    depend on the thread count. Within a range, blocks of output channels whose lanes fit
    GRAD_LANE_BYTES; each block pads every image again (one pass over x, against 9·OCB·C
    multiply-adds per pixel)."""
    N, C, H, Wd = x.shape
    OC = gy.shape[1]
    per_channel = C * 9 * Wd * x.itemsize
    ocb = max(1, GRAD_LANE_BYTES // per_channel)

    def job(o0, o1):
        p = _padded(x)
        for b0 in range(o0, o1, ocb):
            b1 = min(b0 + ocb, o1)
            lanes = workspace("direct_lanes", (b1 - b0, C, 9, Wd), x.dtype)
            lanes[...] = 0
            for n in range(N):
                pad_image(x, n, p)
                weight_grad_image(p, gy, n, b0, lanes)
            reduce_lanes(lanes, b0, gW)

    map_ranges(job, OC)
