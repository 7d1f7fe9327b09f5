"""Winograd convolution (kernels/winograd.py, kernels/cpu/winograd.py), F(2×2,3×3) and
F(4×4,3×3), and choosing the conv algorithm (`minivgg.backend.set_conv_algorithm`).

References: the 1-D definition of F(m, 3) for the transform matrices; a naive loop and the
twelve-line NumPy version for the forward; float64 central differences (`minivgg.gradcheck`)
and PyTorch for the gradients. Shapes are odd (H, W not multiples of the tile), non-square,
batch 1. float32 tolerances are 5× the worst error measured on VGG-16's layers
(benchmarks/winograd_accuracy.md).
"""

import numpy as np
import pytest

import minivgg
from minivgg import backend
from minivgg import functional as F
from minivgg.kernels import cpu, reference, winograd
from minivgg.kernels.cpu import winograd as cpu_winograd
from conftest import TOLERANCES
from test_ops import naive_conv2d

torch = pytest.importorskip("torch")

TILES = (2, 4)
ALGORITHM = {m: name for name, m in winograd.ALGORITHMS.items()}  # 2 -> "winograd", ...
# max |float32 - float64| / RMS(float64): 5× the worst of y, gx, gW over VGG-16's layers
FLOAT32_ERROR = {2: 5 * 3.5e-6, 4: 5 * 7.8e-5}

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


def forward(x, W, b, m):
    """The CPU kernel table's conv2d_forward with F(m×m, 3×3)."""
    return cpu.conv2d_forward(x, W, b, (1, 1), (1, 1), ALGORITHM[m])


def backward(x, W, gy, m, need_gx=True):
    return cpu.conv2d_backward(x, W, gy, (1, 1), (1, 1), need_gx, ALGORITHM[m])


@pytest.fixture
def conv_algorithm():
    """Set backend's conv algorithm for one test and restore it afterwards."""
    before = backend.get_conv_algorithm()
    yield backend.set_conv_algorithm
    backend.set_conv_algorithm(before)


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


# ----------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("m", TILES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_reference_winograd_matches_naive_loop(shape, m):
    x, W, b, _ = random_case(shape)
    expected = naive_conv2d(x, W, b, (1, 1), (1, 1))
    np.testing.assert_allclose(reference.conv2d_winograd(x, W, b, m), expected,
                               **TOLERANCES["conv2d"][np.dtype(np.float64)])


