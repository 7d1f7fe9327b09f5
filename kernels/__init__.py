"""Hand-written kernels, installed as `minivgg.kernels`.

* `cpu/`: NumPy / Numba kernels, one module per op family (conv, pool, lrn, activation,
  loss, sgd) beside the runtime (thread pool, single-threaded BLAS, workspaces).
* `gpu.py` and `cuda/*.cu`: CuPy with custom CUDA kernels and cuBLAS (needs the `cuda`
  extra); the `.cu` files mirror the CPU modules one to one.
* `common.py`: what both devices share (chunk planning, workspaces, the im2col conv
  drivers) and `Primitives`, the contract each device's kernels fulfil (`CpuPrimitives` in
  `cpu/conv.py`, `CudaPrimitives` in `gpu.py`); `winograd.py` and `direct.py`: the other
  two conv algorithms' drivers, written once the same way; `shapes.py`: output sizes and
  the 3×3/s1/p1 test.
* `reference.py`: plain NumPy im2col / col2im, the definition the fast kernels are tested
  against.

Both kernel tables offer the same entry points (`common.ENTRY_POINTS`) with the same
parameter names; `minivgg.backend` picks one per array. Set `NUMBA_DISABLE_JIT=1` to step
through a CPU kernel as plain Python.
"""
