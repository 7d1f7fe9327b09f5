"""The fused ops of `minivgg.fused` and the kernels behind them: bit for bit the two ops.

* kernels: `relu_max_pool2d_forward` / `_backward` against `relu_forward` then
  `max_pool2d_forward`, and `max_pool2d_backward` then `relu_backward`, on NaN, -0.0, ties,
  windows with no positive value, odd sizes, ceil mode and overlapping windows;
  `relu_forward` in place;
* ops: `conv2d_relu` (every conv algorithm) and `relu_max_pool2d` against the two ops of
  `minivgg.functional`, values and gradients, on every device;
* models: `Sequential.forward` (which picks the fused ops) against the layers run one at a
  time, logits and every parameter's gradient, float32 and float64.
"""

import numpy as np
import pytest

from minivgg import Tensor, backend, functional as F, fused, models
from minivgg.kernels import cpu
from conftest import tensor, to_numpy

DTYPES = [np.float32, np.float64]


def bits(a):
    """The array's bits as integers: equal bits, not just equal values (-0.0, NaN)."""
    a = to_numpy(a)
    return a.view(f"i{a.itemsize}")


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [((2, 3, 8, 10), 2, 2, False), ((2, 3, 7, 9), 2, 2, False),
                                  ((2, 3, 7, 9), 2, 2, True), ((1, 2, 9, 8), 3, 2, False),
                                  ((2, 2, 7, 7), 3, 2, True), ((64, 17, 16, 16), 2, 2, False)])
def test_relu_max_pool2d_kernels_are_relu_then_max_pool_bit_for_bit(case, dtype, monkeypatch):
    """One pass for 2×2/s2 whole windows, the general kernels otherwise: the bits of the
    two passes, forward and backward (-0.0, NaN and inf in the gradient too)."""
    monkeypatch.setenv("NUMBA_NUM_THREADS", "2")
    shape, K, s, ceil_mode = case
    rng = np.random.default_rng(21)
    x = rng.standard_normal(shape).astype(dtype)
    x[0, 0, :2, :2] = [[-1.0, -2.0], [-0.5, -3.0]]  # all negative: ties at 0 after the ReLU
    x[0, 0, 2:4, :2] = [[-0.0, 0.0], [0.0, -0.0]]
    x[-1, -1, 0, 0], x[0, -1, 1, 1] = np.nan, np.nan
    x[-1, 0, 2:4, 2:4] = np.float64(-np.nan)
    y, arg = cpu.relu_max_pool2d_forward(x, (K, K), (s, s), ceil_mode)
    r = cpu.relu_forward(x)
    want_y, want_arg = cpu.max_pool2d_forward(r, (K, K), (s, s), ceil_mode)
    np.testing.assert_array_equal(bits(y), bits(want_y))
    np.testing.assert_array_equal(arg, want_arg)
    gy = rng.standard_normal(y.shape).astype(dtype)
    flat = gy.reshape(-1)
    flat[::5], flat[1::7], flat[2::11] = -0.0, np.nan, np.inf
    gy[0, 0, 0, 0] = -1.0  # the winner of an all-negative window: -1 * 0 is -0.0
    gx = cpu.relu_max_pool2d_backward(gy, arg, y, x.shape, (K, K), (s, s))
    want = cpu.relu_backward(r, cpu.max_pool2d_backward(gy, arg, x.shape, (K, K), (s, s)))
    np.testing.assert_array_equal(bits(gx), bits(want))


def test_relu_forward_in_place_and_a_bad_output_array():
    rng = np.random.default_rng(22)
    x = rng.standard_normal((3, 70_001)).astype(np.float32)  # above INLINE_ELEMENTS
    x[0, :3] = [np.nan, -0.0, 0.0]
    want = cpu.relu_forward(x)
    assert cpu.relu_forward(x, x) is x
    np.testing.assert_array_equal(bits(x), bits(want))
    for bad in (np.empty((3, 70_000), np.float32), np.empty((3, 70_001), np.float64),
                np.empty((70_001, 3), np.float32).T):
        with pytest.raises(ValueError, match="relu_forward: the output must be"):
            cpu.relu_forward(x, bad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [((2, 3, 8, 6), 2, 2, False), ((1, 2, 9, 7), 3, 2, True)])
def test_cuda_twins_of_the_fused_kernels_match_the_cpu_bit_for_bit(case, dtype, rng):
    """kernels/gpu.py's relu_max_pool2d_* and in-place relu_forward, on the host emulator
    (tests/test_cuda_kernels_emulated.py): forward gives the CPU table's bits, backward
    those of the GPU's own two kernels (its relu_backward selects, 0 or gy, where the CPU's
    multiplies: the two tables differ in the sign of some zeros)."""
    from cuda_host_emulator import have_compiler, load_emulated_cuda_kernels
    if not have_compiler():
        pytest.skip("g++ not found")
    import standin_cupy as standin
    gpu, dev, host = load_emulated_cuda_kernels(), standin.asarray, standin.asnumpy
    standin.reset()
    shape, K, s, ceil_mode = case
    x = rng.integers(-3, 4, size=shape).astype(dtype)  # ties, zeros, windows of negatives
    y, arg = gpu.relu_max_pool2d_forward(dev(x), (K, K), (s, s), ceil_mode)
    y_cpu, arg_cpu = cpu.relu_max_pool2d_forward(x, (K, K), (s, s), ceil_mode)
    np.testing.assert_array_equal(bits(host(y)), bits(y_cpu))
    np.testing.assert_array_equal(host(arg), arg_cpu)
    gy = rng.normal(size=y_cpu.shape).astype(dtype)
    gy.reshape(-1)[::3] = -gy.reshape(-1)[::3]
    gx = gpu.relu_max_pool2d_backward(dev(gy), arg, y, shape, (K, K), (s, s))
    want = gpu.relu_backward(gpu.relu_forward(dev(x)),
                             gpu.max_pool2d_backward(dev(gy), arg, shape, (K, K), (s, s)))
    np.testing.assert_array_equal(bits(host(gx)), bits(host(want)))
    xd = dev(x)
    assert gpu.relu_forward(xd, xd) is xd
    np.testing.assert_array_equal(bits(host(xd)), bits(cpu.relu_forward(x)))
    assert not standin.hazards, standin.hazards


