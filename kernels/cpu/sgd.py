"""SGD with momentum and weight decay on the CPU (Sec. 3.1), PyTorch's convention; the twin of
`cuda/sgd.cu`."""

import numpy as np
from numba import njit

from minivgg.kernels.cpu.runtime import JIT, map_ranges


@njit(**JIT)
def _sgd_update_kernel(w, g, v, lr, momentum, weight_decay):
    """One pass over memory: VGG-16's 138M parameters are 553 MB per array, so the four
    NumPy passes this replaces cost more than the arithmetic.

    NOTE: on 1-D slices, over range(w.size): an index Numba knows is never negative, so it
    drops the wraparound check and LLVM vectorises the loop (see `relu_backward`)."""
    for i in range(w.size):
        vi = momentum * v[i] + (g[i] + weight_decay * w[i])
        v[i] = vi
        w[i] -= lr * vi


def sgd_update(params, grads, velocities, lr, momentum, weight_decay):
    """In place, for every parameter: g = grad + wd*w; v = momentum*v + g; w -= lr*v.

    NOTE: one `map_ranges` call for all the parameters, its ranges cut from their elements
    laid end to end, not one call per parameter: the small recipe's 22 parameters made 6
    hand-offs to the pool a step (and 16 calls run inline), each a wait for the helper
    threads, which on a loaded machine costs more than the update itself. The arithmetic
    of each element is the same, so the bits are too."""
    pieces, start = [], 0  # (w, g, v flat, first element's index, the scalars in w's dtype)
    for w, g, v in zip(params, grads, velocities):
        if not (w.flags.c_contiguous and v.flags.c_contiguous):
            raise ValueError("sgd_update: parameters and velocities must be contiguous")
        g = np.ascontiguousarray(g, dtype=w.dtype)
        t = w.dtype.type
        pieces.append((w.reshape(-1), g.reshape(-1), v.reshape(-1), start,
                       (t(lr), t(momentum), t(weight_decay))))
        start += w.size

    def job(t0, t1):
        for wf, gf, vf, first, scalars in pieces:
            a, b = max(t0 - first, 0), min(t1 - first, wf.size)
            if a < b:
                _sgd_update_kernel(wf[a:b], gf[a:b], vf[a:b], *scalars)

    map_ranges(job, start, elements=start)
