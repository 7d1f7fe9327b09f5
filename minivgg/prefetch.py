"""Moving batches to the training device.

`to_device_batches(batches, device)` takes an iterator of host (images, labels) arrays and
yields them on `device`. On the CPU it passes them through unchanged. The GPU version (see
the GPU backend) copies through pinned host buffers on a side stream, one batch ahead, so
the host-to-device copy overlaps with compute.
"""

from minivgg import backend


def to_device_batches(batches, device):
    """Yield (x, y) from `batches` as arrays on `device` ("cpu" or "cuda")."""
    device = backend.check_device(device)
    if device == "cpu":
        yield from batches
        return
    for x, y in batches:
        yield backend.to_device(x, device), backend.to_device(y, device)
