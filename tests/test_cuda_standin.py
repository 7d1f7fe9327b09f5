"""The emulated GPU made strict: the stand-in CuPy's rules, tiny grids, sanitizers, streams.

test_cuda_kernels_emulated.py compares every CUDA kernel with the CPU on the stand-in; this
file checks that the stand-in would catch the mistakes a GPU punishes (each rule is tried on
purpose), runs every kernel family with grids of 1 and 3 blocks so the grid-stride loops go
round, runs the emulated kernels built with AddressSanitizer and UndefinedBehaviorSanitizer,
runs `minivgg.prefetch` (two streams, events, pinned buffers) on the stand-in, and checks
that the step benchmark's `--tf32 on` reaches minivgg's GEMMs.
"""

import os
import subprocess
import sys
import types

import numpy as np
import pytest

import standin_cupy as standin
from conftest import assert_close, load_script
from cuda_host_emulator import have_compiler, load_emulated_cuda_kernels, use_standin
from minivgg.kernels import cpu
from minivgg.prefetch import to_device_batches
from standin_cupy import asarray as dev, asnumpy as host

pytestmark = pytest.mark.skipif(not have_compiler(), reason="g++ not found")

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def gpu():
    return load_emulated_cuda_kernels()


@pytest.fixture(autouse=True)
def fresh_streams():
    standin.reset()
    yield
    standin.reset()


# ----------------------------------------------------------------------------------------
# The stand-in refuses what CuPy refuses
# ----------------------------------------------------------------------------------------

def test_standin_refuses_implicit_conversion_to_numpy():
    a = dev(np.arange(4.0))
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(a)
    with pytest.raises(TypeError, match="Unsupported type"):
        a + np.ones(4)  # a host array in device arithmetic
    np.testing.assert_array_equal(host(a * 2), [0, 2, 4, 6])  # explicit copies work
    assert isinstance(a.sum(), standin.ndarray) and float(a.sum()) == 6.0  # 0-d, as CuPy


def test_standin_pool_hands_out_nan_and_poisons_freed_blocks():
    a = standin.empty((3, 5), np.float32)
    assert np.isnan(host(a)).all()  # fresh memory is not zero
    a.fill(1.0)
    address = a.data.ptr
    del a  # back to the pool, poisoned
    b = standin.empty((3, 5), np.float32)  # the same size on the same stream: reused
    assert b.data.ptr == address and np.isnan(host(b)).all()


def test_raw_kernel_reads_a_non_contiguous_view_as_raw_memory(gpu):
    """As on the GPU, a kernel gets the first element's address only: strides are lost."""
    base = dev(np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5)
    view = base.T  # (3, 2), not contiguous
    y = standin.empty((3, 2), np.float32)
    gpu._kernel("relu_forward", np.float32)((1,), (32,), (view, y, np.int64(6)))
    np.testing.assert_array_equal(host(y).ravel(), np.maximum(host(base).ravel(), 0))
    assert not np.array_equal(host(y), np.maximum(host(view), 0))


def test_a_missing_ascontiguousarray_is_caught_by_the_comparison_with_cpu(gpu, monkeypatch,
                                                                           rng):
    """Drop every `ascontiguousarray` in kernels/gpu.py: a transposed input then reaches
    the kernels as raw memory and the results differ from the CPU's."""
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    xt = dev(x.transpose(0, 1, 3, 2).copy()).transpose(0, 1, 3, 2)  # x's values, strided
    np.testing.assert_array_equal(host(gpu.relu_forward(xt)), cpu.relu_forward(x))
    careless = types.SimpleNamespace(**{k: getattr(standin, k) for k in dir(standin)
                                        if not k.startswith("__")})
    careless.ascontiguousarray = lambda a, dtype=None: a if dtype is None else a.astype(dtype)
    careless.__getattr__ = standin.__getattr__
    monkeypatch.setattr(gpu, "cp", careless)
    assert not np.array_equal(host(gpu.relu_forward(xt)), cpu.relu_forward(x))


