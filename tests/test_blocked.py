"""The register-blocked direct convolution on the nChw16c layout (kernels/cpu/blocked.py),
forward: 3×3, stride 1, padding 1, float32.

References: the naive float64 loop of tests/test_ops.py, and the CPU table's im2col path.
Shapes chosen against the blocking: channel counts that are not multiples of 16 (3, 17,
40), widths that are not multiples of the 8-pixel block, 1×1 maps, batch 1. Both the
AVX-512 micro-kernel (where this CPU has it) and the plain-loop fallback run here.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from minivgg.kernels import cpu
from minivgg.kernels.cpu import blocked
from test_ops import naive_conv2d

# (N, C, H, W, OC)
SHAPES = {
    "rgb_odd": (2, 3, 7, 5, 17),
    "rgb_one_block": (2, 3, 6, 9, 16),  # a lone output block summing 3 input channels
    "rgb_image_parts": (9, 3, 5, 6, 16),  # its weight gradient in 8 parts of the images
    "four_channels": (2, 4, 5, 7, 16),  # a lone block summing 4 input channels, not 3
    "c17_batch1": (1, 17, 6, 11, 40),
    "one_pixel": (1, 40, 1, 1, 3),
    "c40_wide": (2, 40, 3, 19, 33),
    "exact_blocks": (2, 32, 8, 16, 16),
    "whole_4x4_maps": (3, 33, 4, 4, 17),  # one block of 4 rows × 4 covers the whole map
    "four_wide_6_rows": (2, 20, 6, 4, 24),  # its second group of rows has 2 of 4
    "four_wide_3_rows": (1, 16, 3, 4, 16),
}
# max |float32 - float64| / RMS(float64), im2col's bound as in tests/test_direct.py
FLOAT32_ERROR = 5 * 2.5e-6

HAS_AVX512 = blocked.avx512_reason() == ""
PATHS = [pytest.param(True, id="avx512", marks=pytest.mark.skipif(
    not HAS_AVX512, reason=blocked.avx512_reason() or "-")),
    pytest.param(False, id="loops")]


def random_case(shape, seed=0):
    N, C, H, W, OC = shape
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, C, H, W)).astype(np.float32)
    Wt = (rng.normal(size=(OC, C, 3, 3)) / np.sqrt(9 * C)).astype(np.float32)
    b = rng.normal(size=OC).astype(np.float32)
    return x, Wt, b


def blocked_forward(x, Wt, b, relu=False, vector=None):
    OC = Wt.shape[0]
    yb = blocked.conv2d_forward_blocked(blocked.to_blocked(x), blocked.block_filters(Wt),
                                        blocked.block_bias(b, OC), relu=relu, vector=vector)
    return yb, blocked.from_blocked(yb, OC)


def relative_error(result, exact):
    return np.abs(result - exact).max() / np.sqrt((exact ** 2).mean())


def test_layout_round_trip_pads_channels_with_zeros():
    x = np.random.default_rng(1).normal(size=(2, 17, 3, 5)).astype(np.float32)
    xb = blocked.to_blocked(x)
    assert xb.shape == (2, 2, 3, 5, 16)
    assert np.array_equal(xb[:, 0, :, :, 4], x[:, 4])
    assert np.array_equal(xb[:, 1, :, :, 0], x[:, 16])
    assert not xb[:, 1, :, :, 1:].any()
    assert np.array_equal(blocked.from_blocked(xb, 17), x)


def test_block_filters_puts_output_channels_last():
    Wt = np.random.default_rng(2).normal(size=(20, 17, 3, 3)).astype(np.float32)
    wb = blocked.block_filters(Wt)
    assert wb.shape == (2, 2, 3, 3, 16, 16)
    assert wb[1, 1, 2, 0, 0, 3] == Wt[19, 16, 2, 0]
    assert wb[0, 0, 1, 2, 5, 7] == Wt[7, 5, 1, 2]
    assert not wb[1, :, :, :, :, 4:].any() and not wb[:, 1, :, :, 1:, :].any()


@pytest.mark.parametrize("vector", PATHS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_blocked_forward_matches_naive_loop(shape, vector):
    x, Wt, b = random_case(shape)
    yb, y = blocked_forward(x, Wt, b, vector=vector)
    exact = naive_conv2d(x, Wt, b, (1, 1), (1, 1))
    assert relative_error(y, exact) < FLOAT32_ERROR
    assert not yb[:, -1, ..., Wt.shape[0] % 16 or 16:].any()  # the padded channels stay 0


@pytest.mark.parametrize("vector", PATHS)
def test_blocked_forward_fuses_relu_and_matches_im2col(vector):
    x, Wt, b = random_case((3, 24, 9, 13, 20), seed=3)
    _, y = blocked_forward(x, Wt, b, relu=True, vector=vector)
    ref = np.maximum(cpu.conv2d_forward(x, Wt, b, (1, 1), (1, 1), "im2col"), 0)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    assert (y == 0).any() and (y > 0).any()


def test_fallback_is_chosen_when_avx512_is_disabled(monkeypatch):
    monkeypatch.setenv("MINIVGG_DISABLE_AVX512", "1")
    assert blocked.avx512_reason() == "MINIVGG_DISABLE_AVX512 is set"
    x, Wt, b = random_case(SHAPES["c17_batch1"], seed=4)
    _, y = blocked_forward(x, Wt, b)  # vector=None: chooses by avx512_reason()
    _, loops = blocked_forward(x, Wt, b, vector=False)
    assert np.array_equal(y, loops)


@pytest.mark.parametrize("vector", PATHS)
def test_blocked_forward_does_not_depend_on_thread_count(monkeypatch, vector):
    """Each output is one thread's fixed-order sum: same bits at 1, 2 and 3 threads."""
    x, Wt, b = random_case((3, 20, 5, 11, 36), seed=5)
    results = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("NUMBA_NUM_THREADS", threads)
        results.append(blocked_forward(x, Wt, b, vector=vector)[1])
    assert all(np.array_equal(results[0], r) for r in results[1:])


