"""The fc layers' streamed bf16 GEMM (kernels/cpu/amx_stream.py): bit for bit `gemm_bf16`, at
any block size and thread count, and an fp32 sum of bf16 products (float64 reference on the
rounded operands)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from minivgg import backend
from minivgg.kernels.cpu import amx, amx_isa, amx_stream, bf16, matmul

AMX, WHY_NOT = amx_isa.amx_available()
requires_amx = pytest.mark.skipif(not AMX, reason=f"no AMX here: {WHY_NOT}")

# (M, K, N): odd edges in every dimension, K past one block, one column, the batch sizes
SHAPES = [(1, 1, 1), (3, 100, 77), (8, 300, 1100), (17, 64, 1), (32, 257, 530), (33, 1000, 47),
          (64, 40, 2049)]


def operands(M, K, N, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((M, K)).astype(np.float32),
            rng.standard_normal((K, N)).astype(np.float32))


def same_bits(x, y):
    return x.dtype == y.dtype and np.array_equal(x.view(np.uint32), y.view(np.uint32))


@requires_amx
@pytest.mark.parametrize("transposed", [False, True], ids=["gy_W", "x_WT"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_stream_is_gemm_bf16_bit_for_bit_and_an_fp32_sum(shape, transposed):
    """Against the float64 product of the rounded operands: within K + 1 fp32 roundings
    of the sum of |products|; B's rows contiguous (gy W) or its columns (x W.T)."""
    A, B = operands(*shape)
    C = amx_stream.gemm_stream(A, B.T.copy().T if transposed else B)
    assert same_bits(C, amx.gemm_bf16(A, B))
    exact = bf16.reference_gemm_bf16(A, B)
    magnitude = bf16.reference_gemm_bf16(np.abs(A), np.abs(B))
    assert np.all(np.abs(C - exact) <= (shape[1] + 1) * 2.0**-24 * magnitude + 1e-30)


@requires_amx
@pytest.mark.parametrize("blocks", [(1, 1), (2, 3), (5, 2), (64, 8)])
def test_block_sizes_do_not_change_the_bits(blocks):
    A, B = operands(9, 700, 300, seed=1)
    C = amx.gemm_bf16(A, B)
    assert same_bits(amx_stream.gemm_stream(A, B, *blocks), C)
    # B = S.T with S's rows contiguous (the forward's W.T): blocks of S's rows by K tiles
    S = B.T.copy()
    assert same_bits(amx_stream.gemm_stream(A, S.T, row_tiles=blocks[1],
                                            row_k_tiles=blocks[0]), C)


@requires_amx
def test_views_and_the_transposed_operand_give_the_same_bits():
    A, B = operands(8, 333, 200, seed=2)
    C = amx.gemm_bf16(A, B)
    assert same_bits(amx_stream.gemm_stream(A.T.copy().T, B), C)
    assert same_bits(amx_stream.gemm_stream(A, B.T.copy().T), C)  # B's columns contiguous
    assert same_bits(amx_stream.gemm_stream(A, B, parallel=False), C)


@requires_amx
@pytest.mark.parametrize("transposed", [False, True], ids=["gy_W", "x_WT"])
def test_same_bits_at_one_and_two_threads(transposed, monkeypatch):
    A, B = operands(8, 512, 3000, seed=3)  # several strips: the threads share them
    if transposed:
        B = B.T.copy().T
    results = []
    for threads in ("1", "2", "3", "1"):
        monkeypatch.setenv("NUMBA_NUM_THREADS", threads)
        results.append(amx_stream.gemm_stream(A, B))
    assert all(same_bits(C, results[0]) for C in results[1:])
    assert same_bits(results[0], amx.gemm_bf16(A, B))


@requires_amx
def test_same_bits_in_fresh_processes_with_one_and_two_threads():
    script = ("import hashlib, numpy as np; from minivgg.kernels.cpu import amx_stream; "
              "rng = np.random.default_rng(7); "
              "A = rng.standard_normal((32, 1000)).astype(np.float32); "
              "B = rng.standard_normal((1000, 2500)).astype(np.float32); "
              "print(hashlib.sha1(amx_stream.gemm_stream(A, B)).hexdigest(), "
              "hashlib.sha1(amx_stream.gemm_stream(A, B.T.copy().T)).hexdigest())")
    digests = set()
    for threads in ("1", "2"):
        env = dict(os.environ, NUMBA_NUM_THREADS=threads)
        env.pop("OMP_NUM_THREADS", None)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                             text=True, check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1


@requires_amx
def test_fc_matmul_streams_the_forward_and_input_gradient(monkeypatch):
    """x W.T and gy W (few rows) go through gemm_stream; the weight gradient gy.T x keeps
    gemm_bf16; all give gemm_bf16's bits."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 300)).astype(np.float32)
    W = rng.standard_normal((200, 300)).astype(np.float32)
    gy = rng.standard_normal((8, 200)).astype(np.float32)
    calls = []
    stream = amx_stream.gemm_stream
    monkeypatch.setattr(amx_stream, "gemm_stream", lambda a, b: calls.append(b.shape) or
                        stream(a, b))
    backend.set_precision("bf16")
    try:
        assert same_bits(matmul.fc_matmul(gy, W), amx.gemm_bf16(gy, W))
        assert same_bits(matmul.fc_matmul(x, W.T), amx.gemm_bf16(x, W.T))
        assert same_bits(matmul.fc_matmul(gy.T, x), amx.gemm_bf16(gy.T, x))
    finally:
        backend.set_precision("fp32")
    assert calls == [(200, 300), (300, 200)]


@requires_amx
def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="A is 4x5 but B is 6x6"):
        amx_stream.gemm_stream(np.ones((4, 5), np.float32), np.ones((6, 6), np.float32))


def test_without_amx_fc_matmul_keeps_the_fallback(monkeypatch):
    """No AMX: the rounded operands go through NumPy's fp32 matmul, never gemm_stream."""
    monkeypatch.setenv("MINIVGG_DISABLE_AMX", "1")
    monkeypatch.setattr(amx_isa, "_warned", [True])  # the fallback's one warning: not here
    monkeypatch.setattr(amx_stream, "gemm_stream", None)  # would fail if called
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 70)).astype(np.float32)
    W = rng.standard_normal((50, 70)).astype(np.float32)
    gy = rng.standard_normal((8, 50)).astype(np.float32)
    backend.set_precision("bf16")
    try:
        y, gx = matmul.fc_matmul(x, W.T), matmul.fc_matmul(gy, W)
    finally:
        backend.set_precision("fp32")
    assert np.array_equal(y, bf16.round_to_bf16(x) @ bf16.round_to_bf16(W.T))
    assert np.array_equal(gx, bf16.round_to_bf16(gy) @ bf16.round_to_bf16(W))