# ----------------------------------------------------------------------------------------
# Streams and events
# ----------------------------------------------------------------------------------------

def test_reading_another_streams_copy_without_wait_event_fails():
    side = standin.cuda.Stream(non_blocking=True)
    a = standin.empty(4, np.float32)
    a.set(np.arange(4, dtype=np.float32), stream=side)  # deferred: not run yet
    with pytest.raises(standin.StreamOrderError, match="without waiting"):
        a.get()
    standin.cuda.get_current_stream().wait_event(side.record())
    np.testing.assert_array_equal(host(a), np.arange(4))  # the copy ran, in order


def test_overwriting_memory_another_stream_may_still_read_fails():
    side = standin.cuda.Stream(non_blocking=True)
    a = dev(np.zeros(4, np.float32))
    _ = a + 1  # read on the null stream
    with pytest.raises(standin.StreamOrderError, match="may still be reading"):
        a.set(np.ones(4, np.float32), stream=side)
    side.wait_event(standin.cuda.get_current_stream().record())
    a.set(np.ones(4, np.float32), stream=side)  # ordered now


def test_freeing_a_block_while_another_stream_writes_it_is_a_hazard():
    side = standin.cuda.Stream(non_blocking=True)
    a = standin.empty(4, np.float32)
    a.set(np.ones(4, np.float32), stream=side)
    del a
    assert standin.hazards and "freed" in standin.hazards[0]
    standin.hazards.clear()
    b = standin.empty(4, np.float32)
    b.set(np.ones(4, np.float32), stream=side)
    side.synchronize()
    del b
    assert not standin.hazards


# ----------------------------------------------------------------------------------------
# minivgg.prefetch on the stand-in: a side stream, events, two sets of pinned buffers
# ----------------------------------------------------------------------------------------

def _batches(rng, sizes=(4, 4, 4, 4, 2)):
    return [(rng.normal(size=(n, 3, 5, 5)).astype(np.float32), rng.integers(0, 10, n))
            for n in sizes]  # a short last batch, as from a DataLoader


def test_prefetch_delivers_every_batch_intact_on_the_standin(gpu, monkeypatch, rng):
    use_standin(monkeypatch, gpu)
    batches = _batches(rng)
    got = [(host(x * 1), host(y)) for x, y in to_device_batches(iter(batches), "cuda")]
    assert len(got) == len(batches)
    for (x, y), (xd, yd) in zip(batches, got):
        np.testing.assert_array_equal(xd, x)
        np.testing.assert_array_equal(yd, y)
    assert not standin.hazards, standin.hazards


class _Diverged(Exception):
    pass


@pytest.mark.parametrize("how", ["break", "exception"])
def test_prefetch_abandoned_midway_frees_no_batch_under_a_pending_copy(how, gpu, monkeypatch,
                                                                       rng):
    """The consumer stops after two batches (`break`, or an exception such as
    TrainingDiverged): the batch already being copied must not go back to the pool while
    its copy may still write into it."""
    use_standin(monkeypatch, gpu)
    batches = _batches(rng)
    try:
        for i, (x, y) in enumerate(to_device_batches(iter(batches), "cuda")):
            float(x.sum())  # a training step's work on the training stream
            if i == 1:
                if how == "break":
                    break
                raise _Diverged
    except _Diverged:
        pass
    del x, y
    assert not standin.hazards, standin.hazards


# ----------------------------------------------------------------------------------------
# Tiny grids: every kernel family with 1 and 3 blocks, so each thread loops many times
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("blocks", [1, 3])
def test_every_kernel_matches_cpu_with_a_tiny_grid(blocks, gpu, monkeypatch, rng):
    dtype = np.float32
    dropout_full_grid = host(gpu.dropout_mask((40, 30), 0.3, np.dtype(dtype),
                                              np.random.default_rng(5)))
    monkeypatch.setattr(gpu, "MAX_BLOCKS", blocks)
    monkeypatch.setattr(gpu, "THREADS_PER_BLOCK", 32)

    x = rng.normal(size=(2, 3, 9, 7)).astype(dtype)
    _conv_matches_cpu(gpu, monkeypatch, x, rng)
    _pool_relu_lrn_match_cpu(gpu, x, rng)
    _cross_entropy_matches_cpu(gpu, rng)
    # the mask is a function of (seed, index) only, whatever the launch shape
    np.testing.assert_array_equal(
        host(gpu.dropout_mask((40, 30), 0.3, np.dtype(dtype), np.random.default_rng(5))),
        dropout_full_grid)
    _sgd_matches_cpu(gpu, rng)


