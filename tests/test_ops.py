"""The layers' ops of `minivgg.functional` (conv2d, max_pool2d, relu, local_response_norm,
linear, dropout, cross_entropy), forward and backward, on every device. Tensor arithmetic
(elementwise, reductions, reshape, matmul) is tests/test_tensor_ops.py, on the same
references; `naive_conv2d` here is the reference of the conv kernels' own tests.

Three independent references:
* a naive loop, written from the definition, for the conv and pool forward passes;
* float64 central differences of a random projection sum(y * r) (`minivgg.gradcheck`);
* `torch.nn.functional`, forward and backward, on seeded random shapes (odd H/W, batch 1,
  stride 2, padding 0, non-square inputs and kernels).
"""

import numpy as np
import pytest

import minivgg
from minivgg import backend
from minivgg import functional as F
from conftest import TOLERANCES, assert_close, compare_with_torch, tensor, to_numpy

DTYPES = [np.float32, np.float64]
GRADCHECK = TOLERANCES["gradcheck"][np.dtype(np.float64)]


def gradcheck(fn, inputs, device):
    return minivgg.gradcheck(fn, inputs, device=device, **GRADCHECK)


# ----------------------------------------------------------------------------------------
# Naive references, straight from the definitions
# ----------------------------------------------------------------------------------------

def naive_conv2d(x, W, b, stride, padding):
    """y[n, o, i, j] = b[o] + sum_{c, ky, kx} W[o, c, ky, kx] * xpad[n, c, i*s+ky, j*s+kx]."""
    (SH, SW), (PH, PW) = stride, padding
    N, C, H, Wd = x.shape
    OC, _, KH, KW = W.shape
    xp = np.zeros((N, C, H + 2 * PH, Wd + 2 * PW), dtype=np.float64)
    xp[:, :, PH:PH + H, PW:PW + Wd] = x
    OH, OW = (H + 2 * PH - KH) // SH + 1, (Wd + 2 * PW - KW) // SW + 1
    y = np.zeros((N, OC, OH, OW))
    for n in range(N):
        for o in range(OC):
            for i in range(OH):
                for j in range(OW):
                    patch = xp[n, :, i * SH:i * SH + KH, j * SW:j * SW + KW]
                    y[n, o, i, j] = (patch * W[o]).sum() + (b[o] if b is not None else 0.0)
    return y


