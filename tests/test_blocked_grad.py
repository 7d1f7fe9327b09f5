"""The backward pass of the blocked direct convolution (kernels/cpu/blocked_grad.py):
input and weight gradients of a 3×3/s1/p1 float32 convolution on the nChw16c layout.

References: a naive float64 loop over the nine taps (below), and the CPU table's im2col
backward. Shapes chosen against the blocking: channel counts that are not multiples of 16
(3, 17, 40), widths 1, 5, 11, 19, 1×1 maps, batch 1. Both the AVX-512 micro-kernel (where
this CPU has it) and the plain-loop fallback run here.
"""

import numpy as np
import pytest

from minivgg.kernels import cpu
from minivgg.kernels.cpu import blocked, blocked_grad
from test_blocked import (PATHS, HAS_AVX512, SHAPES, random_case, relative_error,
                          spills_inside_sums)

GRAD_SHAPES = {**SHAPES, "width1": (2, 17, 4, 1, 3), "c3_to_40": (1, 3, 5, 5, 40)}
# max |float32 - float64| / RMS(float64). Measured on GRAD_SHAPES, both paths: at most
# 3.0e-6 (gx), 2.3e-6 (gW), 1.1e-7 (gb); the bound is the forward tests' (im2col's,
# 5 × 2.5e-6).
FLOAT32_ERROR = 5 * 2.5e-6


def naive_conv2d_grads(x, Wt, gy):
    """gx, gW, gb of y = conv(x, Wt) + b (3×3/s1/p1) in float64, one tap at a time."""
    x, Wt, gy = (a.astype(np.float64) for a in (x, Wt, gy))
    N, C, H, W = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    gxp = np.zeros_like(xp)
    gW = np.zeros(Wt.shape)
    for ky in range(3):
        for kx in range(3):
            window = xp[:, :, ky:ky + H, kx:kx + W]  # x[n, c, oy+ky-1, ox+kx-1]
            gW[:, :, ky, kx] = np.einsum("nohw,nchw->oc", gy, window)
            gxp[:, :, ky:ky + H, kx:kx + W] += np.einsum("nohw,oc->nchw", gy, Wt[:, :, ky, kx])
    return gxp[:, :, 1:-1, 1:-1], gW, gy.sum(axis=(0, 2, 3))


def random_gradient_case(shape, seed=0):
    N, C, H, W, OC = shape
    x, Wt, _ = random_case(shape, seed)
    gy = np.random.default_rng(seed + 100).normal(size=(N, OC, H, W)).astype(np.float32)
    return x, Wt, gy


def blocked_grads(x, Wt, gy, vector=None):
    """gx, gW, gb by the blocked kernels, and gxb (to check its padded channels)."""
    OC, C = Wt.shape[:2]
    gyb = blocked.to_blocked(gy)
    gxb = blocked_grad.conv2d_input_grad_blocked(gyb, Wt, vector=vector)
    gW, gb = blocked_grad.conv2d_weight_grad_blocked(blocked.to_blocked(x), gyb, C, OC,
                                                     vector=vector)
    return blocked.from_blocked(gxb, C), gW, gb, gxb


def test_unblock_filters_undoes_block_filters():
    Wt = np.random.default_rng(2).normal(size=(20, 17, 3, 3)).astype(np.float32)
    assert np.array_equal(blocked_grad.unblock_filters(blocked.block_filters(Wt), 20, 17), Wt)


@pytest.mark.parametrize("vector", PATHS)
@pytest.mark.parametrize("shape", GRAD_SHAPES.values(), ids=GRAD_SHAPES.keys())
def test_blocked_gradients_match_naive_loop(shape, vector):
    x, Wt, gy = random_gradient_case(shape)
    gx, gW, gb, gxb = blocked_grads(x, Wt, gy, vector=vector)
    exact_gx, exact_gW, exact_gb = naive_conv2d_grads(x, Wt, gy)
    assert gx.shape == x.shape and gW.shape == Wt.shape and gb.shape == (Wt.shape[0],)
    assert gW.dtype == gb.dtype == gxb.dtype == np.float32
    assert relative_error(gx, exact_gx) < FLOAT32_ERROR
    assert relative_error(gW, exact_gW) < FLOAT32_ERROR
    assert relative_error(gb, exact_gb) < FLOAT32_ERROR
    assert not gxb[:, -1, ..., Wt.shape[1] % 16 or 16:].any()  # the padded channels stay 0


@pytest.mark.parametrize("vector", PATHS)
def test_blocked_gradients_match_im2col_backward(vector):
    x, Wt, gy = random_gradient_case((3, 24, 9, 13, 20), seed=3)
    gx, gW, gb, _ = blocked_grads(x, Wt, gy, vector=vector)
    ref_gx, ref_gW, ref_gb = cpu.conv2d_backward(x, Wt, gy, (1, 1), (1, 1), "im2col")
    np.testing.assert_allclose(gx, ref_gx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gW, ref_gW, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gb, ref_gb, rtol=1e-4, atol=1e-4)


def test_weight_grad_fallback_is_chosen_when_avx512_is_disabled(monkeypatch):
    monkeypatch.setenv("MINIVGG_DISABLE_AVX512", "1")
    x, Wt, gy = random_gradient_case(SHAPES["c17_batch1"], seed=4)
    chosen = blocked_grads(x, Wt, gy)  # vector=None: chooses by avx512_reason()
    loops = blocked_grads(x, Wt, gy, vector=False)
    assert all(np.array_equal(a, b) for a, b in zip(chosen, loops))