def _conv_matches_cpu(gpu, monkeypatch, x, rng):
    """conv2d forward and backward (stride 2×1): im2col of the whole batch, and in bands."""
    dtype = x.dtype
    W, b = rng.normal(size=(4, 3, 3, 3)).astype(dtype), rng.normal(size=4).astype(dtype)
    for chunk_bytes in (gpu.IM2COL_CHUNK_BYTES, 3 * 27 * 4 * 4):  # whole batch; row bands
        monkeypatch.setattr(gpu, "IM2COL_CHUNK_BYTES", chunk_bytes)
        y = gpu.conv2d_forward(dev(x), dev(W), dev(b), (2, 1), (1, 1))
        assert_close(host(y), cpu.conv2d_forward(x, W, b, (2, 1), (1, 1)), "conv2d", dtype)
        gy = rng.normal(size=y.shape).astype(dtype)
        for got, want in zip(gpu.conv2d_backward(dev(x), dev(W), dev(gy), (2, 1), (1, 1)),
                             cpu.conv2d_backward(x, W, gy, (2, 1), (1, 1))):
            assert_close(host(got), want, "conv2d", dtype)


def _pool_relu_lrn_match_cpu(gpu, x, rng):
    """max_pool2d (with ties), relu and LRN, forward and backward."""
    dtype = x.dtype
    xi = rng.integers(-3, 4, size=x.shape).astype(dtype)  # ties
    y, argmax = gpu.max_pool2d_forward(dev(xi), (3, 3), (2, 2))
    y_cpu, argmax_cpu = cpu.max_pool2d_forward(xi, (3, 3), (2, 2))
    np.testing.assert_array_equal(host(y), y_cpu)
    gy = rng.normal(size=y.shape).astype(dtype)
    assert_close(host(gpu.max_pool2d_backward(dev(gy), argmax, x.shape, (3, 3), (2, 2))),
                 cpu.max_pool2d_backward(gy, argmax_cpu, x.shape, (3, 3), (2, 2)),
                 "max_pool2d", dtype)

    gx = rng.normal(size=x.shape).astype(dtype)
    np.testing.assert_array_equal(host(gpu.relu_forward(dev(x))), cpu.relu_forward(x))
    np.testing.assert_array_equal(host(gpu.relu_backward(dev(x), dev(gx))),
                                  cpu.relu_backward(x, gx))

    ys, scale = gpu.lrn_forward(dev(x), 5, 1e-2, 0.75, 2.0)
    ys_cpu, scale_cpu = cpu.lrn_forward(x, 5, 1e-2, 0.75, 2.0)
    assert_close(host(ys), ys_cpu, "local_response_norm", dtype)
    assert_close(host(gpu.lrn_backward(dev(x), ys, scale, dev(gx), 5, 1e-2, 0.75)),
                 cpu.lrn_backward(x, ys_cpu, scale_cpu, gx, 5, 1e-2, 0.75),
                 "local_response_norm", dtype)


def _cross_entropy_matches_cpu(gpu, rng, dtype=np.float32):
    logits, labels = rng.normal(size=(70, 9)).astype(dtype), rng.integers(0, 9, 70)
    loss, probs = gpu.softmax_cross_entropy_forward(dev(logits), dev(labels))
    loss_cpu, probs_cpu = cpu.softmax_cross_entropy_forward(logits, labels)
    assert_close(host(loss), loss_cpu, "cross_entropy", dtype)
    gloss = np.asarray(1.0, dtype)
    assert_close(host(gpu.softmax_cross_entropy_backward(probs, dev(labels), dev(gloss))),
                 cpu.softmax_cross_entropy_backward(probs_cpu, labels, gloss),
                 "cross_entropy", dtype)


