"""CPU and GPU agree: every op forward and backward, a VGG training step, moving tensors,
modules, optimizer state and checkpoints between devices.

The agreement tests need a GPU (mark `gpu`, skipped cleanly without one): each runs the same
float32 computation on "cpu" and "cuda" and compares with the one tolerance table in
conftest.py. The tests at the end run everywhere: the device-independent parts (prefetch
on the CPU, the clear error where CUDA is missing). test_ops.py and test_tensor_ops.py
already run every op on both devices against PyTorch and naive loops;
test_cuda_kernels_emulated.py runs the CUDA kernels on the CPU.
"""

import numpy as np
import pytest

import minivgg
from conftest import assert_close, tensor, to_numpy
from minivgg import backend, checkpoint, functional as F, models, nn, optim
from minivgg.prefetch import to_device_batches


@pytest.fixture
def cuda():
    """The device name "cuda", or a clean skip where CuPy sees no GPU."""
    if not backend.cuda_available():
        pytest.skip("no CUDA GPU visible to CuPy")
    return "cuda"


def _forward_backward(fn, arrays, device, seed=0):
    """fn(*tensors) on `device` -> (output, [input gradients]) as host arrays, with the
    output gradient a fixed random projection: L = sum(y * r)."""
    xs = [tensor(a, device, requires_grad=True) for a in arrays]
    y = fn(*xs)
    r = np.random.default_rng(seed).normal(size=y.shape).astype(y.dtype)
    y.backward(backend.to_device(r, device))
    return to_numpy(y), [to_numpy(x.grad) for x in xs]


def _assert_devices_agree(op, fn, arrays, cuda):
    arrays = [np.asarray(a, dtype=np.float32) for a in arrays]
    y_cpu, g_cpu = _forward_backward(fn, arrays, "cpu")
    y_gpu, g_gpu = _forward_backward(fn, arrays, cuda)
    assert_close(y_gpu, y_cpu, op, np.float32, f"{op}: forward")
    for i, (a, b) in enumerate(zip(g_gpu, g_cpu)):
        assert_close(a, b, op, np.float32, f"{op}: gradient of input {i}")


# ----------------------------------------------------------------------------------------
# Every op, forward and backward, CPU vs GPU
# ----------------------------------------------------------------------------------------

CONV_CASES = {  # x shape, W shape, stride, padding
    "conv3-s1-p1": ((2, 3, 9, 7), (4, 3, 3, 3), 1, 1),
    "conv1": ((2, 5, 6, 6), (3, 5, 1, 1), 1, 0),
    "conv7-p0": ((1, 2, 9, 9), (3, 2, 7, 7), 1, 0),
    "conv3-s2-odd": ((1, 3, 11, 8), (2, 3, 3, 3), 2, 1),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_agrees_on_cpu_and_gpu(case, cuda, rng):
    x_shape, w_shape, stride, padding = CONV_CASES[case]
    arrays = [rng.normal(size=x_shape), rng.normal(size=w_shape), rng.normal(size=w_shape[0])]
    _assert_devices_agree("conv2d", lambda x, W, b: F.conv2d(x, W, b, stride, padding),
                          arrays, cuda)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel_size, stride, shape",
                         [(2, 2, (2, 3, 8, 8)), (2, 2, (1, 2, 7, 9)), (3, 2, (2, 2, 9, 7))])
def test_max_pool2d_agrees_on_cpu_and_gpu(kernel_size, stride, shape, cuda, rng):
    x = rng.integers(-3, 4, size=shape)  # NOTE: ties, so both devices must pick the first
    _assert_devices_agree("max_pool2d", lambda x: F.max_pool2d(x, kernel_size, stride), [x],
                          cuda)


@pytest.mark.gpu
def test_relu_agrees_on_cpu_and_gpu(cuda, rng):
    x = rng.normal(size=(2, 3, 5, 4))
    x[0, 0, 0, :2] = 0.0  # the gradient at exactly 0 is 0 on both
    _assert_devices_agree("relu", F.relu, [x], cuda)


@pytest.mark.gpu
@pytest.mark.parametrize("alpha_over_n", [False, True])
def test_local_response_norm_agrees_on_cpu_and_gpu(alpha_over_n, cuda, rng):
    x = rng.normal(size=(2, 7, 4, 3)) * 10  # large enough that the normaliser matters
    _assert_devices_agree(
        "local_response_norm",
        lambda x: F.local_response_norm(x, 5, 1e-4, 0.75, 2.0, alpha_over_n), [x], cuda)


