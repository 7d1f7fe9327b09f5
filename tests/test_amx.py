"""The bf16 GEMM of kernels/cpu/amx.py: rounding, packing, the AMX kernel and its fallback.

The reference is the definition: float64 product of the bf16-rounded operands. The kernel
rounds only the operands and sums in fp32, so it is held to fp32 summation error: 1e-6 of
the result's norm, and elementwise the textbook bound (K + 1) u (|A| @ |B|), u = 2^-24.
Tests of the AMX kernel itself skip where `amx_available()` says no (a CPU without AMX,
Linux refusing the tile state, MINIVGG_DISABLE_AMX=1); the fallback runs everywhere.
"""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from minivgg.kernels.cpu import amx, amx_isa, bf16

AMX, WHY_NOT = amx_isa.amx_available()
requires_amx = pytest.mark.skipif(not AMX, reason=f"no AMX here: {WHY_NOT}")

# (M, K, N): tiny, odd (edges in every dimension), conv1_1's K = 27, VGG-like large ones
SHAPES = [(1, 1, 1), (17, 33, 31), (100, 27, 3), (3, 27, 100), (64, 27, 1000),
          (16, 32, 16), (33, 65, 47), (128, 1152, 196), (784, 1152, 256), (40, 5000, 24)]
PATHS = [pytest.param(True, marks=requires_amx, id="amx"), pytest.param(False, id="fallback")]


def random_operands(M, K, N, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((M, K)).astype(np.float32),
            rng.standard_normal((K, N)).astype(np.float32))


def reference(A, B):
    """`bf16.reference_gemm_bf16` (float64 product of the bf16-rounded operands), and
    |A| @ |B| of those operands for the error bound."""
    return (bf16.reference_gemm_bf16(A, B),
            bf16.reference_gemm_bf16(np.abs(A), np.abs(B)))


def assert_fp32_sum_of(C, A, B):
    exact, magnitude = reference(A, B)
    K = A.shape[1]
    assert C.dtype == np.float32 and C.shape == exact.shape
    assert np.linalg.norm(C - exact) <= 1e-6 * np.linalg.norm(exact) + 1e-30
    assert np.all(np.abs(C - exact) <= (K + 1) * 2.0**-24 * magnitude + 1e-30)


# ----------------------------------------------------------------------------------------
# bf16 rounding
# ----------------------------------------------------------------------------------------

# float32 bits -> bf16 bits, rounded to nearest, ties to even
CRAFTED = {
    0x3F800000: 0x3F80,  # 1.0, exact
    0x3F808000: 0x3F80,  # tie between 0x3F80 and 0x3F81: to the even one
    0x3F818000: 0x3F82,  # tie between 0x3F81 and 0x3F82: to the even one
    0x3F808001: 0x3F81,  # just above the tie
    0x3F807FFF: 0x3F80,  # just below it
    0xBF818000: 0xBF82,  # negative tie
    0x80000000: 0x8000,  # -0.0
    0x7F800000: 0x7F80,  # inf
    0xFF800000: 0xFF80,  # -inf
    0x7F7FFFFF: 0x7F80,  # float32's largest rounds up to inf
    0x7F7F7FFF: 0x7F7F,  # ... one that does not
    0x00000001: 0x0000,  # smallest subnormal rounds to +0
    0x00008000: 0x0000,  # subnormal tie, to even (0)
    0x00018000: 0x0002,  # subnormal tie, to even (2)
    0x00017FFF: 0x0001,
    0x007FFFFF: 0x0080,  # largest subnormal rounds up to the smallest normal
}


def test_to_bf16_rounds_crafted_bit_patterns_to_nearest_even():
    bits = np.array(list(CRAFTED), np.uint32)
    assert bf16.to_bf16(bits.view(np.float32)).tolist() == list(CRAFTED.values())


@pytest.mark.parametrize("nan_bits", [0x7F800001, 0x7FC00000, 0xFFFFFFFF, 0x7FFFFFFF,
                                      0xFF800001])
def test_to_bf16_keeps_every_nan_a_nan(nan_bits):
    # 0x7F800001 would round to inf (0x7F80) if NaNs were rounded like numbers
    out = bf16.to_bf16(np.array([nan_bits], np.uint32).view(np.float32))
    assert np.isnan(bf16.from_bf16(out))[0]
    assert out[0] >> 15 == nan_bits >> 31  # sign kept


