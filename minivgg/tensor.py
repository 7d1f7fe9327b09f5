"""The autograd core: a `Tensor` that records the `Function`s that made it.

The graph is define-by-run (as in Chainer, DeZero and PyTorch): every op builds its output
and remembers its inputs, and `Tensor.backward()` walks that record in reverse.

Three rules keep it small and safe for VGG-sized graphs:

* Backward is first order and runs on raw arrays (NumPy on CPU, CuPy on GPU): a
  `Function.backward` gets the output gradient as an array and returns input gradients as
  arrays. VGG never needs second derivatives.
* The walk is iterative (an explicit stack, no recursion), so a chain of 10,000 ops works.
* After a `Function` has passed its gradients on, it drops what it saved for backward, so the
  im2col inputs and activations of a big net are freed as soon as they are no longer needed.
"""

import contextlib
import threading
import weakref

import numpy as np

from minivgg import backend


# ----------------------------------------------------------------------------------------
# Gradient mode
# ----------------------------------------------------------------------------------------

# NOTE: per thread, as in PyTorch: a no_grad() evaluation in one thread must not switch
# the graph off for a training loop running in another.
_mode = threading.local()


@contextlib.contextmanager
def no_grad():
    """Context in which ops record no graph (evaluation, SGD updates)."""
    previous, _mode.enabled = is_grad_enabled(), False
    try:
        yield
    finally:
        _mode.enabled = previous


def is_grad_enabled():
    return getattr(_mode, "enabled", True)


# ----------------------------------------------------------------------------------------
# Tensor
# ----------------------------------------------------------------------------------------

class Tensor:
    """An array plus what autograd needs: `.grad`, `requires_grad` and the op that made it.

    `data` is a NumPy array (CPU) or a CuPy array (GPU). Python lists and scalars become
    float32 arrays; NumPy arrays keep their dtype, so float64 works end to end.
    `grad` is a raw array of the same shape, filled by `backward()` and accumulated over
    calls, as in PyTorch (an optimizer's `zero_grad()` clears it).
    """

    __array_priority__ = 100  # make `ndarray * Tensor` call Tensor.__rmul__

    def __init__(self, data, requires_grad=False, dtype=None):
        if isinstance(data, Tensor):
            data = data.data
        if isinstance(data, np.generic):
            # NOTE: NumPy reductions return scalars (np.float64(3.0)), not arrays; keep
            # their dtype, or a float64 sum would silently become float32 below.
            data = np.asarray(data)
        if not backend.is_array(data):
            data = np.asarray(data, dtype=dtype or np.float32)
        elif dtype is not None:
            data = data.astype(dtype, copy=False)
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self.creator = None  # the Function that produced this tensor, if any
        self.name = None

    # --- array-like facts: those of the array it holds ----------------------------------
    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    dtype = property(lambda self: self.data.dtype)
    size = property(lambda self: self.data.size)

    @property
    def device(self):
        return backend.device_of(self.data)

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, device={self.device}{grad})"

    def numpy(self):
        """The data as a NumPy array (copied from the GPU if needed)."""
        return backend.to_numpy(self.data)

    def __array__(self, dtype=None, copy=None):
        a = self.numpy()
        return a if dtype is None else a.astype(dtype)

    def item(self):
        return self.data.item()

    def to(self, device):
        """A copy on `device` ("cpu" or "cuda"); the same tensor if it is already there."""
        data = backend.to_device(self.data, device)
        if data is self.data:
            return self
        out = Tensor(data, requires_grad=self.requires_grad)
        return out

    def detach(self):
        """The same data, cut from the graph."""
        return Tensor(self.data)

    # --- backward ----------------------------------------------------------------------
    def backward(self, grad=None, on_leaf_done=None):
        """Fill `.grad` of every leaf that requires it, by reverse-mode differentiation.

        `grad` is the gradient of some scalar with respect to this tensor. It defaults to 1
        for a one-element tensor and must be given otherwise, as in PyTorch.
        `on_leaf_done(leaf)`, if given, is called once for each leaf that requires a
        gradient, as soon as its `.grad` is final (after the last op that uses it), in the
        order backward reaches them: the output layer's weights first. Data-parallel
        training uses it to start averaging gradients while backward goes on (as
        PyTorch's post-accumulate-grad hooks do).
        """
        grad = self._output_grad(grad)
        # Gradients of non-leaf tensors, keyed by id. Each entry keeps its tensor alive
        # until its creator has consumed the gradient, then both are dropped.
        grads = {id(self): (self, grad)}
        order = _topological_order(self.creator)
        leaf_uses = _leaf_uses(order) if on_leaf_done is not None else {}
        for fn in order:
            leaves = [x for x in fn.inputs if id(x) in leaf_uses]
            outputs = [out() for out in fn.outputs]  # weak references
            gys = [grads.pop(id(o), (None, None))[1] if o is not None else None
                   for o in outputs]
            if all(gy is None for gy in gys):
                fn.saved, fn.inputs = None, ()  # no gradient reached it: just free it
                _count_down(leaves, leaf_uses, on_leaf_done)
                continue
            if fn.saved is None:
                raise RuntimeError(f"backward() through {type(fn).__name__} a second time: "
                                   "its saved buffers were already freed")
            xp = backend.array_module(next(gy for gy in gys if gy is not None))
            gys = [gy if gy is not None else xp.zeros(shape, dtype)
                   for gy, (shape, dtype) in zip(gys, fn.output_specs)]
            gxs = fn.backward(*gys)
            if not isinstance(gxs, tuple):
                gxs = (gxs,)
            fn.saved = None  # NOTE: free the saved activations and im2col inputs now
            for x, gx in zip(fn.inputs, gxs):
                if gx is None or not x.requires_grad:
                    continue
                gx = _check_grad(fn, x, gx)
                if x.creator is None:  # a leaf: accumulate into .grad
                    x.grad = _owned(gx, gys, gxs) if x.grad is None else x.grad + gx
                elif id(x) in grads:  # used more than once: sum the contributions
                    grads[id(x)] = (x, grads[id(x)][1] + gx)
                else:
                    grads[id(x)] = (x, gx)
            fn.inputs = ()
            _count_down(leaves, leaf_uses, on_leaf_done)
        if self.creator is None:  # backward() called on a leaf itself
            self.grad = grad.copy() if self.grad is None else self.grad + grad

    def _output_grad(self, grad):
        """The gradient backward() starts from, checked: 1 for a one-element tensor."""
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad "
                               "(was it computed under no_grad(), or from constants only?)")
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward() needs an output gradient for a non-scalar "
                                   f"tensor of shape {self.shape}")
            return backend.array_module(self.data).ones_like(self.data)
        grad = grad.data if isinstance(grad, Tensor) else grad
        grad = backend.as_array_like(grad, self.data)
        if grad.shape != self.shape:
            raise ValueError(f"backward(): gradient shape {grad.shape} does not match "
                             f"tensor shape {self.shape}")
        return grad

    # --- operators --------------------------------------------------------------------
    # NOTE: +, -, *, /, unary -, @, .sum(), .mean(), .reshape(), .flatten() and .T are the
    # ops of minivgg.functional, which imports this module; so they are attached to Tensor
    # there, once, by `functional._bind_operators()` (DeZero's `setup_variable()`), and
    # this module never imports functional. `import minivgg` runs it.


