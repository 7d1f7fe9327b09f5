"""Hand-written kernels, installed as `minivgg.kernels`.

* `cpu.py`: NumPy / Numba kernels.
* `cuda.py` and `cuda/*.cu`: CuPy with custom CUDA kernels (needs the `cuda` extra).

Both modules expose the same functions with the same parameter names; `minivgg.backend`
picks one per array. Set `NUMBA_DISABLE_JIT=1` to step through a CPU kernel as plain Python.
"""
