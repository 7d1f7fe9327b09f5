"""Data parallelism: one model per process, gradients averaged over MPI or NCCL (Sec. 3.3).

The paper trained on 4 GPUs by splitting each batch of 256 into per-GPU sub-batches,
computing their gradients at once and averaging them, which is exactly the gradient of the
whole batch (Sec. 3.3). minivgg does the same with N processes started by an MPI launcher
(`mpirun -n 4 python examples/train_imagenet.py DIR ...`). Every process, a "rank", holds
the whole model, and one training step on every rank is

    forward and backward on the rank's slice of the global batch
    gradients summed over the ranks (Allreduce of contiguous buckets) and averaged
    the same SGD step, so the weights stay identical without ever being sent again

The pieces, in the order a run meets them:

* `detect_launch()` (minivgg/launch.py) reads rank and world size from the launcher's
  environment (Open MPI, MPICH and Intel MPI, Slurm's srun). A single process never imports
  mpi4py.
* `init()` returns a group: `SingleProcess`, `MPIGroup` (CPU) or `NCCLGroup` (GPU: NCCL
  moves the gradients, MPI the rest), and sets each rank's kernel threads to the cores of
  its node divided by the ranks on it, so the ranks do not fight over cores.
* `group.broadcast_(arrays)` overwrites every rank's arrays with rank 0's (parameters after
  initialisation, `--init-from` and `--resume`).
* `group.gradient_reducer(params)` packs the gradients into a few buckets. With
  `loss.backward(on_leaf_done=reducer.grad_ready)` a bucket's allreduce starts as soon as
  backward has finished its last gradient (the fc layers' long before conv1's), so the
  communication overlaps the rest of backward, as in PyTorch DDP and Horovod.
* `group.sum(values)` adds small per-rank counters: losses, error counts, a stop flag.
* `group.guard()` turns an exception on any rank into one message naming the rank and
  MPI_Abort, so the other ranks never wait forever inside an allreduce.

Only mpi4py's buffer (upper-case) methods are used: they send the arrays' bytes as they
are, where the lower-case methods would pickle them.
"""

import contextlib
import os
import socket
import sys
import time
import traceback
import zlib

import numpy as np

from minivgg import backend
from minivgg.launch import default_threads, detect_launch, set_threads, threads_from_environment

# Bucket size. NOTE: one allreduce per parameter would pay the network latency 32 times a
# step and one for all of them could not start before conv1's gradient is ready; 64 MB
# gives VGG-16 three buckets (fc8+fc7, fc6, all convs) and the small recipes one.
BUCKET_BYTES = 64 * 2**20

# Seconds a failing rank waits between printing why and MPI_Abort (see `_abort`).
ABORT_GRACE_S = 0.5


class DistributedError(RuntimeError):
    """A multi-process launch that cannot work (no mpi4py, sizes that disagree, no GPU)."""


# ----------------------------------------------------------------------------------------
# Starting the group
# ----------------------------------------------------------------------------------------

def init(device="cpu", threads=None, environ=None):
    """The process group of this run: one process, or all the ranks of an MPI launch.

    `device` "cuda" gives an `NCCLGroup` with one GPU per rank (local rank mod GPUs).
    A rank that cannot join (no GPU, no NCCL) prints why and ends the job (MPI_Abort).
    `threads`: kernel threads of this rank; default: NUMBA_NUM_THREADS or OMP_NUM_THREADS
    when set, else cores / local ranks (`default_threads`); a single process is left as
    it is unless `threads` is given.
    """
    launch = detect_launch(environ)
    if launch.size == 1:
        group = SingleProcess()
    else:
        MPI = _import_mpi(launch)
        if MPI.COMM_WORLD.Get_size() != launch.size:
            raise DistributedError(
                f"{launch.launcher} started {launch.size} processes, but MPI sees "
                f"{MPI.COMM_WORLD.Get_size()}: mpi4py is linked to another MPI than the "
                f"launcher's (use the mpirun that comes with it: {_mpi_library(MPI)})")
        cuda = str(device).startswith("cuda")
        try:
            group = NCCLGroup(MPI) if cuda else MPIGroup(MPI)
        except DistributedError as e:
            # NOTE: the other ranks may already wait in a collective (the NCCL id's Bcast)
            print(f"error: rank {launch.rank} of {launch.size}: {e}", file=sys.stderr,
                  flush=True)
            _abort(MPI.COMM_WORLD, 2)
    if threads is None and group.size > 1:
        threads = threads_from_environment() or default_threads(group.local_size)
    if threads:
        set_threads(threads)
    return group


