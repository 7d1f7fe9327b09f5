"""The autograd core: graph order, accumulation, output gradients, depth, no_grad, memory."""

import gc
import weakref

import numpy as np
import pytest

import minivgg
from minivgg import Tensor, functional as F, no_grad
from conftest import tensor, to_numpy


def leaf(values, device, dtype=np.float64):
    return tensor(np.asarray(values, dtype=dtype), device, requires_grad=True)


# ----------------------------------------------------------------------------------------
# Order and accumulation
# ----------------------------------------------------------------------------------------

def test_diamond_graph_sums_both_paths(device):
    """x -> a = 3x, b = x*x -> y = a * b = 3x^3, so dy/dx = 9x^2 (both paths counted)."""
    x = leaf([1.0, 2.0, -3.0], device)
    a = x * 3.0
    b = x * x
    (a * b).sum().backward()
    np.testing.assert_allclose(to_numpy(x.grad), 9 * np.array([1.0, 4.0, 9.0]))


def test_nested_diamonds_visit_each_function_after_all_its_consumers(device):
    """h is used by two branches that meet again twice; a wrong order would pass a partial
    gradient on. y = (h + 2h) * (h * h) with h = x + 1: dy/dx = 9 (x+1)^2."""
    x = leaf([0.5, -2.0], device)
    h = x + 1.0
    y = ((h + h * 2.0) * (h * h)).sum()
    y.backward()
    np.testing.assert_allclose(to_numpy(x.grad), 9 * (np.array([0.5, -2.0]) + 1) ** 2)


def test_tensor_used_twice_in_one_op_gets_both_gradients(device):
    x = leaf([3.0], device)
    (x * x).sum().backward()
    np.testing.assert_allclose(to_numpy(x.grad), [6.0])
    y = leaf([2.0, 5.0], device)
    (y + y + y).sum().backward()
    np.testing.assert_allclose(to_numpy(y.grad), [3.0, 3.0])


def test_leaf_gradients_accumulate_over_backward_calls(device):
    x = leaf([1.0, 2.0], device)
    (x * 2.0).sum().backward()
    (x * x).sum().backward()
    np.testing.assert_allclose(to_numpy(x.grad), [2.0 + 2.0, 2.0 + 4.0])


def test_reused_intermediate_in_a_deep_branchy_graph_matches_closed_form(device):
    """y_{k+1} = y_k * 0.5 + y_k * 0.5 forty times: every step reuses y_k twice."""
    x = leaf([1.5], device)
    y = x
    for _ in range(40):
        y = y * 0.5 + y * 0.5
    y.sum().backward()
    np.testing.assert_allclose(to_numpy(x.grad), [1.0])


def test_branch_without_gradient_path_is_ignored(device):
    """A constant input (requires_grad=False) gets no .grad; the leaf still does."""
    x = leaf([1.0, 2.0], device)
    c = tensor(np.array([4.0, 5.0]), device)
    (x * c).sum().backward()
    assert c.grad is None
    np.testing.assert_allclose(to_numpy(x.grad), [4.0, 5.0])


# ----------------------------------------------------------------------------------------
# backward(grad)
# ----------------------------------------------------------------------------------------

def test_backward_with_output_gradient_on_non_scalar(device):
    x = leaf([[1.0, 2.0], [3.0, 4.0]], device)
    y = x * x
    g = np.array([[1.0, 0.0], [0.5, -1.0]])
    y.backward(g)
    np.testing.assert_allclose(to_numpy(x.grad), 2 * to_numpy(x) * g)


def test_backward_accepts_a_tensor_as_output_gradient(device):
    x = leaf([1.0, 2.0], device)
    (x * 3.0).backward(tensor(np.array([1.0, 2.0]), device))
    np.testing.assert_allclose(to_numpy(x.grad), [3.0, 6.0])


def test_backward_without_gradient_on_non_scalar_raises(device):
    y = leaf([1.0, 2.0], device) * 2.0
    with pytest.raises(RuntimeError, match=r"non-scalar.*\(2,\)"):
        y.backward()


def test_backward_with_wrong_gradient_shape_names_both_shapes(device):
    y = leaf([[1.0, 2.0]], device) * 2.0
    with pytest.raises(ValueError, match=r"\(3,\).*\(1, 2\)"):
        y.backward(np.ones(3))


def test_backward_on_tensor_that_needs_no_grad_raises(device):
    with pytest.raises(RuntimeError, match="does not require grad"):
        (tensor(np.ones(2), device) * 2.0).sum().backward()


def test_backward_on_a_leaf_sets_its_own_gradient(device):
    x = leaf([2.0], device)
    x.backward()
    np.testing.assert_allclose(to_numpy(x.grad), [1.0])


def test_scalar_output_gradient_defaults_to_one(device):
    x = leaf([[2.0]], device)
    (x * 5.0).backward()  # one element, not 0-d: still gets grad 1
    np.testing.assert_allclose(to_numpy(x.grad), [[5.0]])


# ----------------------------------------------------------------------------------------
# Depth: no recursion
# ----------------------------------------------------------------------------------------

def test_chain_of_10000_ops_backpropagates_without_recursion_error():
    x = Tensor(np.array([1.0]), requires_grad=True)
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [1.0001 ** 10_000], rtol=1e-9)


# ----------------------------------------------------------------------------------------
# no_grad, leaves and non-leaves
# ----------------------------------------------------------------------------------------

