"""Winograd convolution (kernels/winograd.py), F(2×2,3×3) and F(4×4,3×3).

References: the 1-D definition of F(m, 3) for the transform matrices; a naive loop and the
twelve-line NumPy version for the forward; float64 central differences (`minivgg.gradcheck`)
and PyTorch for the gradients. Shapes are odd (H, W not multiples of the tile), non-square,
batch 1. float32 tolerances are 5× the worst error measured on VGG-16's layers
(benchmarks/winograd_accuracy.md).
"""

import numpy as np
import pytest

import minivgg
from minivgg.kernels import winograd
from minivgg.tensor import Function
from conftest import TOLERANCES
from test_ops import naive_conv2d

torch = pytest.importorskip("torch")

TILES = winograd.TILE_SIZES
# max |float32 - float64| / RMS(float64): 5× the worst of y, gx, gW over VGG-16's layers
FLOAT32_ERROR = {2: 5 * 3.6e-6, 4: 5 * 7.8e-5}

# (N, C, H, W, OC): odd sizes, non-square, batch 1, a 1×1 image, tiles cut by the edge
SHAPES = {
    "odd": (2, 3, 7, 5, 4),
    "batch1_nonsquare": (1, 5, 6, 11, 3),
    "one_pixel": (1, 2, 1, 1, 3),
    "thin_row": (3, 2, 2, 9, 2),
    "many_channels": (2, 17, 9, 10, 13),
}


def random_case(shape, dtype=np.float64, seed=0):
    N, C, H, W, OC = shape
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, C, H, W))
    Wt = rng.normal(size=(OC, C, 3, 3)) / np.sqrt(9 * C)
    b = rng.normal(size=OC)
    gy = rng.normal(size=(N, OC, H, W))
    return [a.astype(dtype) for a in (x, Wt, b, gy)]


def torch_conv(x, W, b, gy):
    """PyTorch's y, gx, gW, gb for a 3×3/s1/p1 convolution, in float64."""
    xt, Wt, bt = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, W, b))
    y = torch.nn.functional.conv2d(xt, Wt, bt, padding=1)
    y.backward(torch.tensor(gy, dtype=torch.float64))
    return y.detach().numpy(), xt.grad.numpy(), Wt.grad.numpy(), bt.grad.numpy()


def relative_error(result, exact):
    return np.abs(result - exact).max() / np.sqrt((exact ** 2).mean())


# ----------------------------------------------------------------------------------------
# The transform matrices
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("m", TILES)
def test_transforms_compute_f_m_3_in_one_dimension(m):
    """A^T [(G g) ⊙ (B^T d)] = the m outputs of a 3-tap correlation over m + 2 inputs."""
    BT, G, AT = winograd.transforms(m)
    rng = np.random.default_rng(m)
    for _ in range(5):
        d, g = rng.normal(size=m + 2), rng.normal(size=3)
        expected = np.array([d[i:i + 3] @ g for i in range(m)])
        np.testing.assert_allclose(AT @ ((G @ g) * (BT @ d)), expected, rtol=1e-12,
                                   atol=1e-12)


@pytest.mark.parametrize("m", TILES)
def test_transforms_compute_f_mxm_3x3_on_one_tile(m):
    BT, G, AT = winograd.transforms(m)
    rng = np.random.default_rng(10 + m)
    d, g = rng.normal(size=(m + 2, m + 2)), rng.normal(size=(3, 3))
    expected = np.array([[(d[i:i + 3, j:j + 3] * g).sum() for j in range(m)]
                         for i in range(m)])
    Y = AT @ ((G @ g @ G.T) * (BT @ d @ BT.T)) @ AT.T
    np.testing.assert_allclose(Y, expected, rtol=1e-12, atol=1e-12)


def test_unknown_tile_size_is_rejected():
    with pytest.raises(ValueError, match="tile size must be 2 or 4"):
        winograd.transforms(3)


def test_non_3x3_or_strided_convolution_is_rejected():
    x, W, b, _ = random_case((1, 2, 5, 5, 3))
    with pytest.raises(ValueError, match="3×3 filters, stride 1, padding 1"):
        winograd.conv2d_winograd_forward(x, W, b, stride=(2, 2))
    with pytest.raises(ValueError, match="3×3 filters, stride 1, padding 1"):
        winograd.conv2d_winograd_forward(x, np.zeros((3, 2, 5, 5)), b, padding=(2, 2))


# ----------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("m", TILES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_reference_winograd_matches_naive_loop(shape, m):
    x, W, b, _ = random_case(shape)
    expected = naive_conv2d(x, W, b, (1, 1), (1, 1))
    np.testing.assert_allclose(winograd.conv2d_winograd_reference(x, W, b, m), expected,
                               **TOLERANCES["conv2d"][np.dtype(np.float64)])