def test_to_bf16_matches_pytorch_on_random_bit_patterns():
    torch = pytest.importorskip("torch")
    bits = np.random.default_rng(0).integers(0, 2**32, 200_000, dtype=np.uint64)
    x = bits.astype(np.uint32).view(np.float32)
    ours = bf16.from_bf16(bf16.to_bf16(x))
    theirs = torch.from_numpy(x).bfloat16().float().numpy()
    numbers = ~np.isnan(x)
    assert np.array_equal(ours[numbers].view(np.uint32), theirs[numbers].view(np.uint32))
    assert np.isnan(ours[~numbers]).all()


def test_round_to_bf16_is_to_bf16_then_from_bf16_bit_for_bit():
    bits = np.random.default_rng(3).integers(0, 2**32, 300_004, dtype=np.uint64)
    x = np.concatenate([bits.astype(np.uint32), np.array(list(CRAFTED), np.uint32)])
    x = x.view(np.float32).reshape(-1, 7)  # 300,020 values: any shape, on the pool
    expected = bf16.from_bf16(bf16.to_bf16(x))
    assert np.array_equal(bf16.round_to_bf16(x).view(np.uint32), expected.view(np.uint32))


def test_from_bf16_inverts_to_bf16_on_bf16_values():
    u = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    x = bf16.from_bf16(u)
    numbers = ~np.isnan(x)
    assert np.array_equal(bf16.to_bf16(x)[numbers], u[numbers])


def test_packing_kernels_round_like_to_bf16():
    # the packing kernels' scalar rounding (`_bf16_bits`) against the array one
    x = np.array(list(CRAFTED) + [0x7F800001, 0xFF800001], np.uint32).view(np.float32)
    A = x.reshape(1, -1)
    assert np.array_equal(amx.pack_a(A).tiles[0].transpose(1, 0, 2).reshape(16, -1)[0, :x.size],
                          bf16.to_bf16(x))


# ----------------------------------------------------------------------------------------
# Packing: against loops written from the layout's definition (`Packed`)
# ----------------------------------------------------------------------------------------