def spills_inside_sums(asm, gap=30):
    """Lines of `asm` that move a zmm register to or from the stack inside a run of FMAs (FMA
    lines at most `gap` lines apart): an accumulator spilled. Outside the sums, Numba's own
    stack structures may be zeroed with zmm stores (LLVM's Zen 4 model does that)."""
    lines = asm.splitlines()
    fmas = [i for i, line in enumerate(lines) if "vfmadd" in line]
    runs, start = [], fmas[0]
    for a, b in zip(fmas, fmas[1:] + [None]):
        if b is None or b - a > gap:
            runs.append((start, a))
            start = b
    return [lines[i] for i0, i1 in runs for i in range(i0, i1 + 1)
            if "zmm" in lines[i] and "rsp" in lines[i]]


@pytest.mark.skipif(not HAS_AVX512, reason=blocked.avx512_reason() or "-")
def test_micro_kernel_compiles_to_broadcast_fmas_on_zmm_registers():
    """The driver compiles six block shapes of 16 accumulators or fewer: 1 block of 16
    output channels × 2 rows of PIX pixels (summing 16 input channels, or 4, or 3), × 4
    rows of 4 pixels, or × 4 pixels of a row; and 2 blocks × 4 pixels of a row. The two
    that leave out x's zero border have a tap body per border case (3 × 3: the first, all
    or last pixels of a row, and rows): per input channel, summed over the cases,
    (8 + 7 + 7)·(2 + 1 + 1) = 88 FMAs for 2 rows of 8 and (4 + 3 + 3)² = 100 for 4 × 4.
    Each input value is broadcast once: folded into its one FMA as `mem{1to16}` (1 block),
    or a `vbroadcastss` feeding two FMAs (2 blocks). At least that many FMAs, all on zmm
    registers (LLVM may copy a body when it merges the cases' ends), and no accumulator
    spilled to the stack inside the sums (on Zen 4 that needs `blocked_ir.tune_scheduling`,
    and the taps' count hidden from LLVM: `blocked_ir._opaque`)."""
    x, Wt, b = random_case((1, 16, 2, 8, 16))
    blocked_forward(x, Wt, b, vector=True)
    # the cached machine code carries no assembly text: compile once more, uncached
    kernel = blocked._conv_rows_avx512.py_func
    fresh = blocked.njit(nogil=True)(kernel)
    p = np.zeros((16, 6, 10), np.float32)  # (C, rows, WQ+2): rows to spare for any shape
    y = np.empty((1, 16, 2, 8), np.float32)
    none = (np.empty((0, 0, 0, 16), np.float32), np.empty((0, 0)))
    fresh(x, blocked.block_filters(Wt), blocked.block_bias(b, 16), y, p, 0, 1, False, *none)
    asm = next(iter(fresh.inspect_asm().values()))
    fmas = [line for line in asm.splitlines() if "vfmadd" in line]
    pairs = 16 * 4  # input values per tap of the 2-block shape
    singles = 16 * (88 + 100 + 4) + (3 + 4) * 2 * blocked.PIX
    assert len(fmas) >= 2 * pairs + singles
    assert all("zmm" in f for f in fmas)
    assert sum("{1to16}" in f for f in fmas) == len(fmas) - 2 * pairs
    assert sum("vbroadcastss" in line for line in asm.splitlines()) == pairs
    assert spills_inside_sums(asm) == []