def naive_max_pool2d(x, kernel_size, stride, ceil_mode=False):
    """Floor mode: whole windows only. Ceil mode: ceil((H - KH) / SH) + 1 windows (minus one
    that would start past the input, PyTorch's rule), the last clipped by the slice."""
    (KH, KW), (SH, SW) = kernel_size, stride
    N, C, H, W = x.shape
    OH, OW = (H - KH) // SH + 1, (W - KW) // SW + 1
    if ceil_mode:
        OH, OW = -(-(H - KH) // SH) + 1, -(-(W - KW) // SW) + 1
        OH, OW = OH - ((OH - 1) * SH >= H), OW - ((OW - 1) * SW >= W)
    y = np.zeros((N, C, OH, OW))
    for n in range(N):
        for c in range(C):
            for i in range(OH):
                for j in range(OW):
                    y[n, c, i, j] = x[n, c, i * SH:i * SH + KH, j * SW:j * SW + KW].max()
    return y


def naive_lrn(x, size, alpha, beta, k):
    """The paper's (AlexNet's) formula: b_c = a_c / (k + alpha sum a_c'^2)^beta, window
    c - size//2 ... c + (size-1)//2 clipped to the channels."""
    C = x.shape[1]
    y = np.empty_like(x)
    for c in range(C):
        lo, hi = max(0, c - size // 2), min(C, c + (size - 1) // 2 + 1)
        s = (x[:, lo:hi] ** 2).sum(axis=1)
        y[:, c] = x[:, c] / (k + alpha * s) ** beta
    return y


# ----------------------------------------------------------------------------------------
# conv2d
# ----------------------------------------------------------------------------------------

# (N, C, H, W, OC, kernel (KH, KW), stride, padding, bias)
CONV_CASES = {
    "1x1": (2, 3, 5, 5, 4, (1, 1), 1, 0, True),
    "3x3_p1": (2, 3, 7, 6, 5, (3, 3), 1, 1, True),
    "7x7_p0": (1, 2, 9, 8, 3, (7, 7), 1, 0, True),
    "3x3_s2_odd": (2, 3, 9, 7, 4, (3, 3), 2, 1, False),
    "nonsquare_kernel": (1, 2, 6, 5, 3, (3, 1), (2, 1), (1, 0), True),
    "batch1_no_bias": (1, 4, 5, 9, 2, (3, 3), 1, 1, False),
    "2x2_s2_p0": (3, 2, 8, 6, 3, (2, 2), 2, 0, True),
}


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def _conv_arrays(case, rng):
    N, C, H, W, OC, (KH, KW), stride, padding, bias = case
    x = rng.normal(size=(N, C, H, W))
    Wt = rng.normal(size=(OC, C, KH, KW)) / np.sqrt(C * KH * KW)
    b = rng.normal(size=OC) if bias else None
    return x, Wt, b, stride, padding


@pytest.mark.parametrize("name", ["1x1", "3x3_p1", "3x3_s2_odd", "nonsquare_kernel"])
@pytest.mark.parametrize("algorithm", backend.CONV_ALGORITHMS)
def test_conv2d_forward_matches_naive_loop(algorithm, name, device, rng):
    backend.set_conv_algorithm(algorithm)  # 3×3/s1/p1 cases only; the rest im2col
    x, W, b, stride, padding = _conv_arrays(CONV_CASES[name], rng)
    y = F.conv2d(tensor(x, device), tensor(W, device),
                 None if b is None else tensor(b, device), stride, padding)
    expected = naive_conv2d(x, W, b, _pair(stride), _pair(padding))
    assert_close(y, expected, "conv2d", np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CONV_CASES))
@pytest.mark.parametrize("algorithm", backend.CONV_ALGORITHMS)
def test_conv2d_matches_torch_forward_and_backward(algorithm, name, dtype, device, rng, torch):
    backend.set_conv_algorithm(algorithm)  # 3×3/s1/p1 cases only; the rest im2col
    x, W, b, stride, padding = _conv_arrays(CONV_CASES[name], rng)
    arrays = [x, W] if b is None else [x, W, b]
    compare_with_torch(
        "conv2d",
        lambda *t: F.conv2d(*t[:2], t[2] if len(t) > 2 else None, stride, padding),
        lambda *t: torch.nn.functional.conv2d(*t[:2], t[2] if len(t) > 2 else None,
                                              stride=stride, padding=padding),
        arrays, device, dtype, what=f" [{name}]")


@pytest.mark.parametrize("seed", range(4))
def test_conv2d_matches_torch_on_random_shapes(seed, device, torch):
    rng = np.random.default_rng(100 + seed)
    KH, KW = (int(k) for k in rng.integers(1, 5, size=2))
    stride = tuple(int(s) for s in rng.integers(1, 3, size=2))
    padding = tuple(int(p) for p in rng.integers(0, 2, size=2))
    H, W = int(KH + rng.integers(0, 6)), int(KW + rng.integers(0, 6))
    N, C, OC = (int(v) for v in rng.integers(1, 4, size=3))
    arrays = [rng.normal(size=(N, C, H, W)), rng.normal(size=(OC, C, KH, KW)),
              rng.normal(size=OC)]
    compare_with_torch(
        "conv2d", lambda x, Wt, b: F.conv2d(x, Wt, b, stride, padding),
        lambda x, Wt, b: torch.nn.functional.conv2d(x, Wt, b, stride=stride, padding=padding),
        arrays, device, np.float32, seed=seed,
        what=f" [x {(N, C, H, W)}, W {(OC, C, KH, KW)}, s {stride}, p {padding}]")


# The algorithms that run 3×3/s1/p1 convolutions, on their own random shapes: channels
# from 1 to 20, maps from 1×1 to 15×13, batch 1 to 4 (so that "auto" takes every branch),
# and two fixed ones against the blocked kernel's 16-channel, 8-pixel blocks.
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("algorithm", backend.CONV_ALGORITHMS)
def test_conv2d_3x3_matches_torch_on_random_shapes(algorithm, seed, device, torch):
    backend.set_conv_algorithm(algorithm)
    rng = np.random.default_rng(200 + seed)
    N, H, W = int(rng.integers(1, 5)), int(rng.integers(1, 16)), int(rng.integers(1, 14))
    C, OC = (int(v) for v in rng.integers(1, 21, size=2))
    if seed < 2:  # enough channels and pixels for "auto" to pick F(4×4,3×3), F(2×2,3×3)
        N, C, H, W = [(4, 130, 25, 19), (3, 132, 14, 13)][seed]
    if seed >= 6:  # a 1×1 map and a one-row map, channels past one block of 16, batch 1
        N, C, H, W, OC = [(1, 33, 1, 1, 17), (1, 18, 1, 9, 40)][seed - 6]
    arrays = [rng.normal(size=(N, C, H, W)), rng.normal(size=(OC, C, 3, 3)) / np.sqrt(9 * C),
              rng.normal(size=OC)]
    x = tensor(arrays[0], device, np.float32)  # the dtype compare_with_torch runs in
    ran = backend.conv_algorithm_for(x.data, arrays[1], (1, 1), (1, 1))
    assert ran == algorithm or algorithm == "auto"
    if algorithm == "auto" and device == "cpu":
        from minivgg.kernels import winograd
        from minivgg.kernels.cpu import blocked
        fast = not blocked.avx512_reason()
        assert ran == winograd.auto_algorithm("cpu", N, C, H, W, blocked=fast)
        assert fast or ran != "blocked"
        if seed < 2:
            assert ran == ["winograd4", "winograd"][seed]
    compare_with_torch(
        "conv2d_winograd4" if ran == "winograd4" else "conv2d",
        lambda x, Wt, b: F.conv2d(x, Wt, b, 1, 1),
        lambda x, Wt, b: torch.nn.functional.conv2d(x, Wt, b, stride=1, padding=1),
        arrays, device, np.float32, seed=seed,
        what=f" [{algorithm} ran {ran}: x {(N, C, H, W)}, OC {OC}]")


# Smaller cases for finite differences: two forward passes per input element.
GRADCHECK_CONV_CASES = {
    "1x1": (2, 2, 3, 3, 2, (1, 1), 1, 0, True),
    "3x3_p1": (2, 1, 4, 3, 2, (3, 3), 1, 1, True),
    "3x3_s2_odd_no_bias": (1, 2, 5, 4, 2, (3, 3), 2, 1, False),
    "nonsquare_kernel": (1, 2, 4, 3, 2, (3, 1), (2, 1), (1, 0), True),
}


@pytest.mark.parametrize("name", list(GRADCHECK_CONV_CASES))
@pytest.mark.parametrize("algorithm", backend.CONV_ALGORITHMS)
def test_conv2d_backward_matches_finite_differences(algorithm, name, device, rng):
    backend.set_conv_algorithm(algorithm)  # 3×3/s1/p1 cases only; the rest im2col
    x, W, b, stride, padding = _conv_arrays(GRADCHECK_CONV_CASES[name], rng)
    if b is None:
        assert gradcheck(lambda x, W: F.conv2d(x, W, None, stride, padding), [x, W], device)
    else:
        assert gradcheck(lambda x, W, b: F.conv2d(x, W, b, stride, padding), [x, W, b], device)


def test_conv2d_gives_same_result_when_im2col_is_chunked(monkeypatch, rng):
    """A tiny chunk budget forces one image per chunk; results must not change."""
    from minivgg.kernels.cpu import conv as cpu
    if not hasattr(cpu, "IM2COL_CHUNK_BYTES"):
        pytest.skip("the CPU kernels no longer chunk through IM2COL_CHUNK_BYTES")
    x, W, b = rng.normal(size=(5, 3, 6, 7)), rng.normal(size=(4, 3, 3, 3)), rng.normal(size=4)
    gy = rng.normal(size=(5, 4, 6, 7))
    whole = cpu.conv2d_forward(x, W, b, (1, 1), (1, 1))
    grads = cpu.conv2d_backward(x, W, gy, (1, 1), (1, 1))
    monkeypatch.setattr(cpu, "IM2COL_CHUNK_BYTES", 1)
    np.testing.assert_allclose(cpu.conv2d_forward(x, W, b, (1, 1), (1, 1)), whole,
                               rtol=1e-12, atol=1e-12)
    for chunked, full in zip(cpu.conv2d_backward(x, W, gy, (1, 1), (1, 1)), grads):
        np.testing.assert_allclose(chunked, full, rtol=1e-12, atol=1e-12)


def test_conv2d_skips_input_gradient_when_input_needs_none(device, rng):
    """conv1_1 never needs d loss / d image: the image gets no .grad, W still does."""
    x = tensor(rng.normal(size=(1, 3, 5, 5)), device, np.float32)
    W = tensor(rng.normal(size=(2, 3, 3, 3)), device, np.float32, requires_grad=True)
    F.conv2d(x, W, padding=1).sum().backward()
    assert x.grad is None
    assert W.grad is not None and W.grad.shape == (2, 3, 3, 3)


# ----------------------------------------------------------------------------------------
# max_pool2d
# ----------------------------------------------------------------------------------------

# (N, C, H, W, kernel_size, stride)
POOL_CASES = {
    "2x2_s2": (2, 3, 8, 6, (2, 2), (2, 2)),
    "2x2_s2_odd": (1, 2, 7, 5, (2, 2), (2, 2)),
    "3x3_s2_overlap": (2, 2, 9, 7, (3, 3), (2, 2)),
    "3x3_s1": (1, 3, 5, 6, (3, 3), (1, 1)),
    "nonsquare": (2, 1, 6, 7, (2, 3), (1, 2)),
}


def _distinct(shape, rng):
    """Values at least 0.01 apart, so that eps-nudges never change a pool's winner."""
    return rng.permutation(np.arange(int(np.prod(shape)))).reshape(shape) * 0.01


@pytest.mark.parametrize("name", list(POOL_CASES))
def test_max_pool2d_forward_matches_naive_loop(name, device, rng):
    N, C, H, W, k, s = POOL_CASES[name]
    x = rng.normal(size=(N, C, H, W))
    y = F.max_pool2d(tensor(x, device), k, s)
    assert_close(y, naive_max_pool2d(x, k, s), "max_pool2d", np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(POOL_CASES))
def test_max_pool2d_matches_torch_forward_and_backward(name, dtype, device, rng, torch):
    N, C, H, W, k, s = POOL_CASES[name]
    compare_with_torch("max_pool2d", lambda x: F.max_pool2d(x, k, s),
                       lambda x: torch.nn.functional.max_pool2d(x, k, s),
                       [_distinct((N, C, H, W), rng)], device, dtype, what=f" [{name}]")


@pytest.mark.parametrize("shape, k, s", [((1, 2, 5, 3), (2, 2), (2, 2)),
                                         ((1, 1, 5, 5), (3, 3), (2, 2)),
                                         ((2, 1, 4, 5), (2, 3), (1, 2))])
def test_max_pool2d_backward_matches_finite_differences(shape, k, s, device, rng):
    assert gradcheck(lambda x: F.max_pool2d(x, k, s), [_distinct(shape, rng)], device)


# Odd sizes, where ceil mode adds a partial last window (the stride-3 case has one that
# would start past the input, which PyTorch drops).
CEIL_CASES = {
    "2x2_s2_odd": (2, 3, 7, 9, (2, 2), (2, 2)),
    "2x2_s2_batch1": (1, 2, 5, 5, (2, 2), (2, 2)),
    "3x3_s2_overlap": (1, 2, 8, 6, (3, 3), (2, 2)),
    "nonsquare": (2, 1, 6, 7, (2, 3), (1, 2)),
    "2x2_s3": (1, 1, 7, 8, (2, 2), (3, 3)),
}


@pytest.mark.parametrize("name", list(CEIL_CASES))
def test_max_pool2d_ceil_mode_matches_naive_loop(name, device, rng):
    N, C, H, W, k, s = CEIL_CASES[name]
    x = rng.normal(size=(N, C, H, W))
    y = F.max_pool2d(tensor(x, device), k, s, ceil_mode=True)
    assert_close(y, naive_max_pool2d(x, k, s, ceil_mode=True), "max_pool2d", np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CEIL_CASES))