@pytest.mark.parametrize("vector", PATHS)
def test_blocked_gradients_do_not_depend_on_thread_count(monkeypatch, vector):
    """Each gW tile is one thread's fixed-order sum: same bits at 1, 2 and 3 threads."""
    x, Wt, gy = random_gradient_case((3, 20, 5, 11, 36), seed=5)
    results = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("NUMBA_NUM_THREADS", threads)
        results.append(blocked_grads(x, Wt, gy, vector=vector))
    assert all(np.array_equal(a, b) for r in results[1:] for a, b in zip(results[0], r))


@pytest.mark.skipif(not HAS_AVX512, reason=blocked.avx512_reason() or "-")
def test_weight_micro_kernel_compiles_to_broadcast_fmas_on_zmm_registers():
    """Per pixel, two gy vector loads and 8 broadcasts feeding 16 `vfmadd231ps zmm` (a
    pair of output blocks; 8 more for a lone block, and 8 + 4 for the tiles of 4 input
    channels), and no accumulator spilled to the stack inside the sum (Zen 4 included,
    without `blocked_ir.tune_scheduling`). At least that many
    FMAs: LLVM may copy a loop body when it takes the loop-invariant choice of tile out of
    the loops."""
    x, Wt, gy = random_gradient_case((1, 16, 2, 8, 16))
    blocked_grads(x, Wt, gy, vector=True)
    # the cached machine code carries no assembly text: compile once more, uncached
    fresh = blocked.njit(nogil=True)(blocked_grad._weight_tiles_avx512.py_func)
    p = np.zeros((1, 16, 4, 10), np.float32)
    gw = np.empty((1, 1, 1, 3, 3, 16, 16), np.float32)  # (parts, OCB, CB, taps, 16, 16)
    fresh(p, blocked.to_blocked(gy), gw, 0, 9, 1, 1, 16, 1, np.empty((0, 0, 0, 0), np.float32))
    asm = next(iter(fresh.inspect_asm().values()))
    fmas = [line for line in asm.splitlines() if "vfmadd" in line]
    assert len(fmas) >= blocked.BLOCK + blocked.BLOCK // 2 + 8 + 4
    assert all("zmm" in f for f in fmas)
    assert spills_inside_sums(asm) == []


@pytest.mark.parametrize("vector", PATHS)
def test_weight_gradient_has_the_same_bits_in_chunks_of_one_image(monkeypatch, vector):
    """Summing a tile one image at a time (resuming from the stored tile) gives the bits of
    the default chunks: the order of every sum is (image, row, pixel) either way."""
    x, Wt, gy = random_gradient_case((5, 20, 6, 9, 24), seed=11)
    whole = blocked_grads(x, Wt, gy, vector=vector)[1]
    monkeypatch.setattr(blocked_grad, "GW_CHUNK_BYTES", 1)  # one row at a time
    assert np.array_equal(blocked_grads(x, Wt, gy, vector=vector)[1], whole)


@pytest.mark.skipif(not HAS_AVX512, reason=blocked.avx512_reason() or "-")
@pytest.mark.parametrize("shape", [(3, 16, 5, 7, 20), (2, 24, 4, 4, 16), (1, 8, 1, 9, 40),
                                   (4, 32, 9, 3, 33)], ids=["c16", "c24_4x4", "c8_row", "c32"])
def test_weight_gradient_from_x_itself_has_the_bits_of_the_bordered_copy(shape):
    """No tap of the weight tiles reads x's zero border, so reading x where it lies
    (`weight_grad_nchw`, C a multiple of 8) sums the same products in the same order."""
    x, Wt, gy = random_gradient_case(shape, seed=4)
    N, C, H, W, OC = shape
    gyb = blocked.to_blocked(gy)
    padded = blocked.pad_images(x, np.empty((N, -(-C // 16) * 16, H + 2, W + 2), np.float32))
    gW, gb = blocked_grad.weight_grad_from_padded(padded, gyb, C, OC)
    gW2, gb2 = blocked_grad.weight_grad_nchw(x, gyb, C, OC)
    assert np.array_equal(gW, gW2) and np.array_equal(gb, gb2)
    _, gW_exact, _ = naive_conv2d_grads(x, Wt, gy)
    assert relative_error(gW2, gW_exact) < FLOAT32_ERROR


@pytest.mark.skipif(not HAS_AVX512, reason=blocked.avx512_reason() or "-")
@pytest.mark.parametrize("shape", [(3, 20, 5, 7, 36), (5, 16, 4, 4, 17)], ids=["c20", "4x4"])
def test_backward_blocks_gy_on_the_way_with_the_bits_of_a_pass_of_its_own(shape):
    """The input gradient's pass writes gy in nChw16c and its plane sums for the weight
    gradient (`conv2d_nchw(blocked_out=...)`): gW and gb have the bits they have when gy is
    blocked by a pass of its own (`_to_blocked`), and gx those of the plain pass."""
    from minivgg.kernels.cpu import blocked_nchw
    x, Wt, gy = random_gradient_case(shape, seed=9)
    N, C, H, W, OC = shape
    gx, gW, gb = blocked_nchw.blocked_conv2d_backward(x, Wt, gy, True)
    sums = np.empty((N, -(-OC // 16) * 16))
    gyb = blocked_nchw._to_blocked(gy, np.float32, "test_gy", sums=sums)
    gW2, gb2 = blocked_grad.weight_grad_nchw(x, gyb, C, OC, plane_sums=sums)
    gx2 = blocked.conv2d_nchw(gy, blocked.block_filters(Wt, rotate=True),
                              blocked.block_bias(None, C), C)
    assert np.array_equal(gx, gx2) and np.array_equal(gW, gW2) and np.array_equal(gb, gb2)