def _sgd_matches_cpu(gpu, rng, dtype=np.float32):
    params = [rng.normal(size=s).astype(dtype) for s in [(4, 3, 3, 3), (4,), (50, 7)]]
    grads = [rng.normal(size=p.shape).astype(dtype) for p in params]
    params_gpu, velocities_gpu = [dev(p) for p in params], [standin.zeros_like(p)
                                                           for p in params]
    velocities = [np.zeros_like(p) for p in params]
    gpu.sgd_update(params_gpu, [dev(g) for g in grads], velocities_gpu, 0.1, 0.9, 5e-4)
    cpu.sgd_update(params, grads, velocities, 0.1, 0.9, 5e-4)
    for got, want in zip(params_gpu + velocities_gpu, params + velocities):
        assert_close(host(got), want, "sgd", dtype)


# ----------------------------------------------------------------------------------------
# AddressSanitizer and UndefinedBehaviorSanitizer
# ----------------------------------------------------------------------------------------

def _libasan():
    path = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True,
                          text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.mark.slow
def test_emulated_kernels_run_clean_under_address_and_undefined_behavior_sanitizers():
    """The emulated-kernel tests and the tiny grids again, in a child process whose kernels
    are built with -fsanitize=address,undefined. Every device block is its own malloc, so a
    kernel reading or writing past an array's end, and any undefined behaviour (signed
    overflow in index arithmetic, a bad shift), aborts the child."""
    libasan = _libasan()
    if libasan is None:
        pytest.skip("g++ has no AddressSanitizer runtime (libasan.so)")
    env = dict(os.environ, MINIVGG_EMULATOR_SANITIZE="1", LD_PRELOAD=libasan,
               ASAN_OPTIONS="detect_leaks=0:halt_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    result = subprocess.run(
        # -s: a sanitizer writes its report to fd 2 and aborts; pytest's capture would lose it
        [sys.executable, "-m", "pytest", "-q", "-x", "-s", "-p", "no:cacheprovider",
         os.path.join(TESTS, "test_cuda_kernels_emulated.py"),
         os.path.join(TESTS, "test_cuda_standin.py"), "-k", "not sanitizer and not vgg16"],
        capture_output=True, text=True, env=env, cwd=os.path.dirname(TESTS), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "passed" in result.stdout


# ----------------------------------------------------------------------------------------
# The step benchmark's minivgg worker, on the stand-in
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("tf32", ["on", "off"])
def test_bench_step_worker_runs_minivgg_in_tf32_when_asked(tf32, gpu, monkeypatch):
    """`bench_step.py --tf32 on` must put minivgg's GEMMs in TF32, as it does PyTorch's:
    one timed step of the small case on the stand-in "cuda", then CuPy's compute type."""
    from minivgg import backend
    use_standin(monkeypatch, gpu)
    monkeypatch.setattr(backend, "_tf32", False)  # restored after the test
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script adds benchmarks/ to it
    bench_step = load_script("benchmarks/bench_step.py")
    # NOTE: the real one also waits for PyTorch's CUDA, which a CPU build of torch refuses
    monkeypatch.setattr(bench_step.common, "cuda_sync",
                        lambda device: standin.cuda.Device().synchronize())
    args = bench_step.parse_args(["--device", "cuda", "--tf32", tf32, "--steps", "1",
                                  "--warmup", "0", "--threads", "1"])
    result = bench_step.minivgg_worker(args, "small", 1)
    assert len(result["times"]) == 1
    fc_and_im2col = {c[5] for c in standin.cublas_calls if c[0] == "gemmEx"}
    assert fc_and_im2col == ({77} if tf32 == "on" else {68})  # TF32 or FP32, as asked
    assert backend.tf32_enabled() == (tf32 == "on")
