"""The GPU's register-blocked direct convolution (kernels/cuda/blocked.cu, launched by
`CudaPrimitives.blocked_conv2d_forward` / `blocked_conv2d_backward` in kernels/gpu.py), run
on the CPU through the host emulator (tests/support/cuda_host_emulator.py).

References: the naive float64 loops of tests/test_ops.py (forward) and
tests/test_blocked_grad.py (input, weight and bias gradients). Shapes chosen against the
blocking: channel counts that are not multiples of the 8-channel chunk or the 16-channel
tiles, maps narrower and wider than the 8 × 32 forward tile and the 32-column gradient
segment, odd sizes, batch 1, 1×1 maps; grids cut to 1 and 3 blocks, so each block loops over
many tiles; the weight gradient's row ranges one row each, crossing images, or one for all.
On a GPU, test_gpu.py runs the same kernels against the CPU's.
"""

import os
import re

import numpy as np
import pytest

import standin_cupy as standin
from conftest import assert_close
from cuda_host_emulator import have_compiler, load_emulated_cuda_kernels
from standin_cupy import asarray as dev, asnumpy as host
from test_blocked_grad import naive_conv2d_grads
from test_ops import naive_conv2d

pytestmark = pytest.mark.skipif(not have_compiler(), reason="g++ not found")

# (N, C, H, W, OC)
SHAPES = {
    "rgb_odd": (2, 3, 7, 5, 5),
    "c17_two_tiles_each_way": (1, 17, 9, 35, 20),
    "one_pixel": (1, 9, 1, 1, 3),
    "one_channel_in_and_out": (3, 1, 5, 4, 1),
}
DTYPES = [np.float32, np.float64]


@pytest.fixture(scope="module")
def gpu():
    return load_emulated_cuda_kernels()


@pytest.fixture(autouse=True)
def no_stream_hazards():
    standin.reset()
    yield
    assert not standin.hazards, standin.hazards


def random_case(shape, dtype, seed=0):
    """x, W, b, gy of a 3×3/s1/p1 convolution of `shape` (N, C, H, W, OC)."""
    N, C, H, W, OC = shape
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, C, H, W)).astype(dtype)
    Wt = (rng.normal(size=(OC, C, 3, 3)) / np.sqrt(9 * C)).astype(dtype)
    return x, Wt, rng.normal(size=OC).astype(dtype), rng.normal(size=(N, OC, H, W)).astype(
        dtype)


def blocked_on_gpu(gpu, x, Wt, b, gy):
    """y, gx, gW, gb by the blocked kernels on the emulated device, back on the host."""
    prims = gpu.PRIMITIVES
    y = prims.blocked_conv2d_forward(dev(x), dev(Wt), dev(b))
    return (host(y), *(host(g) for g in prims.blocked_conv2d_backward(
        dev(x), dev(Wt), dev(gy), True)))


def assert_matches_naive_loops(got, x, Wt, b, gy, dtype):
    y, gx, gW, gb = got
    assert y.dtype == gx.dtype == gW.dtype == gb.dtype == dtype
    assert gx.shape == x.shape and gW.shape == Wt.shape and gb.shape == b.shape
    assert_close(y, naive_conv2d(x, Wt, b, (1, 1), (1, 1)), "conv2d", dtype, "y")
    for name, g, want in zip(("gx", "gW", "gb"), (gx, gW, gb), naive_conv2d_grads(x, Wt, gy)):
        assert_close(g, want, "conv2d", dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_cuda_blocked_conv_and_gradients_match_naive_loops(shape, dtype, gpu):
    x, Wt, b, gy = random_case(shape, dtype)
    assert_matches_naive_loops(blocked_on_gpu(gpu, x, Wt, b, gy), x, Wt, b, gy, dtype)


@pytest.mark.parametrize("blocks", [1, 3])
def test_cuda_blocked_kernels_loop_over_tiles_on_a_tiny_grid(blocks, gpu, monkeypatch):
    """Every kernel's grid-stride loop: 1 or 3 blocks for 16 forward tiles, 36 gradient
    jobs and the sum's 1377 entries."""
    monkeypatch.setattr(gpu, "MAX_BLOCKS", blocks)
    x, Wt, b, gy = random_case((2, 17, 9, 35, 20), np.float64, seed=1)
    assert_matches_naive_loops(blocked_on_gpu(gpu, x, Wt, b, gy), x, Wt, b, gy, np.float64)


@pytest.mark.parametrize("grad_blocks", [1, 3, 512])  # one range; 3 ranges; one row each
def test_cuda_blocked_weight_grad_is_the_same_for_any_row_ranges(grad_blocks, gpu,
                                                                  monkeypatch):
    """The (image, row) axis cut into 1 range (bands of 4 rows written straight into gW),
    3 ranges of 6 rows (the second crosses from image 0 into image 1), or 18 of one row:
    within float64 rounding of the naive loop, and the same bits from call to call."""
    monkeypatch.setattr(gpu, "BLOCKED_GRAD_BLOCKS", grad_blocks)
    x, Wt, _, gy = random_case((2, 5, 9, 6, 4), np.float64, seed=2)
    prims = gpu.PRIMITIVES
    gx, gW, gb = prims.blocked_conv2d_backward(dev(x), dev(Wt), dev(gy), False)
    assert gx is None
    assert_close(host(gW), naive_conv2d_grads(x, Wt, gy)[1], "conv2d", np.float64)
    again = prims.blocked_conv2d_backward(dev(x), dev(Wt), dev(gy), False)[1]
    np.testing.assert_array_equal(host(again), host(gW))


def test_cuda_blocked_forward_reads_strided_filters_and_no_bias(gpu):
    """A filter view with swapped axes (the kernel reads raw memory: it must get a copy)
    and b=None."""
    x, Wt, _, _ = random_case((2, 4, 6, 7, 3), np.float32, seed=3)
    W_view = dev(np.ascontiguousarray(Wt.transpose(1, 0, 2, 3))).transpose(1, 0, 2, 3)
    y = gpu.PRIMITIVES.blocked_conv2d_forward(dev(x), W_view, None)
    assert_close(host(y), naive_conv2d(x, Wt, None, (1, 1), (1, 1)), "conv2d", np.float32)


def test_gpu_py_launches_blocked_cu_with_its_block_shape(gpu):
    """BLOCKED_THREADS, BLOCKED_TILE and GRAD_TILE in kernels/gpu.py are blocked.cu's."""
    with open(os.path.join(os.path.dirname(gpu.__file__), "cuda", "blocked.cu")) as f:
        defines = dict(re.findall(r"#define (\w+) (\d+)", f.read()))
    assert (gpu.BLOCKED_TILE, gpu.GRAD_TILE) == (
        tuple(int(defines[k]) for k in ("TILE_H", "TILE_W", "TILE_OC")),
        int(defines["GRAD_TILE"]))
    TH, TW, TOC = gpu.BLOCKED_TILE
    assert gpu.BLOCKED_THREADS == TH * TW // int(defines["PIX"]) * TOC // int(defines["OCT"])
