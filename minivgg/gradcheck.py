"""Check an op's backward against central finite differences, in float64.

    >>> import numpy as np, minivgg
    >>> from minivgg import functional as F
    >>> x = np.random.default_rng(0).normal(size=(2, 3, 5, 5))
    >>> W = np.random.default_rng(1).normal(size=(4, 3, 3, 3))
    >>> minivgg.gradcheck(lambda x, W: F.conv2d(x, W, padding=1), [x, W])
    True

The function's output y is reduced to a scalar with a fixed random projection, L = sum(y*r),
so one backward pass (with output gradient r) gives every input's full gradient, and each
input element is then nudged by +-eps to estimate dL/dx numerically.
"""

import numpy as np

from minivgg import backend
from minivgg.tensor import Tensor


def numerical_grad(fn, inputs, r, eps=1e-6):
    """Central differences of L = sum(fn(*inputs) * r) with respect to every input.

    `fn` takes host arrays and returns a Tensor (on any device); `inputs` are nudged in place
    and restored.
    """
    grads = []
    for x in inputs:
        g = np.zeros_like(x)
        flat, gflat = x.reshape(-1), g.reshape(-1)
        for i in range(flat.size):
            old = flat[i]
            flat[i] = old + eps
            plus = float((backend.to_numpy(fn(*inputs).data) * r).sum())
            flat[i] = old - eps
            minus = float((backend.to_numpy(fn(*inputs).data) * r).sum())
            flat[i] = old
            gflat[i] = (plus - minus) / (2 * eps)
        grads.append(g)
    return grads


def gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, seed=0, raise_exception=True,
              device="cpu"):
    """True when `fn`'s analytic gradients match finite differences for every input.

    `fn` takes Tensors and returns one Tensor; `inputs` are arrays (converted to float64 and
    placed on `device`, "cpu" or "cuda"). On a mismatch, raises `AssertionError` naming the
    input and the worst element, or returns False when `raise_exception=False`.
    """
    arrays = [np.array(backend.to_numpy(x), dtype=np.float64) for x in inputs]
    tensors = [Tensor(backend.to_device(a, device), requires_grad=True) for a in arrays]
    y = fn(*tensors)
    r = np.random.default_rng(seed).normal(size=y.shape)
    y.backward(r)
    analytic = [backend.to_numpy(t.grad) if t.grad is not None else np.zeros_like(a)
                for t, a in zip(tensors, arrays)]
    numeric = numerical_grad(
        lambda *xs: fn(*[Tensor(backend.to_device(a, device)) for a in xs]), arrays, r, eps)
    for i, (a, n) in enumerate(zip(analytic, numeric)):
        if not np.allclose(a, n, atol=atol, rtol=rtol):
            worst = tuple(int(j) for j in np.unravel_index(np.argmax(np.abs(a - n)), a.shape))
            msg = (f"gradcheck: input {i} (shape {a.shape}) differs at {worst}: "
                   f"analytic {a[worst]:.6g}, numerical {n[worst]:.6g}")
            if raise_exception:
                raise AssertionError(msg)
            return False
    return True