def test_max_pool2d_ceil_mode_matches_torch_forward_and_backward(name, dtype, device, rng,
                                                                 torch):
    N, C, H, W, k, s = CEIL_CASES[name]
    compare_with_torch("max_pool2d", lambda x: F.max_pool2d(x, k, s, ceil_mode=True),
                       lambda x: torch.nn.functional.max_pool2d(x, k, s, ceil_mode=True),
                       [_distinct((N, C, H, W), rng)], device, dtype, what=f" [{name}]")


@pytest.mark.parametrize("name", list(CEIL_CASES))
def test_max_pool2d_ceil_mode_backward_matches_finite_differences(name, device, rng):
    N, C, H, W, k, s = CEIL_CASES[name]
    assert gradcheck(lambda x: F.max_pool2d(x, k, s, ceil_mode=True),
                     [_distinct((N, C, H, W), rng)], device)


def test_max_pool2d_ceil_mode_sees_the_last_row_and_column_floor_mode_drops(device):
    """A 5×5 image whose only signal is its last row and column: floor mode's 2×2 windows
    never reach it, ceil mode's partial windows do (and route its gradient back)."""
    x = np.zeros((1, 1, 5, 5))
    x[0, 0, 4, :] = x[0, 0, :, 4] = 1.0
    assert to_numpy(F.max_pool2d(tensor(x, device), 2, 2)).max() == 0.0
    xt = tensor(x, device, requires_grad=True)
    y = F.max_pool2d(xt, 2, 2, ceil_mode=True)
    np.testing.assert_array_equal(to_numpy(y)[0, 0], [[0, 0, 1], [0, 0, 1], [1, 1, 1]])
    y.backward(np.ones(y.shape))
    assert to_numpy(xt.grad)[0, 0, 4, 4] == 1.0 and to_numpy(xt.grad).sum() == 9.0


