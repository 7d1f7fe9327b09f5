"""Background processes for the data loader that Ctrl-C, SIGTERM or SIGKILL cannot hang.

    pool = WorkerPool(2, fn, state)          # fn(job, state) runs in the workers
    for result in pool.map(jobs, ahead=4):   # results in the order of `jobs`
        ...
    pool.close()

Why not `multiprocessing.Pool`: its workers share one job queue guarded by a lock. Ctrl-C
in a terminal sends SIGINT to every process of the foreground group; a worker raises
KeyboardInterrupt while it holds that lock, dies, and `Pool.terminate()` in the main
process then waits for the lock forever. So here:

- Nothing is shared. Each worker has a pipe of its own for jobs and one for results; job
  k goes to worker k % n and results are read back in the same round-robin order, so they
  come out in submission order without any reordering buffer.
- Workers ignore SIGINT, SIGTERM and SIGUSR1 (the "checkpoint now" signal). Only the
  main process decides to stop (`minivgg.interrupts`); `close()` closes the pipes, waits
  a moment, and kills what is left (safe: a worker owns no lock and no file anyone else
  needs).
- A worker dies with its main process, whatever ends it (SIGKILL, a crash): on Linux the
  kernel sends it SIGKILL at once (`PR_SET_PDEATHSIG`), even while it is stuck in a system
  call; elsewhere, and as a second line, an idle worker notices within `POLL_SECONDS`
  that its parent is gone and exits. None is left orphaned. A main process that goes away while
  a worker is sending makes that worker exit quietly, never with a BrokenPipe traceback.
- A worker that dies (out of memory, a segfault in a decoder) is reported as a
  `WorkerError` naming it, instead of a wait that never ends.
"""

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from itertools import islice

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_SECONDS = 0.5  # how often an idle worker checks that its main process is still there
# Signals meant for the main process (minivgg.interrupts); workers ignore them.
_IGNORED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1")
                         if hasattr(signal, name))


class WorkerError(RuntimeError):
    """A worker process died, or the pool was used after `close()`."""


def _context():
    # NOTE: "fork" shares an in-memory image cache with the workers copy-on-write, for
    # free; "spawn" (the default on macOS and Windows) pickles `state` to every worker.
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else "spawn")