@pytest.mark.parametrize("m", TILES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_winograd_forward_matches_reference_and_naive_loop(shape, m):
    x, W, b, _ = random_case(shape)
    y = winograd.conv2d_winograd_forward(x, W, b, m=m)
    tol = TOLERANCES["conv2d"][np.dtype(np.float64)]
    np.testing.assert_allclose(y, winograd.conv2d_winograd_reference(x, W, b, m), **tol)
    np.testing.assert_allclose(y, naive_conv2d(x, W, b, (1, 1), (1, 1)), **tol)


@pytest.mark.parametrize("m", TILES)
def test_winograd_forward_without_bias(m):
    x, W, _, _ = random_case(SHAPES["odd"])
    np.testing.assert_allclose(winograd.conv2d_winograd_forward(x, W, None, m=m),
                               naive_conv2d(x, W, None, (1, 1), (1, 1)),
                               **TOLERANCES["conv2d"][np.dtype(np.float64)])


# ----------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------

class WinogradConv(Function):
    """The Winograd kernels as an autograd op, so `minivgg.gradcheck` can drive them."""

    def __init__(self, m):
        self.m = m

    def forward(self, x, W, b):
        self.save_for_backward(x, W)
        return winograd.conv2d_winograd_forward(x, W, b, m=self.m)

    def backward(self, gy):
        x, W = self.saved
        return winograd.conv2d_winograd_backward(x, W, gy, m=self.m)


@pytest.mark.parametrize("m", TILES)
@pytest.mark.parametrize("shape", [(1, 2, 5, 3, 2), (2, 1, 4, 6, 3)], ids=["batch1", "batch2"])
def test_winograd_gradients_match_finite_differences(shape, m):
    x, W, b, _ = random_case(shape, seed=3)
    assert minivgg.gradcheck(lambda x, W, b: WinogradConv(m)(x, W, b), [x, W, b],
                             **TOLERANCES["gradcheck"][np.dtype(np.float64)])


@pytest.mark.parametrize("m", TILES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_winograd_matches_pytorch_in_float64(shape, m):
    x, W, b, gy = random_case(shape, seed=1)
    y_t, gx_t, gW_t, gb_t = torch_conv(x, W, b, gy)
    y = winograd.conv2d_winograd_forward(x, W, b, m=m)
    gx, gW, gb = winograd.conv2d_winograd_backward(x, W, gy, m=m)
    tol = TOLERANCES["conv2d"][np.dtype(np.float64)]
    for name, ours, theirs in [("y", y, y_t), ("gx", gx, gx_t), ("gW", gW, gW_t),
                               ("gb", gb, gb_t)]:
        np.testing.assert_allclose(ours, theirs, err_msg=name, **tol)


@pytest.mark.parametrize("m", TILES)
def test_winograd_float32_error_within_measured_bound(m):
    """float32 against PyTorch's float64 on the same inputs, relative to the RMS."""
    x, W, b, gy = random_case((2, 32, 13, 10, 24), dtype=np.float32, seed=2)
    y_t, gx_t, gW_t, _ = torch_conv(x, W, b, gy)
    y = winograd.conv2d_winograd_forward(x, W, b, m=m)
    gx, gW, _ = winograd.conv2d_winograd_backward(x, W, gy, m=m)
    for name, ours, theirs in [("y", y, y_t), ("gx", gx, gx_t), ("gW", gW, gW_t)]:
        assert ours.dtype == np.float32, name
        assert relative_error(ours.astype(np.float64), theirs) < FLOAT32_ERROR[m], name


def test_input_gradient_is_skipped_when_not_needed():
    x, W, _, gy = random_case(SHAPES["odd"])
    gx, gW, gb = winograd.conv2d_winograd_backward(x, W, gy, need_gx=False)
    assert gx is None and gW.shape == W.shape and gb.shape == (W.shape[0],)


# ----------------------------------------------------------------------------------------
# Chunks and determinism
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("m", TILES)
def test_small_chunks_give_the_same_result(m, monkeypatch):
    """Many chunks (one tile row each) agree with one chunk; each tile row is one job."""
    x, W, b, gy = random_case((3, 4, 9, 7, 5), dtype=np.float32, seed=4)
    y1 = winograd.conv2d_winograd_forward(x, W, b, m=m)
    g1 = winograd.conv2d_winograd_backward(x, W, gy, m=m)
    monkeypatch.setattr(winograd, "WINOGRAD_CHUNK_BYTES", 1)
    assert len(winograd.tile_chunks(3 * 5, 1000)) == 15
    y2 = winograd.conv2d_winograd_forward(x, W, b, m=m)
    g2 = winograd.conv2d_winograd_backward(x, W, gy, m=m)
    for a, c in zip((y1,) + g1, (y2,) + g2):  # only the float32 summation order differs
        assert relative_error(c.astype(np.float64), a) < FLOAT32_ERROR[m]


@pytest.mark.parametrize("m", TILES)
def test_weight_gradient_is_bitwise_repeatable(m, monkeypatch):
    """The per-thread partial sums are added in a fixed order: same inputs, same bits."""
    monkeypatch.setattr(winograd, "WINOGRAD_CHUNK_BYTES", 4096)  # several chunks per part
    x, W, _, gy = random_case((4, 8, 12, 9, 6), dtype=np.float32, seed=5)
    first = winograd.conv2d_winograd_backward(x, W, gy, m=m)
    for _ in range(3):
        again = winograd.conv2d_winograd_backward(x, W, gy, m=m)
        for a, c in zip(first, again):
            assert np.array_equal(a, c)
