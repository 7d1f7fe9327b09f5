"""The CUDA kernel table, run on the CPU through the host emulator, against kernels/cpu/.

No GPU needed: `cuda_host_emulator` compiles `kernels/cuda/*.cu` with g++ and loads
`kernels/cuda.py` on NumPy arrays, so these tests check the CUDA kernels' index arithmetic
and the launch code (argument order and C types) in CI. On a GPU machine, test_gpu.py runs
the same comparisons on the real device.
"""

import numpy as np
import pytest

from conftest import assert_close
from cuda_host_emulator import have_compiler, load_emulated_cuda_kernels
from minivgg.kernels import common, cpu
from minivgg.kernels.cpu import conv as cpu_conv

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
    """`kernels/cuda.py` running on NumPy arrays with host-compiled CUDA kernels."""
    return load_emulated_cuda_kernels()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_cuda_im2col_and_col2im_match_cpu(case, dtype, gpu, rng):
    shape, (KH, KW), (SH, SW), (PH, PW) = CONV_CASES[case]
    x = rng.normal(size=shape).astype(dtype)
    cols = gpu.im2col(x, KH, KW, SH, SW, PH, PW)
    np.testing.assert_array_equal(cols, cpu.im2col(x, KH, KW, SH, SW, PH, PW))
    g = rng.normal(size=cols.shape).astype(dtype)
    assert_close(gpu.col2im(g, shape, KH, KW, SH, SW, PH, PW),
                 cpu.col2im(g, shape, KH, KW, SH, SW, PH, PW), "conv2d", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_cuda_conv2d_forward_and_backward_match_cpu(case, dtype, gpu, rng):
    shape, (KH, KW), stride, padding = CONV_CASES[case]
    x = rng.normal(size=shape).astype(dtype)
    W = rng.normal(size=(5, shape[1], KH, KW)).astype(dtype)
    b = rng.normal(size=5).astype(dtype)
    y = gpu.conv2d_forward(x, W, b, stride, padding)
    assert_close(y, cpu.conv2d_forward(x, W, b, stride, padding), "conv2d", dtype)
    gy = rng.normal(size=y.shape).astype(dtype)
    for got, want in zip(gpu.conv2d_backward(x, W, gy, stride, padding, True),
                         cpu.conv2d_backward(x, W, gy, stride, padding, True)):
        assert_close(got, want, "conv2d", dtype)


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 18 * 25 * 4 // 2])  # row bands; 1.5 images
def test_cuda_conv2d_matches_cpu_for_any_chunking(chunk_bytes, gpu, monkeypatch, rng):
    x = rng.normal(size=(3, 2, 5, 5)).astype(np.float32)
    W = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    b = rng.normal(size=4).astype(np.float32)
    gy = rng.normal(size=(3, 4, 5, 5)).astype(np.float32)
    monkeypatch.setattr(gpu, "IM2COL_CHUNK_BYTES", chunk_bytes)
    assert len(common.conv_chunks(3, 5, 5, 18, 4, gpu.IM2COL_CHUNK_BYTES)) > 1
    assert_close(gpu.conv2d_forward(x, W, b, (1, 1), (1, 1)),
                 cpu.conv2d_forward(x, W, b, (1, 1), (1, 1)), "conv2d", np.float32)
    for got, want in zip(gpu.conv2d_backward(x, W, gy, (1, 1), (1, 1), True),
                         cpu.conv2d_backward(x, W, gy, (1, 1), (1, 1), True)):
        assert_close(got, want, "conv2d", np.float32)


@pytest.mark.parametrize("n0, n1, oy0, oy1", [(0, 2, 0, 4), (1, 2, 1, 3), (0, 1, 3, 4)])
def test_cuda_chunk_moves_match_cpu(n0, n1, oy0, oy1, gpu, rng):
    """im2col_chunk, col2im_chunk, cols_to_nchw and nchw_to_cols on a band of rows."""
    x = rng.normal(size=(2, 3, 8, 7))
    KH, KW, SH, SW, PH, PW = 3, 2, 2, 1, 1, 0
    OW = common.conv_output_size(7, KW, SW, PW)  # OH = 4
    P = (n1 - n0) * (oy1 - oy0) * OW
    cols, cols_cpu = np.empty((3 * KH * KW, P)), np.empty((3 * KH * KW, P))
    gpu.im2col_chunk(x, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, cols)
    cpu_conv.im2col_chunk(x, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, cols_cpu)
    np.testing.assert_array_equal(cols, cols_cpu)
    gx, gx_cpu = np.ones(x.shape), np.ones(x.shape)  # both add into what is there
    gpu.col2im_chunk(cols, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, gx)
    cpu_conv.col2im_chunk(cols, n0, n1, oy0, oy1, KH, KW, SH, SW, PH, PW, gx_cpu)
    assert_close(gx, gx_cpu, "conv2d", np.float64)
    ycols, b = rng.normal(size=(5, P)), rng.normal(size=5)
    y, y_cpu = np.zeros((2, 5, 4, OW)), np.zeros((2, 5, 4, OW))
    gpu.cols_to_nchw(ycols, b, n0, n1, oy0, oy1, y)
    cpu_conv.cols_to_nchw(ycols, b, n0, n1, oy0, oy1, y_cpu)
    np.testing.assert_array_equal(y, y_cpu)
    back, back_cpu = np.empty((5, P)), np.empty((5, P))
    gpu.nchw_to_cols(y, n0, n1, oy0, oy1, back)
    cpu_conv.nchw_to_cols(y, n0, n1, oy0, oy1, back_cpu)
    np.testing.assert_array_equal(back, back_cpu)


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_CASES)
def test_cuda_max_pool2d_forward_and_backward_match_cpu(case, dtype, ceil_mode, gpu, rng):
    shape, kernel_size, stride = POOL_CASES[case]
    # NOTE: values from a small set, so windows hold ties and the tie rule is exercised
    x = rng.integers(-3, 4, size=shape).astype(dtype)
    y, argmax = gpu.max_pool2d_forward(x, kernel_size, stride, ceil_mode)
    y_cpu, argmax_cpu = cpu.max_pool2d_forward(x, kernel_size, stride, ceil_mode)
    np.testing.assert_array_equal(y, y_cpu)
    np.testing.assert_array_equal(argmax, argmax_cpu)
    gy = rng.normal(size=y.shape).astype(dtype)
    assert_close(gpu.max_pool2d_backward(gy, argmax, shape, kernel_size, stride),
                 cpu.max_pool2d_backward(gy, argmax_cpu, shape, kernel_size, stride),
                 "max_pool2d", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_relu_forward_and_backward_match_cpu(dtype, gpu, rng):
    x = rng.normal(size=(2, 3, 4, 5)).astype(dtype)
    x[0, 0, 0, :3] = [0.0, -0.0, np.nan]  # the NOTE cases: exact zeros and a NaN
    y = gpu.relu_forward(x)
    np.testing.assert_array_equal(y, cpu.relu_forward(x))
    gy = rng.normal(size=x.shape).astype(dtype)
    np.testing.assert_array_equal(gpu.relu_backward(y, gy), cpu.relu_backward(y, gy))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size, channels", [(5, 7), (5, 3), (4, 6), (1, 2)])
def test_cuda_lrn_forward_and_backward_match_cpu(size, channels, dtype, gpu, rng):
    x = rng.normal(size=(2, channels, 3, 4)).astype(dtype)
    alpha, beta, k = 1e-2, 0.75, 2.0  # alpha large enough that the sum matters
    y, scale = gpu.lrn_forward(x, size, alpha, beta, k)
    y_cpu, scale_cpu = cpu.lrn_forward(x, size, alpha, beta, k)
    assert_close(y, y_cpu, "local_response_norm", dtype)
    assert_close(scale, scale_cpu, "local_response_norm", dtype)
    gy = rng.normal(size=x.shape).astype(dtype)
    assert_close(gpu.lrn_backward(x, y, scale, gy, size, alpha, beta),
                 cpu.lrn_backward(x, y_cpu, scale_cpu, gy, size, alpha, beta),
                 "local_response_norm", dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_softmax_cross_entropy_matches_cpu(dtype, gpu, rng):
    logits = (rng.normal(size=(4, 7)) * 3).astype(dtype)
    logits[1] = [1000, -1000, 0, 999, 3, -2, 1]  # stays finite
    labels = np.array([0, 3, 6, 2], dtype=np.int64)
    loss, probs = gpu.softmax_cross_entropy_forward(logits, labels)
    loss_cpu, probs_cpu = cpu.softmax_cross_entropy_forward(logits, labels)
    assert loss.dtype == dtype and np.isfinite(loss)
    assert_close(loss, loss_cpu, "cross_entropy", dtype)
    assert_close(probs, probs_cpu, "cross_entropy", dtype)
    gloss = np.asarray(0.5, dtype=dtype)
    assert_close(gpu.softmax_cross_entropy_backward(probs, labels, gloss),
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
    mask = gpu.dropout_mask(shape, p, np.dtype(dtype), np.random.default_rng(7))
    seed = np.random.default_rng(7).integers(0, 2**64, dtype=np.uint64)
    u = (_splitmix64(seed, np.arange(64 * 50)) >> np.uint64(40)).astype(np.float32) / 2**24
    expected = np.where(u >= np.float32(p), dtype(1 / (1 - p)), dtype(0)).reshape(shape)
    np.testing.assert_array_equal(mask, expected)
    assert mask.dtype == dtype
    assert abs((mask == 0).mean() - p) < 0.03
    again = gpu.dropout_mask(shape, p, np.dtype(dtype), np.random.default_rng(7))
    np.testing.assert_array_equal(mask, again)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_fused_sgd_update_matches_cpu_over_every_parameter(dtype, gpu, rng):
    shapes = [(3, 2, 3, 3), (3,), (0,), (5, 4), (1,)]  # an empty one, sizes not aligned
    params = [rng.normal(size=s).astype(dtype) for s in shapes]
    grads = [rng.normal(size=s).astype(dtype) for s in shapes]
    velocities = [rng.normal(size=s).astype(dtype) for s in shapes]
    params_cpu, velocities_cpu = [a.copy() for a in params], [a.copy() for a in velocities]
    gpu.sgd_update(params, grads, velocities, 0.1, 0.9, 5e-4)
    cpu.sgd_update(params_cpu, grads, velocities_cpu, 0.1, 0.9, 5e-4)
    for got, want in zip(params + velocities, params_cpu + velocities_cpu):
        assert_close(got, want, "sgd", dtype)


def test_cuda_sgd_update_handles_mixed_dtypes_and_casts_gradients(gpu, rng):
    params = [rng.normal(size=4).astype(np.float32), rng.normal(size=3)]
    grads = [rng.normal(size=4), rng.normal(size=3).astype(np.float32)]  # swapped dtypes
    velocities = [np.zeros_like(p) for p in params]
    params_cpu, velocities_cpu = [a.copy() for a in params], [a.copy() for a in velocities]
    gpu.sgd_update(params, grads, velocities, 0.1, 0.9, 5e-4)
    cpu.sgd_update(params_cpu, grads, velocities_cpu, 0.1, 0.9, 5e-4)
    for got, want in zip(params + velocities, params_cpu + velocities_cpu):
        assert got.dtype == want.dtype
        assert_close(got, want, "sgd", got.dtype)


def test_emulated_launch_rejects_a_python_int_for_an_int_parameter(gpu):
    """The emulator's own check: CuPy would pass 3 as a 64-bit value to an `int`."""
    x = np.zeros((1, 1, 2, 2), np.float32)
    kernel = gpu._kernel("relu_forward", np.float32)
    with pytest.raises(TypeError, match="count"):
        kernel((1,), (32,), (x, x, 4))


def test_vgg_training_steps_through_the_cuda_kernel_table_match_cpu(gpu, monkeypatch, rng):
    """Two SGD steps of a small VGG A-LRN (conv, LRN, pool, ReLU, fc, loss, fused SGD) with
    every kernel call routed to the CUDA table."""
    import minivgg
    from minivgg import backend, functional as F, models, nn, optim

    x = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
    labels = np.array([1, 7])

    def train(kernels_for):
        monkeypatch.setattr(backend, "kernels_for", kernels_for)
        model = models.vgg("A-LRN", num_classes=10, width=1 / 16, fc_width=16, input_size=32,
                           seed=0)
        for _, m in model.named_modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0  # the two tables draw different masks by design
        opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        losses = []
        for _ in range(2):
            opt.zero_grad()
            loss = F.cross_entropy(model(minivgg.Tensor(x)), labels)
            loss.backward()
            opt.step()
            losses.append(float(loss.item()))
        return losses, model.state_dict()

    cpu_kernels_for = backend.kernels_for
    losses_gpu, state_gpu = train(lambda a: gpu)
    losses_cpu, state_cpu = train(cpu_kernels_for)
    assert_close(np.array(losses_gpu), np.array(losses_cpu), "model", np.float32)
    for k in state_cpu:
        assert_close(state_gpu[k], state_cpu[k], "model", np.float32, k)
