"""The CPU runtime: one thread pool of our own, single-threaded BLAS inside it, workspaces.

NOTE: the obvious setup, a multi-threaded BLAS plus Numba's `parallel=True` kernels, is two
thread pools that spin-wait and meet at a barrier after every GEMM and every kernel. On a
busy 2-core machine one descheduled thread then stalls the other: we measured training
steps 5-15x slower than with one thread. Here every piece of work (a range of im2col chunks
and their GEMMs, a range of pooling planes) runs start to finish on one thread of one pool,
with a single-threaded BLAS call inside, and the threads only meet when an op is done.

`map_ranges` is the one way work is spread: contiguous ranges fixed by the sizes and the
thread count, never by timing, so every result (and every sum across ranges, taken in range
order by the caller) is the same from one call to the next.
"""

import contextlib
import contextvars
import ctypes
import os
import queue
import threading

import numpy as np

from minivgg.kernels.common import Workspace
from minivgg.kernels.cpu.spin import SPIN_LOADS, wait_past

# Numba's options for every kernel. The kernels are serial; `map_ranges` runs pieces of one
# on several threads (`nogil` lets them run at once). NOTE: fastmath stays off, so float
# results do not depend on the compiler's reassociation and the tests can compare against
# plain loops tightly.
JIT = dict(cache=True, fastmath=False, nogil=True)

# Below this many array elements, a memory-bound kernel (ReLU, pooling, the SGD update of one
# parameter) runs on the calling thread. NOTE: handing work to the pool and waiting for it
# costs about 0.1 ms (more on a loaded machine), while a pass over 64K floats takes tens of
# microseconds; the small recipe's fc layers, late pools and most of its parameters are
# below it.
INLINE_ELEMENTS = 1 << 16

MAX_HELPERS = 1023  # helper threads of the pool, besides the calling thread


# NOTE: read once: os.cpu_count() is a system call, and `num_threads` is asked about 120
# times per small-recipe training step (2.4 ms a step in a cProfile of 20 steps, taken
# while another job loaded the machine, when it was asked every time).
_CPU_COUNT = os.cpu_count() or 1


def num_threads():
    """Threads used by the CPU kernels: NUMBA_NUM_THREADS, else OMP_NUM_THREADS, else all
    cores (so `torch.set_num_threads`-style comparisons can pin both to the same count)."""
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return _CPU_COUNT


def _numpy_openblas():
    """The OpenBLAS library NumPy loaded (a ctypes.CDLL), or None.

    NOTE: found among the libraries mapped into this process, since NumPy does not expose
    the handle; it must be NumPy's own: SciPy, when something has imported it, maps a
    second OpenBLAS with the same function names, and picking whichever came first from a
    set of paths (whose order changes with each process's string hashing) set the thread
    count of the wrong library in some processes and not in others (2026-12-05: fresh
    processes then ran the small recipe's step at 0.054 s or at 0.09 s).
    """
    numpy_dir = os.path.dirname(os.path.dirname(os.path.abspath(np.__file__)))
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:
        return None
    ours = sorted(p for p in paths if os.path.dirname(os.path.dirname(p)) == numpy_dir
                  or os.path.basename(os.path.dirname(p)).startswith("numpy"))
    try:
        return ctypes.CDLL(ours[0]) if ours else None
    except OSError:
        return None


def _openblas_set_threads_local():
    """`openblas_set_num_threads_local` of the OpenBLAS that NumPy loaded, or None.

    It sets the BLAS thread count of the calling thread only (OpenBLAS >= 0.3.27), so the
    pool's threads run one-thread GEMMs while the main thread keeps BLAS's own threads for
    NumPy code elsewhere.
    """
    lib = _numpy_openblas()
    return None if lib is None else getattr(lib, "openblas_set_num_threads_local", None)


def _openblas_thread_setters():
    """(get, set) of the process-wide thread count of NumPy's OpenBLAS, or None. Its
    symbols carry the build's prefix and suffix (NumPy 2's wheels:
    `scipy_openblas_set_num_threads64_`)."""
    lib = _numpy_openblas()
    if lib is None:
        return None
    for prefix, suffix in (("", ""), ("scipy_", "64_"), ("scipy_", ""), ("", "64_")):
        get = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
        put = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
        if get is not None and put is not None:
            return get, put
    return None