def _owned(gx, gys, gxs):
    """`gx`, or a copy of it when it may share memory with another gradient.

    NOTE: Add passes its output gradient straight through, so without the copy two leaves
    (or a leaf and the caller's `grad`) would hold one array, and an in-place change to one
    `.grad` would change the other. A fresh array (fc6's 400 MB weight gradient) is kept.
    """
    xp = backend.array_module(gx)
    others = [g for g in list(gys) + list(gxs) if g is not None and g is not gx]
    if any(g is gx for g in gys) or sum(g is gx for g in gxs) > 1 or any(
            xp.may_share_memory(gx, g) for g in others):
        return gx.copy()
    return gx


def _check_grad(fn, x, gx):
    """An input gradient must have its input's shape; it takes the input's dtype."""
    if gx.shape != x.shape:
        raise RuntimeError(f"{type(fn).__name__}.backward returned a gradient of shape "
                           f"{gx.shape} for an input of shape {x.shape}")
    # NOTE: mixing dtypes (float32 x + float64 array) promotes the forward result; the
    # gradient of a float32 leaf must still be float32, as in PyTorch.
    return gx if gx.dtype == x.dtype else gx.astype(x.dtype)


def _leaf_uses(order):
    """{id(leaf): how many of the functions in `order` take it} for leaves needing grad."""
    uses = {}
    for fn in order:
        for x in fn.inputs:
            if x.creator is None and x.requires_grad:
                uses[id(x)] = uses.get(id(x), 0) + 1
    return uses


def _count_down(leaves, leaf_uses, on_leaf_done):
    """One use of each leaf is done; call `on_leaf_done` for those with none left."""
    for x in leaves:
        leaf_uses[id(x)] -= 1
        if leaf_uses[id(x)] == 0:
            on_leaf_done(x)


def _topological_order(root_fn):
    """Functions reachable from `root_fn`, each after every function that uses its output.

    Iterative depth-first search: a chain of 10,000 ops would overflow Python's recursion
    limit in the textbook recursive version.
    """
    if root_fn is None:
        return []
    order, visited = [], set()
    stack = [(root_fn, False)]
    while stack:
        fn, children_done = stack.pop()
        if children_done:
            order.append(fn)
            continue
        if id(fn) in visited:
            continue
        visited.add(id(fn))
        stack.append((fn, True))
        for x in fn.inputs:
            parent = x.creator
            if parent is not None and id(parent) not in visited:
                stack.append((parent, False))
    order.reverse()  # post-order reversed: consumers before producers
    return order


# ----------------------------------------------------------------------------------------
# Function: one op = forward on arrays + backward on arrays
# ----------------------------------------------------------------------------------------

class Function:
    """Base class of every differentiable op.

    A subclass writes `forward(*arrays) -> array(s)` and, right below it,
    `backward(*grad_outputs) -> grad_input(s)`, both on raw arrays. Whatever backward needs
    is stored explicitly in `self.saved` (a tuple) by forward; the core frees it after use.
    """

    def __call__(self, *inputs):
        inputs = [as_tensor(x) for x in inputs]
        self.saved = ()
        outputs = self.forward(*[x.data for x in inputs])
        single = not isinstance(outputs, tuple)
        outputs = [Tensor(y) for y in ((outputs,) if single else outputs)]
        if is_grad_enabled() and any(x.requires_grad for x in inputs):
            self.inputs = inputs
            self.outputs = [weakref.ref(y) for y in outputs]
            self.output_specs = [(y.shape, y.dtype) for y in outputs]
            for y in outputs:
                y.requires_grad = True
                y.creator = self
        else:
            self.saved = None
        return outputs[0] if single else tuple(outputs)

    def save_for_backward(self, *arrays):
        self.saved = arrays

    def forward(self, *xs):
        raise NotImplementedError

    def backward(self, *gys):
        raise NotImplementedError


def as_tensor(x):
    return x if isinstance(x, Tensor) else Tensor(x)