class WorkerPool:
    """`n` processes, each running `fn(job, state)` on the jobs sent to it, in order."""

    def __init__(self, n, fn, state=None, name="minivgg-worker"):
        if n < 1:
            raise ValueError(f"WorkerPool needs at least one worker, got {n}")
        ctx = _context()
        forked = ctx.get_start_method() == "fork"
        self._workers = []  # (process, job pipe's sending end, result pipe's receiving end)
        self._submitted = self._received = 0
        parent_ends = []
        # NOTE: with those signals blocked while a worker starts, it inherits the block
        # and installs SIG_IGN before it unblocks: no signal can reach a half-started
        # worker and print a KeyboardInterrupt traceback from it.
        blocked = _block(_IGNORED_SIGNALS)
        # NOTE: the kernel's parent-death signal fires when the *thread* that started the
        # worker ends; only the main thread lives as long as the process.
        main_thread = threading.current_thread() is threading.main_thread()
        try:
            for i in range(n):
                job_recv, job_send = ctx.Pipe(duplex=False)
                result_recv, result_send = ctx.Pipe(duplex=False)
                parent_ends += [job_send, result_recv]
                process = ctx.Process(
                    target=_serve, name=f"{name}-{i}", daemon=True,
                    args=(fn, state, job_recv, result_send, (os.getpid(), main_thread),
                          parent_ends if forked else [], blocked))
                process.start()
                job_recv.close()
                result_send.close()
                self._workers.append((process, job_send, result_recv))
        except BaseException:
            self.close()
            raise
        finally:
            _unblock(blocked)

    def __len__(self):
        return len(self._workers)

    @property
    def closed(self):
        return not self._workers

    @property
    def pids(self):
        """Process ids of the workers (empty once closed)."""
        return [process.pid for process, _, _ in self._workers]

    @property
    def pending(self):
        """Jobs submitted whose result has not been read yet."""
        return self._submitted - self._received

    def submit(self, job):
        process, send, _ = self._worker(self._submitted)
        try:
            send.send(job)
        except (BrokenPipeError, ConnectionResetError, OSError):
            raise WorkerError(_death_message(process)) from None
        self._submitted += 1

    def result(self):
        """The result of the oldest job not read yet; re-raises the exception `fn` raised."""
        if self.pending == 0:
            raise WorkerError("WorkerPool.result: no job is pending")
        process, _, recv = self._worker(self._received)
        try:
            ok, value = recv.recv()
        except (EOFError, ConnectionResetError, OSError):
            raise WorkerError(_death_message(process)) from None
        self._received += 1
        if not ok:
            raise value
        return value

    def map(self, jobs, ahead):
        """Yield `fn(job, state)` for each job, in order, keeping `ahead` jobs in flight.

        A consumer that stops early (an exception, `break`, an interrupt) leaves results
        in the pipes that the next `map` would read as its own, so the pool is closed then.
        """
        jobs = iter(jobs)
        finished = False
        try:
            for job in islice(jobs, max(1, ahead)):
                self.submit(job)
            while self.pending:
                result = self.result()
                for job in islice(jobs, 1):
                    self.submit(job)
                yield result
            finished = True
        finally:
            if not finished:
                self.close()

    def close(self, timeout=1.0):
        """Stop every worker: close the pipes, wait up to `timeout` s, kill the rest."""
        workers, self._workers = self._workers, []
        for _, send, recv in workers:
            send.close()  # an idle worker reads end-of-file and returns
            recv.close()  # a worker blocked in send() gets a broken pipe and returns
        deadline = time.monotonic() + timeout
        for process, _, _ in workers:
            process.join(max(0.0, deadline - time.monotonic()))
        for process, _, _ in workers:
            if process.is_alive():
                process.kill()  # it ignores SIGTERM; it holds nothing anyone needs
                process.join()

    def _worker(self, k):
        if not self._workers:
            raise WorkerError("the worker pool was closed")
        return self._workers[k % len(self._workers)]

    def __del__(self):
        try:
            self.close(timeout=0.0)
        except Exception:
            pass


def _death_message(process):
    process.join(0.1)
    code = process.exitcode
    how = ("is still running but closed its pipe" if code is None
           else f"was killed by signal {-code}" if code < 0 else f"exited with status {code}")
    hint = " (out of memory?)" if code == -signal.SIGKILL else ""
    return f"data loader worker {process.name} (pid {process.pid}) {how}{hint}"


def _block(signals):
    if hasattr(signal, "pthread_sigmask"):
        return signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    return None


def _unblock(previous):
    if previous is not None and hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _die_with_parent(parent_pid):
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG);
    then make sure the parent did not die before the request. Elsewhere: nothing."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no libc to ask: the poll in `_serve` still ends an orphan
    if os.getppid() != parent_pid:
        os._exit(0)


def _serve(fn, state, jobs, results, parent, parent_ends, signal_mask):
    """A worker's life: jobs in, (ok, result or exception) out, until told or orphaned."""
    parent_pid, started_by_main_thread = parent
    if started_by_main_thread:
        _die_with_parent(parent_pid)
    for sig in _IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    _unblock(signal_mask)  # the start-up block was inherited; signals now find SIG_IGN
    # NOTE: a forked worker inherits the main process's ends of every pipe made so far;
    # while it holds them, closing them in the main process would not reach the others.
    for end in parent_ends:
        end.close()
    try:
        while True:
            while not jobs.poll(POLL_SECONDS):
                if os.getppid() != parent_pid:
                    return  # the main process is gone: nobody will read our results
            job = jobs.recv()
            try:
                out = (True, fn(job, state))
            except Exception as e:  # handed to the main process, which raises it
                out = (False, _picklable(e))
            results.send(out)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the main process closed the pipes: a normal shutdown


def _picklable(error):
    import pickle
    import traceback
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        text = "".join(traceback.format_exception(error))
        return WorkerError(f"a data loader worker failed:\n{text}")


def map_in_processes(fn, items, workers):
    """[fn(item) for item in items], in order, over `workers` processes (0 = here)."""
    if workers <= 0:
        return [fn(item) for item in items]
    pool = WorkerPool(workers, fn)
    try:
        return list(pool.map(items, ahead=4 * workers))
    finally:
        pool.close()
