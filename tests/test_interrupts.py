"""minivgg.interrupts: stop and save signals become flags; a second stop signal ends the
process at once. Real signals, sent to this process or to a subprocess with deadlines."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from minivgg.interrupts import StopSignals

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")


def _wait_for(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_signals_become_flags_and_the_handlers_are_restored_afterwards():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert _wait_for(lambda: signals.save_requested)
        assert signals.take_save_request() and not signals.take_save_request()
        assert signals.stop is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_for(lambda: signals.stop == "SIGTERM")
        # The next stop signal would take the default action: end the process at once.
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert {s: signal.getsignal(s) for s in before} == before


SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from minivgg.interrupts import StopSignals
    with StopSignals() as signals:
        print("ready", flush=True)
        while True:          # a loop that never looks at the flag: only the default
            time.sleep(0.05)  # action of the second signal can end it
""")


def test_a_second_ctrl_c_ends_the_process_at_once(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(SCRIPT.format(repo=REPO))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None  # the first one only asked the loop to stop
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGINT
    err = proc.stderr.read()
    assert "SIGINT received: stopping after this batch" in err and "Traceback" not in err


def test_ranks_settle_on_the_same_stop_and_save_from_their_summed_votes():
    a, b = StopSignals(), StopSignals()  # two ranks' flags (no handlers installed)
    a.stop, b.save_requested = "SIGINT", True
    totals = [x + y for x, y in zip(a.votes(), b.votes())]  # what group.sum gives both
    assert a.settle(totals) == b.settle(totals) == "SIGINT"
    assert a.take_agreed_save() and b.take_agreed_save()
    assert not a.take_agreed_save() and not b.votes()[2]  # a request counts once
    b.stop = "SIGTERM"
    assert b.settle([x + y for x, y in zip(a.votes(), b.votes())]) == "SIGINT"  # it stays
    c = StopSignals()
    c.stop = "SIGTERM"
    assert c.settle([x + y for x, y in zip(a.votes(), c.votes())]) == "SIGTERM"  # preemption