_BLAS_THREADS = None  # (get, set), looked up on first use


@contextlib.contextmanager
def single_threaded_blas():
    """Run the BLAS calls inside on the calling thread alone, then restore the count.

    NOTE: OpenBLAS's worker threads spin-wait (for about 0.1 s) after each multi-threaded
    call before they sleep. The fc layers' GEMMs run on the main thread between the
    convolutions, which run on the pool's two threads; an OpenBLAS worker left spinning
    after the fc layers' sgemm took a core from them. On the small recipe's step (2
    threads, quiet, 2026-12-05) fresh processes whose OpenBLAS thread spun ran at
    0.085-0.098 s a step (that thread burnt 1.07 s of CPU in 12 steps) against 0.053-0.058 s
    with the fc GEMMs single-threaded (0.09 s of CPU); at batch 32 the fc layers are a few
    ms of the step either way.
    """
    global _BLAS_THREADS
    if _BLAS_THREADS is None:
        _BLAS_THREADS = _openblas_thread_setters() or ()
    if not _BLAS_THREADS:
        yield
        return
    get, put = _BLAS_THREADS
    before = get()
    put(1)  # NOTE: always: `get` can say 1 while this thread would still run 2
    try:
        yield
    finally:
        put(before)


@contextlib.contextmanager
def _blas_on_this_thread_only():
    """One-thread GEMMs on the calling thread for the block, as on the pool's helpers,
    through OpenBLAS's thread-local setting: other threads keep theirs."""
    set_local = _pool.set_local
    if set_local is None:
        yield
        return
    before = set_local(1)
    try:
        yield
    finally:
        set_local(before)


class _Pool:
    """Helper threads that each run one range of a `map_ranges` call, then wait for the next.

    NOTE: lighter than `concurrent.futures.ThreadPoolExecutor`, which `map_ranges` used
    before: no Future, no Python-level Condition per task. A task goes to its thread
    through a `queue.SimpleQueue` (a C lock) and comes back through another, made per call,
    so calls from several threads at once never mix their results.
    NOTE: the calling thread runs the first range itself, with its BLAS on one thread
    (`_blas_on_this_thread_only`), and the helpers the others: a call then wakes one helper on
    2 cores, not two, and the caller works while the helper wakes (about 45 us on this
    machine's 2 vCPUs). On the small recipe (AMD EPYC, 2 threads, 2026-12-05) that took
    the blocked conv1_1's backward from 3.25 to 2.31 ms and conv5's forward + backward
    from 3.5 to 3.1 ms. Tried before the fix of `_numpy_openblas` (when the BLAS setters
    could reach SciPy's library instead of NumPy's), it had made OpenBLAS's own threads
    burn 0.9-1.7 s of CPU per step.
    NOTE: a helper about to sleep, and the caller about to wait for the helpers' results,
    first watch a counter for about 0.1 ms (`spin.wait_past`: compiled, without the GIL),
    which the other side bumps after its `put`: an empty call went from 47 to 30 us, and
    the small recipe's blocked layers (2 threads) took 9-17% less time, conv5's forward +
    backward 3.1 -> 2.8 ms; its step 0.0515 -> 0.049 s (AMD EPYC, 2026-12-05, medians of
    10 steps, 3 processes each).
    """

    def __init__(self):
        self.inboxes = []
        self.lock = threading.Lock()
        self.helper_ids = set()
        self.set_local = _openblas_set_threads_local()
        # tasks handed to helper j and results it handed back, for `spin.wait_past`
        self.rung, self.done = np.zeros(MAX_HELPERS, np.int64), np.zeros(MAX_HELPERS, np.int64)

    def helpers(self, count):
        """The inboxes of `count` helper threads, started on first need."""
        if count > MAX_HELPERS:
            raise ValueError(f"{count + 1} threads asked of the CPU pool; at most "
                             f"{MAX_HELPERS + 1} (NUMBA_NUM_THREADS, OMP_NUM_THREADS)")
        with self.lock:
            while len(self.inboxes) < count:
                inbox = queue.SimpleQueue()
                j = len(self.inboxes)
                threading.Thread(target=self._serve, args=(inbox, j), daemon=True,
                                 name=f"minivgg-{j}").start()
                self.inboxes.append(inbox)
        return self.inboxes[:count]

    def _serve(self, inbox, j):
        self.helper_ids.add(threading.get_ident())
        if self.set_local is not None:
            self.set_local(1)  # one-thread GEMMs on the helpers (module docstring)
        taken = 0
        while True:
            wait_past(self.rung, j, taken, SPIN_LOADS)
            context, job, t0, t1, k, outbox = inbox.get()
            taken += 1
            try:
                outbox.put((k, context.run(job, t0, t1), None))
            except BaseException as e:  # handed to the caller, raised there
                outbox.put((k, None, e))
            self.done[j] += 1


