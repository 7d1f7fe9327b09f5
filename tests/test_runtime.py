"""kernels/cpu/runtime.py's process-wide settings: glibc's kept memory and the OpenBLAS
thread counts (NumPy's own library, single-threaded around the fc GEMMs). Each test runs in a
fresh process, since both are set once per process."""

import os

import pytest


@pytest.mark.parametrize("setting, expected", [("0", "False"), ("1", "glibc")])
def test_keeping_freed_memory_can_be_turned_off(setting, expected):
    """runtime asks glibc to keep freed memory (process-wide) unless
    MINIVGG_KEEP_FREED_MEMORY=0; off glibc it cannot ask and says False."""
    import platform
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MINIVGG_KEEP_FREED_MEMORY=setting,
               PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", "from minivgg.kernels.cpu import runtime; "
                          "print(runtime.KEEPS_FREED_MEMORY)"], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    if expected == "glibc":
        expected = str(platform.libc_ver()[0] == "glibc")
    assert out == expected


def test_blas_threads_are_set_on_numpys_openblas_even_with_scipys_loaded():
    """SciPy maps a second OpenBLAS with the same function names: runtime must find NumPy's
    (the small step ran 1.6x slower in processes where it took SciPy's), and
    `single_threaded_blas` must give NumPy's BLAS one thread inside and restore it after."""
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = """
import scipy.linalg  # noqa: F401  (maps SciPy's own OpenBLAS first)
import numpy as np
from minivgg.kernels.cpu import runtime
lib = runtime._numpy_openblas()
setters = runtime._openblas_thread_setters()
if lib is None or setters is None:
    print("no openblas")
else:
    get, put = setters
    put(2)
    with runtime.single_threaded_blas():
        inside = get()
    print("numpy" in lib._name, inside, get())
"""
    pytest.importorskip("scipy")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    if out == ["no", "openblas"]:
        pytest.skip("NumPy is not linked to OpenBLAS here")
    assert out == ["True", "1", "2"]


def test_wait_past_returns_once_the_count_is_past_or_gives_up():
    """`spin.wait_past`, the watch a helper keeps before it sleeps: True at once when the
    count is already past the value, False after its reads when it never gets there, and
    True when another thread bumps the count while it watches."""
    import threading
    import time

    import numpy as np
    from minivgg.kernels.cpu.spin import wait_past
    counts = np.zeros(2, np.int64)
    counts[1] = 5
    assert wait_past(counts, 1, 4, 1)
    assert not wait_past(counts, 0, 0, 1000)

    def bump():
        time.sleep(0.01)
        counts[0] += 1

    thread = threading.Thread(target=bump)
    thread.start()
    assert wait_past(counts, 0, 0, 10**12)  # returns as soon as the count moves
    thread.join()
