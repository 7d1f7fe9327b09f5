"""Ctrl-C, SIGTERM and SIGUSR1 during a run: stop (or checkpoint) at the next batch boundary.

    with StopSignals() as signals:
        for batch in batches:
            step(batch)
            if signals.take_save_request():   # SIGUSR1: checkpoint now, and go on
                save()
            if signals.stop:                  # SIGINT or SIGTERM: save and leave
                save()
                break

- The first SIGINT (Ctrl-C; a terminal sends it to every process of the foreground group)
  or SIGTERM (how a cluster scheduler preempts a job) only sets `stop` to the signal's
  name and says so on stderr. The run finishes the batch it is computing, writes a
  resumable checkpoint and returns: no KeyboardInterrupt is raised in the middle of an
  optimizer step or a checkpoint write.
- The handler then gives both signals back their default action, so a second Ctrl-C (or
  SIGTERM) ends the process at once, even inside a long native kernel, where a Python
  handler would only run once the kernel returns. What is on disk stays consistent:
  checkpoints are written atomically (`minivgg.checkpoint`).
- SIGUSR1 (POSIX) asks for a checkpoint without stopping: `kill -USR1 <pid>`.
- The data loader's workers ignore all three (`minivgg.workers`); the main process shuts
  them down, so a signal to the whole group cannot kill one half-way through a batch.

Handlers can only be installed from the main thread; elsewhere (a notebook running the
loop in a thread) `StopSignals` installs nothing and the flags simply stay unset.
"""

import os
import signal
import threading

STOP_SIGNALS = ("SIGINT", "SIGTERM")
SAVE_SIGNAL = "SIGUSR1"


class StopSignals:
    """Context manager that turns stop and save signals into flags the loop polls."""

    def __init__(self, stop_signals=STOP_SIGNALS, save_signal=SAVE_SIGNAL):
        self.stop = None              # name of the first stop signal received, e.g. "SIGINT"
        self.save_requested = False
        self._stop_signals = [getattr(signal, n) for n in stop_signals if hasattr(signal, n)]
        self._save_signal = getattr(signal, save_signal, None) if save_signal else None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self._stop_signals:
            self._previous[sig] = signal.signal(sig, self._on_stop)
        if self._save_signal is not None:
            self._previous[self._save_signal] = signal.signal(self._save_signal, self._on_save)
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False

    def take_save_request(self):
        """True once per SIGUSR1 received since the last call."""
        requested, self.save_requested = self.save_requested, False
        return requested

    def _on_stop(self, signum, frame):
        self.stop = signal.Signals(signum).name
        for sig in self._stop_signals:  # the next one takes the default action: exit now
            signal.signal(sig, signal.SIG_DFL)
        _say(f"\n{self.stop} received: stopping after this batch and saving a checkpoint "
             f"(Ctrl-C again quits at once, without it)\n")

    def _on_save(self, signum, frame):
        self.save_requested = True
        _say(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this "
             f"batch\n")


def _say(text):
    # NOTE: os.write, not print: a handler can run while the main thread is inside a
    # write to sys.stderr (the progress bar), and Python's buffered streams raise
    # "reentrant call" if the handler writes to the same stream.
    try:
        os.write(2, text.encode())
    except OSError:
        pass
