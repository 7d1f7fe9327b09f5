"""A stand-in for CuPy's streams and NCCL binding, to run `NCCLGroup` under mpirun on CPUs.

CI has no GPU, so the NCCL path of minivgg.distributed would otherwise never run before it
meets a real cluster. Installed in each rank (`install()`), this module plays `cupy` with:

* "device" arrays that are NumPy arrays (the CPU stand-in for CuPy, as in
  cuda_host_emulator.py), and a device pointer that is the array's host address;
* `cuda.Device(i).use()`, `.pci_bus_id`, `cuda.runtime.getDeviceCount()`: GPUS per machine,
  or, where CUDA_VISIBLE_DEVICES is set, the physical GPUs it lists (as the driver does);
* `cuda.Stream`, `cuda.Event`, `cuda.get_current_stream()` that record ordering;
* `cuda.nccl`: `get_unique_id()`, `NcclCommunicator(ndev, uid, rank)` with `allReduce` and
  `bcast`, which move the bytes with MPI.

It checks the contract of the real library, which a wrong call would break only on GPUs:
every rank builds its communicator with rank 0's unique id and its own rank, after choosing
a GPU no other rank on the machine uses; a collective runs on a stream that was made to wait
for the compute stream since its previous collective; and the compute stream waits for the
collective stream before it reads the sums (`unsynchronised()` counts the violations).
"""

import ctypes
import os
import sys
import types

import numpy as np

GPUS = 2
NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64 = 6, 7, 8
NCCL_SUM = 0
DTYPES = {NCCL_FLOAT16: np.float16, NCCL_FLOAT32: np.float32, NCCL_FLOAT64: np.float64}

current_device = None
violations = []


class Stream:
    _by_ptr = {}

    def __init__(self, non_blocking=False, null=False):
        self.ptr = 0 if null else 1000 + len(Stream._by_ptr)
        Stream._by_ptr[self.ptr] = self
        self.collectives = 0      # collectives issued on this stream so far
        self.waited_for = {}      # stream -> its collective count when we last waited
        self.fresh_wait = False   # waited for another stream since our last collective

    def wait_event(self, event):
        self.waited_for[event.stream] = event.collectives
        self.fresh_wait = True

    def synchronize(self):
        pass


class Event:
    def record(self, stream=None):
        self.stream = stream or get_current_stream()
        self.collectives = self.stream.collectives


_null_stream = Stream(null=True)


def get_current_stream():
    return _null_stream


def unsynchronised():
    """Collectives whose results the compute stream may read before they are done."""
    return sum(s.collectives - _null_stream.waited_for.get(s, 0)
               for s in Stream._by_ptr.values() if s is not _null_stream)


def visible_gpus():
    """The physical GPUs this process sees, in order: CUDA_VISIBLE_DEVICES or all GPUS."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return list(range(GPUS))
    return [int(i) for i in listed.split(",") if i.strip()]


class Device:
    def __init__(self, index):
        if not 0 <= index < len(visible_gpus()):
            raise ValueError(f"stand-in: no GPU {index} (there are {len(visible_gpus())})")
        self.index = index

    @property
    def pci_bus_id(self):
        return f"0000:{0x18 + visible_gpus()[self.index]:02X}:00.0"

    def use(self):
        global current_device
        current_device = self.index


def _array_at(ptr, count, datatype):
    dtype = np.dtype(DTYPES[datatype])
    raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype)


def get_unique_id():
    return tuple(int(b) - 128 for b in os.urandom(128))


class NcclCommunicator:
    def __init__(self, ndev, commId, rank):
        from mpi4py import MPI
        self.MPI, world = MPI, MPI.COMM_WORLD
        if ndev != world.Get_size() or rank != world.Get_rank():
            raise RuntimeError(f"stand-in NCCL: communicator of {ndev} ranks as rank {rank}, "
                               f"MPI says {world.Get_size()} and {world.Get_rank()}")
        if current_device is None:
            raise RuntimeError("stand-in NCCL: no GPU chosen before the communicator")
        ids = np.empty((ndev, 128), dtype=np.int16)
        world.Allgather(np.array(commId, dtype=np.int16), ids)
        if (ids != ids[0]).any():
            raise RuntimeError("stand-in NCCL: the ranks passed different unique ids")
        node = world.Split_type(MPI.COMM_TYPE_SHARED)
        devices = np.empty(node.Get_size(), dtype=np.int64)
        physical = visible_gpus()[current_device]
        node.Allgather(np.array([physical], dtype=np.int64), devices)
        node.Free()
        if len(set(devices.tolist())) != len(devices):
            raise RuntimeError(f"stand-in NCCL: ranks of one machine share a GPU {devices}")
        self.comm = world

    def _stream(self, ptr):
        stream = Stream._by_ptr[ptr]
        if stream is not _null_stream and not stream.fresh_wait:
            violations.append("collective on a stream that did not wait for the compute "
                              "stream since its last collective")
        stream.fresh_wait = False
        stream.collectives += 1

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
        if op != NCCL_SUM:
            raise ValueError("stand-in NCCL: only sums")
        self._stream(stream)
        recv = _array_at(recvbuf, count, datatype)
        send = self.MPI.IN_PLACE if sendbuf == recvbuf else _array_at(sendbuf, count, datatype)
        self.comm.Allreduce(send, recv, op=self.MPI.SUM)

    def bcast(self, buff, count, datatype, root, stream):
        self._stream(stream)
        self.comm.Bcast(_array_at(buff, count, datatype), root=root)


def install():
    """Make `import cupy` and `from cupy.cuda import nccl` find this stand-in."""
    cupy = types.ModuleType("cupy")
    cupy.__getattr__ = lambda name: getattr(np, name)
    cuda = types.ModuleType("cupy.cuda")
    cuda.Stream, cuda.Event, cuda.Device = Stream, Event, Device
    cuda.get_current_stream = get_current_stream
    cuda.runtime = types.SimpleNamespace(getDeviceCount=lambda: len(visible_gpus()))
    nccl = types.ModuleType("cupy.cuda.nccl")
    for name in ("NCCL_FLOAT16", "NCCL_FLOAT32", "NCCL_FLOAT64", "NCCL_SUM",
                 "get_unique_id", "NcclCommunicator"):
        setattr(nccl, name, globals()[name])
    cupy.cuda, cuda.nccl = cuda, nccl
    sys.modules.update({"cupy": cupy, "cupy.cuda": cuda, "cupy.cuda.nccl": nccl})
    # minivgg.backend must not take the stand-in for a GPU: its arrays are host arrays.
    from minivgg import backend
    backend._cupy_error = "the NCCL stand-in is not a GPU"
    from minivgg import distributed
    distributed._device_pointer = lambda a: a.ctypes.data