# ----------------------------------------------------------------------------------------
# Ops, values and gradients
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [((2, 3, 8, 10), 2, None, False), ((2, 3, 7, 9), 2, None, True),
                                  ((1, 2, 9, 8), 3, 2, False)])
def test_relu_max_pool2d_is_relu_then_max_pool2d_bit_for_bit(case, dtype, device, rng):
    shape, k, s, ceil_mode = case
    x = rng.normal(size=shape)
    x[0, 0, :2, :2] = -1.0  # a window of negatives: all 0 after the ReLU, a tie
    r = rng.normal(size=F.max_pool2d(np.zeros(shape), k, s, ceil_mode).shape)
    got, want = tensor(x, device, dtype, True), tensor(x, device, dtype, True)
    y = fused.relu_max_pool2d(got, k, s, ceil_mode)
    (y * tensor(r, device, dtype)).sum().backward()
    y2 = F.max_pool2d(F.relu(want), k, s, ceil_mode)
    (y2 * tensor(r, device, dtype)).sum().backward()
    np.testing.assert_array_equal(bits(y), bits(y2))
    np.testing.assert_array_equal(bits(got.grad), bits(want.grad))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", backend.CONV_ALGORITHMS)
def test_conv2d_relu_is_conv2d_then_relu_bit_for_bit(algorithm, dtype, device, rng):
    backend.set_conv_algorithm(algorithm)  # the conftest puts im2col back
    x, W, b = rng.normal(size=(2, 3, 6, 5)), rng.normal(size=(4, 3, 3, 3)), rng.normal(size=4)
    r = rng.normal(size=(2, 4, 6, 5))
    grads = []
    for op in (fused.conv2d_relu, lambda *a, **k: F.relu(F.conv2d(*a, **k))):
        args = [tensor(a, device, dtype, True) for a in (x, W, b)]
        y = op(*args, padding=1)
        (y * tensor(r, device, dtype)).sum().backward()
        grads.append([y] + [a.grad for a in args])
    for got, want in zip(*grads):
        np.testing.assert_array_equal(bits(got), bits(want))


def test_fused_ops_check_their_arguments_as_the_plain_ops_do():
    x = Tensor(np.zeros((1, 2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="pool3: input shape .* is smaller than the 5x5"):
        fused.relu_max_pool2d(x, 5, where="pool3")
    with pytest.raises(ValueError, match="conv1_1: input has 2 channels but the weight"):
        fused.conv2d_relu(x, Tensor(np.zeros((4, 3, 3, 3), np.float32)), where="conv1_1")


# ----------------------------------------------------------------------------------------
# Models: Sequential.forward picks the fused ops
# ----------------------------------------------------------------------------------------

def _ops_in_graph(out):
    """The names of the op classes that made `out` (before backward clears the graph)."""
    names, todo = set(), [out.creator]
    while todo:
        fn = todo.pop()
        names.add(type(fn).__name__)
        todo += [t.creator for t in fn.inputs if t.creator is not None]
    return names


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config, size, ceil_mode", [("A", 32, False), ("A-LRN", 40, False),
                                                     ("B", 72, True)])
def test_forward_fuses_relus_and_equals_the_layers_one_by_one_bit_for_bit(config, size,
                                                                          ceil_mode, dtype):
    """Logits and every parameter's gradient keep the bits of the layers run one at a
    time, and `activations()` still gives each ReLU layer's own output."""
    model = models.vgg(config, 10, 0.25, 32, size, init="glorot", seed=0, dtype=dtype,
                       ceil_mode=ceil_mode)
    model.eval()  # no dropout: both passes must see the same network
    x = np.random.default_rng(3).standard_normal((2, 3, size, size)).astype(dtype)
    results, ops = [], []
    for fused_pass in (True, False):
        model.zero_grad()
        h = Tensor(x)
        if fused_pass:
            h = model(h)
        else:
            for layer in model:
                h = layer(h)
        ops.append(_ops_in_graph(h))
        (h * h).sum().backward()
        results.append([h.data] + [p.grad for p in model.parameters()])
    assert {"ReLUMaxPool2d", "Conv2dReLU"} <= ops[0]
    assert not {"ReLUMaxPool2d", "Conv2dReLU"} & ops[1]
    for got, want in zip(*results):
        np.testing.assert_array_equal(bits(got), bits(want))
    relu = model.activations(Tensor(x), ["relu1_1"])["relu1_1"]
    assert type(relu.creator) is F.ReLU and relu.data.min() >= 0
