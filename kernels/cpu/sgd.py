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
    """In place, for every parameter: g = grad + wd*w; v = momentum*v + g; w -= lr*v."""
    for w, g, v in zip(params, grads, velocities):
        if not (w.flags.c_contiguous and v.flags.c_contiguous):
            raise ValueError("sgd_update: parameters and velocities must be contiguous")
        g = np.ascontiguousarray(g, dtype=w.dtype)
        t = w.dtype.type
        wf, gf, vf = w.reshape(-1), g.reshape(-1), v.reshape(-1)
        lr_, m_, wd_ = t(lr), t(momentum), t(weight_decay)
        map_ranges(lambda t0, t1: _sgd_update_kernel(wf[t0:t1], gf[t0:t1], vf[t0:t1], lr_, m_,
                                                     wd_), w.size, elements=w.size)
