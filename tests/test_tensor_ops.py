"""Tensor arithmetic, forward and backward, on every device: the elementwise operators
with broadcasting (and Python scalars), reductions, reshape, flatten, matmul and transpose.

The same references as tests/test_ops.py (the layers' ops): `torch.nn.functional` forward
and backward, and float64 central differences (`minivgg.gradcheck`); plus the dtypes that
results and gradients keep.
"""

import numpy as np
import pytest

from minivgg import functional as F
from conftest import compare_with_torch, tensor, to_numpy
from test_ops import DTYPES, gradcheck


# ----------------------------------------------------------------------------------------
# Elementwise arithmetic with broadcasting
# ----------------------------------------------------------------------------------------

BINARY = {
    "add": (lambda a, b: a + b, lambda a, b: a + b),
    "sub": (lambda a, b: a - b, lambda a, b: a - b),
    "mul": (lambda a, b: a * b, lambda a, b: a * b),
    "div": (lambda a, b: a / b, lambda a, b: a / b),
}
BROADCAST_SHAPES = [((2, 3, 4), (2, 3, 4)), ((2, 3, 4), (3, 1)), ((2, 1, 4), (1, 3, 1)),
                    ((5,), (3, 5)), ((1,), (2, 3))]


def _binary_arrays(shape_a, shape_b, rng):
    # keep the divisor away from 0
    return rng.normal(size=shape_a), rng.uniform(0.5, 2.0, size=shape_b) * rng.choice(
        [-1, 1], size=shape_b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", BROADCAST_SHAPES)
@pytest.mark.parametrize("op", list(BINARY))
def test_elementwise_op_with_broadcasting_matches_torch(op, shapes, dtype, device, rng, torch):
    mv, th = BINARY[op]
    compare_with_torch("elementwise", mv, th, list(_binary_arrays(*shapes, rng)), device,
                       dtype, what=f" [{op} {shapes}]")


@pytest.mark.parametrize("shapes", BROADCAST_SHAPES[1:4])
@pytest.mark.parametrize("op", list(BINARY))
def test_elementwise_op_backward_matches_finite_differences(op, shapes, device, rng):
    assert gradcheck(BINARY[op][0], list(_binary_arrays(*shapes, rng)), device)


@pytest.mark.parametrize("expr", [lambda x: x * 2.0, lambda x: 2.0 * x, lambda x: x + 1,
                                  lambda x: 1.0 - x, lambda x: x / 3.0, lambda x: 1.0 / x,
                                  lambda x: -x, lambda x: x.mean(), lambda x: x.sum(axis=0),
                                  lambda x: x.mean(axis=(0, 1), keepdims=True)])
def test_python_scalars_and_reductions_keep_float32(expr, device):
    x = tensor(np.ones((2, 3), np.float32), device, requires_grad=True)
    y = expr(x)
    assert y.dtype == np.float32
    y.backward(np.ones(y.shape))
    assert x.grad.dtype == np.float32


def test_reductions_keep_float64(device):
    x = tensor(np.ones((2, 3)), device, np.float64)
    assert x.sum().dtype == np.float64 and x.mean().dtype == np.float64


def test_mixed_precision_gradient_takes_the_leaf_dtype(device):
    """float32 * float64 computes in float64, but the float32 leaf's .grad is float32."""
    a = tensor(np.ones(3), device, np.float32, requires_grad=True)
    b = tensor(np.full(3, 2.0), device, np.float64, requires_grad=True)
    (a * b).sum().backward()
    assert a.grad.dtype == np.float32 and b.grad.dtype == np.float64
    np.testing.assert_array_equal(to_numpy(a.grad), [2.0, 2.0, 2.0])


# ----------------------------------------------------------------------------------------
# Reductions, reshape, flatten
# ----------------------------------------------------------------------------------------

AXES = [(None, False), (0, False), ((1, 2), False), (-1, True), ((0, 2), True)]


def _torch_axes(axis):
    return tuple(range(3)) if axis is None else axis


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis, keepdims", AXES)
@pytest.mark.parametrize("op", ["sum", "mean"])
def test_reduction_over_axes_matches_torch(op, axis, keepdims, dtype, device, rng, torch):
    compare_with_torch(
        "reduction", lambda t: getattr(t, op)(axis=axis, keepdims=keepdims),
        lambda t: getattr(t, op)(dim=_torch_axes(axis), keepdim=keepdims),
        [rng.normal(size=(3, 4, 5))], device, dtype, what=f" [{op} axis={axis}]")


@pytest.mark.parametrize("axis, keepdims", AXES)
def test_sum_and_mean_backward_match_finite_differences(axis, keepdims, device, rng):
    x = rng.normal(size=(2, 3, 4))
    assert gradcheck(lambda t: t.sum(axis, keepdims), [x], device)
    assert gradcheck(lambda t: F.mean(t, axis, keepdims), [x], device)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reshape_and_flatten_match_torch(dtype, device, rng, torch):
    x = rng.normal(size=(2, 3, 4, 5))
    compare_with_torch("reshape", lambda t: t.reshape(6, -1) * 1.0,
                       lambda t: t.reshape(6, -1) * 1.0, [x], device, dtype)
    compare_with_torch("reshape", lambda t: F.flatten(t), lambda t: torch.flatten(t, 1),
                       [x], device, dtype)
    compare_with_torch("reshape", lambda t: t.flatten(2), lambda t: torch.flatten(t, 2),
                       [x], device, dtype)


def test_reshape_backward_matches_finite_differences(device, rng):
    x = rng.normal(size=(2, 3, 2))
    assert gradcheck(lambda t: t.reshape((3, 4)) * t.reshape((3, 4)), [x], device)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_and_transpose_match_torch(dtype, device, rng, torch):
    compare_with_torch("linear", lambda a, b: a @ b.T, lambda a, b: a @ b.T,
                       [rng.normal(size=(3, 4)), rng.normal(size=(5, 4))], device, dtype)


def test_sum_accepts_a_list_of_axes(device, rng):
    x = tensor(rng.normal(size=(2, 3, 4)), device, requires_grad=True)
    y = x.sum(axis=[0, 2])
    assert y.shape == (3,)
    y.backward(np.ones(3))
    np.testing.assert_array_equal(to_numpy(x.grad), np.ones((2, 3, 4)))