def test_no_grad_records_no_graph_and_restores_on_exit(device):
    x = leaf([1.0], device)
    with no_grad():
        assert not minivgg.is_grad_enabled()
        y = x * 2.0
    assert minivgg.is_grad_enabled()
    assert not y.requires_grad and y.creator is None
    assert (x * 2.0).requires_grad


def test_no_grad_restores_mode_after_an_exception():
    with pytest.raises(KeyError):
        with no_grad():
            raise KeyError("boom")
    assert minivgg.is_grad_enabled()


def test_no_grad_nests():
    with no_grad():
        with no_grad():
            pass
        assert not minivgg.is_grad_enabled()
    assert minivgg.is_grad_enabled()


def test_leaves_get_grad_and_intermediates_do_not(device):
    x = leaf([1.0, 2.0], device)
    h = x * 2.0
    y = (h * h).sum()
    assert x.creator is None and h.creator is not None
    assert h.requires_grad
    y.backward()
    assert x.grad is not None
    assert h.grad is None  # like PyTorch without retain_grad()


def test_detach_cuts_the_graph(device):
    x = leaf([3.0], device)
    d = (x * 2.0).detach()
    assert not d.requires_grad and d.creator is None
    y = (x * d).sum()
    y.backward()
    np.testing.assert_allclose(to_numpy(x.grad), [6.0])


def test_tensor_keeps_numpy_dtype_and_defaults_lists_to_float32():
    assert Tensor([1, 2]).dtype == np.float32
    assert Tensor(np.zeros(2)).dtype == np.float64
    assert Tensor(np.float64(2.0)).dtype == np.float64  # NumPy scalars keep their dtype
    assert Tensor(np.zeros(2, np.float32), dtype=np.float64).dtype == np.float64


# ----------------------------------------------------------------------------------------
# Memory: buffers released after backward
# ----------------------------------------------------------------------------------------

def test_backward_frees_saved_buffers_and_inputs(device, rng):
    x = tensor(rng.normal(size=(1, 2, 5, 5)), device)
    W = tensor(rng.normal(size=(3, 2, 3, 3)), device, requires_grad=True)
    h = F.relu(F.conv2d(x, W, padding=1))
    conv_fn, relu_fn = h.creator.inputs[0].creator, h.creator
    loss = h.sum()
    loss.backward()
    for fn in (conv_fn, relu_fn, loss.creator):
        assert fn.saved is None
        assert fn.inputs == ()


def test_second_backward_through_freed_graph_raises_clearly(device):
    x = leaf([1.0, 2.0], device)
    y = (x * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="second time.*freed"):
        y.backward()


def test_activations_are_garbage_collected_after_backward(device, rng):
    """Nothing but the user's own references keeps an intermediate array alive."""
    x = tensor(rng.normal(size=(2, 3)), device, requires_grad=True)
    h = x * 2.0
    data_ref = weakref.ref(h)
    y = (F.relu(h) * 3.0).sum()
    del h
    gc.collect()
    assert data_ref() is not None  # the graph holds it until backward
    y.backward()
    gc.collect()
    assert data_ref() is None


def test_no_grad_keeps_no_buffers(device):
    x = leaf([1.0, 2.0], device)
    with no_grad():
        y = F.relu(x)
    assert y.creator is None


def test_function_backward_returning_wrong_shape_is_reported():
    class Broken(minivgg.Function):
        def forward(self, x):
            return x * 2

        def backward(self, gy):
            return gy.sum()

    x = Tensor(np.ones(3), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"Broken.*shape \(\).*shape \(3,\)"):
        Broken()(x).sum().backward()


# ----------------------------------------------------------------------------------------
# gradcheck itself must catch a wrong backward, or every check built on it is vacuous
# ----------------------------------------------------------------------------------------

class Cube(minivgg.Function):
    def __init__(self, wrong=False):
        self.wrong = wrong

    def forward(self, x):
        self.save_for_backward(x)
        return x ** 3

    def backward(self, gy):
        (x,) = self.saved
        return gy * (2.9 if self.wrong else 3.0) * x * x


def test_gradcheck_accepts_a_right_backward_and_catches_a_wrong_one(device, rng):
    x = rng.normal(size=(3, 2))
    assert minivgg.gradcheck(lambda t: Cube()(t), [x], device=device)
    assert not minivgg.gradcheck(lambda t: Cube(wrong=True)(t), [x], device=device,
                                 raise_exception=False)
    with pytest.raises(AssertionError, match=r"input 0 \(shape \(3, 2\)\) differs at"):
        minivgg.gradcheck(lambda t: Cube(wrong=True)(t), [x], device=device)


def test_no_grad_in_one_thread_leaves_other_threads_recording():
    import threading
    inside, release = threading.Event(), threading.Event()

    def evaluate():
        with no_grad():
            inside.set()
            release.wait(10)

    worker = threading.Thread(target=evaluate)
    worker.start()
    inside.wait(10)  # the worker is now inside no_grad()
    try:
        assert minivgg.is_grad_enabled()
        assert (Tensor(np.ones(2), requires_grad=True) * 2.0).requires_grad
    finally:
        release.set()
        worker.join()


def test_leaf_gradients_never_alias_each_other_or_the_output_gradient(device):
    """Add hands its output gradient to both inputs; each leaf must still own its .grad."""
    a, b = leaf([1.0, 2.0], device), leaf([3.0, 4.0], device)
    g = tensor(np.array([1.0, 1.0]), device).data
    (a + b).backward(g)
    a.grad += 1.0
    np.testing.assert_array_equal(to_numpy(b.grad), [1.0, 1.0])
    np.testing.assert_array_equal(to_numpy(g), [1.0, 1.0])
