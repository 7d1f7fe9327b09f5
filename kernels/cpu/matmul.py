"""The fully connected layers' products (fc6, fc7, fc8): NumPy's BLAS, with all its threads.

NOTE: unlike the conv GEMMs, which run single-threaded inside the pool's threads
(`runtime.py`), these run on the calling thread, where BLAS keeps its own thread count.
"""

import numpy as np


def fc_matmul(a, b):
    """a @ b for 2-D arrays (either may be a transposed view) -> a new array."""
    return np.matmul(a, b)