def _keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for the next allocation -> True if it agreed.

    NOTE: by default glibc gives big blocks (from 128 KB, a limit it raises to 32 MB as
    such blocks are freed) straight back to the kernel, and trims the top of its heap once
    128 KB there are free. A training step frees its activations and gradients and
    allocates the same sizes again in the next step, so each step mapped them afresh and
    the kernel zeroed every 4 KB page at its first write: on the small recipe (1 thread,
    CPU time, 2026-12-04) ReLU's backward took 15-19 ms a step that way and 9 ms with the
    memory kept. The peak resident size stays the same (264 and 288 MB above the imports
    for the small recipe, 2855 and 2878 MB for VGG-D at 224, batch 8), but the process no
    longer hands memory back to the system until it exits. Elsewhere than glibc: nothing.
    The setting is process-wide, made when the CPU kernels are first imported; a program
    that embeds minivgg and wants glibc's default sets MINIVGG_KEEP_FREED_MEMORY=0.
    """
    if os.environ.get("MINIVGG_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


KEEPS_FREED_MEMORY = _keep_freed_memory()
_pool = _Pool()
_caller = threading.local()  # .busy: this thread is running a range of its own call


workspace = Workspace(np, per_thread=True)


def _forget_pool_after_fork():
    # NOTE: a forked child (a data-loader worker) inherits the pool object but not its
    # threads; it must start its own pool, and its own per-thread workspace, when needed.
    global _pool
    _pool = _Pool()
    workspace.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def map_ranges(job, n_items, elements=None):
    """[job(t0, t1) for contiguous ranges covering range(n_items)], one range per thread.

    The ranges depend on n_items and the thread count only; the results come back in range
    order. `elements`, the number of array elements the whole call touches: below
    `INLINE_ELEMENTS` one job covers everything, on this thread.
    """
    if n_items == 0:
        return []
    T = min(num_threads(), n_items)
    if T == 1 or (elements is not None and elements < INLINE_ELEMENTS):
        return [job(0, n_items)]
    bounds = [n_items * k // T for k in range(T + 1)]
    if threading.get_ident() in _pool.helper_ids or getattr(_caller, "busy", False):
        # NOTE: called from a job already running (on a helper, or on this thread as the
        # caller's own range): the helpers may be busy with the outer call, so run every
        # range here, in order (the same ranges, so the same results).
        return [job(bounds[k], bounds[k + 1]) for k in range(T)]
    outbox = queue.SimpleQueue()
    # NOTE: each helper's range runs in a copy of the caller's context, so settings the
    # caller made for this work hold on the helpers too: NumPy's `np.errstate` (training
    # silences overflow warnings and checks the loss itself) lives in a context variable.
    # One copy per range, because one context cannot be entered by two threads at once.
    pool = _pool
    helpers = pool.helpers(T - 1)
    done = pool.done[:T - 1].copy()
    for k, inbox in enumerate(helpers, start=1):
        inbox.put((contextvars.copy_context(), job, bounds[k], bounds[k + 1], k, outbox))
        pool.rung[k - 1] += 1  # after the put: a helper watching it finds the task there
    results, errors = [None] * T, [None] * T
    _caller.busy = True
    try:  # the first range on this thread, while the helpers run theirs
        with _blas_on_this_thread_only():
            results[0] = job(bounds[0], bounds[1])
    except BaseException as e:
        errors[0] = e
    finally:
        _caller.busy = False
    for j in range(T - 1):
        wait_past(pool.done, j, done[j], SPIN_LOADS)
    for _ in range(T - 1):  # wait for every range, even after an error: they use our arrays
        k, result, error = outbox.get()
        results[k], errors[k] = result, error
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results