def _import_mpi(launch):
    try:
        import mpi4py
    except ImportError:
        raise DistributedError(
            f"this is rank {launch.rank} of {launch.size} processes started by "
            f"{launch.launcher}, but mpi4py is not installed; install the MPI extra: "
            "pip install 'minivgg[mpi]'") from None
    # Only the main thread calls MPI (the kernels' threads never do).
    mpi4py.rc.thread_level = "funneled"
    from mpi4py import MPI
    return MPI


def _mpi_library(MPI):
    """The MPI library's name and version, e.g. "MPICH Version: 5.0.2"."""
    return " ".join(MPI.Get_library_version().splitlines()[0].split())


# ----------------------------------------------------------------------------------------
# Groups
# ----------------------------------------------------------------------------------------

class SingleProcess:
    """The group of a run without a launcher: every collective is the identity."""
    rank, size, local_rank, local_size = 0, 1, 0, 1
    description = "1 process"

    @property
    def is_root(self):
        """True on the rank that prints, writes metrics, plots and checkpoints."""
        return self.rank == 0

    def broadcast_(self, arrays):
        """Overwrite `arrays` on every rank with rank 0's, in place."""

    def sum(self, values):
        """The element-wise sum over ranks of a few numbers, as float64."""
        return np.array(values, dtype=np.float64)

    def any(self, flag):
        """True on every rank when `flag` is true on at least one."""
        return bool(self.sum([bool(flag)])[0])

    def check_identical(self, arrays, what):
        """Raise `DistributedError` unless every rank holds bitwise the same `arrays`."""

    def gradient_reducer(self, params, bucket_bytes=BUCKET_BYTES, overlap=True):
        return NoReduction()

    @contextlib.contextmanager
    def guard(self):
        """Around a rank's whole run: a failure ends every rank (see MPIGroup.guard)."""
        yield


class NoReduction:
    """The reducer of a single process: nothing to average, no backward hook."""
    grad_ready = None

    def start(self, count):
        pass

    def finish(self):
        pass


class MPIGroup(SingleProcess):
    """The ranks of MPI_COMM_WORLD, on CPUs: arrays travel through MPI itself."""

    def __init__(self, MPI):
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        # MPI knows which ranks share a machine for every launcher (the environment may not).
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self.description = f"{self.size} processes over MPI ({_mpi_library(MPI)})"

    def broadcast_(self, arrays):
        for a in arrays:
            self.comm.Bcast(_contiguous(a), root=0)

    def sum(self, values):
        buf = np.array(values, dtype=np.float64)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return buf

    def gradient_reducer(self, params, bucket_bytes=BUCKET_BYTES, overlap=True):
        return GradientReducer(params, _MPITransport(self.comm, self.MPI), bucket_bytes,
                               overlap)

    def check_identical(self, arrays, what):
        # A CRC-32 of each array's bytes, compared through the smallest and largest over
        # ranks: one pass over the weights (0.2 s for VGG-16's 553 MB), once an epoch.
        crcs = np.array([zlib.crc32(backend.to_numpy(a).tobytes()) for a in arrays],
                        dtype=np.int64)
        low, high = crcs.copy(), crcs.copy()
        self.comm.Allreduce(self.MPI.IN_PLACE, low, op=self.MPI.MIN)
        self.comm.Allreduce(self.MPI.IN_PLACE, high, op=self.MPI.MAX)
        if (low != high).any():
            raise DistributedError(f"the ranks' {what} differ ({int((low != high).sum())} "
                                   f"of {len(crcs)} arrays): data parallelism is broken")

    def abort(self, message, code=1):
        """Print `message` naming this rank, then end every rank of the job (MPI_Abort)."""
        print(f"error: rank {self.rank} of {self.size} ({socket.gethostname()}): {message}"
              f"; ending all {self.size} ranks", file=sys.stderr, flush=True)
        _abort(self.comm, code)

    @contextlib.contextmanager
    def guard(self):
        """Around a rank's whole run: an exception or a failing exit on this rank ends the
        job at once, instead of leaving the other ranks waiting in the next allreduce.

        NOTE: a clean exit (status 0) passes through; an `error:` line printed by the
        script before `sys.exit(2)` stays the first thing the user reads.
        """
        try:
            yield
        except SystemExit as e:
            if e.code in (0, None):
                raise
            code = e.code if isinstance(e.code, int) else 1
            self.abort(f"stopped with exit status {code}", code)
        except KeyboardInterrupt:
            self.abort("interrupted", 130)
        except BaseException as e:
            traceback.print_exc()
            self.abort(f"{type(e).__name__}: {e}")