@pytest.mark.parametrize("kernel_size, stride", [(2, 2), (3, 2), (3, 1)])
def test_max_pool2d_tie_sends_gradient_to_first_maximum_only(kernel_size, stride, device):
    """A constant image ties every window: each window's gradient goes to exactly one
    input, the first in row-major order, so the gradient sums to the output gradient."""
    x = tensor(np.ones((1, 2, 7, 7)), device, requires_grad=True)
    y = F.max_pool2d(x, kernel_size, stride)
    gy = np.arange(1.0, y.size + 1).reshape(y.shape)
    y.backward(gy)
    expected = np.zeros((1, 2, 7, 7))
    OH, OW = y.shape[2:]
    for i in range(OH):
        for j in range(OW):
            expected[:, :, i * stride, j * stride] += gy[:, :, i, j]
    np.testing.assert_array_equal(to_numpy(x.grad), expected)
    assert to_numpy(x.grad).sum() == gy.sum()


# ----------------------------------------------------------------------------------------
# relu
# ----------------------------------------------------------------------------------------

def test_relu_at_exact_zero_has_zero_output_and_zero_gradient(device):
    x = tensor(np.array([-2.0, -0.0, 0.0, 3.0]), device, np.float32, requires_grad=True)
    y = F.relu(x)
    y.backward(np.ones(4))
    np.testing.assert_array_equal(to_numpy(y), [0.0, 0.0, 0.0, 3.0])
    np.testing.assert_array_equal(to_numpy(x.grad), [0.0, 0.0, 0.0, 1.0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 4), (1, 2, 5, 3), (2, 3, 4, 4)])
