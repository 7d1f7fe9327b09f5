"""The CUDA kernel table, run on the CPU through the host emulator, against kernels/cpu/.

No GPU needed: `cuda_host_emulator` compiles `kernels/cuda/*.cu` with g++ and loads
`kernels/gpu.py` on the stand-in CuPy (`standin_cupy`), so these tests check the CUDA
kernels' index arithmetic and the launch code (argument order and C types) in CI. Inputs go
to the "device" with `dev` and come back with `host`, as they would with CuPy. On a GPU
machine, test_gpu.py runs the same comparisons on the real device.
test_cuda_standin.py holds the checks of the stand-in's own strictness.
"""

import os
import re

import numpy as np
import pytest

from conftest import assert_close
import standin_cupy as standin
from cuda_host_emulator import have_compiler, load_emulated_cuda_kernels, use_standin
from minivgg.kernels import common, cpu, shapes, winograd
from minivgg.kernels.cpu import conv as cpu_conv
from standin_cupy import asarray as dev, asnumpy as host
from test_blocked_grad import naive_conv2d_grads
from test_ops import naive_conv2d

pytestmark = pytest.mark.skipif(not have_compiler(), reason="g++ not found")

DTYPES = [np.float32, np.float64]

# (N, C, H, W), (KH, KW), (SH, SW), (PH, PW): VGG's 3x3/s1/p1 and 1x1, the dense-evaluation
# 7x7/p0, stride 2, non-square inputs and kernels, odd sizes, batch 1.
CONV_CASES = {
    "3x3-s1-p1": ((2, 3, 7, 6), (3, 3), (1, 1), (1, 1)),
    "1x1": ((2, 4, 5, 5), (1, 1), (1, 1), (0, 0)),
    "7x7-p0": ((1, 2, 9, 8), (7, 7), (1, 1), (0, 0)),
    "3x3-s2-p1": ((2, 3, 9, 7), (3, 3), (2, 2), (1, 1)),
    "2x3-s2x1-p0x2": ((1, 2, 6, 5), (2, 3), (2, 1), (0, 2)),
}

# (N, C, H, W), (KH, KW), (SH, SW): VGG's 2x2/s2, overlapping 3x3/s2, odd sizes (floor mode)
POOL_CASES = {
    "2x2-s2": ((2, 3, 8, 6), (2, 2), (2, 2)),
    "2x2-s2-odd": ((1, 2, 7, 5), (2, 2), (2, 2)),
    "3x3-s2-overlap": ((2, 2, 9, 7), (3, 3), (2, 2)),
    "3x2-s1": ((1, 3, 5, 6), (3, 2), (1, 1)),
}


@pytest.fixture(scope="module")
def gpu():
    """`kernels/gpu.py` running on the stand-in CuPy with host-compiled CUDA kernels."""
    return load_emulated_cuda_kernels()