def _abort(comm, code):
    """MPI_Abort: the launcher ends every rank of the job.

    NOTE: two races with the launcher. It forwards our output through pipes and may kill
    everything before it has read what we just printed, so we give it a moment first; and
    MPICH's Abort can return while the launcher is still on its way, so we exit anyway.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(ABORT_GRACE_S)
    comm.Abort(code)
    os._exit(code)


def _contiguous(a):
    # NOTE: the buffer interface sends the bytes of the array, which must be one block;
    # a parameter always is, a view of one might not be.
    if not a.flags.c_contiguous:
        raise ValueError("broadcast_ needs C-contiguous arrays")
    return a


# ----------------------------------------------------------------------------------------
# Gradient buckets
# ----------------------------------------------------------------------------------------

def plan_buckets(sizes, itemsize, bucket_bytes=BUCKET_BYTES):
    """Parameter indices grouped into buckets, in the order backward finishes them.

    `sizes` are the parameters' element counts in model order; backward finishes the last
    layer's gradients first, so buckets are filled from the end. A bucket is closed once it
    holds `bucket_bytes`; a larger parameter (VGG-16's fc6, 411 MB) is a bucket alone.
    """
    buckets, current, nbytes = [], [], 0
    for i in reversed(range(len(sizes))):
        current.append(i)
        nbytes += sizes[i] * itemsize
        if nbytes >= bucket_bytes:
            buckets.append(current)
            current, nbytes = [], 0
    if current:
        buckets.append(current)
    return buckets


class _Bucket:
    """One contiguous buffer: the gradients of a few parameters and the rank's count.

    Layout: [grad_0 * count | grad_1 * count | ... | count]. After the allreduce sums the
    buffers of all ranks, dividing by the last element gives the average of the gradients
    weighted by each rank's number of images: exactly the gradient of the global batch
    even when ranks had different numbers of images (an unreadable file skipped).
    """

    def __init__(self, params):
        self.params = params
        dtype = params[0].data.dtype
        if any(p.data.dtype != dtype for p in params):
            raise ValueError("gradient buckets need parameters of one dtype")
        xp = backend.array_module(params[0].data)
        self.flat = xp.zeros(sum(p.size for p in params) + 1, dtype=dtype)
        self.views, offset = [], 0
        for p in params:
            self.views.append(self.flat[offset:offset + p.size].reshape(p.shape))
            offset += p.size
        self.ready, self.handle = 0, None

    def pack(self, count):
        """Copy the gradients in, each multiplied by this rank's image count."""
        xp = backend.array_module(self.flat)
        for p, view in zip(self.params, self.views):
            if p.grad is None:  # NOTE: unused by this batch; it still takes part
                view.fill(0)
            else:
                xp.multiply(p.grad, count, out=view)
        self.flat[-1] = count

    def unpack(self):
        """Divide by the total count and hand each parameter its averaged gradient."""
        self.flat[:-1] /= self.flat[-1]
        # NOTE: p.grad becomes a view of the bucket, not a copy (553 MB for VGG-16): the
        # optimizer's zero_grad() drops it before the next backward refills the bucket.
        for p, view in zip(self.params, self.views):
            p.grad = view


class GradientReducer:
    """Averages the gradients of `params` over the ranks, a bucket at a time.

    Per step:

        reducer.start(len(y))                        # this rank's images in the batch
        loss.backward(on_leaf_done=reducer.grad_ready)
        reducer.finish()                             # p.grad: the global-batch gradient
        optimizer.step()

    With `overlap`, a bucket's allreduce starts inside backward as soon as its last
    gradient is final; without (or with no hook given to backward), all start in finish().
    """

    def __init__(self, params, transport, bucket_bytes=BUCKET_BYTES, overlap=True):
        params = list(params)
        if not params:
            raise ValueError("GradientReducer: got an empty parameter list")
        plan = plan_buckets([p.size for p in params], params[0].data.dtype.itemsize,
                            bucket_bytes)
        self.buckets = [_Bucket([params[i] for i in indices]) for indices in plan]
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self.transport, self.overlap = transport, overlap
        self.count = None

    def start(self, count):
        """Begin a step in which this rank saw `count` images."""
        self.count = count
        for b in self.buckets:
            b.ready, b.handle = 0, None

    def grad_ready(self, param):
        """The backward hook: `param.grad` is final; launch its bucket once it is full."""
        bucket = self._bucket_of.get(id(param))
        if bucket is None:
            return
        bucket.ready += 1
        if self.overlap and bucket.ready == len(bucket.params):
            self._launch(bucket)
        # NOTE: MPI moves a nonblocking collective forward only inside MPI calls (there is
        # no progress thread by default): testing the requests now and then keeps it going.
        self.transport.progress([b.handle for b in self.buckets if b.handle is not None])

    def finish(self):
        """Launch what is left, wait for every bucket, leave the averages in `p.grad`."""
        if self.count is None:
            raise RuntimeError("GradientReducer.finish() without start(count)")
        for b in self.buckets:
            if b.handle is None:
                self._launch(b)
        self.transport.wait([b.handle for b in self.buckets])
        for b in self.buckets:
            b.unpack()
        self.count = None

    def _launch(self, bucket):
        bucket.pack(self.count)
        bucket.handle = self.transport.start(bucket.flat)


class _MPITransport:
    """Nonblocking in-place MPI sums of host buffers."""

    def __init__(self, comm, MPI):
        self.comm, self.MPI = comm, MPI

    def start(self, buf):
        return self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

    def progress(self, requests):
        if requests:
            self.MPI.Request.Testall(requests)

    def wait(self, requests):
        self.MPI.Request.Waitall(requests)


# ----------------------------------------------------------------------------------------
# GPUs: NCCL for the arrays, MPI for the rest
# ----------------------------------------------------------------------------------------

class NCCLGroup(MPIGroup):
    """One GPU per rank, arrays summed by NCCL.

    Which GPU: with one visible GPU (each rank given its own by the launcher, e.g. Slurm's
    `srun --gpus-per-task=1` or a per-rank CUDA_VISIBLE_DEVICES) that one; with several,
    the rank's local rank among them (`mpirun -n 8` on a machine of 8 GPUs). Either way
    the ranks of a machine then compare their GPUs' PCI bus ids and refuse to start if two
    of them share one (NCCL cannot put two ranks of a communicator on one GPU).

    NCCL needs one "unique id" made by one rank and known to all: rank 0 makes it and MPI
    broadcasts its 128 bytes. Counters, flags and failures still go through MPI.
    """

    def __init__(self, MPI):
        super().__init__(MPI)
        try:
            import cupy
            from cupy.cuda import nccl
            gpus = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # ImportError, no driver, no NCCL in this CuPy
            raise DistributedError(f"device 'cuda' on several ranks needs CuPy with NCCL and "
                                   f"a GPU (pip install 'minivgg[cuda,mpi]'): "
                                   f"{type(e).__name__}: {e}") from None
        if gpus < 1:
            raise DistributedError(f"rank {self.rank} on {socket.gethostname()} sees no GPU")
        self.cupy, self.nccl = cupy, nccl
        self.gpu = 0 if gpus == 1 else self.local_rank % gpus
        cupy.cuda.Device(self.gpu).use()
        self._check_one_rank_per_gpu(cupy.cuda.Device(self.gpu).pci_bus_id)
        uid = np.zeros(_NCCL_UNIQUE_ID_BYTES, dtype=np.int16)  # chars, signed or not
        if self.rank == 0:
            uid[:] = nccl.get_unique_id()
        self.comm.Bcast(uid, root=0)
        self.nccl_comm = nccl.NcclCommunicator(self.size, tuple(int(v) for v in uid),
                                               self.rank)
        self.description = (f"{self.size} processes, GPU {self.gpu} of {gpus} visible here "
                            f"(PCI {cupy.cuda.Device(self.gpu).pci_bus_id}), NCCL for "
                            f"gradients, MPI ({_mpi_library(self.MPI)}) for the rest")

    def _check_one_rank_per_gpu(self, bus_id):
        """Raise on every rank of a machine if two of its ranks chose the same GPU.

        NOTE: compares physical GPUs (PCI bus ids), not counts: two ranks that each see
        one GPU may see the same one (the same CUDA_VISIBLE_DEVICES), or different ones.
        """
        node = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED)
        mine = np.zeros(64, dtype=np.uint8)
        encoded = bus_id.encode()[:64]
        mine[:len(encoded)] = np.frombuffer(encoded, dtype=np.uint8)
        everyone = np.zeros((node.Get_size(), 64), dtype=np.uint8)
        node.Allgather(mine, everyone)
        node.Free()
        ids = [bytes(row).rstrip(b"\0").decode() for row in everyone]
        shared = [i for i, b in enumerate(ids) if ids.count(b) > 1]
        if shared:
            raise DistributedError(
                f"local ranks {', '.join(map(str, shared))} on {socket.gethostname()} would "
                f"share a GPU (PCI bus ids {', '.join(ids)}): give each rank its own GPU "
                f"(as many GPUs visible as ranks on the machine, or one distinct GPU per "
                f"rank through CUDA_VISIBLE_DEVICES or srun --gpus-per-task=1)")

    def broadcast_(self, arrays):
        stream = self.cupy.cuda.get_current_stream()
        for a in arrays:
            a = _contiguous(a)
            self.nccl_comm.bcast(_device_pointer(a), a.size, _nccl_dtype(self.nccl, a.dtype),
                                 0, stream.ptr)
        stream.synchronize()

    def gradient_reducer(self, params, bucket_bytes=BUCKET_BYTES, overlap=True):
        transport = _NCCLTransport(self.nccl_comm, self.nccl, self.cupy)
        return GradientReducer(params, transport, bucket_bytes, overlap)