def test_relu_matches_torch_forward_and_backward(shape, dtype, device, rng, torch):
    x = rng.normal(size=shape)
    x.flat[0] = 0.0  # an exact zero: torch's gradient there is 0 too
    compare_with_torch("relu", F.relu, torch.relu, [x], device, dtype)


def test_relu_backward_matches_finite_differences(device, rng):
    x = rng.normal(size=(2, 3, 4))
    x[np.abs(x) < 1e-3] = 0.5  # keep away from the kink
    assert gradcheck(F.relu, [x], device)


# ----------------------------------------------------------------------------------------
# local_response_norm (Sec. 2.1: A-LRN)
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6])
def test_lrn_paper_convention_matches_alexnet_formula(size, device, rng):
    x = rng.normal(size=(2, 7, 3, 2)) * 3
    y = F.local_response_norm(tensor(x, device), size, alpha=1e-2, beta=0.75, k=2.0)
    assert_close(y, naive_lrn(x, size, 1e-2, 0.75, 2.0), "local_response_norm", np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size, channels", [(5, 7), (4, 6), (3, 3), (5, 3), (2, 8)])
def test_lrn_alpha_over_n_matches_torch(size, channels, dtype, device, rng, torch):
    x = rng.normal(size=(2, channels, 3, 4)) * 3
    compare_with_torch(
        "local_response_norm",
        lambda t: F.local_response_norm(t, size, 1e-2, 0.75, 1.0, alpha_over_n=True),
        lambda t: torch.nn.functional.local_response_norm(t, size, 1e-2, 0.75, 1.0),
        [x], device, dtype, what=f" [size {size}, C {channels}]")


@pytest.mark.parametrize("size", [5, 4])
def test_lrn_paper_convention_equals_torch_with_alpha_times_n(size, device, rng, torch):
    """Paper: k + alpha * sum. Torch: k + alpha/n * sum. So torch's alpha = alpha * n."""
    alpha = 1e-4
    x = rng.normal(size=(1, 9, 4, 3)) * 30  # large enough that the sum matters
    compare_with_torch(
        "local_response_norm",
        lambda t: F.local_response_norm(t, size, alpha, 0.75, 2.0),
        lambda t: torch.nn.functional.local_response_norm(t, size, alpha * size, 0.75, 2.0),
        [x], device, np.float64)


@pytest.mark.parametrize("size, alpha_over_n", [(5, False), (4, False), (3, True), (6, True)])
def test_lrn_backward_matches_finite_differences(size, alpha_over_n, device, rng):
    x = rng.normal(size=(1, 7, 2, 2)) * 3
    assert gradcheck(lambda t: F.local_response_norm(t, size, 0.1, 0.75, 2.0, alpha_over_n),
                     [x], device)


# ----------------------------------------------------------------------------------------
# linear
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, fin, fout, bias", [(1, 5, 3, True), (4, 7, 2, False),
                                                (3, 16, 9, True)])