@pytest.fixture(autouse=True)
def no_stream_hazards():
    """Every test starts with fresh streams and ends with no hazard reported by the pool."""
    standin.reset()
    yield
    assert not standin.hazards, standin.hazards


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_cuda_im2col_and_col2im_match_cpu(case, dtype, gpu, rng):
    shape, (KH, KW), (SH, SW), (PH, PW) = CONV_CASES[case]
    x = rng.normal(size=shape).astype(dtype)
    cols = host(gpu.im2col(dev(x), KH, KW, SH, SW, PH, PW))
    np.testing.assert_array_equal(cols, cpu.im2col(x, KH, KW, SH, SW, PH, PW))
    g = rng.normal(size=cols.shape).astype(dtype)
    assert_close(host(gpu.col2im(dev(g), shape, KH, KW, SH, SW, PH, PW)),
                 cpu.col2im(g, shape, KH, KW, SH, SW, PH, PW), "conv2d", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_cuda_conv2d_forward_and_backward_match_cpu(case, dtype, gpu, rng):
    shape, (KH, KW), stride, padding = CONV_CASES[case]
    x = rng.normal(size=shape).astype(dtype)
    W = rng.normal(size=(5, shape[1], KH, KW)).astype(dtype)
    b = rng.normal(size=5).astype(dtype)
    y = host(gpu.conv2d_forward(dev(x), dev(W), dev(b), stride, padding))
    assert_close(y, cpu.conv2d_forward(x, W, b, stride, padding), "conv2d", dtype)
    gy = rng.normal(size=y.shape).astype(dtype)
    for got, want in zip(gpu.conv2d_backward(dev(x), dev(W), dev(gy), stride, padding, True),
                         cpu.conv2d_backward(x, W, gy, stride, padding, True)):
        assert_close(host(got), want, "conv2d", dtype)


# (N, C, H, W, OC): odd sizes (tiles cut by the edge), non-square, batch 1, one pixel
WINOGRAD_CASES = {"odd": (2, 3, 7, 5, 4), "batch1-wide": (1, 5, 6, 11, 3),
                  "one-pixel": (1, 2, 1, 1, 3)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", ["winograd", "winograd4", "direct"])
@pytest.mark.parametrize("case", WINOGRAD_CASES)
def test_cuda_winograd_forward_and_backward_match_cpu(case, algorithm, dtype, gpu, rng):
    """The winograd.cu transforms / direct.cu kernels and the shared drivers on the GPU
    table, against the CPU's Numba kernels (both against float64 references in
    tests/test_winograd.py and tests/test_direct.py)."""
    N, C, H, W, OC = WINOGRAD_CASES[case]
    x = rng.normal(size=(N, C, H, W)).astype(dtype)
    Wt = rng.normal(size=(OC, C, 3, 3)).astype(dtype)
    b = rng.normal(size=OC).astype(dtype)
    gy = rng.normal(size=(N, OC, H, W)).astype(dtype)
    args = ((1, 1), (1, 1))
    assert_close(host(gpu.conv2d_forward(dev(x), dev(Wt), dev(b), *args, algorithm)),
                 cpu.conv2d_forward(x, Wt, b, *args, algorithm), "conv2d", dtype)
    for got, want in zip(gpu.conv2d_backward(dev(x), dev(Wt), dev(gy), *args, True, algorithm),
                         cpu.conv2d_backward(x, Wt, gy, *args, True, algorithm)):
        assert_close(host(got), want, "conv2d", dtype)


@pytest.mark.parametrize("chunk_bytes", [1, 2000])  # one tile row per chunk; a few rows
def test_cuda_winograd_matches_cpu_for_any_chunking(chunk_bytes, gpu, monkeypatch, rng):
    monkeypatch.setattr(gpu, "WINOGRAD_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(winograd, "MIN_CHUNK_TILES", 1)
    x = rng.normal(size=(3, 2, 9, 6)).astype(np.float64)
    Wt = rng.normal(size=(4, 2, 3, 3))
    gy = rng.normal(size=(3, 4, 9, 6))
    args = ((1, 1), (1, 1), True, "winograd4")
    for got, want in zip(gpu.conv2d_backward(dev(x), dev(Wt), dev(gy), *args),
                         cpu.conv2d_backward(x, Wt, gy, *args)):
        assert_close(host(got), want, "conv2d", np.float64)


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 18 * 25 * 4 // 2])  # row bands; 1.5 images
def test_cuda_conv2d_matches_cpu_for_any_chunking(chunk_bytes, gpu, monkeypatch, rng):
    x = rng.normal(size=(3, 2, 5, 5)).astype(np.float32)
    W = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    b = rng.normal(size=4).astype(np.float32)
    gy = rng.normal(size=(3, 4, 5, 5)).astype(np.float32)
    monkeypatch.setattr(gpu, "IM2COL_CHUNK_BYTES", chunk_bytes)
    assert len(common.conv_chunks(3, 5, 5, 18, 4, gpu.IM2COL_CHUNK_BYTES)) > 1
    assert_close(host(gpu.conv2d_forward(dev(x), dev(W), dev(b), (1, 1), (1, 1))),
                 cpu.conv2d_forward(x, W, b, (1, 1), (1, 1)), "conv2d", np.float32)
    for got, want in zip(gpu.conv2d_backward(dev(x), dev(W), dev(gy), (1, 1), (1, 1), True),
                         cpu.conv2d_backward(x, W, gy, (1, 1), (1, 1), True)):
        assert_close(host(got), want, "conv2d", np.float32)


@pytest.mark.parametrize("n0, n1, oy0, oy1", [(0, 2, 0, 4), (1, 2, 1, 3), (0, 1, 3, 4)])
def test_cuda_chunk_moves_match_cpu(n0, n1, oy0, oy1, gpu, rng):
    """im2col_chunk, col2im_chunk, cols_to_nchw and nchw_to_cols on a band of rows."""
    prims = gpu.PRIMITIVES
    x = rng.normal(size=(2, 3, 8, 7))
    KH, KW, SH, SW, PH, PW = 3, 2, 2, 1, 1, 0
    OW = shapes.conv_output_size(7, KW, SW, PW)  # OH = 4
    P = (n1 - n0) * (oy1 - oy0) * OW
    cols, cols_cpu = standin.empty((3 * KH * KW, P)), np.empty((3 * KH * KW, P))
    prims.im2col_chunk(dev(x), n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, cols)
    cpu_conv.im2col_chunk(x, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, cols_cpu)
    np.testing.assert_array_equal(host(cols), cols_cpu)
    gx, gx_cpu = standin.ones(x.shape), np.ones(x.shape)  # both add into what is there
    prims.col2im_chunk(cols, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, gx)
    cpu_conv.col2im_chunk(cols_cpu, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, gx_cpu)
    assert_close(host(gx), gx_cpu, "conv2d", np.float64)
    ycols, b = rng.normal(size=(5, P)), rng.normal(size=5)
    y, y_cpu = standin.zeros((2, 5, 4, OW)), np.zeros((2, 5, 4, OW))
    prims.cols_to_nchw(dev(ycols), dev(b), n0, n1, oy0, oy1, y)
    cpu_conv.cols_to_nchw(ycols, b, n0, n1, oy0, oy1, y_cpu)
    np.testing.assert_array_equal(host(y), y_cpu)
    back, back_cpu = standin.empty((5, P)), np.empty((5, P))
    prims.nchw_to_cols(y, n0, n1, oy0, oy1, back)
    cpu_conv.nchw_to_cols(y_cpu, n0, n1, oy0, oy1, back_cpu)
    np.testing.assert_array_equal(host(back), back_cpu)


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_CASES)
def test_cuda_max_pool2d_forward_and_backward_match_cpu(case, dtype, ceil_mode, gpu, rng):
    shape, kernel_size, stride = POOL_CASES[case]
    # NOTE: values from a small set, so windows hold ties and the tie rule is exercised
    x = rng.integers(-3, 4, size=shape).astype(dtype)
    y, argmax = gpu.max_pool2d_forward(dev(x), kernel_size, stride, ceil_mode)
    y_cpu, argmax_cpu = cpu.max_pool2d_forward(x, kernel_size, stride, ceil_mode)
    np.testing.assert_array_equal(host(y), y_cpu)
    np.testing.assert_array_equal(host(argmax), argmax_cpu)
    gy = rng.normal(size=y.shape).astype(dtype)
    assert_close(host(gpu.max_pool2d_backward(dev(gy), argmax, shape, kernel_size, stride)),
                 cpu.max_pool2d_backward(gy, argmax_cpu, shape, kernel_size, stride),
                 "max_pool2d", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_relu_forward_and_backward_match_cpu(dtype, gpu, rng):
    x = rng.normal(size=(2, 3, 4, 5)).astype(dtype)
    x[0, 0, 0, :3] = [0.0, -0.0, np.nan]  # the NOTE cases: exact zeros and a NaN
    y = gpu.relu_forward(dev(x))
    np.testing.assert_array_equal(host(y), cpu.relu_forward(x))
    gy = rng.normal(size=x.shape).astype(dtype)
    np.testing.assert_array_equal(host(gpu.relu_backward(y, dev(gy))),
                                  cpu.relu_backward(host(y), gy))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size, channels", [(5, 7), (5, 3), (4, 6), (1, 2)])
def test_cuda_lrn_forward_and_backward_match_cpu(size, channels, dtype, gpu, rng):
    x = rng.normal(size=(2, channels, 3, 4)).astype(dtype)
    alpha, beta, k = 1e-2, 0.75, 2.0  # alpha large enough that the sum matters
    y, scale = gpu.lrn_forward(dev(x), size, alpha, beta, k)
    y_cpu, scale_cpu = cpu.lrn_forward(x, size, alpha, beta, k)
    assert_close(host(y), y_cpu, "local_response_norm", dtype)
    assert_close(host(scale), scale_cpu, "local_response_norm", dtype)
    gy = rng.normal(size=x.shape).astype(dtype)
    assert_close(host(gpu.lrn_backward(dev(x), y, scale, dev(gy), size, alpha, beta)),
                 cpu.lrn_backward(x, y_cpu, scale_cpu, gy, size, alpha, beta),
                 "local_response_norm", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_softmax_cross_entropy_matches_cpu(dtype, gpu, rng):
    logits = (rng.normal(size=(4, 7)) * 3).astype(dtype)
    logits[1] = [1000, -1000, 0, 999, 3, -2, 1]  # stays finite
    labels = np.array([0, 3, 6, 2], dtype=np.int64)
    loss, probs = gpu.softmax_cross_entropy_forward(dev(logits), dev(labels))
    loss_cpu, probs_cpu = cpu.softmax_cross_entropy_forward(logits, labels)
    assert loss.dtype == dtype and np.isfinite(host(loss))
    assert_close(host(loss), loss_cpu, "cross_entropy", dtype)
    assert_close(host(probs), probs_cpu, "cross_entropy", dtype)
    gloss = np.asarray(0.5, dtype=dtype)
    assert_close(host(gpu.softmax_cross_entropy_backward(probs, dev(labels), dev(gloss))),
                 cpu.softmax_cross_entropy_backward(probs_cpu, labels, gloss),
                 "cross_entropy", dtype)


def _splitmix64(seed, i):
    """The i-th output of SplitMix64 from `seed`, in NumPy uint64 arithmetic (wraps mod 2^64)."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (i.astype(np.uint64) + np.uint64(1)) * np.uint64(
            0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_dropout_mask_is_splitmix64_thresholded_and_repeats_per_seed(dtype, gpu):
    p, shape = 0.3, (64, 50)
    mask = host(gpu.dropout_mask(shape, p, np.dtype(dtype), np.random.default_rng(7)))
    seed = np.random.default_rng(7).integers(0, 2**64, dtype=np.uint64)
    u = (_splitmix64(seed, np.arange(64 * 50)) >> np.uint64(40)).astype(np.float32) / 2**24
    expected = np.where(u >= np.float32(p), dtype(1 / (1 - p)), dtype(0)).reshape(shape)
    np.testing.assert_array_equal(mask, expected)
    assert mask.dtype == dtype
    assert abs((mask == 0).mean() - p) < 0.03
    again = host(gpu.dropout_mask(shape, p, np.dtype(dtype), np.random.default_rng(7)))
    np.testing.assert_array_equal(mask, again)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_fused_sgd_update_matches_cpu_over_every_parameter(dtype, gpu, rng):
    shapes = [(3, 2, 3, 3), (3,), (0,), (5, 4), (1,)]  # an empty one, sizes not aligned
    params = [rng.normal(size=s).astype(dtype) for s in shapes]
    grads = [rng.normal(size=s).astype(dtype) for s in shapes]
    velocities = [rng.normal(size=s).astype(dtype) for s in shapes]
    params_cpu, velocities_cpu = [a.copy() for a in params], [a.copy() for a in velocities]
    params, velocities = [dev(a) for a in params], [dev(a) for a in velocities]
    gpu.sgd_update(params, [dev(g) for g in grads], velocities, 0.1, 0.9, 5e-4)
    cpu.sgd_update(params_cpu, grads, velocities_cpu, 0.1, 0.9, 5e-4)
    for got, want in zip(params + velocities, params_cpu + velocities_cpu):
        assert_close(host(got), want, "sgd", dtype)


def test_cuda_sgd_update_handles_mixed_dtypes_and_casts_gradients(gpu, rng):
    params = [rng.normal(size=4).astype(np.float32), rng.normal(size=3)]
    grads = [rng.normal(size=4), rng.normal(size=3).astype(np.float32)]  # swapped dtypes
    velocities = [np.zeros_like(p) for p in params]
    params_cpu, velocities_cpu = [a.copy() for a in params], [a.copy() for a in velocities]
    params, velocities = [dev(a) for a in params], [dev(a) for a in velocities]
    gpu.sgd_update(params, [dev(g) for g in grads], velocities, 0.1, 0.9, 5e-4)
    cpu.sgd_update(params_cpu, grads, velocities_cpu, 0.1, 0.9, 5e-4)
    for got, want in zip(params + velocities, params_cpu + velocities_cpu):
        assert got.dtype == want.dtype
        assert_close(host(got), want, "sgd", got.dtype)


def test_emulated_launch_rejects_a_python_int_for_an_int_parameter(gpu):
    """The emulator's own check: CuPy would pass 3 as a 64-bit value to an `int`."""
    x = standin.zeros((1, 1, 2, 2), np.float32)
    kernel = gpu._kernel("relu_forward", np.float32)
    with pytest.raises(TypeError, match="count"):
        kernel((1,), (32,), (x, x, 4))


def _train_steps(device, config, x, labels, steps=2, **vgg_args):
    """`steps` SGD steps of `models.vgg(config, **vgg_args)` on `device`, dropout off (the
    two devices draw different masks by design) -> (losses, state dict)."""
    import minivgg
    from minivgg import backend, functional as F, models, nn, optim
    model = models.vgg(config, seed=0, **vgg_args).to(device)
    for _, m in model.named_modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x = minivgg.Tensor(backend.to_device(x, device))
    labels = backend.to_device(labels, device)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
    return losses, model.state_dict()


def _assert_same_training(got, want):
    (losses_gpu, state_gpu), (losses_cpu, state_cpu) = got, want
    assert_close(np.array(losses_gpu), np.array(losses_cpu), "model", np.float32)
    assert state_gpu.keys() == state_cpu.keys()
    for k in state_cpu:
        assert_close(state_gpu[k], state_cpu[k], "model", np.float32, k)


def test_vgg_training_steps_through_the_cuda_kernel_table_match_cpu(gpu, monkeypatch, rng):
    """Two SGD steps of a small VGG A-LRN (conv, LRN, pool, ReLU, fc, loss, fused SGD) with
    the whole model on the stand-in "cuda" device."""
    x = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
    labels = np.array([1, 7])
    small = dict(num_classes=10, width=1 / 16, fc_width=16, input_size=32)
    want = _train_steps("cpu", "A-LRN", x, labels, **small)
    use_standin(monkeypatch, gpu)
    _assert_same_training(_train_steps("cuda", "A-LRN", x, labels, **small), want)


def test_a_training_step_on_the_gpu_reads_the_device_once(gpu, monkeypatch, rng):
    """Loss and top-1 guesses come back in one copy; host labels are checked on the host
    (issue 22: the step used to wait for the GPU three to four times)."""
    from types import SimpleNamespace
    from minivgg import models, optim
    from minivgg.replicas import Replicas
    from minivgg.train import train_step
    use_standin(monkeypatch, gpu)
    model = models.vgg("A", 10, 1 / 16, 16, 32, init="glorot", seed=0).to("cuda")
    run = SimpleNamespace(model=model, replicas=Replicas(),
                          optimizer=optim.SGD(model.parameters(), 0.01, momentum=0.9))
    x = standin.asarray(rng.normal(size=(3, 3, 32, 32)).astype(np.float32))
    labels = np.array([1, 7, 2])
    standin.host_reads.clear()
    loss_sum, wrong, seen = train_step(run, x, labels)
    assert standin.host_reads == [(4,)], standin.host_reads  # the loss and 3 guesses
    assert seen == 3 and 0 <= wrong <= 3 and np.isfinite(loss_sum)


@pytest.mark.slow
def test_vgg16_training_steps_at_full_width_in_row_bands_match_cpu(gpu, monkeypatch, rng):
    """VGG-16 (config D) at full width (64..512 channels, 4096-wide fc layers) on 32x32
    inputs: two SGD steps on the stand-in, with an im2col budget so small that every conv
    layer runs in bands of one to four output rows, against the CPU."""
    x = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
    labels = np.array([3, 8])
    want = _train_steps("cpu", "D", x, labels, num_classes=10, input_size=32)
    use_standin(monkeypatch, gpu)
    monkeypatch.setattr(gpu, "IM2COL_CHUNK_BYTES", 16 * 2**10)
    assert all(len(common.conv_chunks(2, s, s, c * 9, 4, gpu.IM2COL_CHUNK_BYTES)) > 2
               for s, c in [(32, 3), (32, 64), (16, 128), (8, 256), (4, 512), (2, 512)])
    _assert_same_training(_train_steps("cuda", "D", x, labels, num_classes=10,
                                       input_size=32), want)


# ----------------------------------------------------------------------------------------
# GEMMs on cuBLAS (kernels/gpu.py: gemm), emulated on the stand-in's raw memory
# ----------------------------------------------------------------------------------------

def _operands(rng, dtype, shape_a, shape_b, transpose_a, transpose_b):
    """Device operands of those shapes, each a transposed view of its transpose when asked."""
    def make(shape, transpose):
        if not transpose:
            return dev(rng.normal(size=shape).astype(dtype))
        swapped = shape[:-2] + (shape[-1], shape[-2])
        return dev(rng.normal(size=swapped).astype(dtype)).swapaxes(-1, -2)
    return make(shape_a, transpose_a), make(shape_b, transpose_b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transpose_a, transpose_b", [(False, False), (True, False),
                                                      (False, True), (True, True)])
@pytest.mark.parametrize("batch", [None, 5])
def test_gpu_gemm_equals_numpy_for_both_transposes_batched_and_dtypes(
        batch, transpose_a, transpose_b, dtype, gpu, rng):
    """One cuBLAS call per product: gemmEx for a matrix, one gemmStridedBatchedEx for a
    stack; row-major operands and transposed views of them, with no copy."""
    lead = () if batch is None else (batch,)
    A, B = _operands(rng, dtype, lead + (7, 4), lead + (4, 6), transpose_a, transpose_b)
    out = standin.empty(lead + (7, 6), dtype)
    gpu.gemm(A, B, out, allow_tf32=False)
    np.testing.assert_allclose(host(out), np.matmul(host(A), host(B)),
                               rtol=1e-6 if dtype == np.float32 else 1e-13)
    name = "gemmEx" if batch is None else "gemmStridedBatchedEx"
    compute = 68 if dtype == np.float32 else 70  # CUBLAS_COMPUTE_32F / _64F
    assert standin.cublas_calls == [(name, 6, 7, 4, batch or 1, compute)]


def test_gpu_gemm_writes_into_a_strided_band_of_rows(gpu, rng):
    """The im2col forward's GEMM writes a row band of y[n] seen as (OC, OH*OW) in place."""
    y = standin.zeros((3, 20))
    A, B = _operands(rng, np.float64, (3, 4), (4, 8), False, False)
    gpu.gemm(A, B, y[:, 6:14], allow_tf32=False)
    want = np.zeros((3, 20))
    want[:, 6:14] = host(A) @ host(B)
    np.testing.assert_allclose(host(y), want, rtol=1e-13)


@pytest.mark.parametrize("tf32", [False, True])
def test_gpu_tf32_reaches_im2col_gemms_but_never_winograds(tf32, gpu, monkeypatch, rng):
    """With TF32 on, float32 im2col GEMMs ask cuBLAS for CUBLAS_COMPUTE_32F_FAST_TF32 (and
    the stand-in rounds their inputs as tensor cores do); Winograd's stay FP32, float64
    stays FP64."""
    from minivgg import backend
    monkeypatch.setattr(backend, "tf32_enabled", lambda: tf32)
    x = rng.normal(size=(2, 8, 6, 6)).astype(np.float32)
    W = rng.normal(size=(4, 8, 3, 3)).astype(np.float32)
    y = host(gpu.conv2d_forward(dev(x), dev(W), None, (1, 1), (1, 1)))
    assert {c[5] for c in standin.cublas_calls} == {77 if tf32 else 68}
    err = np.abs(y - cpu.conv2d_forward(x, W, None, (1, 1), (1, 1))).max()
    assert (err > 1e-4) == tf32  # TF32's 10-bit inputs show; FP32 agrees to float rounding
    standin.cublas_calls.clear()
    gpu.conv2d_forward(dev(x), dev(W), None, (1, 1), (1, 1), "winograd4")
    gpu.conv2d_forward(dev(x.astype(np.float64)), dev(W.astype(np.float64)), None, (1, 1),
                       (1, 1))
    assert [c[5] for c in standin.cublas_calls] == [68, 70]


@pytest.mark.parametrize("algorithm", ["winograd", "winograd4"])
def test_gpu_winograd_makes_one_batched_gemm_per_chunk(algorithm, gpu, monkeypatch, rng):
    """All α² transform points of a chunk in one gemmStridedBatchedEx (not α² calls), for
    the forward, the input gradient and the weight gradient."""
    monkeypatch.setattr(gpu, "WINOGRAD_CHUNK_BYTES", 1)  # one tile row per chunk
    monkeypatch.setattr(winograd, "MIN_CHUNK_TILES", 1)
    N, C, H, W, OC, m = 2, 3, 9, 6, 4, winograd.ALGORITHMS[algorithm]
    x, Wt = rng.normal(size=(N, C, H, W)), rng.normal(size=(OC, C, 3, 3))
    gy = rng.normal(size=(N, OC, H, W))
    chunks = len(winograd.tile_chunks(N * winograd.tile_grid(H, W, m)[0], 1, 1))
    gpu.conv2d_forward(dev(x), dev(Wt), None, (1, 1), (1, 1), algorithm)
    assert [c[0] for c in standin.cublas_calls] == ["gemmStridedBatchedEx"] * chunks
    assert all(c[4] == (m + 2) ** 2 for c in standin.cublas_calls)
    standin.cublas_calls.clear()
    gpu.conv2d_backward(dev(x), dev(Wt), dev(gy), (1, 1), (1, 1), True, algorithm)
    assert [c[0] for c in standin.cublas_calls] == ["gemmStridedBatchedEx"] * (2 * chunks)


# ----------------------------------------------------------------------------------------
# The direct weight gradient's block reduction; uploads per training step
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("blocks, threads", [(1, 32), (3, 64), (65536, 256)])
def test_gpu_direct_weight_grad_repeats_bit_for_bit_on_any_grid(blocks, threads, gpu,
                                                                 monkeypatch, rng):
    """A block per entry (a grid-stride loop over entries when the grid is smaller), its
    threads' sums added by a fixed tree: within float64 rounding of the CPU, and the same
    bits from one call to the next."""
    monkeypatch.setattr(gpu, "MAX_BLOCKS", blocks)
    monkeypatch.setattr(gpu, "THREADS_PER_BLOCK", threads)
    x, gy = rng.normal(size=(2, 3, 7, 5)), rng.normal(size=(2, 4, 7, 5))
    gW = standin.empty((4, 3, 3, 3))
    gpu.PRIMITIVES.direct_weight_grad(dev(x), dev(gy), gW)
    want = np.empty((4, 3, 3, 3))
    from minivgg.kernels.cpu import direct as cpu_direct
    cpu_direct.direct_weight_grad(x, gy, want)
    assert_close(host(gW), want, "conv2d", np.float64)
    again = standin.empty((4, 3, 3, 3))
    gpu.PRIMITIVES.direct_weight_grad(dev(x), dev(gy), again)
    np.testing.assert_array_equal(host(again), host(gW))


@pytest.mark.parametrize("algorithm", ["im2col", "winograd4"])
def test_training_steps_upload_at_most_the_gradient_table(algorithm, gpu, monkeypatch,
                                                         rng):
    """After the first step, a step copies at most one small table from the host: the SGD
    tables of parameter and velocity addresses and the offsets are cached by the arrays'
    addresses, and Winograd's matrices are constants in winograd.cu. Only the gradients'
    address table is sent again when the pool hands the new gradients other addresses.
    (Before: four tables per step, and four matrices per Winograd call.)"""
    import minivgg
    from minivgg import backend, functional as F, models, optim
    use_standin(monkeypatch, gpu)
    backend.set_conv_algorithm(algorithm)
    monkeypatch.setattr(backend, "_conv_algorithm", algorithm)
    model = models.vgg("A", seed=0, num_classes=10, width=1 / 16, fc_width=16,
                       input_size=32).to("cuda")
    model.eval()  # no dropout masks
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = minivgg.Tensor(backend.to_device(rng.normal(size=(2, 3, 32, 32)).astype(np.float32),
                                         "cuda"))
    labels = backend.to_device(np.array([1, 7]), "cuda")
    uploads = []
    for _ in range(3):
        before = standin.transfers["host_to_device"]
        opt.zero_grad()
        F.cross_entropy(model(x), labels).backward()
        opt.step()
        uploads.append(standin.transfers["host_to_device"] - before)
    assert max(uploads[1:]) <= 1, uploads


# ----------------------------------------------------------------------------------------
# The register-blocked direct convolution (blocked.cu), against the naive float64 loops
# ----------------------------------------------------------------------------------------
#
# `CudaPrimitives.blocked_conv2d_forward` / `blocked_conv2d_backward` against the loops of
# tests/test_ops.py (forward) and tests/test_blocked_grad.py (gradients). Shapes chosen
# against the blocking: channel counts that are not multiples of the 8-channel chunk or the
# 16-channel tiles, maps narrower and wider than the 8 × 32 forward tile and the 32-column
# gradient segment, odd sizes, batch 1, 1×1 maps; grids of 1 and 3 blocks, so each block
# loops over many tiles; the weight gradient's row ranges one row each, crossing images, or
# one for all.

# (N, C, H, W, OC)
BLOCKED_SHAPES = {
    "rgb_odd": (2, 3, 7, 5, 5),
    "c17_two_tiles_each_way": (1, 17, 9, 35, 20),
    "one_pixel": (1, 9, 1, 1, 3),
    "one_channel_in_and_out": (3, 1, 5, 4, 1),
}


def random_blocked_case(shape, dtype, seed=0):
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
@pytest.mark.parametrize("shape", BLOCKED_SHAPES.values(), ids=BLOCKED_SHAPES.keys())
def test_cuda_blocked_conv_and_gradients_match_naive_loops(shape, dtype, gpu):
    x, Wt, b, gy = random_blocked_case(shape, dtype)
    assert_matches_naive_loops(blocked_on_gpu(gpu, x, Wt, b, gy), x, Wt, b, gy, dtype)


@pytest.mark.parametrize("blocks", [1, 3])
def test_cuda_blocked_kernels_loop_over_tiles_on_a_tiny_grid(blocks, gpu, monkeypatch):
    """Every kernel's grid-stride loop: 1 or 3 blocks for 16 forward tiles, 36 gradient
    jobs and the sum's 1377 entries."""
    monkeypatch.setattr(gpu, "MAX_BLOCKS", blocks)
    x, Wt, b, gy = random_blocked_case((2, 17, 9, 35, 20), np.float64, seed=1)
    assert_matches_naive_loops(blocked_on_gpu(gpu, x, Wt, b, gy), x, Wt, b, gy, np.float64)


@pytest.mark.parametrize("grad_blocks", [1, 3, 512])  # one range; 3 ranges; one row each
def test_cuda_blocked_weight_grad_is_the_same_for_any_row_ranges(grad_blocks, gpu,
                                                                  monkeypatch):
    """The (image, row) axis cut into 1 range (bands of 4 rows written straight into gW),
    3 ranges of 6 rows (the second crosses from image 0 into image 1), or 18 of one row:
    within float64 rounding of the naive loop, and the same bits from call to call."""
    monkeypatch.setattr(gpu, "BLOCKED_GRAD_BLOCKS", grad_blocks)
    x, Wt, _, gy = random_blocked_case((2, 5, 9, 6, 4), np.float64, seed=2)
    prims = gpu.PRIMITIVES
    gx, gW, gb = prims.blocked_conv2d_backward(dev(x), dev(Wt), dev(gy), False)
    assert gx is None
    assert_close(host(gW), naive_conv2d_grads(x, Wt, gy)[1], "conv2d", np.float64)
    again = prims.blocked_conv2d_backward(dev(x), dev(Wt), dev(gy), False)[1]
    np.testing.assert_array_equal(host(again), host(gW))


def test_cuda_blocked_forward_reads_strided_filters_and_no_bias(gpu):
    """A filter view with swapped axes (the kernel reads raw memory: it must get a copy)
    and b=None."""
    x, Wt, _, _ = random_blocked_case((2, 4, 6, 7, 3), np.float32, seed=3)
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