@pytest.mark.parametrize("shape", [(3, 20, 7, 11, 36), (9, 3, 6, 5, 16), (7, 16, 5, 9, 20)],
                         ids=["2 tiles", "rgb, image parts", "16 ch, 4 image parts"])
def test_blocked_conv2d_entry_points_give_the_same_bits_at_1_2_and_3_threads(monkeypatch,
                                                                             shape):
    """y, gx, gW and gb of the algorithm "blocked", NCHW in and out, through the CPU table:
    every output and every gW tile is one thread's fixed-order sum; layers of few channels
    cut the images into parts (`blocked_grad.image_parts`, shapes only) added in order, and
    so does the RGB layer's own weight gradient (`blocked_grad_rgb.parts`) on AVX-512."""
    from minivgg.kernels.cpu import blocked_grad, blocked_grad_rgb
    x, Wt, b = random_case(shape, seed=6)
    N, C, H, W, OC = shape
    parts = blocked_grad.image_parts(N, -(-OC // 16), -(-C // 16), C)
    assert parts == {(3, 20): 1, (9, 3): 8, (7, 16): 4}[N, C]
    assert blocked_grad_rgb.parts(N, OC, C) == 4 or C > blocked_grad_rgb.MAX_CHANNELS
    gy = np.random.default_rng(7).normal(size=(N, OC, H, W)).astype(np.float32)
    results = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("NUMBA_NUM_THREADS", threads)
        y = cpu.conv2d_forward(x, Wt, b, (1, 1), (1, 1), "blocked")
        results.append([y, *cpu.conv2d_backward(x, Wt, gy, (1, 1), (1, 1), True, "blocked")])
    for one, two, three in zip(*results):
        assert one.dtype == np.float32 and np.array_equal(one, two)
        assert np.array_equal(one, three)


FALLBACK_SCRIPT = """
import numpy as np
from minivgg.kernels import cpu
from minivgg.kernels.cpu import blocked
assert blocked.avx512_reason() == "MINIVGG_DISABLE_AVX512 is set"
rng = np.random.default_rng(8)
x = rng.normal(size=(2, 19, 6, 9)).astype(np.float32)
W = (rng.normal(size=(24, 19, 3, 3)) / 13).astype(np.float32)
b, gy = rng.normal(size=24).astype(np.float32), rng.normal(size=(2, 24, 6, 9)).astype(np.float32)
ours = [cpu.conv2d_forward(x, W, b, (1, 1), (1, 1), "blocked"),
        *cpu.conv2d_backward(x, W, gy, (1, 1), (1, 1), True, "blocked")]
ref = [cpu.conv2d_forward(x, W, b, (1, 1), (1, 1), "im2col"),
       *cpu.conv2d_backward(x, W, gy, (1, 1), (1, 1), True, "im2col")]
for a, r in zip(ours, ref):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)
from minivgg import backend
backend.set_conv_algorithm("auto")
assert backend.conv_algorithm_for(x, W, (1, 1), (1, 1)) != "blocked"
print("ok")
"""


def test_blocked_algorithm_runs_the_loops_when_avx512_is_disabled_in_a_fresh_process():
    """MINIVGG_DISABLE_AVX512=1, set before anything is imported: the algorithm "blocked"
    still gives im2col's results (forward and all three gradients), by the plain loops, and
    "auto" does not pick it for a thin layer it would otherwise run."""
    env = dict(os.environ, MINIVGG_DISABLE_AVX512="1", PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_pass_layout_kernels_match_numpy(dtype):
    """`blocked_nchw._to_blocked` (one pass, spread over the pool; 16×16 blocks and the
    pixels left over) against `to_blocked` (channels past C are zeros), and `pad_images`, the
    zero-bordered NCHW copy the kernels read x from (planes past C and columns past the
    border are zeros too), against np.pad, into a buffer full of garbage."""
    from minivgg.kernels.cpu import blocked_nchw
    x = np.random.default_rng(9).normal(size=(3, 19, 5, 7)).astype(dtype)
    xb = blocked_nchw._to_blocked(x, dtype, "test_x")
    assert xb.dtype == dtype and np.array_equal(xb, blocked.to_blocked(x))
    if dtype == np.float32 and HAS_AVX512:  # 16×16 blocks turned in registers, and not
        for turn in (True, False):
            assert np.array_equal(blocked_nchw._to_blocked(x, dtype, "test_x", turn), xb)
    out = np.full((3, 32, 7, 11), np.nan, dtype)
    padded = np.pad(x, ((0, 0), (0, 13), (1, 1), (1, 3)))
    assert np.array_equal(blocked.pad_images(x, out), padded)
