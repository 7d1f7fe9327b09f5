"""The weight and bias gradients of a layer of few input channels (conv1_1's RGB), straight
from NCHW gy (kernels/cpu/blocked_grad_rgb.py), AVX-512 only.

References: the naive float64 loop of tests/test_blocked_grad.py and PyTorch where it is
installed. Shapes chosen against the kernel's blocking: widths below, at and past one
16-pixel segment (1, 5, 16, 17, 33), output channels not a multiple of the group of 8
(1, 3, 9, 17), 1 to 4 input channels, batch 1, more images than parts.
"""

import numpy as np
import pytest

from minivgg.kernels import cpu
from minivgg.kernels.cpu import blocked, blocked_grad_rgb
from test_blocked import HAS_AVX512, spills_inside_sums
from test_blocked_grad import FLOAT32_ERROR, naive_conv2d_grads, random_gradient_case

pytestmark = pytest.mark.skipif(not HAS_AVX512, reason=blocked.avx512_reason() or "-")

# (N, C, H, W, OC)
SHAPES = {"rgb_odd": (2, 3, 7, 5, 17), "one_pixel": (1, 4, 1, 1, 3),
          "one_channel_33_wide": (3, 1, 4, 33, 9), "two_ch_16": (1, 2, 16, 16, 8),
          "seg_plus_one": (5, 3, 3, 17, 1), "many_images": (40, 3, 6, 7, 16)}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_few_channel_weight_gradient_matches_naive_loop(shape):
    x, Wt, gy = random_gradient_case(shape, seed=3)
    _, gW_exact, gb_exact = naive_conv2d_grads(x, Wt, gy)
    gW, gb = blocked_grad_rgb.weight_grad_few_channels(x, gy)
    assert gW.dtype == gb.dtype == np.float32
    assert gW.shape == Wt.shape and gb.shape == (shape[4],)
    assert np.abs(gW - gW_exact).max() <= FLOAT32_ERROR * np.sqrt((gW_exact ** 2).mean())
    assert np.abs(gb - gb_exact).max() <= FLOAT32_ERROR * np.sqrt((gb_exact ** 2).mean())


def test_few_channel_weight_gradient_matches_pytorch():
    torch = pytest.importorskip("torch")
    x, Wt, gy = random_gradient_case((4, 3, 13, 21, 20), seed=5)
    tx, tW = torch.from_numpy(x), torch.from_numpy(Wt).requires_grad_()
    tb = torch.zeros(20, requires_grad=True)
    torch.nn.functional.conv2d(tx, tW, tb, 1, 1).backward(torch.from_numpy(gy))
    gW, gb = blocked_grad_rgb.weight_grad_few_channels(x, gy)
    np.testing.assert_allclose(gW, tW.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gb, tb.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_blocked_backward_uses_it_for_rgb_and_keeps_the_bits_at_any_thread_count(monkeypatch):
    """The CPU table's "blocked" backward on 3 input channels gives this kernel's bits, the
    same at 1, 2 and 3 threads (items and parts depend on the shapes only)."""
    x, Wt, gy = random_gradient_case((9, 3, 6, 19, 12), seed=8)
    direct = blocked_grad_rgb.weight_grad_few_channels(x, gy)
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("NUMBA_NUM_THREADS", threads)
        _, gW, gb = cpu.conv2d_backward(x, Wt, gy, (1, 1), (1, 1), False, "blocked")
        assert np.array_equal(gW, direct[0]) and np.array_equal(gb, direct[1])


def test_few_channel_weight_gradient_rejects_wide_inputs_and_mismatched_gy():
    x = np.zeros((2, 5, 4, 4), np.float32)
    with pytest.raises(ValueError, match="C <= 4"):
        blocked_grad_rgb.weight_grad_few_channels(x, np.zeros((2, 8, 4, 4), np.float32))
    with pytest.raises(ValueError, match="gy"):
        blocked_grad_rgb.weight_grad_few_channels(x[:, :3], np.zeros((2, 8, 4, 5), np.float32))


def test_few_channel_kernel_compiles_to_24_fmas_per_segment_without_spills():
    """Per 16-pixel segment: 3 masked x loads and 8 gy loads feeding 24 `vfmadd231ps` on
    zmm registers, every accumulator kept in a register through the sums."""
    fresh = blocked.njit(nogil=True)(blocked_grad_rgb._grad_items.py_func)
    xp, gy = np.zeros((1, 3, 6, 6), np.float32), np.zeros((1, 16, 4, 4), np.float32)
    fresh(xp, gy, np.zeros((1, 2, 10, 8, 3, 16), np.float32), 0, 1)
    asm = next(iter(fresh.inspect_asm().values()))
    fmas = [line for line in asm.splitlines() if "vfmadd" in line]
    assert len(fmas) == 24 and all("zmm" in f for f in fmas)
    assert spills_inside_sums(asm) == []