class _NCCLTransport:
    """In-place NCCL sums on a stream of their own, ordered against the compute stream by
    events: a bucket is summed only after it was packed, and read only after the sum."""

    def __init__(self, comm, nccl, cupy):
        self.comm, self.nccl, self.cupy = comm, nccl, cupy
        self.stream = cupy.cuda.Stream(non_blocking=True)

    def start(self, buf):
        packed = self.cupy.cuda.Event()
        packed.record(self.cupy.cuda.get_current_stream())
        self.stream.wait_event(packed)
        ptr = _device_pointer(buf)
        self.comm.allReduce(ptr, ptr, buf.size, _nccl_dtype(self.nccl, buf.dtype),
                            self.nccl.NCCL_SUM, self.stream.ptr)
        return packed  # any non-None handle: the GPU itself tracks completion

    def progress(self, handles):
        pass  # NCCL runs on the GPU without help from the host

    def wait(self, handles):
        summed = self.cupy.cuda.Event()
        summed.record(self.stream)
        self.cupy.cuda.get_current_stream().wait_event(summed)


_NCCL_UNIQUE_ID_BYTES = 128  # sizeof(ncclUniqueId)


def _device_pointer(a):
    """The device address of a CuPy array (the tests' stand-in replaces this)."""
    return a.data.ptr


def _nccl_dtype(nccl, dtype):
    names = {np.dtype(np.float32): "NCCL_FLOAT32", np.dtype(np.float64): "NCCL_FLOAT64",
             np.dtype(np.float16): "NCCL_FLOAT16"}
    if np.dtype(dtype) not in names:
        raise ValueError(f"NCCL sums of {dtype} arrays are not supported here")
    return getattr(nccl, names[np.dtype(dtype)])
