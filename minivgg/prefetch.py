"""Moving batches to the training device, the next one while the current one trains.

`to_device_batches(batches, device)` takes an iterator of host (images, labels) arrays and
yields them on `device`. On the CPU it passes them through unchanged.

On the GPU a host-to-device copy runs at full speed only from page-locked ("pinned") host
memory, and only then can it run asynchronously, beside the kernels. So each batch is

1. copied on the host into a pinned buffer (two sets, used in turn, so one batch can be in
   flight while the next is staged);
2. sent to the GPU on a side stream, as soon as the previous batch has been handed out;
3. handed out after the training stream has been told to wait for that copy (an event, no
   host synchronisation).

So batch k+1 crosses the bus while the GPU computes step k: one batch ahead, which is all
the overlap a training step needs (a VGG step takes far longer than one batch's copy).
A consumer that stops early costs one wait for the copy in flight (see the `finally`).
"""

import numpy as np

from minivgg import backend


def to_device_batches(batches, device, move=None):
    """Yield (x, y, ...) tuples from `batches` with the arrays at positions `move` (default:
    all) on `device` ("cpu" or "cuda"); the others stay where they are.

    NOTE: the training loop moves the images only. Its labels stay on the host, where
    `functional.cross_entropy` checks their range without waiting for the GPU, and where
    the step's top-1 errors are counted from one read of the device (`train.train_step`).
    """
    device = backend.check_device(device)
    if device == "cpu":
        yield from batches
        return
    prefetcher = _CudaPrefetcher(backend.require_cuda(), move)
    pending = None
    try:
        for batch in batches:
            started = prefetcher.start(batch)
            if pending is not None:
                yield prefetcher.finish(pending)
            pending = started
        if pending is not None:
            yield prefetcher.finish(pending)
    finally:
        # NOTE: a consumer that stops early (`break`, TrainingDiverged) leaves the next
        # batch's copy in flight. Its device arrays go back to the memory pool when this
        # generator dies, and the pool may hand them out while the copy still writes into
        # them: wait for the side stream first.
        prefetcher.stream.synchronize()


class _CudaPrefetcher:
    """Host batches to the GPU through pinned buffers on a side stream."""

    def __init__(self, cp, move=None):
        import cupyx
        self.cp, self.empty_pinned, self.move = cp, cupyx.empty_pinned, move
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.pinned = [{}, {}]  # per slot: (shape, dtype) -> pinned host array
        self.copied = [None, None]  # per slot: event recorded after the slot's last copy
        self.slot = 0

    def _stage(self, a, slot):
        """`a` copied into slot's pinned buffer of its shape and dtype (made on first use)."""
        key = (a.shape, a.dtype.str)
        buffers = self.pinned[slot]
        if key not in buffers:
            if len(buffers) >= 4:  # shapes change rarely (a short last batch); stay small
                buffers.clear()
            buffers[key] = self.empty_pinned(a.shape, a.dtype)
        np.copyto(buffers[key], a)
        return buffers[key]

    def start(self, batch):
        """Begin copying `batch` to the GPU; returns what `finish` needs."""
        cp, slot = self.cp, self.slot
        self.slot ^= 1
        if self.copied[slot] is not None:
            # NOTE: the copy that last read this slot's pinned buffers must be done before
            # the host overwrites them.
            self.copied[slot].synchronize()
        # NOTE: the device arrays come from the training stream's memory pool and may reuse
        # memory that its queued kernels still read; the side stream waits for them first.
        self.stream.wait_event(cp.cuda.get_current_stream().record())
        arrays = []
        for i, a in enumerate(batch):
            if backend.device_of(a) == "cuda" or (self.move is not None and i not in self.move):
                arrays.append(a)
                continue
            host = self._stage(np.ascontiguousarray(a), slot)
            device_array = cp.empty(host.shape, dtype=host.dtype)
            device_array.set(host, stream=self.stream)
            arrays.append(device_array)
        self.copied[slot] = self.stream.record()
        return arrays, self.copied[slot]

    def finish(self, started):
        """The batch's device arrays, once the training stream is ordered after their copy."""
        arrays, copied = started
        self.cp.cuda.get_current_stream().wait_event(copied)
        return tuple(arrays)
