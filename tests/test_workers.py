"""The loader's worker processes: order, errors, and real signals that must never hang.

The signal tests run a real loader in a subprocess in its own process group and send the
signal as a terminal (Ctrl-C: SIGINT to the whole group) or a cluster (SIGTERM) does; every
wait has a deadline, so a hang fails the test instead of hanging the suite.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from minivgg.workers import WorkerError, WorkerPool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")


def _square(job, state):
    if job == "boom":
        raise KeyError("boom")
    if job == "die":
        os._exit(3)
    time.sleep(0.002 * (job % 3))  # uneven job times: order must not depend on them
    return job * job + (state or 0)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_map_returns_results_in_submission_order(n):
    pool = WorkerPool(n, _square, 10)
    try:
        assert list(pool.map(range(20), ahead=5)) == [j * j + 10 for j in range(20)]
        assert list(pool.map(range(3), ahead=1)) == [10, 11, 14]  # the pool is reused
    finally:
        pool.close()
    assert pool.closed and pool.pids == []


def test_an_exception_in_a_worker_is_raised_in_the_main_process():
    pool = WorkerPool(2, _square)
    with pytest.raises(KeyError, match="boom"):
        list(pool.map([1, 2, "boom", 4], ahead=4))
    assert pool.closed  # abandoned with jobs in flight: closed, not left inconsistent


def test_a_worker_that_dies_is_a_clear_error_not_a_hang():
    pool = WorkerPool(2, _square)
    with pytest.raises(WorkerError, match=r"worker .* exited with status 3"):
        list(pool.map([1, "die", 3], ahead=3))
    assert pool.closed


def test_close_kills_a_busy_worker_quickly():
    pool = WorkerPool(1, _sleep)
    pool.submit(30.0)
    pid = pool.pids[0]
    start = time.monotonic()
    pool.close(timeout=0.2)
    assert time.monotonic() - start < 5 and not _alive(pid)


def _sleep(seconds, state):
    time.sleep(seconds)


# --- real signals to a real loader ----------------------------------------------------------

LOADER_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from minivgg.data import DataStats, EvalTransform
    from minivgg.loader import Loader
    from minivgg.synthetic import SyntheticImages

    class SlowImages(SyntheticImages):
        def load(self, i):
            time.sleep(0.01)  # keep the workers busy, as real JPEG decoding does
            return super().load(i)

    stats = DataStats([0.0] * 3, [0.0] * 3, [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    loader = Loader(SlowImages(400, 20, seed=0), EvalTransform(20, 16, stats), 8,
                    workers=2)
    try:
        for epoch in range(1000):
            for step, (x, y) in enumerate(loader.epoch(epoch)):
                if epoch == 0 and step == 0:
                    print(*loader.worker_pids, flush=True)
                time.sleep(0.005)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    finally:
        loader.close()
""")


def _alive(pid):
    """True while `pid` runs (a zombie waiting for its parent to reap it counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _wait_gone(pids, seconds):
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _start_loader(tmp_path):
    script = tmp_path / "loader.py"
    script.write_text(LOADER_SCRIPT.format(repo=REPO))
    # NOTE: a non-interactive shell starts background jobs with SIGINT ignored, and children
    # inherit that (CI may run us so); the child gets the default back, as under a terminal,
    # so that Python installs its KeyboardInterrupt handler there.
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = _read_line(proc, seconds=60)
    pids = [int(p) for p in line.split()]
    assert len(pids) == 2, line
    time.sleep(0.3)  # let the workers get into the middle of their jobs
    return proc, pids


def _read_line(proc, seconds):
    import selectors
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=seconds):
            _kill_group(proc)
            pytest.fail(f"no output from the loader in {seconds}s: {proc.stderr.read()}")
    return proc.stdout.readline()


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _finish(proc, seconds=15):
    try:
        out, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"the process hung for {seconds}s after the signal; stderr:\n{err}")
    return out, err


@pytest.mark.parametrize("attempt", range(4))  # the old deadlock struck in most tries
def test_ctrl_c_to_the_process_group_stops_the_loader_without_a_hang(tmp_path, attempt):
    proc, pids = _start_loader(tmp_path)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = _finish(proc)
    assert "interrupted" in out
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert _wait_gone(pids, 5) == []


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_workers_never_outlive_a_main_process_killed_alone(tmp_path, sig):
    # SIGTERM to the main process alone ends it at once (no handler in this script), as
    # SIGKILL does: its workers must notice, exit, and print no BrokenPipe traceback.
    proc, pids = _start_loader(tmp_path)
    os.kill(proc.pid, getattr(signal, sig))
    out, err = _finish(proc)
    assert _wait_gone(pids, 5) == [], f"orphaned workers {pids}"
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_sigterm_to_the_process_group_leaves_no_worker(tmp_path):
    proc, pids = _start_loader(tmp_path)
    os.killpg(proc.pid, signal.SIGTERM)  # the workers ignore it; the main process dies
    out, err = _finish(proc)
    assert proc.returncode == -signal.SIGTERM
    assert _wait_gone(pids, 5) == [] and "Traceback" not in err, err
