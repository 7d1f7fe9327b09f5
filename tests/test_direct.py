"""Direct convolution (kernels/direct.py, kernels/cpu/direct.py): 3×3, stride 1, padding 1.

References as for Winograd (tests/test_winograd.py): a naive loop for the forward, float64
central differences (`minivgg.gradcheck`) and PyTorch for the gradients, on odd,
non-square shapes and batch 1. Direct convolution sums the same products as the naive
loop, so float32 is held to im2col's bound; and since each output, and each entry of the
weight gradient, is summed by one thread in a fixed order, results do not change with the
thread count or the blocking at all.
"""

import numpy as np
import pytest

import minivgg
from minivgg import backend
from minivgg import functional as F
from minivgg.kernels import cpu, direct
from minivgg.kernels.cpu import direct as cpu_direct
from conftest import TOLERANCES
from test_ops import naive_conv2d
from test_winograd import SHAPES, model_step, random_case, relative_error, torch_conv

# max |float32 - float64| / RMS(float64): 5× im2col's worst over VGG-16's layers
# (benchmarks/winograd_accuracy.md)
FLOAT32_ERROR = 5 * 2.5e-6


def forward(x, W, b):
    return cpu.conv2d_forward(x, W, b, (1, 1), (1, 1), "direct")


def backward(x, W, gy, need_gx=True):
    return cpu.conv2d_backward(x, W, gy, (1, 1), (1, 1), need_gx, "direct")


@pytest.fixture
def conv_algorithm():
    before = backend.get_conv_algorithm()
    yield backend.set_conv_algorithm
    backend.set_conv_algorithm(before)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_direct_forward_matches_naive_loop(shape):
    x, W, b, _ = random_case(shape)
    np.testing.assert_allclose(forward(x, W, b), naive_conv2d(x, W, b, (1, 1), (1, 1)),
                               **TOLERANCES["conv2d"][np.dtype(np.float64)])


def test_direct_forward_without_bias():
    x, W, _, _ = random_case(SHAPES["odd"])
    np.testing.assert_allclose(forward(x, W, None), naive_conv2d(x, W, None, (1, 1), (1, 1)),
                               **TOLERANCES["conv2d"][np.dtype(np.float64)])


def test_rotated_filters_are_the_adjoint():
    """<conv(x, W), g> = <x, conv(g, W')>: W' is what the input gradient convolves with."""
    x, W, _, gy = random_case((2, 3, 6, 5, 4), seed=7)
    Wr = direct.rotated_filters(np, W)
    assert Wr.shape == (3, 4, 3, 3) and Wr[1, 2, 0, 0] == W[2, 1, 2, 2]
    lhs = (naive_conv2d(x, W, None, (1, 1), (1, 1)) * gy).sum()
    rhs = (x * naive_conv2d(gy, Wr, None, (1, 1), (1, 1))).sum()
    assert abs(lhs - rhs) < 1e-10 * abs(lhs)


@pytest.mark.parametrize("shape", [(1, 2, 5, 3, 2), (2, 1, 4, 6, 3)], ids=["batch1", "batch2"])
def test_direct_gradients_match_finite_differences(shape, conv_algorithm):
    conv_algorithm("direct")
    x, W, b, _ = random_case(shape, seed=3)
    assert minivgg.gradcheck(lambda x, W, b: F.conv2d(x, W, b, padding=1), [x, W, b],
                             **TOLERANCES["gradcheck"][np.dtype(np.float64)])


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_direct_matches_pytorch_in_float64(shape):
    x, W, b, gy = random_case(shape, seed=1)
    y_t, gx_t, gW_t, gb_t = torch_conv(x, W, b, gy)
    y = forward(x, W, b)
    gx, gW, gb = backward(x, W, gy)
    tol = TOLERANCES["conv2d"][np.dtype(np.float64)]
    for name, ours, theirs in [("y", y, y_t), ("gx", gx, gx_t), ("gW", gW, gW_t),
                               ("gb", gb, gb_t)]:
        np.testing.assert_allclose(ours, theirs, err_msg=name, **tol)


@pytest.mark.parametrize("shape", [(2, 3, 37, 29, 24), (3, 32, 13, 10, 20)],
                         ids=["rgb_layer", "thin_layer"])
def test_direct_float32_error_within_im2col_bound(shape):
    x, W, b, gy = random_case(shape, dtype=np.float32, seed=2)
    y_t, gx_t, gW_t, _ = torch_conv(x, W, b, gy)
    y = forward(x, W, b)
    gx, gW, _ = backward(x, W, gy)
    for name, ours, theirs in [("y", y, y_t), ("gx", gx, gx_t), ("gW", gW, gW_t)]:
        assert ours.dtype == np.float32, name
        assert relative_error(ours.astype(np.float64), theirs) < FLOAT32_ERROR, name


def test_input_gradient_is_skipped_when_not_needed():
    x, W, _, gy = random_case(SHAPES["odd"])
    gx, gW, gb = backward(x, W, gy, need_gx=False)
    assert gx is None and gW.shape == W.shape and gb.shape == (W.shape[0],)


def test_results_do_not_depend_on_threads_or_blocks(monkeypatch):
    """Every output and gW entry is one thread's fixed-order sum: same bits for 1, 2 or 3
    threads, output-channel blocks of 1, 3 or 8, lane blocks of 1 or 3 channels within a
    thread's range, or all of it (1,620 bytes of lanes per channel here)."""
    x, W, b, gy = random_case((3, 5, 11, 9, 13), dtype=np.float32, seed=5)
    first = (forward(x, W, b),) + backward(x, W, gy)
    for threads, oc_block, lane_bytes in [("1", 1, 1), ("3", 8, 1 << 30), ("2", 3, 5000)]:
        monkeypatch.setenv("NUMBA_NUM_THREADS", threads)
        monkeypatch.setattr(cpu_direct, "OC_BLOCK", oc_block)
        monkeypatch.setattr(cpu_direct, "GRAD_LANE_BYTES", lane_bytes)
        again = (forward(x, W, b),) + backward(x, W, gy)
        for name, a, c in zip(("y", "gx", "gW", "gb"), first, again):
            assert np.array_equal(a, c), (name, threads, oc_block, lane_bytes)


def test_direct_applies_to_3x3_s1_p1_only(conv_algorithm):
    conv_algorithm("direct")
    x = np.zeros((2, 3, 16, 16), dtype=np.float32)
    assert backend.conv_algorithm_for(x, np.zeros((8, 3, 3, 3)), (1, 1), (1, 1)) == "direct"
    for shape, stride, padding in [((8, 3, 1, 1), (1, 1), (0, 0)),  # config C's 1×1
                                   ((8, 3, 3, 3), (2, 2), (1, 1))]:
        assert backend.conv_algorithm_for(x, np.zeros(shape), stride, padding) == "im2col"


def test_model_step_matches_im2col(conv_algorithm):
    """A VGG-A forward and backward with every 3×3 conv done directly, against im2col."""
    conv_algorithm("im2col")
    expected = model_step()
    conv_algorithm("direct")
    for ours, theirs in zip(model_step(), expected):
        assert relative_error(ours.astype(np.float64), theirs.astype(np.float64)) < 1e-4