def pack_a_loops(A):
    M, K = A.shape
    bits = bf16.to_bf16(A)
    tiles = np.zeros((-(-M // 16), -(-K // 32), 16, 32), np.uint16)
    for r in range(M):
        for c in range(K):
            tiles[r // 16, c // 32, r % 16, c % 32] = bits[r, c]
    return tiles


def pack_b_loops(B):
    K, N = B.shape
    bits = bf16.to_bf16(B)
    tiles = np.zeros((-(-N // 16), -(-K // 32), 16, 16, 2), np.uint16)
    for r in range(K):
        for c in range(N):
            # K rows 2p and 2p + 1 of a 32-row block side by side: the VNNI pair layout
            tiles[c // 16, r // 32, (r % 32) // 2, c % 16, r % 2] = bits[r, c]
    return tiles


@pytest.mark.parametrize("shape", [(1, 1), (16, 32), (17, 33), (40, 70), (3, 100)])
def test_pack_a_and_pack_b_match_loops_over_the_layout(shape):
    X = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    assert np.array_equal(amx.pack_a(X).tiles, pack_a_loops(X))
    assert np.array_equal(amx.pack_b(X).tiles, pack_b_loops(X))
    assert np.array_equal(amx.pack_a(X).unpack(), bf16.round_to_bf16(X))
    assert np.array_equal(amx.pack_b(X).unpack(), bf16.round_to_bf16(X))


def test_packed_tiles_start_on_a_cache_line():
    # a tile row that straddles two cache lines costs a second line on every load
    for shape in [(1, 1), (300, 700), (2000, 1152)]:
        X = np.ones(shape, np.float32)
        assert amx.pack_a(X).tiles.ctypes.data % 64 == 0
        assert amx.pack_b(X).tiles.ctypes.data % 64 == 0


@pytest.mark.parametrize("shape", [(45, 70), (16, 32), (2, 1), (130, 97)])
def test_pack_of_a_transposed_view_equals_pack_of_the_copy(shape):
    # pack_b of a transposed view takes its own kernel (`_pack_b_rows`); so does a
    # transposed column slice (a band of an image's gradient in the conv weight gradient)
    X = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    assert np.array_equal(amx.pack_a(X, trans=True).tiles, amx.pack_a(X.T.copy()).tiles)
    assert np.array_equal(amx.pack_b(X, trans=True).tiles, amx.pack_b(X.T.copy()).tiles)
    band = np.random.default_rng(3).standard_normal((shape[0], 2 * shape[1] + 5),
                                                    dtype=np.float32)[:, 3:3 + shape[1]]
    assert np.array_equal(amx.pack_b(band.T).tiles, amx.pack_b(band.T.copy()).tiles)


# ----------------------------------------------------------------------------------------
# The GEMM, on AMX and on the fallback
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_amx", PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_bf16_is_fp32_sum_of_bf16_products(shape, use_amx):
    A, B = random_operands(*shape)
    assert_fp32_sum_of(amx.gemm_bf16(A, B, amx=use_amx), A, B)


@pytest.mark.parametrize("use_amx", PATHS)
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_gemm_bf16_transposes_give_the_same_bits(trans_a, trans_b, use_amx):
    A, B = random_operands(37, 70, 50, seed=3)
    a = A.T.copy() if trans_a else A
    b = B.T.copy() if trans_b else B
    C = amx.gemm_bf16(a, b, trans_a=trans_a, trans_b=trans_b, amx=use_amx)
    assert np.array_equal(C, amx.gemm_bf16(A, B, amx=use_amx))


@pytest.mark.parametrize("use_amx", PATHS)
def test_gemm_bf16_takes_packed_operands_and_float64(use_amx):
    A, B = random_operands(50, 90, 33, seed=4)
    C = amx.gemm_bf16(A, B, amx=use_amx)
    assert np.array_equal(amx.gemm_bf16(amx.pack_a(A), amx.pack_b(B), amx=use_amx), C)
    assert np.array_equal(amx.gemm_bf16(A, amx.pack_b(B), amx=use_amx), C)
    assert np.array_equal(amx.gemm_bf16(A.astype(np.float64), B, amx=use_amx), C)


@pytest.mark.parametrize("use_amx", PATHS)
@pytest.mark.parametrize("shape", [(32, 64, 48), (17, 33, 31)])
def test_gemm_bf16_writes_into_out(shape, use_amx):
    A, B = random_operands(*shape, seed=5)
    C = amx.gemm_bf16(A, B, amx=use_amx)
    out = np.full(C.shape, np.nan, np.float32)
    assert amx.gemm_bf16(A, B, out=out, amx=use_amx) is out
    assert np.array_equal(out, C)
    strided = np.full((C.shape[1], C.shape[0]), np.nan, np.float32).T  # not C-contiguous
    amx.gemm_bf16(A, B, out=strided, amx=use_amx)
    assert np.array_equal(strided, C)


def test_gemm_bf16_rejects_mismatched_shapes_and_swapped_packs():
    A, B = random_operands(4, 5, 6)
    with pytest.raises(ValueError, match="A is 4x5 but B is 6x6"):
        amx.gemm_bf16(A, np.ones((6, 6), np.float32))
    with pytest.raises(ValueError, match="pack_a"):
        amx.gemm_bf16(amx.pack_b(B), B)
    with pytest.raises(ValueError, match="out"):
        amx.gemm_bf16(A, B, out=np.empty((6, 4), np.float32))


# ----------------------------------------------------------------------------------------
# Same bits at any thread count
# ----------------------------------------------------------------------------------------

# big enough (above INLINE_FLOPS) to go through the pool; split along N, then along M
THREAD_SHAPES = [(96, 1152, 1300), (1300, 1152, 96)]


@requires_amx
@pytest.mark.parametrize("shape", THREAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_bf16_same_bits_at_any_thread_count(shape, monkeypatch):
    assert 2 * np.prod(shape) > amx.INLINE_FLOPS
    A, B = random_operands(*shape, seed=6)
    results = []
    for threads in (1, 2, 3, 7, 2):
        monkeypatch.setenv("NUMBA_NUM_THREADS", str(threads))
        results.append(amx.gemm_bf16(A, B))
    for C in results[1:]:
        assert np.array_equal(C, results[0])
    assert_fp32_sum_of(results[0], A, B)


@requires_amx
def test_gemm_bf16_same_bits_in_fresh_processes_with_one_and_two_threads():
    # a fresh interpreter also asks Linux for the tile state itself
    script = ("import hashlib, numpy as np; from minivgg.kernels.cpu import amx, amx_isa; "
              "rng = np.random.default_rng(7); "
              "A = rng.standard_normal((260, 1152)).astype(np.float32); "
              "B = rng.standard_normal((1152, 500)).astype(np.float32); "
              "print(amx_isa.amx_available()[0], hashlib.sha1(amx.gemm_bf16(A, B)).hexdigest())")
    assert 2 * 260 * 1152 * 500 > amx.INLINE_FLOPS  # so two threads share it
    outputs = []
    for threads in ("1", "2"):
        env = dict(os.environ, NUMBA_NUM_THREADS=threads)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        outputs.append(out.stdout.split()[-2:])
    assert outputs[0] == outputs[1] and outputs[0][0] == "True"


@pytest.mark.parametrize("use_amx", PATHS)
def test_gemm_bf16_inside_the_pools_jobs_runs_on_their_threads(use_amx, monkeypatch):
    # what a conv layer does per chunk; a nested map_ranges would wait on the busy pool
    from minivgg.kernels.cpu.runtime import map_ranges
    monkeypatch.setenv("NUMBA_NUM_THREADS", "2")
    A, B = random_operands(*THREAD_SHAPES[0], seed=11)
    whole = amx.gemm_bf16(A, B, amx=use_amx)
    halves = map_ranges(lambda i0, i1: amx.gemm_bf16(
        A, B[:, i0 * 650:i1 * 650], amx=use_amx, parallel=False), 2)
    if use_amx:  # each C tile summed the same way whatever the split
        assert np.array_equal(np.hstack(halves), whole)
    else:  # BLAS may pick another kernel for half the columns
        assert_fp32_sum_of(np.hstack(halves), A, B)


# ----------------------------------------------------------------------------------------
# AMX against the fallback, the machine code, the missing-AMX message
# ----------------------------------------------------------------------------------------

@requires_amx
def test_amx_and_fallback_agree_up_to_summation_order():
    A, B = random_operands(130, 2304, 90, seed=8)
    on_amx, fallback = amx.gemm_bf16(A, B, amx=True), amx.gemm_bf16(A, B, amx=False)
    exact, magnitude = reference(A, B)
    assert np.all(np.abs(on_amx - fallback) <= 2 * (A.shape[1] + 1) * 2.0**-24 * magnitude)


@requires_amx
def test_amx_flushes_bf16_subnormals_where_the_fallback_does_not():
    # NOTE in the module docstring: tdpbf16ps treats subnormal inputs as zero
    A = np.full((16, 32), 1e-39, np.float32)  # a bf16 subnormal
    B = np.full((32, 16), 1e30, np.float32)
    assert np.all(amx.gemm_bf16(A, B, amx=True) == 0)
    assert np.all(amx.gemm_bf16(A, B, amx=False) > 0)


@requires_amx
def test_the_compiled_kernel_multiplies_with_tdpbf16ps():
    import numba
    A, B = random_operands(32, 64, 32)
    a, b = amx.pack_a(A), amx.pack_b(B)
    C = np.empty((32, 32), np.float32)
    # NOTE: Numba shows no assembly for code loaded from its cache: compile a fresh copy
    fresh = numba.njit(nogil=True)(amx._gemm_tiles.py_func)
    fresh(amx_isa.TILE_CONFIG, a.tiles, b.tiles, C, 0, 2, 0, 2, 2, amx.BLOCK_M, amx.BLOCK_N)
    assert_fp32_sum_of(C, A, B)
    asm = fresh.inspect_asm(fresh.signatures[0])
    for instruction in ("ldtilecfg", "tileloadd", "tdpbf16ps", "tilestored", "tilerelease"):
        assert instruction in asm


def test_disable_variable_forces_the_fallback_and_warns_once(monkeypatch):
    monkeypatch.setenv("MINIVGG_DISABLE_AMX", "1")
    monkeypatch.setattr(amx_isa, "_warned", [])
    assert amx_isa.amx_available() == (False, "MINIVGG_DISABLE_AMX is set")
    A, B = random_operands(17, 33, 31, seed=9)
    with pytest.warns(RuntimeWarning, match="MINIVGG_DISABLE_AMX"):
        C = amx.gemm_bf16(A, B)
    assert_fp32_sum_of(C, A, B)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        amx.gemm_bf16(A, B)  # said once per process, not per call
    with pytest.raises(RuntimeError, match="MINIVGG_DISABLE_AMX"):
        amx.gemm_bf16(A, B, amx=True)


def test_a_cpu_without_amx_is_named_and_still_computes(monkeypatch):
    monkeypatch.delenv("MINIVGG_DISABLE_AMX", raising=False)
    monkeypatch.setattr(amx_isa, "cpu_flags", lambda: {"avx512f", "amx_tile"})
    monkeypatch.setattr(amx_isa, "_hardware", {})
    monkeypatch.setattr(amx_isa, "_warned", [])
    available, reason = amx_isa.amx_available()
    assert not available and "amx_bf16" in reason and "amx_tile" not in reason
    A, B = random_operands(20, 40, 30, seed=10)
    with pytest.warns(RuntimeWarning, match="no faster than fp32 here: .*amx_bf16"):
        C = amx.gemm_bf16(A, B)
    assert_fp32_sum_of(C, A, B)
