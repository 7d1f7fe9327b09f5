"""Waiting a little without sleeping: the hand-offs of `runtime.map_ranges`.

A thread blocked on a lock sleeps, and on this project's virtual machines waking it again
costs tens of microseconds (an empty `map_ranges` call on 2 threads: about 45 us). A small
recipe's training step makes about 56 such calls, so a helper thread that is about to
sleep first watches a counter for a short while, in compiled code without the GIL, and the
caller bumps the counter right after it hands the work over. Correctness never depends on
the watching: whoever stops watching still takes the work, or the result, from its queue.

    counts = np.zeros(n, np.int64)
    wait_past(counts, i, value, loads)   # True once counts[i] > value, within `loads` reads
"""

from numba import njit, types
from numba.extending import intrinsic

# Reads of the counter before giving up and sleeping: 0.11 ms on this machine (AMD EPYC,
# 2026-12-05). NOTE: a quarter of that (50,000) gave the same step time; 0.11 ms covers
# more of the gaps between two calls, for at most 0.11 ms of a core after each.
SPIN_LOADS = 200_000


@intrinsic
def _load_acquire(typingctx, counts, i):
    """counts[i] read as an atomic load with acquire ordering, so LLVM neither hoists it
    out of the loop nor merges the reads."""
    def codegen(context, builder, sig, args):
        array = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.load_atomic(builder.gep(array.data, [args[1]]), "acquire", 8)

    return types.int64(counts, types.intp), codegen


@njit(nogil=True, cache=True)
def wait_past(counts, i, value, loads):
    """Read counts[i] until it exceeds `value`, at most `loads` times -> whether it did."""
    for _ in range(loads):
        if _load_acquire(counts, i) > value:
            return True
    return False