@pytest.mark.parametrize("m", TILES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_winograd_forward_matches_reference_and_naive_loop(shape, m):
    x, W, b, _ = random_case(shape)
    y = forward(x, W, b, m)
    tol = TOLERANCES["conv2d"][np.dtype(np.float64)]
    np.testing.assert_allclose(y, reference.conv2d_winograd(x, W, b, m), **tol)
    np.testing.assert_allclose(y, naive_conv2d(x, W, b, (1, 1), (1, 1)), **tol)


@pytest.mark.parametrize("m", TILES)
def test_winograd_forward_without_bias(m):
    x, W, _, _ = random_case(SHAPES["odd"])
    np.testing.assert_allclose(forward(x, W, None, m),
                               naive_conv2d(x, W, None, (1, 1), (1, 1)),
                               **TOLERANCES["conv2d"][np.dtype(np.float64)])


# ----------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("m", TILES)
@pytest.mark.parametrize("shape", [(1, 2, 5, 3, 2), (2, 1, 4, 6, 3)], ids=["batch1", "batch2"])
def test_winograd_gradients_match_finite_differences(shape, m, conv_algorithm):
    conv_algorithm(ALGORITHM[m])
    x, W, b, _ = random_case(shape, seed=3)
    assert minivgg.gradcheck(lambda x, W, b: F.conv2d(x, W, b, padding=1), [x, W, b],
                             **TOLERANCES["gradcheck"][np.dtype(np.float64)])


@pytest.mark.parametrize("m", TILES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_winograd_matches_pytorch_in_float64(shape, m):
    x, W, b, gy = random_case(shape, seed=1)
    y_t, gx_t, gW_t, gb_t = torch_conv(x, W, b, gy)
    y = forward(x, W, b, m)
    gx, gW, gb = backward(x, W, gy, m)
    tol = TOLERANCES["conv2d"][np.dtype(np.float64)]
    for name, ours, theirs in [("y", y, y_t), ("gx", gx, gx_t), ("gW", gW, gW_t),
                               ("gb", gb, gb_t)]:
        np.testing.assert_allclose(ours, theirs, err_msg=name, **tol)


@pytest.mark.parametrize("m", TILES)
def test_winograd_float32_error_within_measured_bound(m):
    """float32 against PyTorch's float64 on the same inputs, relative to the RMS."""
    x, W, b, gy = random_case((2, 32, 13, 10, 24), dtype=np.float32, seed=2)
    y_t, gx_t, gW_t, _ = torch_conv(x, W, b, gy)
    y = forward(x, W, b, m)
    gx, gW, _ = backward(x, W, gy, m)
    for name, ours, theirs in [("y", y, y_t), ("gx", gx, gx_t), ("gW", gW, gW_t)]:
        assert ours.dtype == np.float32, name
        assert relative_error(ours.astype(np.float64), theirs) < FLOAT32_ERROR[m], name


def test_input_gradient_is_skipped_when_not_needed():
    x, W, _, gy = random_case(SHAPES["odd"])
    gx, gW, gb = backward(x, W, gy, 4, need_gx=False)
    assert gx is None and gW.shape == W.shape and gb.shape == (W.shape[0],)


# ----------------------------------------------------------------------------------------
# Chunks and determinism
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("m", TILES)
def test_small_chunks_give_the_same_result(m, monkeypatch):
    """Many chunks (one tile row each) agree with one chunk; each tile row is one job."""
    x, W, b, gy = random_case((3, 4, 9, 7, 5), dtype=np.float32, seed=4)
    y1 = forward(x, W, b, m)
    g1 = backward(x, W, gy, m)
    monkeypatch.setattr(cpu_winograd, "WINOGRAD_CHUNK_BYTES", 1)
    monkeypatch.setattr(winograd, "MIN_CHUNK_TILES", 1)
    assert len(winograd.tile_chunks(3 * 5, 1000, 1, parts=2)) == 15
    y2 = forward(x, W, b, m)
    g2 = backward(x, W, gy, m)
    for a, c in zip((y1,) + g1, (y2,) + g2):  # only the float32 summation order differs
        assert relative_error(c.astype(np.float64), a) < FLOAT32_ERROR[m]


@pytest.mark.parametrize("m", TILES)
def test_weight_gradient_is_bitwise_repeatable(m, monkeypatch):
    """The per-thread partial sums are added in a fixed order: same inputs, same bits."""
    monkeypatch.setattr(cpu_winograd, "WINOGRAD_CHUNK_BYTES", 4096)  # chunks per part
    monkeypatch.setattr(winograd, "MIN_CHUNK_TILES", 1)
    x, W, _, gy = random_case((4, 8, 12, 9, 6), dtype=np.float32, seed=5)
    first = backward(x, W, gy, m)
    for _ in range(3):
        again = backward(x, W, gy, m)
        for a, c in zip(first, again):
            assert np.array_equal(a, c)


# ----------------------------------------------------------------------------------------
# Choosing the algorithm
# ----------------------------------------------------------------------------------------

def test_unknown_conv_algorithm_is_rejected():
    with pytest.raises(ValueError, match="unknown conv algorithm 'fft'"):
        backend.set_conv_algorithm("fft")


@pytest.mark.parametrize("algorithm", ["winograd", "winograd4", "auto"])
def test_convolutions_winograd_cannot_run_fall_back_to_im2col(algorithm, conv_algorithm):
    conv_algorithm(algorithm)
    x = np.zeros((8, 64, 32, 32), dtype=np.float32)
    for shape, stride, padding in [((64, 64, 1, 1), (1, 1), (0, 0)),  # config C's 1×1
                                   ((64, 64, 3, 3), (2, 2), (1, 1)),
                                   ((64, 64, 3, 3), (1, 1), (0, 0))]:
        assert backend.conv_algorithm_for(x, np.zeros(shape), stride, padding) == "im2col"


@pytest.mark.parametrize("fast_blocked", [True, False], ids=["avx512", "no_avx512"])
def test_auto_rule_by_layer_shape(fast_blocked, conv_algorithm, monkeypatch):
    """VGG-16 at batch 8 and the small recipe (width 0.25, 64×64, batch 32), in float32,
    with and without AVX-512 for the blocked kernel; float64 never runs "blocked"."""
    from minivgg.kernels.cpu import blocked
    if not fast_blocked:
        monkeypatch.setenv("MINIVGG_DISABLE_AVX512", "1")
    elif blocked.avx512_reason():
        pytest.skip(blocked.avx512_reason())
    conv_algorithm("auto")
    W3 = np.zeros((8, 8, 3, 3))

    def pick(N, C, H, dtype=np.float32):
        return backend.conv_algorithm_for(np.zeros((N, C, H, H), dtype), W3, (1, 1), (1, 1))

    assert pick(8, 3, 224) == "direct"  # conv1_1: C = 3
    assert pick(32, 3, 64) == ("blocked" if fast_blocked else "direct")  # 12288 an image
    assert pick(64, 3, 112) == ("blocked" if fast_blocked else "direct")  # any batch
    assert pick(32, 3, 64, np.float64) == "direct"
    vgg16 = [(64, 224), (64, 112), (128, 112), (128, 56), (256, 56), (256, 28), (512, 28),
             (512, 14)]
    assert [pick(8, C, s) for C, s in vgg16] == ["winograd4"] * 8
    assert pick(4, 512, 14) == "winograd"  # 784 output pixels
    assert pick(1, 512, 14) == "im2col"  # one image's conv5: 196 pixels
    small = [(16, 32), (32, 16), (64, 16), (64, 8), (128, 8), (128, 4)]  # conv2 ... conv5
    winograd = ["winograd4"] * 5 + ["winograd"]
    assert [pick(32, C, s) for C, s in small] == (["blocked"] * 6 if fast_blocked
                                                   else winograd)
    assert [pick(32, C, s, np.float64) for C, s in small] == winograd
    assert [pick(64, C, s) for C, s in small] == (["blocked"] * 6 if fast_blocked
                                                   else winograd)
    assert pick(2, 16, 65) == "winograd4"  # an image just past 2^16 values (16×65×65)
    assert pick(8, 256, 8) == "winograd"  # a small input, but more than 128 channels


def model_step():
    """Loss and every parameter gradient of one VGG-A step (width 1/8, 32×32, batch 2)."""
    backend.manual_seed(0)
    model = minivgg.models.vgg("A", num_classes=5, width=0.125, fc_width=32, input_size=32)
    model.eval()
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    loss = F.cross_entropy(model(x), np.array([1, 3]))
    loss.backward()
    return [loss.data] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("algorithm", ["winograd", "winograd4", "auto"])
def test_model_step_matches_im2col(algorithm, conv_algorithm):
    """A VGG-A forward and backward with every 3×3 conv by Winograd, against im2col."""
    conv_algorithm("im2col")
    expected = model_step()
    conv_algorithm(algorithm)
    for ours, theirs in zip(model_step(), expected):
        assert relative_error(ours.astype(np.float64), theirs.astype(np.float64)) < 1e-3