def test_linear_matches_torch_forward_and_backward(n, fin, fout, bias, dtype, device, rng,
                                                   torch):
    arrays = [rng.normal(size=(n, fin)), rng.normal(size=(fout, fin))]
    if bias:
        arrays.append(rng.normal(size=fout))
    compare_with_torch("linear", F.linear, torch.nn.functional.linear, arrays, device, dtype)


def test_linear_backward_matches_finite_differences(device, rng):
    x, W, b = rng.normal(size=(3, 4)), rng.normal(size=(5, 4)), rng.normal(size=5)
    assert gradcheck(F.linear, [x, W, b], device)
    assert gradcheck(lambda x, W: F.linear(x, W), [x, W], device)


# ----------------------------------------------------------------------------------------
# dropout (Sec. 3.1: p = 0.5 on fc6 and fc7), inverted
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.5, 0.2, 0.8])
def test_dropout_zeroes_fraction_p_and_scales_survivors(p, device):
    minivgg.manual_seed(0)
    n = 200_000
    x = tensor(np.full(n, 3.0), device, np.float32)
    y = to_numpy(F.dropout(x, p, training=True))
    kept = y != 0
    # The kept count is Binomial(n, 1-p): allow 5 standard deviations.
    assert abs(kept.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / n)
    np.testing.assert_allclose(y[kept], 3.0 / (1 - p), rtol=1e-6)
    assert y.dtype == np.float32


def test_dropout_backward_reuses_the_forward_mask(device, rng):
    minivgg.manual_seed(1)
    x = tensor(rng.normal(size=(50, 40)) + 10.0, device, requires_grad=True)  # no zeros
    y = F.dropout(x, 0.5)
    gy = rng.normal(size=y.shape)
    y.backward(gy)
    mask = to_numpy(y) / to_numpy(x)  # 0 or 1/(1-p) = 2, elementwise
    assert set(np.unique(np.round(mask, 12))) == {0.0, 2.0}
    assert_close(x.grad, gy * mask, "dropout", np.float64)


def test_dropout_backward_matches_finite_differences_for_a_fixed_mask(device, rng):
    x = rng.normal(size=(4, 6))

    def fn(t):  # the same mask on every evaluation: reseed before each draw
        minivgg.manual_seed(7)
        return F.dropout(t, 0.3)

    assert gradcheck(fn, [x], device)


