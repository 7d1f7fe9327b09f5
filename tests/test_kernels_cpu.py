"""Every CPU kernel against a naive-loop reference, in float32 and float64.

The references are written as the textbook defines each op, one output element at a time,
on small odd shapes (batch 1, odd sizes, stride 2, padding 0, overlapping pool windows,
ties), so a wrong index in a fast kernel cannot hide behind a symmetric shape. The kernels
run compiled here; `NUMBA_DISABLE_JIT=1 pytest tests/test_kernels_cpu.py` runs the same
tests through the plain-Python kernel bodies.
"""

import itertools
import os

import numpy as np
import pytest

import minivgg  # noqa: F401  (mounts minivgg.kernels from a checkout)
from minivgg.kernels import common, cpu
from minivgg.kernels.cpu import conv as cpu_conv
from minivgg.kernels import reference
from minivgg.kernels.cpu import runtime

DTYPES = [np.float32, np.float64]
TOL = {np.float32: dict(rtol=1e-4, atol=1e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}

# (N, C, H, W, OC, K, stride, padding): VGG's 3x3/s1/p1 and 1x1/s1/p0, plus odd cases.
CONV_CASES = [
    (1, 3, 7, 9, 4, 3, 1, 1),   # batch 1, odd sizes, conv1_1-like C=3
    (2, 4, 6, 5, 3, 3, 1, 1),
    (2, 3, 9, 8, 2, 3, 2, 1),   # stride 2
    (3, 2, 5, 5, 4, 1, 1, 0),   # 1x1, padding 0 (configuration C)
    (1, 2, 8, 7, 3, 3, 2, 0),   # stride 2, padding 0
    (2, 3, 5, 6, 2, 2, 1, 1),   # even kernel
]


def rand(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


# ----------------------------------------------------------------------------------------
# Naive references
# ----------------------------------------------------------------------------------------

def naive_conv2d(x, W, b, s, p):
    N, C, H, Wd = x.shape
    OC, _, K, _ = W.shape
    OH, OW = (H + 2 * p - K) // s + 1, (Wd + 2 * p - K) // s + 1
    y = np.zeros((N, OC, OH, OW), dtype=np.float64)
    for n, oc, oy, ox in itertools.product(range(N), range(OC), range(OH), range(OW)):
        acc = 0.0 if b is None else float(b[oc])
        for c, ky, kx in itertools.product(range(C), range(K), range(K)):
            iy, ix = oy * s + ky - p, ox * s + kx - p
            if 0 <= iy < H and 0 <= ix < Wd:
                acc += float(x[n, c, iy, ix]) * float(W[oc, c, ky, kx])
        y[n, oc, oy, ox] = acc
    return y


def naive_conv2d_backward(x, W, gy, s, p):
    N, C, H, Wd = x.shape
    OC, _, K, _ = W.shape
    OH, OW = gy.shape[2:]
    gx = np.zeros(x.shape, dtype=np.float64)
    gW = np.zeros(W.shape, dtype=np.float64)
    for n, oc, oy, ox in itertools.product(range(N), range(OC), range(OH), range(OW)):
        g = float(gy[n, oc, oy, ox])
        for c, ky, kx in itertools.product(range(C), range(K), range(K)):
            iy, ix = oy * s + ky - p, ox * s + kx - p
            if 0 <= iy < H and 0 <= ix < Wd:
                gx[n, c, iy, ix] += g * W[oc, c, ky, kx]
                gW[oc, c, ky, kx] += g * x[n, c, iy, ix]
    return gx, gW, gy.sum(axis=(0, 2, 3))


def naive_im2col(x, K, s, p):
    N, C, H, W = x.shape
    OH, OW = (H + 2 * p - K) // s + 1, (W + 2 * p - K) // s + 1
    cols = np.zeros((N, C * K * K, OH * OW), dtype=x.dtype)
    for n, c, ky, kx, oy, ox in itertools.product(range(N), range(C), range(K), range(K),
                                                  range(OH), range(OW)):
        iy, ix = oy * s + ky - p, ox * s + kx - p
        if 0 <= iy < H and 0 <= ix < W:
            cols[n, (c * K + ky) * K + kx, oy * OW + ox] = x[n, c, iy, ix]
    return cols


def naive_max_pool(x, K, s, ceil_mode=False):
    N, C, H, W = x.shape
    OH, OW = (H - K) // s + 1, (W - K) // s + 1
    if ceil_mode:  # one more, clipped window where inputs are left over (PyTorch's rule)
        OH, OW = -(-(H - K) // s) + 1, -(-(W - K) // s) + 1
        OH, OW = OH - ((OH - 1) * s >= H), OW - ((OW - 1) * s >= W)
    y = np.zeros((N, C, OH, OW), dtype=x.dtype)
    arg = np.zeros((N, C, OH, OW), dtype=np.int64)
    for n, c, oy, ox in itertools.product(range(N), range(C), range(OH), range(OW)):
        best, best_k = None, 0
        for ky, kx in itertools.product(range(K), range(K)):  # row-major: first max wins
            if oy * s + ky >= H or ox * s + kx >= W:
                continue  # outside a clipped ceil-mode window
            v = x[n, c, oy * s + ky, ox * s + kx]
            if best is None or v > best:
                best, best_k = v, ky * K + kx
        y[n, c, oy, ox], arg[n, c, oy, ox] = best, best_k
    return y, arg


def naive_lrn(x, size, alpha, beta, k):
    N, C, H, W = x.shape
    lo, hi = size // 2, (size - 1) // 2
    y = np.zeros(x.shape, dtype=np.float64)
    for n, c, h, w in itertools.product(range(N), range(C), range(H), range(W)):
        s = sum(float(x[n, cc, h, w]) ** 2 for cc in range(max(0, c - lo), min(C, c + hi + 1)))
        y[n, c, h, w] = x[n, c, h, w] / (k + alpha * s) ** beta
    return y


# ----------------------------------------------------------------------------------------
# im2col / col2im
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_im2col_matches_naive_loops(case, dtype):
    N, C, H, W, _, K, s, p = case
    x = rand(np.random.default_rng(0), (N, C, H, W), dtype)
    np.testing.assert_array_equal(cpu.im2col(x, K, K, s, s, p, p), naive_im2col(x, K, s, p))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_col2im_is_the_adjoint_of_im2col(case, dtype):
    # <im2col(x), c> == <x, col2im(c)> for all x, c: the defining property of the adjoint.
    N, C, H, W, _, K, s, p = case
    rng = np.random.default_rng(1)
    x = rand(rng, (N, C, H, W), dtype)
    cols = rand(rng, cpu.im2col(x, K, K, s, s, p, p).shape, dtype)
    lhs = float(np.sum(cpu.im2col(x, K, K, s, s, p, p).astype(np.float64) * cols))
    rhs = float(np.sum(x.astype(np.float64) * cpu.col2im(cols, x.shape, K, K, s, s, p, p)))
    assert lhs == pytest.approx(rhs, rel=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_reference_im2col_matches_naive_loops(case, dtype):
    N, C, H, W, _, K, s, p = case
    x = rand(np.random.default_rng(0), (N, C, H, W), dtype)
    np.testing.assert_array_equal(reference.im2col(x, K, K, s, s, p, p),
                                  naive_im2col(x, K, s, p))


# (N, C, H, W, KH, KW, SH, SW, PH, PW): both fast paths (flat-copy "same" and general),
# non-square kernels, strides and paddings, a kernel wider than the padded row's overlap.
FAST_IM2COL_CASES = [(2, 3, 7, 9, 3, 3, 1, 1, 1, 1), (1, 2, 5, 4, 1, 1, 1, 1, 0, 0),
                     (2, 2, 6, 5, 2, 3, 1, 1, 0, 1), (1, 3, 9, 7, 3, 2, 2, 1, 1, 0),
                     (2, 1, 8, 8, 5, 5, 1, 1, 2, 2), (1, 2, 6, 7, 3, 3, 2, 3, 2, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FAST_IM2COL_CASES)
def test_fast_im2col_and_col2im_match_the_numpy_reference(case, dtype):
    N, C, H, W, *args = case
    rng = np.random.default_rng(11)
    x = rand(rng, (N, C, H, W), dtype)
    cols = reference.im2col(x, *args)
    np.testing.assert_array_equal(cpu.im2col(x, *args), cols)
    g = rand(rng, cols.shape, dtype)
    g_before = g.copy()
    np.testing.assert_allclose(cpu.col2im(g, x.shape, *args),
                               reference.col2im(g, x.shape, *args), **TOL[dtype])
    np.testing.assert_array_equal(g, g_before)  # the whole-batch col2im leaves cols alone


@pytest.mark.parametrize("case", FAST_IM2COL_CASES)
def test_im2col_chunk_on_row_bands_matches_the_numpy_reference(case):
    """Chunks of one or two images and bands of rows, as the conv drivers cut them."""
    N, C, H, W, KH, KW, SH, SW, PH, PW = case
    x = rand(np.random.default_rng(12), (N, C, H, W), np.float64)
    whole = reference.im2col(x, KH, KW, SH, SW, PH, PW)
    OH, OW = (H + 2 * PH - KH) // SH + 1, (W + 2 * PW - KW) // SW + 1
    for n0, n1, oy0, oy1 in [(0, N, 0, OH), (N - 1, N, 1, OH), (0, 1, 0, max(1, OH // 2))]:
        cols = np.full((C * KH * KW, (n1 - n0) * (oy1 - oy0) * OW), np.nan)
        cpu_conv.im2col_chunk(x, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, cols)
        want = whole[n0:n1].reshape(n1 - n0, -1, OH, OW)[:, :, oy0:oy1]
        np.testing.assert_array_equal(cols, want.transpose(1, 0, 2, 3).reshape(cols.shape))


# ----------------------------------------------------------------------------------------
# Convolution
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_forward_matches_naive_loops(case, dtype):
    N, C, H, W, OC, K, s, p = case
    rng = np.random.default_rng(2)
    x, Wt, b = rand(rng, (N, C, H, W), dtype), rand(rng, (OC, C, K, K), dtype), \
        rand(rng, (OC,), dtype)
    y = cpu.conv2d_forward(x, Wt, b, (s, s), (p, p))
    assert y.dtype == dtype
    np.testing.assert_allclose(y, naive_conv2d(x, Wt, b, s, p), **TOL[dtype])
    np.testing.assert_allclose(cpu.conv2d_forward(x, Wt, None, (s, s), (p, p)),
                               naive_conv2d(x, Wt, None, s, p), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_backward_matches_naive_loops(case, dtype):
    N, C, H, W, OC, K, s, p = case
    rng = np.random.default_rng(3)
    x, Wt = rand(rng, (N, C, H, W), dtype), rand(rng, (OC, C, K, K), dtype)
    OH, OW = (H + 2 * p - K) // s + 1, (W + 2 * p - K) // s + 1
    gy = rand(rng, (N, OC, OH, OW), dtype)
    gx, gW, gb = cpu.conv2d_backward(x, Wt, gy, (s, s), (p, p), need_gx=True)
    rx, rW, rb = naive_conv2d_backward(x, Wt, gy, s, p)
    for got, want in ((gx, rx), (gW, rW), (gb, rb)):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, **TOL[dtype])
    gx, gW2, _ = cpu.conv2d_backward(x, Wt, gy, (s, s), (p, p), need_gx=False)
    assert gx is None
    np.testing.assert_allclose(gW2, rW, **TOL[dtype])


@pytest.mark.parametrize("chunk_bytes", [1, 200, 10**9])
def test_conv2d_gives_the_same_result_for_any_chunking(monkeypatch, chunk_bytes):
    # 1 byte: one output row per chunk (bands whose col2im halos overlap); 1 GB: one chunk.
    monkeypatch.setattr(cpu_conv, "IM2COL_CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(4)
    x, Wt, b = rand(rng, (3, 3, 9, 7), np.float64), rand(rng, (5, 3, 3, 3), np.float64), \
        rand(rng, (5,), np.float64)
    y = cpu.conv2d_forward(x, Wt, b, (1, 1), (1, 1))
    gy = rand(rng, y.shape, np.float64)
    gx, gW, gb = cpu.conv2d_backward(x, Wt, gy, (1, 1), (1, 1))
    np.testing.assert_allclose(y, naive_conv2d(x, Wt, b, 1, 1), rtol=1e-12, atol=1e-12)
    for got, want in zip((gx, gW, gb), naive_conv2d_backward(x, Wt, gy, 1, 1)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_conv_chunks_cover_every_output_row_exactly_once(monkeypatch):
    monkeypatch.setenv("NUMBA_NUM_THREADS", "2")
    for N, OH in [(1, 7), (3, 5), (8, 14)]:
        for budget in (1, 3 * 40, 10**9):
            chunks = common.conv_chunks(N, OH, 4, 10, 1, budget, parts=2)
            covered = [(n, oy) for n0, n1, oy0, oy1 in chunks
                       for n in range(n0, n1) for oy in range(oy0, oy1)]
            assert sorted(covered) == [(n, oy) for n in range(N) for oy in range(OH)]


def test_conv2d_result_does_not_depend_on_the_thread_count(monkeypatch):
    rng = np.random.default_rng(5)
    x, Wt = rand(rng, (2, 4, 11, 9), np.float32), rand(rng, (6, 4, 3, 3), np.float32)
    gy = rand(rng, (2, 6, 11, 9), np.float32)
    monkeypatch.setattr(cpu_conv, "IM2COL_CHUNK_BYTES", 4 * 36 * 9 * 3)  # bands of 3 rows
    results = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("NUMBA_NUM_THREADS", threads)
        y = cpu.conv2d_forward(x, Wt, None, (1, 1), (1, 1))
        gx, _, _ = cpu.conv2d_backward(x, Wt, gy, (1, 1), (1, 1))
        results.append((y, gx))
    for y, gx in results[1:]:
        np.testing.assert_array_equal(y, results[0][0])   # disjoint outputs: bit-identical
        np.testing.assert_array_equal(gx, results[0][1])  # gathers in a fixed order


# The small Imagenette recipe's conv shapes (VGG-A at width 0.25, 64×64 crops, batch 64):
# (input shape, output channels). Big enough that every layer is cut into several chunks
# spread over the threads.
RECIPE_CONV_SHAPES = [((64, 3, 64, 64), 16), ((64, 16, 32, 32), 32), ((64, 32, 16, 16), 64)]


# NOTE: as plain Python (NUMBA_DISABLE_JIT=1) these sizes would take many minutes.
recipe_size = pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT", "0") != "0",
                                 reason="recipe-size shapes are too slow without the JIT")


@recipe_size
@pytest.mark.parametrize("shape, OC", RECIPE_CONV_SHAPES)
def test_conv2d_is_bitwise_repeatable_with_two_threads(monkeypatch, shape, OC):
    """Issue 15: the weight gradient once followed the threads' timing. Every sum across
    threads now runs in a fixed order, so identical calls give identical bits."""
    monkeypatch.setenv("NUMBA_NUM_THREADS", "2")
    rng = np.random.default_rng(6)
    x, Wt = rand(rng, shape, np.float32), rand(rng, (OC, shape[1], 3, 3), np.float32) * 0.1
    b = rand(rng, (OC,), np.float32)
    gy = rand(rng, (shape[0], OC, shape[2], shape[3]), np.float32)
    assert len(common.conv_chunks(shape[0], shape[2], shape[3], shape[1] * 9, 4,
                                  cpu_conv.IM2COL_CHUNK_BYTES, parts=2)) >= 2
    first = None
    for _ in range(4):
        y = cpu.conv2d_forward(x, Wt, b, (1, 1), (1, 1))
        got = (y, *cpu.conv2d_backward(x, Wt, gy, (1, 1), (1, 1)))
        if first is None:
            first = got
        for a, want in zip(got, first):
            np.testing.assert_array_equal(a, want)
    # One thread instead of two: y, gx and gb keep their bits (each element is summed in
    # one fixed order); gW may not, as the batch is cut into other chunks (see
    # common.conv2d_backward).
    monkeypatch.setenv("NUMBA_NUM_THREADS", "1")
    y = cpu.conv2d_forward(x, Wt, b, (1, 1), (1, 1))
    gx, _, gb = cpu.conv2d_backward(x, Wt, gy, (1, 1), (1, 1))
    for a, want in zip((y, gx, gb), (first[0], first[1], first[3])):
        np.testing.assert_array_equal(a, want)


@recipe_size
def test_every_threaded_kernel_is_bitwise_repeatable_with_two_threads(monkeypatch):
    """Pooling, ReLU, LRN and the SGD update over ranges of threads: same bits every call."""
    monkeypatch.setenv("NUMBA_NUM_THREADS", "2")
    rng = np.random.default_rng(7)
    x = rand(rng, (64, 32, 16, 16), np.float32)
    gy = rand(rng, (64, 32, 8, 8), np.float32)

    def run():
        y, argmax = cpu.max_pool2d_forward(x, (2, 2), (2, 2))
        gx = cpu.max_pool2d_backward(gy, argmax, x.shape, (2, 2), (2, 2))
        r = cpu.relu_forward(x)
        ly, scale = cpu.lrn_forward(x, 5, 1e-4, 0.75, 2.0)
        lg = cpu.lrn_backward(x, ly, scale, x, 5, 1e-4, 0.75)
        w, v = x.copy(), np.ones_like(x)
        cpu.sgd_update([w], [x], [v], 0.01, 0.9, 5e-4)
        return y, gx, r, cpu.relu_backward(r, x), ly, lg, w, v

    first = run()
    for _ in range(2):
        for a, want in zip(run(), first):
            np.testing.assert_array_equal(a, want)


def test_workspace_reuses_its_buffer_and_grows():
    a = runtime.workspace("test", (4, 5), np.float32)
    b = runtime.workspace("test", (2, 3), np.float32)  # smaller: same memory
    assert np.shares_memory(a, b)
    c = runtime.workspace("test", (100, 100), np.float64)  # larger: a new buffer
    assert c.shape == (100, 100) and c.dtype == np.float64


# ----------------------------------------------------------------------------------------
# Max-pooling
# ----------------------------------------------------------------------------------------

POOL_CASES = [(1, 2, 7, 9, 2, 2), (2, 3, 6, 6, 2, 2), (2, 2, 7, 8, 3, 2), (1, 1, 5, 5, 3, 1)]


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_CASES)
def test_max_pool2d_forward_matches_naive_loops(case, dtype, ceil_mode):
    N, C, H, W, K, s = case
    x = rand(np.random.default_rng(6), (N, C, H, W), dtype)
    y, arg = cpu.max_pool2d_forward(x, (K, K), (s, s), ceil_mode)
    ry, rarg = naive_max_pool(x, K, s, ceil_mode)
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(arg, rarg)


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("case", POOL_CASES + [(1, 1, 7, 8, 2, 3)])
def test_max_pool2d_forward_matches_the_numpy_reference(case, ceil_mode):
    N, C, H, W, K, s = case
    x = rand(np.random.default_rng(8), (N, C, H, W), np.float64)
    y, arg = cpu.max_pool2d_forward(x, (K, K), (s, s), ceil_mode)
    ry, rarg = reference.max_pool2d(x, K, K, s, s, ceil_mode)
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(arg, rarg)


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_CASES)
def test_max_pool2d_backward_sums_over_overlapping_windows(case, dtype, ceil_mode):
    N, C, H, W, K, s = case
    rng = np.random.default_rng(7)
    x = rand(rng, (N, C, H, W), dtype)
    y, arg = cpu.max_pool2d_forward(x, (K, K), (s, s), ceil_mode)
    gy = rand(rng, y.shape, dtype)
    gx = cpu.max_pool2d_backward(gy, arg, x.shape, (K, K), (s, s))
    want = np.zeros(x.shape)
    for n, c, oy, ox in itertools.product(*(range(d) for d in y.shape)):
        k = arg[n, c, oy, ox]
        want[n, c, oy * s + k // K, ox * s + k % K] += gy[n, c, oy, ox]
    np.testing.assert_allclose(gx, want, **TOL[dtype])


def test_max_pool2d_tie_sends_the_gradient_to_the_first_maximum():
    x = np.ones((1, 1, 4, 4), dtype=np.float32)  # every window is a four-way tie
    y, arg = cpu.max_pool2d_forward(x, (2, 2), (2, 2))
    assert (arg == 0).all()
    gx = cpu.max_pool2d_backward(np.ones_like(y), arg, x.shape, (2, 2), (2, 2))
    np.testing.assert_array_equal(gx[0, 0], [[1, 0, 1, 0], [0, 0, 0, 0],
                                             [1, 0, 1, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (1, 2, 6, 6), (3, 1, 2, 5)])
def test_max_pool2x2_fast_paths_equal_the_general_kernels_bit_for_bit(shape, dtype):
    from minivgg.kernels.cpu import pool
    x = rand(np.random.default_rng(12), shape, dtype)
    x[0, 0, :2, :2] = [[1.0, 1.0], [1.0, 0.5]]  # a tie: the first maximum wins
    x[-1, -1, 0, 0], x[0, -1, 1, 1] = np.nan, np.nan  # NaN first, NaN last in a window
    x[-1, 0, :2, 2:4] = -0.0
    y, arg = cpu.max_pool2d_forward(x, (2, 2), (2, 2))  # odd H, W: rows left over
    ry, rarg = np.empty_like(y), np.empty_like(arg)
    pool._max_pool2d_forward_kernel(x, 2, 2, 2, 2, ry, rarg, 0, shape[0] * shape[1])
    np.testing.assert_array_equal(y.view(f"i{y.itemsize}"), ry.view(f"i{y.itemsize}"))
    np.testing.assert_array_equal(arg, rarg)
    gy = rand(np.random.default_rng(14), y.shape, dtype)
    gy[0, 0, 0, 0] = -0.0
    gx = cpu.max_pool2d_backward(gy, arg, x.shape, (2, 2), (2, 2))
    want = np.zeros_like(x)
    pool._max_pool2d_backward_kernel(gy, arg, 2, 2, 2, want, 0, shape[0] * shape[1])
    np.testing.assert_array_equal(gx.view(f"i{gx.itemsize}"), want.view(f"i{gx.itemsize}"))


def test_relu_backward_is_the_product_gy_times_y_above_zero_bit_for_bit(monkeypatch):
    monkeypatch.setenv("NUMBA_NUM_THREADS", "2")
    rng = np.random.default_rng(13)
    y = np.maximum(rand(rng, (3, 70_001), np.float32), 0)  # above INLINE_ELEMENTS
    gy = rand(rng, y.shape, np.float32)
    gy[:, ::5], gy[:, 1::7] = np.nan, -gy[:, 1::7]
    gx = cpu.relu_backward(y, gy)
    want = np.multiply(gy, y > 0)  # NaN * 0 stays NaN, -g * 0 is -0.0
    np.testing.assert_array_equal(gx.view(np.int32), want.view(np.int32))


# ----------------------------------------------------------------------------------------
# The thread pool: ranges, results, errors
# ----------------------------------------------------------------------------------------

def test_map_ranges_returns_each_range_in_order_with_the_callers_settings(monkeypatch):
    monkeypatch.setenv("NUMBA_NUM_THREADS", "3")

    def job(t0, t1):
        return t0, t1, np.geterr()["over"]

    with np.errstate(over="ignore"):
        assert runtime.map_ranges(job, 10) == [(0, 3, "ignore"), (3, 6, "ignore"),
                                               (6, 10, "ignore")]
    assert runtime.map_ranges(job, 10, elements=10) == [(0, 10, np.geterr()["over"])]


@pytest.mark.parametrize("failing", [0, 2])  # the caller's own range, a helper's
def test_map_ranges_raises_a_ranges_error_after_every_range_is_done(monkeypatch, failing):
    monkeypatch.setenv("NUMBA_NUM_THREADS", "2")
    finished = []

    def job(t0, t1):
        if t0 == failing:
            raise ValueError(f"range {t0} failed")
        finished.append(t0)

    with pytest.raises(ValueError, match=f"range {failing} failed"):
        runtime.map_ranges(job, 4)
    assert finished == [2 - failing]  # the other range ran to its end first
    assert runtime.map_ranges(lambda t0, t1: t1 - t0, 4) == [2, 2]  # the pool still works


def test_map_ranges_inside_a_range_runs_there_with_the_same_ranges(monkeypatch):
    """The caller runs the first range itself, a helper the second; a map_ranges call from
    inside either runs all its ranges on that thread (the pool is busy with the outer)."""
    monkeypatch.setenv("NUMBA_NUM_THREADS", "2")
    import threading

    def inner(t0, t1):
        return t0, t1, threading.get_ident()

    def outer(t0, t1):
        return runtime.map_ranges(inner, 6), threading.get_ident()

    results = runtime.map_ranges(outer, 2)
    assert results[0][1] == threading.get_ident() != results[1][1]
    for inner_results, thread in results:
        assert [r[:2] for r in inner_results] == [(0, 3), (3, 6)]
        assert {r[2] for r in inner_results} == {thread}  # nothing handed to a busy pool


def test_map_ranges_from_two_threads_at_once_gives_each_its_own_results(monkeypatch):
    """Two callers share the pool's helpers: each runs its own first range and gets its own
    results back (the counters the helpers watch are shared; they are a hint only)."""
    monkeypatch.setenv("NUMBA_NUM_THREADS", "3")
    import threading
    failures = []

    def caller(tag):
        for i in range(200):
            got = runtime.map_ranges(lambda t0, t1: (tag, i, t0, t1), 9)
            if got != [(tag, i, 0, 3), (tag, i, 3, 6), (tag, i, 6, 9)]:
                failures.append(got)

    threads = [threading.Thread(target=caller, args=(tag,)) for tag in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert failures == []


# ----------------------------------------------------------------------------------------
# ReLU, LRN
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_forward_and_backward_match_the_definition(dtype):
    x = rand(np.random.default_rng(8), (3, 5, 7), dtype)
    x[0, 0, :3] = [0.0, -0.0, np.nan]
    y = cpu.relu_forward(x)
    np.testing.assert_array_equal(y, np.maximum(x, 0))  # NaN stays NaN
    gy = rand(np.random.default_rng(9), x.shape, dtype)
    gx = cpu.relu_backward(y, gy)
    np.testing.assert_array_equal(gx, np.where(y > 0, gy, 0))
    assert gx[0, 0, 0] == 0  # NOTE: the gradient at exactly 0 is 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [5, 4, 1, 9])
def test_lrn_forward_matches_naive_window_sums(size, dtype):
    x = rand(np.random.default_rng(10), (2, 7, 3, 5), dtype) * 3
    y, scale = cpu.lrn_forward(x, size, 0.1, 0.75, 2.0)
    np.testing.assert_allclose(y, naive_lrn(x, size, 0.1, 0.75, 2.0), **TOL[dtype])
    np.testing.assert_allclose(y, x * scale ** -0.75, **TOL[dtype])


@pytest.mark.parametrize("size", [5, 4, 1])
def test_lrn_backward_matches_central_differences(size):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((1, 6, 2, 3)) * 3
    r = rng.standard_normal(x.shape)  # a random projection: f(x) = sum(lrn(x) * r)
    y, scale = cpu.lrn_forward(x, size, 0.1, 0.75, 2.0)
    gx = cpu.lrn_backward(x, y, scale, r, size, 0.1, 0.75)
    eps, num = 1e-6, np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += eps
        xm[i] -= eps
        num[i] = (np.sum(cpu.lrn_forward(xp, size, 0.1, 0.75, 2.0)[0] * r)
                  - np.sum(cpu.lrn_forward(xm, size, 0.1, 0.75, 2.0)[0] * r)) / (2 * eps)
    np.testing.assert_allclose(gx, num, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------
# Dropout, softmax cross-entropy, SGD
# ----------------------------------------------------------------------------------------

def test_dropout_mask_keeps_1_minus_p_and_scales_by_its_inverse():
    mask = cpu.dropout_mask((200, 500), 0.5, np.dtype(np.float32), np.random.default_rng(12))
    assert mask.dtype == np.float32
    assert set(np.unique(mask)) == {0.0, 2.0}
    assert abs(mask.mean() - 1.0) < 0.02  # E[mask] = 1: no rescaling at test time


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_cross_entropy_matches_the_definition(dtype):
    rng = np.random.default_rng(13)
    logits = rand(rng, (5, 7), dtype) * 3
    logits[0, 0] = 1000.0  # must stay finite
    labels = rng.integers(0, 7, 5)
    loss, probs = cpu.softmax_cross_entropy_forward(logits, labels)
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    want_p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    want = -np.mean([np.log(want_p[i, labels[i]]) for i in range(5)])
    assert np.isfinite(loss) and float(loss) == pytest.approx(want, rel=1e-5)
    g = cpu.softmax_cross_entropy_backward(probs, labels, 1.0)
    onehot = np.eye(7)[labels]
    np.testing.assert_allclose(g, (want_p - onehot) / 5, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_update_matches_pytorch_convention(dtype):
    rng = np.random.default_rng(14)
    ws = [rand(rng, s, dtype) for s in [(3, 5), (7,), (0,), (2, 3, 3, 3)]]  # one empty
    gs = [rand(rng, w.shape, dtype) for w in ws]
    vs = [rand(rng, w.shape, dtype) for w in ws]
    want_w, want_v = [], []
    for w, g, v in zip(ws, gs, vs):  # element by element, as the docstring says
        v2 = v.astype(np.float64).copy()
        w2 = w.astype(np.float64).copy()
        for i in np.ndindex(w.shape):
            v2[i] = 0.9 * v2[i] + (g[i] + 5e-4 * w2[i])
            w2[i] -= 0.1 * v2[i]
        want_w.append(w2)
        want_v.append(v2)
    cpu.sgd_update(ws, gs, vs, 0.1, 0.9, 5e-4)
    for got, want in zip(ws + vs, want_w + want_v):
        np.testing.assert_allclose(got, want, **TOL[dtype])
