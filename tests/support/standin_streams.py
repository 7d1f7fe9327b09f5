"""The stand-in GPU's streams, events and pooled memory, and the stream-order checker.

Part of the stand-in `cupy` (standin_cupy.py, whose docstring gives the rules), which
gives these CuPy's names (`cuda.Stream`, `cuda.Event`, `get_default_memory_pool`) and
issues every operation on device memory through `_issue`: checked against the streams'
vector clocks, then run (now on the current stream, deferred on another). Blocks come from
`MemoryPool`, poisoned (POISON bytes) when fresh and when freed; a block freed while work
on another stream may still use it is reported in `hazards`.
"""

import weakref

import numpy as np

POISON = 0xFF  # every byte of a fresh or freed block: NaN as float32/float64, -1 as int

hazards = []  # errors found while freeing blocks (see MemoryPool.free)


class StreamOrderError(RuntimeError):
    """Memory touched on one stream while work on another stream is not ordered before."""


# ----------------------------------------------------------------------------------------
# Streams and events: vector clocks
# ----------------------------------------------------------------------------------------

class Stream:
    """A CUDA stream: a queue of deferred work and a clock {stream: ops it waited for}."""

    null = None  # the default stream, set below
    _current = []  # streams made current by `with stream:` / `use()`
    all = weakref.WeakSet()  # every stream alive, for Device.synchronize

    def __init__(self, null=False, non_blocking=False, ptr=0):
        Stream.all.add(self)
        self.seq = 0  # operations issued so far
        self.waited = {}  # other stream -> last of its operations this stream is after
        self.queue = []  # deferred (seq, clock at issue, fn)
        self.non_blocking = non_blocking

    def clock(self):
        """What work on this stream is ordered after: its waits, the host's, its own ops."""
        clock = _merge(dict(self.waited), _host_clock)
        clock[self] = self.seq
        return clock

    def record(self, event=None):
        event = event or Event()
        event.record(self)
        return event

    def wait_event(self, event):
        if event.clock is not None:
            _merge(self.waited, event.clock)

    def synchronize(self):
        self.run_until(self.seq)
        _merge(_host_clock, self.clock())

    def run_until(self, seq):
        """Run the deferred work numbered up to `seq`, after what each item waited for."""
        while self.queue and self.queue[0][0] <= seq:
            _, clock, fn = self.queue.pop(0)
            _run_dependencies(self, clock)
            fn()

    def use(self):
        Stream._current[:] = [self]
        return self

    def __enter__(self):
        Stream._current.append(self)
        return self

    def __exit__(self, *exc):
        Stream._current.pop()

    def __repr__(self):
        return "<null stream>" if self is Stream.null else f"<stream {id(self):#x}>"


Stream.null = Stream(null=True)
_host_clock = {}  # stream -> last of its operations the host has synchronised with


def _merge(into, other):
    for stream, seq in other.items():
        if seq > into.get(stream, 0):
            into[stream] = seq
    return into


def _run_dependencies(stream, clock):
    for other, seq in clock.items():
        if other is not stream:
            other.run_until(seq)


def get_current_stream():
    return Stream._current[-1] if Stream._current else Stream.null


class Event:
    """A point in a stream's work; `wait_event` orders another stream after it."""

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.stream, self.clock = None, None

    def record(self, stream=None):
        self.stream = stream or get_current_stream()
        self.clock = self.stream.clock()

    def synchronize(self):
        if self.stream is not None:
            self.stream.run_until(self.clock[self.stream])
            _merge(_host_clock, self.clock)

    @property
    def done(self):
        self.synchronize()
        return True


def _ordered(stream, seq, after):
    """Is operation `seq` of `stream` ordered before work now issued on stream `after`?"""
    return stream is after or seq <= after.clock().get(stream, 0)


def _issue(reads, writes, fn, stream=None):
    """Check and record an operation on `stream` (the current one by default) and run it:
    now on the current stream, deferred on any other. Returns fn's result when run now."""
    current = get_current_stream()
    stream = stream or current
    for memory in set(reads) | set(writes):
        memory.check_access(stream, memory in writes)
    stream.seq += 1
    for memory in reads:
        memory.reads[stream] = stream.seq
    for memory in writes:
        memory.last_write = (stream, stream.seq)
    if stream is not current:
        stream.queue.append((stream.seq, stream.clock(), fn))
        return None
    _run_dependencies(stream, stream.clock())
    stream.run_until(stream.seq)
    return fn()


# ----------------------------------------------------------------------------------------
# Memory: blocks from a pool, poisoned when fresh and when freed
# ----------------------------------------------------------------------------------------

class Memory:
    """One pool block: a host buffer standing for device memory, and who touched it when."""

    def __init__(self, pool, buffer, stream):
        self.pool, self.buffer, self.stream = pool, buffer, stream
        self.ptr = buffer.ctypes.data
        self.last_write = None  # (stream, seq)
        self.reads = {}  # stream -> seq of its last read
        pool.live[id(self)] = self

    def check_access(self, stream, write):
        if write:
            for other, seq in self.reads.items():
                if not _ordered(other, seq, stream):
                    raise StreamOrderError(
                        f"{stream} overwrites device memory that {other} may still be "
                        f"reading (wait_event on an event recorded after the read)")
        if self.last_write is not None and not _ordered(*self.last_write, stream):
            raise StreamOrderError(
                f"{stream} {'writes' if write else 'reads'} device memory written on "
                f"{self.last_write[0]} without waiting for it (stream.wait_event)")

    def __del__(self):
        self.pool.free(self)


class MemoryPool:
    """CuPy's pool in miniature: freed blocks wait for an allocation of their exact size on
    the stream that allocated them."""

    def __init__(self):
        self.free_blocks = {}  # (stream, nbytes) -> [buffer, ...]
        self.live = weakref.WeakValueDictionary()  # id -> Memory, not kept alive by this

    def malloc(self, nbytes):
        stream = get_current_stream()
        blocks = self.free_blocks.get((stream, nbytes))
        if blocks:
            buffer = blocks.pop()
        else:
            buffer = np.full(max(nbytes, 1), POISON, dtype=np.uint8)
        return Memory(self, buffer, stream)

    def free(self, memory):
        """Take a block back: check that no other stream's work on it is unordered, then
        poison it. NOTE: the pool reuses it at once on its stream, as CuPy's does."""
        self.live.pop(id(memory), None)
        touched = list(memory.reads.items())
        if memory.last_write is not None:
            touched.append(memory.last_write)
        for stream, seq in touched:
            if not _ordered(stream, seq, memory.stream):
                hazards.append(f"a block was freed to the pool of {memory.stream} while work "
                               f"on {stream} may still use it (synchronize that stream first)")
        memory.buffer.fill(POISON)
        self.free_blocks.setdefault((memory.stream, memory.buffer.nbytes), []).append(
            memory.buffer)

    def find(self, address):
        """The live block holding a device address, or None (a host address)."""
        for memory in list(self.live.values()):
            if memory.ptr <= address < memory.ptr + memory.buffer.nbytes:
                return memory
        return None

    def free_all_blocks(self):
        self.free_blocks.clear()

    def used_bytes(self):
        return sum(m.buffer.nbytes for m in list(self.live.values()))

    def total_bytes(self):
        return self.used_bytes() + sum(b.nbytes for bs in self.free_blocks.values() for b in bs)


_pool = MemoryPool()


def get_default_memory_pool():
    return _pool
