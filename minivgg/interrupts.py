"""Ctrl-C, SIGTERM and SIGUSR1 during a run: stop (or checkpoint) at the next batch boundary.

    with StopSignals() as signals:
        for batch in batches:
            totals = group.sum(step(batch) + signals.votes())  # one allreduce per step
            signals.settle(totals[-VOTES:])
            if signals.take_agreed_save():    # SIGUSR1 on any rank: checkpoint, go on
                save()
            if signals.agreed_stop:           # SIGINT or SIGTERM on any rank: save, leave
                save()
                break

The training loop does this through `minivgg.replicas.Replicas`, which folds the votes
into the step's own sum.

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

Data parallelism (`minivgg.distributed`): `mpirun` passes Ctrl-C and SIGTERM on to every
rank, but not at the same instant, and a rank that stopped alone would leave the others
waiting in the next allreduce. So the ranks agree: each adds its `votes()` to a sum the
step computes anyway (`group.sum`), and `settle(totals)` turns the totals into
`agreed_stop` and `agreed_save`, the same on every rank after the same step. The loop
polls those; in a single process they are simply this process's own requests.

Handlers can only be installed from the main thread; elsewhere (a notebook running the
loop in a thread) `StopSignals` installs nothing and the flags simply stay unset.
"""

import os
import signal
import threading

STOP_SIGNALS = ("SIGINT", "SIGTERM")
SAVE_SIGNAL = "SIGUSR1"
VOTES = 3  # len(StopSignals.votes()): SIGINT, SIGTERM, SIGUSR1


class StopSignals:
    """Context manager that turns stop and save signals into flags the loop polls."""

    def __init__(self, stop_signals=STOP_SIGNALS, save_signal=SAVE_SIGNAL, verbose=True):
        self.stop = None              # name of the first stop signal received, e.g. "SIGINT"
        self.save_requested = False
        self.agreed_stop = None       # the stop every rank acts on (see `settle`)
        self.agreed_save = False
        self._stop_signals = [getattr(signal, n) for n in stop_signals if hasattr(signal, n)]
        self._save_signal = getattr(signal, save_signal, None) if save_signal else None
        self._previous = {}
        self._verbose = verbose       # False: take the signals without a word (rank > 0)

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

    def votes(self):
        """This process's requests as numbers for the ranks to add up: [a SIGINT came, a
        SIGTERM came, a SIGUSR1 came]; the save request counts once."""
        return [float(self.stop == "SIGINT"), float(self.stop == "SIGTERM"),
                float(self.take_save_request())]

    def settle(self, totals):
        """Adopt the ranks' summed `votes()` -> the agreed stop (None: go on).

        Every rank gets the same totals, so all stop, or save, after the same step. A
        stop, once agreed, stays; SIGTERM (preemption) names it when both came.
        """
        sigint, sigterm, save = (float(t) for t in totals)
        if self.agreed_stop is None and (sigint or sigterm):
            self.agreed_stop = "SIGTERM" if sigterm else "SIGINT"
        self.agreed_save = self.agreed_save or save > 0
        return self.agreed_stop

    def agree(self, group):
        """`settle` on a sum of its own (where the loop does no other allreduce)."""
        return self.settle(group.sum(self.votes()))

    def take_agreed_save(self):
        """True once per agreed save request."""
        save, self.agreed_save = self.agreed_save, False
        return save

    def _on_stop(self, signum, frame):
        self.stop = signal.Signals(signum).name
        for sig in self._stop_signals:  # the next one takes the default action: exit now
            signal.signal(sig, signal.SIG_DFL)
        self._say(f"\n{self.stop} received: stopping after this batch and saving a "
                  f"checkpoint (Ctrl-C again quits at once, without it)\n")

    def _on_save(self, signum, frame):
        self.save_requested = True
        self._say(f"\n{signal.Signals(signum).name} received: saving a checkpoint after "
                  f"this batch\n")

    def _say(self, text):
        # NOTE: os.write, not print: a handler can run while the main thread is inside a
        # write to sys.stderr (the progress bar), and Python's buffered streams raise
        # "reentrant call" if the handler writes to the same stream.
        if self._verbose:
            try:
                os.write(2, text.encode())
            except OSError:
                pass