@pytest.mark.gpu
def test_linear_agrees_on_cpu_and_gpu(cuda, rng):
    arrays = [rng.normal(size=(3, 20)), rng.normal(size=(7, 20)), rng.normal(size=7)]
    _assert_devices_agree("linear", F.linear, arrays, cuda)


@pytest.mark.gpu
def test_cross_entropy_agrees_on_cpu_and_gpu(cuda, rng):
    logits = rng.normal(size=(5, 11)) * 4
    logits[0, :3] = [1000.0, -1000.0, 999.0]
    labels = np.array([0, 3, 10, 2, 7])
    _assert_devices_agree("cross_entropy",
                          lambda z: F.cross_entropy(z, backend.to_device(labels, z.device)),
                          [logits], cuda)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["add", "mul", "sub", "div"])
def test_elementwise_ops_agree_on_cpu_and_gpu(op, cuda, rng):
    a, b = rng.normal(size=(3, 4)), rng.uniform(1, 2, size=(4,))
    _assert_devices_agree("elementwise", getattr(F, op), [a, b], cuda)


@pytest.mark.gpu
def test_dropout_on_gpu_drops_fraction_p_and_backward_reuses_the_mask(cuda):
    """Masks come from different generators on the two devices (the CPU's NumPy stream,
    the GPU's counter-based hash), so the GPU is checked on its own terms."""
    p = 0.4
    minivgg.manual_seed(3)
    x = tensor(np.ones((200, 100)), cuda, np.float32, requires_grad=True)
    y = F.dropout(x, p)
    y.backward(backend.to_device(np.full((200, 100), 2.0, np.float32), cuda))
    y, g = to_numpy(y), to_numpy(x.grad)
    assert set(np.unique(y)) <= {0.0, np.float32(1 / (1 - p))}
    assert abs((y == 0).mean() - p) < 0.02
    np.testing.assert_array_equal(g, 2.0 * y)
    minivgg.manual_seed(3)
    again = to_numpy(F.dropout(tensor(np.ones((200, 100)), cuda, np.float32), p))
    np.testing.assert_array_equal(again, y)


