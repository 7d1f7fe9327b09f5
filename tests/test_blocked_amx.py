"""The AMX direct convolution (kernels/cpu/blocked_amx.py, blocked_amx_grad.py): the conv
algorithm "blocked" under bf16.

Its reference is the definition: the float64 convolution (minivgg's im2col in float64) of
the bf16-rounded operands. The kernel rounds only the operands and sums in fp32, so it is
held to the tolerance "bf16_operands" of tests/conftest.py (fp32 sums, on results divided by
their RMS), as tests/test_bf16.py holds im2col. Tests of the tiles skip where
`amx_available()` says no; the fallback test runs everywhere.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from minivgg import backend
from minivgg.kernels.cpu import blocked_amx, blocked_amx_grad
from minivgg.kernels.cpu.amx_isa import amx_available
from minivgg.kernels.cpu.bf16 import round_to_bf16
from minivgg.kernels.cpu.conv import PRIMITIVES
from conftest import REPO
from test_bf16 import assert_close_bf16

AMX, WHY_NOT = amx_available()
requires_amx = pytest.mark.skipif(not AMX, reason=f"no AMX here: {WHY_NOT}")

# (N, C, H, W, OC): channel counts off the 16/32 tiles, maps of 1×1 to 7×9, batch 1 and 3,
# one VGG-like layer with whole tiles, and RGB-like layers of 1 to 4 channels
SHAPES = [(1, 3, 1, 1, 5), (3, 5, 2, 3, 17), (1, 17, 7, 9, 40), (3, 40, 7, 9, 3),
          (1, 40, 2, 3, 33), (3, 17, 1, 1, 5), (2, 64, 8, 8, 64), (2, 3, 7, 9, 17),
          (1, 2, 5, 6, 16), (3, 1, 9, 7, 33), (1, 4, 6, 5, 20)]


def arrays(rng, N, C, H, W, OC):
    x = np.maximum(rng.normal(size=(N, C, H, W)), 0).astype(np.float32)
    Wt = (rng.normal(size=(OC, C, 3, 3)) * np.sqrt(2 / (9 * C))).astype(np.float32)
    b = rng.normal(size=OC).astype(np.float32)
    gy = rng.normal(size=(N, OC, H, W)).astype(np.float32)
    return x, Wt, b, gy


def exact(x, Wt, b, gy):
    """(y, gx, gW) in float64 from the bf16-rounded x, W and gy (minivgg's im2col path)."""
    x64, W64, gy64 = (round_to_bf16(a).astype(np.float64) for a in (x, Wt, gy))
    y = PRIMITIVES.conv2d_forward(x64, W64, b.astype(np.float64), (1, 1), (1, 1))
    gx, gW, _ = PRIMITIVES.conv2d_backward(x64, W64, gy64, (1, 1), (1, 1))
    return y, gx, gW


def ours(x, Wt, b, gy):
    return (blocked_amx.conv2d_forward_amx(x, Wt, b), blocked_amx.conv2d_input_grad_amx(gy, Wt),
            blocked_amx_grad.conv2d_weight_grad_amx(x, gy))


@requires_amx
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_both_gradients_are_the_fp32_sums_of_the_rounded_operands(shape, rng):
    data = arrays(rng, *shape)
    for name, a, e in zip(("y", "gx", "gW"), ours(*data), exact(*data)):
        assert a.dtype == np.float32 and a.shape == e.shape, name
        assert_close_bf16(a, e, "bf16_operands", f"{shape} {name}")


@requires_amx
@pytest.mark.parametrize("shape", [(3, 17, 7, 9, 40), (2, 64, 8, 8, 64), (3, 3, 9, 7, 20)])
def test_results_are_the_same_bits_at_one_and_two_threads(shape, rng, monkeypatch):
    data = arrays(rng, *shape)
    monkeypatch.setenv("NUMBA_NUM_THREADS", "1")
    one = ours(*data)
    monkeypatch.setenv("NUMBA_NUM_THREADS", "2")
    two = ours(*data)
    for a, b in zip(one, two):
        assert np.array_equal(a, b)


@requires_amx
def test_a_batch_cut_in_chunks_of_one_image_gives_the_same_sums(rng, monkeypatch):
    """IMAGE_CHUNK_BYTES below one image: every call runs image by image (gW going on from
    the sums so far), still the fp32 sums of the rounded operands, the same y and gx bits
    (each output is one image's), and the same bits at 1 and 2 threads."""
    data = arrays(rng, 3, 17, 7, 9, 40)
    whole = ours(*data)
    monkeypatch.setattr(blocked_amx, "IMAGE_CHUNK_BYTES", 1)
    assert blocked_amx.image_chunks(3, 100) == [(0, 1), (1, 2), (2, 3)]
    chunked = ours(*data)
    assert np.array_equal(chunked[0], whole[0]) and np.array_equal(chunked[1], whole[1])
    for name, a, e in zip(("y", "gx", "gW"), chunked, exact(*data)):
        assert_close_bf16(a, e, "bf16_operands", name)
    monkeypatch.setenv("NUMBA_NUM_THREADS", "1")
    assert all(np.array_equal(a, b) for a, b in zip(ours(*data), chunked))


@requires_amx
def test_the_blocked_algorithm_under_bf16_runs_the_tile_kernels(rng, monkeypatch):
    """Through the kernel table: the AMX results, and gb the fp32 sum of gy."""
    x, Wt, b, gy = arrays(rng, 2, 5, 6, 7, 9)
    backend.set_precision("bf16")
    y = PRIMITIVES.conv2d_forward(x, Wt, b, (1, 1), (1, 1), algorithm="blocked")
    gx, gW, gb = PRIMITIVES.conv2d_backward(x, Wt, gy, (1, 1), (1, 1), algorithm="blocked")
    for a, e in zip((y, gx, gW), ours(x, Wt, b, gy)):
        assert np.array_equal(a, e)
    assert np.array_equal(gb, gy.sum(axis=(0, 2, 3)))


@requires_amx
@pytest.mark.parametrize("module, name", [(blocked_amx, "_conv_blocks"),
                                          (blocked_amx_grad, "_grad_units")])
def test_the_compiled_kernels_multiply_with_tdpbf16ps(module, name, rng, monkeypatch):
    import numba
    # NOTE: Numba shows no assembly for code loaded from its cache: compile a fresh copy
    fresh = numba.njit(nogil=True)(getattr(module, name).py_func)
    monkeypatch.setattr(module, name, fresh)
    x, Wt, b, gy = arrays(rng, 1, 17, 5, 6, 20)
    for a, e in zip(ours(x, Wt, b, gy), exact(x, Wt, b, gy)):
        assert_close_bf16(a, e, "bf16_operands", name)
    asm = fresh.inspect_asm(fresh.signatures[0])
    for instruction in ("ldtilecfg", "tileloadd", "tdpbf16ps", "tilestored", "tilerelease"):
        assert instruction in asm


def test_bad_shapes_are_value_errors(rng):
    x, Wt, b, gy = arrays(rng, 1, 4, 3, 3, 2)
    with pytest.raises(ValueError, match="channels"):
        blocked_amx.conv2d_forward_amx(x, Wt[:, :3], b)
    with pytest.raises(ValueError, match="3, 3"):
        blocked_amx.conv2d_forward_amx(x, Wt[..., :2], b)
    with pytest.raises(ValueError, match="channels"):
        blocked_amx.conv2d_input_grad_amx(gy[:, :1], Wt)
    with pytest.raises(ValueError, match="gy"):
        blocked_amx_grad.conv2d_weight_grad_amx(x, gy[:, :, :2])


FALLBACK_SCRIPT = textwrap.dedent("""
    import numpy as np
    from minivgg import backend
    from minivgg.kernels.cpu import blocked_amx, blocked_nchw
    from minivgg.kernels.cpu.bf16 import round_to_bf16
    from minivgg.kernels.cpu.conv import PRIMITIVES
    def refuse(*args):
        raise AssertionError("the AMX kernel ran")
    blocked_amx.conv2d_forward_amx = refuse
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 6, 7)).astype(np.float32)
    W = rng.normal(size=(9, 5, 3, 3)).astype(np.float32)
    b = rng.normal(size=9).astype(np.float32)
    backend.set_precision("bf16")
    y = PRIMITIVES.conv2d_forward(x, W, b, (1, 1), (1, 1), algorithm="blocked")
    rounded = blocked_nchw.blocked_conv2d_forward(round_to_bf16(x), round_to_bf16(W), b)
    print(bool(np.array_equal(y, rounded)))
""")


def test_without_amx_blocked_runs_the_fp32_kernel_on_rounded_operands():
    env = {**os.environ, "PYTHONPATH": REPO, "MINIVGG_DISABLE_AMX": "1"}
    out = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("shape", [(8, 3, 224, 224), (8, 64, 224, 224), (2, 512, 14, 14),
                                   (32, 16, 32, 32), (1, 128, 1, 1)])
def test_auto_under_bf16_picks_blocked_for_every_3x3_layer_where_amx_runs(shape):
    """The rule of `backend._amx_is_fast`: with AMX, "blocked" whatever the shape (it was
    the fastest on every layer measured); without it, not the AMX kernel's rule."""
    x, W = np.empty(shape, np.float32), np.empty((8, shape[1], 3, 3), np.float32)
    backend.set_conv_algorithm("auto")
    backend.set_precision("bf16")
    picked = backend.conv_algorithm_for(x, W, (1, 1), (1, 1))
    assert (picked == "blocked") if AMX else (picked != "blocked" or shape[1] >= 8)
    assert backend.conv_algorithm_for(x, W, (2, 2), (1, 1)) == "im2col"
    assert backend.conv_algorithm_for(np.zeros(shape), W, (1, 1), (1, 1)) != "blocked"
