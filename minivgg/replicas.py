"""The processes that train one model together (Sec. 3.3), as the training loop sees them.

Every rank holds the same weights and takes its slice of every global batch. After each
step the ranks must agree on three things; `Replicas` is the one object that does it:

    loss_sum, wrong, seen = replicas.sum([loss_sum, wrong, seen])   # every rank's figures
    with replicas.averaging_gradients(n):                           # gradients averaged
        loss.backward(on_leaf_done=replicas.grad_ready)             #   while backward runs
    if replicas.stop: ...                                           # a stop all agreed on

NOTE: a signal (Ctrl-C, SIGTERM, SIGUSR1) reaches the ranks at different moments. So no
rank acts on its own: its votes (`minivgg.interrupts.StopSignals.votes`) ride along in the
step's one sum, and every rank settles on the same totals, so all stop, or save, after the
same batch. With one process the sum is the identity and the averaging does nothing.
"""

import contextlib

from minivgg.distributed import SingleProcess
from minivgg.interrupts import StopSignals


class Replicas:
    """`group`'s ranks training `parameters` together: sums, gradient averaging, votes."""

    def __init__(self, group=None, parameters=()):
        self.group = group or SingleProcess()
        self.reducer = self.group.gradient_reducer(list(parameters))
        self.signals = None  # a StopSignals while `listening()`

    @contextlib.contextmanager
    def listening(self):
        """Take stop and save signals as votes while the block runs; rank 0 alone says
        "SIGINT received" for all."""
        with StopSignals(verbose=self.group.is_root) as signals:
            self.signals = signals
            try:
                yield self
            finally:
                self.signals = None

    def sum(self, values):
        """`values` added up over the ranks (float64), this rank's votes riding along in
        the same allreduce; afterwards `stop` and `take_save` say what all agreed on."""
        values = list(values)
        votes = self.signals.votes() if self.signals else []
        totals = self.group.sum(values + votes)
        if self.signals:
            self.signals.settle(totals[len(values):])
        return totals[:len(values)]

    @property
    def stop(self):
        """The stop signal every rank acts on ("SIGINT", "SIGTERM"), or None: go on."""
        return self.signals.agreed_stop if self.signals else None

    @property
    def stop_received(self):
        """True when a stop signal reached this rank (the others learn it in the next sum)."""
        return bool(self.signals and self.signals.stop)

    def take_save(self):
        """True once per agreed save request (SIGUSR1: checkpoint now and go on)."""
        return bool(self.signals and self.signals.take_agreed_save())

    def agree(self):
        """`stop` after a sum of the votes alone (where the loop does no other sum)."""
        return self.signals.agree(self.group) if self.signals else None

    @contextlib.contextmanager
    def averaging_gradients(self, count):
        """Backward inside this block leaves every rank with the gradients averaged over
        the global batch (`count`: this rank's images); buckets travel as they fill."""
        self.reducer.start(count)
        yield
        self.reducer.finish()

    @property
    def grad_ready(self):
        """The hook backward calls as each weight's gradient is done (None: no hook)."""
        return self.reducer.grad_ready