@pytest.mark.parametrize("p, training", [(0.5, False), (0.0, True)])
def test_dropout_is_the_identity_in_eval_mode_and_for_p_zero(p, training, device, rng):
    x = tensor(rng.normal(size=(3, 5)), device, np.float32, requires_grad=True)
    y = F.dropout(x, p, training)
    np.testing.assert_array_equal(to_numpy(y), to_numpy(x))
    (y * 2.0).sum().backward()
    np.testing.assert_array_equal(to_numpy(x.grad), np.full((3, 5), 2.0, np.float32))


def test_dropout_masks_repeat_after_manual_seed(device):
    x = tensor(np.ones((20, 30)), device, np.float32)
    minivgg.manual_seed(42)
    a = to_numpy(F.dropout(x, 0.5))
    minivgg.manual_seed(42)
    b = to_numpy(F.dropout(x, 0.5))
    c = to_numpy(F.dropout(x, 0.5))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(b, c)


# ----------------------------------------------------------------------------------------
# cross_entropy
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_dtype", [np.int64, np.int32])
@pytest.mark.parametrize("n, k", [(1, 3), (5, 10), (8, 2)])
def test_cross_entropy_matches_torch_forward_and_backward(n, k, label_dtype, dtype, device,
                                                          rng, torch):
    logits = rng.normal(size=(n, k)) * 3
    labels = rng.integers(0, k, size=n).astype(label_dtype)
    compare_with_torch(
        "cross_entropy", lambda t: F.cross_entropy(t, labels),
        lambda t: torch.nn.functional.cross_entropy(t, torch.from_numpy(labels.astype(np.int64))),
        [logits], device, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_stays_finite_for_logits_of_plus_minus_1000(dtype, device, torch):
    logits = np.array([[1000.0, -1000.0, 0.0], [-1000.0, -1000.0, 1000.0],
                       [1000.0, 1000.0, -1000.0]])
    labels = np.array([1, 2, 0])
    x = tensor(logits, device, dtype, requires_grad=True)
    loss = F.cross_entropy(x, labels)
    loss.backward()
    assert np.isfinite(to_numpy(loss)) and np.isfinite(to_numpy(x.grad)).all()
    t = torch.tensor(logits, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(t, torch.from_numpy(labels))
    ref.backward()
    assert_close(loss, ref.item(), "cross_entropy", dtype)
    assert_close(x.grad, t.grad.numpy(), "cross_entropy", dtype)


def test_cross_entropy_backward_matches_finite_differences(device, rng):
    labels = np.array([2, 0, 3, 3])
    assert gradcheck(lambda t: F.cross_entropy(t, labels), [rng.normal(size=(4, 5))], device)


def test_cross_entropy_of_uniform_logits_is_log_k(device):
    loss = F.cross_entropy(tensor(np.zeros((4, 10)), device, np.float32), np.arange(4))
    np.testing.assert_allclose(to_numpy(loss), np.log(10), rtol=1e-6)
    assert loss.dtype == np.float32 and loss.shape == ()


# ----------------------------------------------------------------------------------------
# Ops together: a graph that branches
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_branching_graph_of_convs_and_pools_matches_torch(dtype, device, rng, torch):
    """Two convolutions read one input and meet again: catches kernels whose outputs alias
    a reused scratch buffer (invisible in a plain chain, which consumes each at once)."""
    TF = torch.nn.functional

    def ours(x, W1, W2):
        a = F.relu(F.conv2d(x, W1, padding=1))
        b = F.conv2d(x, W2, stride=2, padding=1)
        return F.max_pool2d(a, 2, 2) * b + F.max_pool2d(F.conv2d(a, W2, padding=1), 2, 2)

    def theirs(x, W1, W2):
        a = TF.relu(TF.conv2d(x, W1, padding=1))
        b = TF.conv2d(x, W2, stride=2, padding=1)
        return TF.max_pool2d(a, 2, 2) * b + TF.max_pool2d(TF.conv2d(a, W2, padding=1), 2, 2)

    arrays = [rng.normal(size=(3, 4, 8, 6)), rng.normal(size=(4, 4, 3, 3)) / 6,
              rng.normal(size=(4, 4, 3, 3)) / 6]
    compare_with_torch("conv2d", ours, theirs, arrays, device, dtype)
