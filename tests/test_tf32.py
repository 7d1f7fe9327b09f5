"""TF32 emulated on the CPU (benchmarks/winograd_accuracy.py --tf32): why minivgg never runs
Winograd's GEMMs in TF32 on the GPU (benchmarks/winograd_accuracy.md, "Under TF32").

The emulation itself is checked first (rounding on the bits, and the emulated convolutions
equal to the real ones when no rounding is applied), then the finding on a small layer:
TF32 operands cost im2col about 1e-3 of accuracy, F(4×4,3×3) ten times more.
"""

import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import winograd_accuracy as acc  # noqa: E402

from minivgg.kernels import cpu  # noqa: E402


def test_round_tf32_keeps_10_mantissa_bits_rounding_to_nearest_even():
    ulp = 2.0 ** -10  # TF32's spacing just above 1
    x = np.array([1.0, 1 + ulp / 2, 1 + 1.5 * ulp, 1 + ulp + ulp / 4, 1 + ulp / 2 + 2**-20,
                  -3.0 - 0.49 * 2 * ulp, 2.0 ** -100], np.float32)
    expected = np.array([1.0, 1.0, 1 + 2 * ulp, 1 + ulp, 1 + ulp, -3.0, 2.0 ** -100],
                        np.float32)
    np.testing.assert_array_equal(acc.round_tf32(x), expected)
    y = acc.round_tf32(np.random.default_rng(0).normal(size=1000).astype(np.float32))
    assert (y.view(np.uint32) & 0x1FFF == 0).all()  # the 13 dropped bits are zero


@pytest.mark.parametrize("m", [None, 2, 4])
def test_emulated_convolutions_equal_the_kernels_without_rounding(m, monkeypatch, rng):
    x = rng.normal(size=(2, 5, 9, 7)).astype(np.float32)
    W = rng.normal(size=(4, 5, 3, 3)).astype(np.float32)
    b = rng.normal(size=4).astype(np.float32)
    monkeypatch.setattr(acc, "round_tf32", lambda a: np.asarray(a, np.float32))
    y = acc.im2col_forward_tf32(x, W, b) if m is None else acc.winograd_forward_tf32(x, W, b, m)
    exact = cpu.conv2d_forward(x.astype(np.float64), W.astype(np.float64),
                               b.astype(np.float64), (1, 1), (1, 1))
    assert np.abs(y - exact).max() / np.sqrt((exact ** 2).mean()) < 1e-4


def test_tf32_costs_winograd4_ten_times_the_accuracy_it_costs_im2col():
    errors = acc.measure_tf32("conv2_1", 64, 32, 12, 1, np.random.default_rng(0))
    assert 3e-4 < errors["im2col"] < 5e-3, errors
    assert errors["F(2x2,3x3)"] < 1e-2, errors
    assert errors["F(4x4,3x3)"] > 10 * errors["im2col"], errors
