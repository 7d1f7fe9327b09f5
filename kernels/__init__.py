"""Hand-written kernels, installed as `minivgg.kernels`.

* `cpu/`: NumPy / Numba kernels, one module per op family (conv, pool, lrn, activation,
  loss, sgd) beside the runtime (thread pool, single-threaded BLAS, workspaces).
* `cuda.py` and `cuda/*.cu`: CuPy with custom CUDA kernels (needs the `cuda` extra); the
  `.cu` files mirror the CPU modules one to one.
* `common.py`: what both devices share (output sizes, chunk planning, workspaces, the conv
  drivers), written once and parameterised by the device's primitives.
* `reference.py`: plain NumPy im2col / col2im, the definition the fast kernels are tested
  against.

Both kernel tables offer the same entry points (`common.ENTRY_POINTS`) with the same
parameter names; `minivgg.backend` picks one per array. Set `NUMBA_DISABLE_JIT=1` to step
through a CPU kernel as plain Python.
"""