@pytest.mark.gpu
def test_kernel_table_conv_building_blocks_agree_on_cpu_and_gpu(cuda, rng):
    from minivgg.kernels import cpu
    x = rng.normal(size=(2, 3, 7, 6)).astype(np.float32)
    args = (3, 3, 2, 1, 1, 1)
    kern = backend.kernels_for(backend.to_device(x, cuda))
    assert kern.__name__ == "minivgg.kernels.gpu"
    cols = kern.im2col(backend.to_device(x, cuda), *args)
    np.testing.assert_array_equal(to_numpy(cols), cpu.im2col(x, *args))
    g = rng.normal(size=cols.shape).astype(np.float32)
    assert_close(kern.col2im(backend.to_device(g, cuda), x.shape, *args),
                 cpu.col2im(g, x.shape, *args), "conv2d", np.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("algorithm", ["winograd", "winograd4", "direct", pytest.param(
    "blocked", marks=pytest.mark.skipif("blocked" not in backend.CONV_ALGORITHMS,
                                        reason="'blocked' is not a conv algorithm here"))])
def test_conv_algorithms_agree_on_cpu_and_gpu(algorithm, cuda, rng):
    """Winograd's transforms and the direct kernels on the GPU against the CPU's, forward and
    backward, on an odd, non-square shape (the emulated twin of this test runs in CI)."""
    from minivgg.kernels import cpu
    x = rng.normal(size=(3, 5, 9, 7)).astype(np.float32)
    W = rng.normal(size=(6, 5, 3, 3)).astype(np.float32)
    b = rng.normal(size=6).astype(np.float32)
    gy = rng.normal(size=(3, 6, 9, 7)).astype(np.float32)
    kern = backend.kernels_for(backend.to_device(x, cuda))
    d = [backend.to_device(a, cuda) for a in (x, W, b, gy)]
    args = ((1, 1), (1, 1))
    assert_close(kern.conv2d_forward(d[0], d[1], d[2], *args, algorithm),
                 cpu.conv2d_forward(x, W, b, *args, algorithm), "conv2d", np.float32)
    for got, want in zip(kern.conv2d_backward(d[0], d[1], d[3], *args, True, algorithm),
                         cpu.conv2d_backward(x, W, gy, *args, True, algorithm)):
        assert_close(got, want, "conv2d", np.float32)


@pytest.mark.gpu
def test_blocked_kernels_agree_with_the_cpu_and_repeat_bit_for_bit(cuda, rng):
    """blocked.cu's forward, input and weight gradients on a shape of several tiles and
    channel blocks each way, against the CPU's direct convolution; a second call gives the
    same bits (its sums have a fixed order, whatever the GPU's threads do at once)."""
    from minivgg.kernels import cpu
    x = rng.normal(size=(2, 20, 37, 70)).astype(np.float32)
    W = (rng.normal(size=(33, 20, 3, 3)) / np.sqrt(180)).astype(np.float32)
    b = rng.normal(size=33).astype(np.float32)
    gy = rng.normal(size=(2, 33, 37, 70)).astype(np.float32)
    d = [backend.to_device(a, cuda) for a in (x, W, b, gy)]
    prims = backend.kernels_for(d[0]).PRIMITIVES

    def run():
        y = prims.blocked_conv2d_forward(d[0], d[1], d[2])
        return [to_numpy(a) for a in (y, *prims.blocked_conv2d_backward(d[0], d[1], d[3], True))]

    first, second = run(), run()
    args = ((1, 1), (1, 1))
    want = [cpu.conv2d_forward(x, W, b, *args, "direct"),
            *cpu.conv2d_backward(x, W, gy, *args, True, "direct")]
    for got, again, expected in zip(first, second, want):
        assert_close(got, expected, "conv2d", np.float32)
        np.testing.assert_array_equal(again, got)


@pytest.mark.gpu
def test_tf32_switch_changes_what_cublas_computes(cuda, rng):
    """A float32 fc product off the tensor cores' TF32 is float32-accurate; with TF32 on its
    inputs lose 13 mantissa bits (errors about 1e-3); Winograd's GEMMs never do."""
    a = rng.normal(size=(256, 512)).astype(np.float32)
    b = rng.normal(size=(512, 128)).astype(np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    kern = backend.kernels_for(backend.to_device(a, cuda))

    def error():
        y = kern.fc_matmul(backend.to_device(a, cuda), backend.to_device(b, cuda))
        return np.abs(to_numpy(y) - exact).max() / np.abs(exact).max()

    assert not backend.tf32_enabled()  # off by default
    assert error() < 1e-5
    try:
        backend.set_tf32(True)
        assert backend.tf32_enabled() and 1e-5 < error() < 1e-2
    finally:
        backend.set_tf32(False)
    assert error() < 1e-5


# ----------------------------------------------------------------------------------------
# A whole training step
# ----------------------------------------------------------------------------------------

def _small_vgg(config="A-LRN"):
    model = models.vgg(config, num_classes=10, width=1 / 16, fc_width=32, input_size=32,
                       seed=0)
    # NOTE: dropout masks differ between devices by design (see the dropout test above), so
    # the step is compared without them.
    for _, m in model.named_modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _train_step(model, opt, x, labels):
    opt.zero_grad()
    loss = F.cross_entropy(model(minivgg.Tensor(x)), labels)
    loss.backward()
    grads = {k: to_numpy(p.grad) for k, p in model.named_parameters()}
    opt.step()
    return float(loss.item()), grads


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["A-LRN", "C"])
def test_vgg_training_step_gives_the_same_result_on_cpu_and_gpu(config, cuda, rng):
    x = rng.normal(size=(4, 3, 32, 32)).astype(np.float32)
    labels = np.array([1, 0, 9, 4])
    results = {}
    for device in ("cpu", cuda):
        model = _small_vgg(config).to(device)
        opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        steps = [_train_step(model, opt, backend.to_device(x, device),
                             backend.to_device(labels, device)) for _ in range(2)]
        results[device] = steps, model.state_dict(), opt.state_dict()["velocities"]
    (steps_cpu, state_cpu, v_cpu), (steps_gpu, state_gpu, v_gpu) = results["cpu"], results[cuda]
    for (loss_cpu, grads_cpu), (loss_gpu, grads_gpu) in zip(steps_cpu, steps_gpu):
        assert_close(loss_gpu, loss_cpu, "model", np.float32, "loss")
        for k in grads_cpu:
            assert_close(grads_gpu[k], grads_cpu[k], "model", np.float32, f"grad {k}")
    for k in state_cpu:
        assert_close(state_gpu[k], state_cpu[k], "model", np.float32, f"weight {k}")
    for a, b in zip(v_gpu, v_cpu):
        assert_close(a, b, "model", np.float32, "velocity")


# ----------------------------------------------------------------------------------------
# Moving things between devices
# ----------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_tensor_to_moves_data_and_back_unchanged(cuda, rng):
    a = rng.normal(size=(3, 4)).astype(np.float32)
    t = minivgg.Tensor(a, requires_grad=True)
    g = t.to(cuda)
    assert g.device == "cuda" and g.requires_grad and g.dtype == np.float32
    assert g.to(cuda) is g  # already there
    back = g.to("cpu")
    assert back.device == "cpu" and isinstance(back.data, np.ndarray)
    np.testing.assert_array_equal(back.data, a)


@pytest.mark.gpu
def test_module_to_moves_parameters_and_gradients(cuda):
    model = _small_vgg()
    for p in model.parameters():
        p.grad = np.ones(p.shape, dtype=p.dtype)
    before = model.state_dict()
    model.to(cuda)
    assert all(p.device == "cuda" and backend.device_of(p.grad) == "cuda"
               for p in model.parameters())
    model.to("cpu")
    assert all(isinstance(p.data, np.ndarray) for p in model.parameters())
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


@pytest.mark.gpu
def test_optimizer_momentum_follows_the_model_to_another_device(cuda, rng):
    x = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
    labels = np.array([3, 5])
    model = _small_vgg()
    opt = optim.SGD(model.parameters(), lr=0.05)
    _train_step(model, opt, x, labels)  # momentum buffers now live on the CPU
    model.to(cuda)
    _train_step(model, opt, backend.to_device(x, cuda), backend.to_device(labels, cuda))
    assert all(backend.device_of(v) == "cuda" for v in opt.velocities)


@pytest.mark.gpu
def test_checkpoint_saved_from_gpu_loads_on_cpu(cuda, rng, tmp_path):
    x = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
    labels = np.array([3, 5])
    model = _small_vgg().to(cuda)
    opt = optim.SGD(model.parameters(), lr=0.05)
    _train_step(model, opt, backend.to_device(x, cuda), backend.to_device(labels, cuda))
    path = tmp_path / "gpu.npz"
    checkpoint.save(path, model.state_dict(), opt.state_dict(), {"epoch": 1})

    model_state, opt_state, meta = checkpoint.load(path)
    cpu_model = _small_vgg()
    cpu_model.load_state_dict(model_state)
    cpu_opt = optim.SGD(cpu_model.parameters(), lr=0.05)
    cpu_opt.load_state_dict(opt_state)
    for (k, p), (_, q) in zip(model.named_parameters(), cpu_model.named_parameters()):
        assert isinstance(q.data, np.ndarray)
        np.testing.assert_array_equal(q.data, to_numpy(p.data), err_msg=k)
    for v_gpu, v_cpu in zip(opt.velocities, cpu_opt.velocities):
        np.testing.assert_array_equal(v_cpu, to_numpy(v_gpu))
    # and the next step continues identically on both devices
    loss_gpu, _ = _train_step(model, opt, backend.to_device(x, cuda),
                              backend.to_device(labels, cuda))
    loss_cpu, _ = _train_step(cpu_model, cpu_opt, x, labels)
    assert_close(loss_gpu, loss_cpu, "model", np.float32, "loss after reload")


@pytest.mark.gpu
def test_prefetch_yields_the_same_batches_on_the_gpu(cuda, rng):
    batches = [(rng.normal(size=(n, 3, 8, 8)).astype(np.float32), rng.integers(0, 10, n))
               for n in (4, 4, 4, 2)]  # a short last batch, as from a DataLoader
    out = list(to_device_batches(iter(batches), cuda))
    assert len(out) == len(batches)
    for (x, y), (xd, yd) in zip(batches, out):
        assert backend.device_of(xd) == "cuda" and backend.device_of(yd) == "cuda"
        np.testing.assert_array_equal(to_numpy(xd), x)
        np.testing.assert_array_equal(to_numpy(yd), y)


# ----------------------------------------------------------------------------------------
# Everywhere
# ----------------------------------------------------------------------------------------

def test_prefetch_passes_host_batches_through_on_the_cpu(rng):
    batches = [(rng.normal(size=(2, 3)), np.arange(2)) for _ in range(3)]
    out = list(to_device_batches(iter(batches), "cpu"))
    assert all(a[0] is b[0] and a[1] is b[1] for a, b in zip(out, batches))


def test_asking_for_cuda_without_a_gpu_says_what_is_missing():
    if backend.cuda_available():
        pytest.skip("a GPU is available here")
    with pytest.raises(RuntimeError, match="cuda.*not available.*cupy"):
        backend.check_device("cuda")
    with pytest.raises(RuntimeError, match="not available"):
        minivgg.Tensor(np.zeros(2)).to("cuda")
    with pytest.raises(RuntimeError, match="not available"):
        list(to_device_batches(iter([(np.zeros(2), np.zeros(2))]), "cuda"))
