"""A stand-in `cupy` for CI: NumPy underneath, CuPy's rules on top, and a stream checker.

`cuda_host_emulator.py` loads `kernels/gpu.py` (and, through `use_standin`, the whole of
minivgg's "cuda" device) with this module in place of `cupy`. It is only as useful as it is
strict, so it refuses what real CuPy refuses and reproduces what a GPU silently gets wrong:

* device arrays are a type of their own (`ndarray`). `np.asarray(device_array)` raises
  TypeError, as in CuPy; so does arithmetic that mixes a device and a NumPy array. `get()`,
  `asnumpy` and `asarray` are the explicit copies. Reductions give 0-d device arrays.
* memory comes from a pool (`MemoryPool`) that reuses blocks of the same size on the same
  stream, as CuPy's does. Fresh and freed blocks are filled with 0xFF bytes, a NaN in float32
  and float64 (-1 in integers): `empty` hands out NaNs, and a read of freed memory shows.
* a raw kernel gets the address of an array's first element and nothing else (the launcher
  is in cuda_host_emulator.py): strides are ignored, so a non-contiguous view passed to a
  kernel is read as its raw memory, as on the GPU. So do the cuBLAS calls of
  `cuda.cublas` (gemmEx, gemmStridedBatchedEx): column-major operands are read from raw
  addresses with the leading dimensions and batch strides given, and each call is logged in
  `cublas_calls`.
* `transfers` counts the host-to-device copies (`set`, hence `asarray` of host data).
* streams and events. Work issued to the current stream runs at once; a copy issued to
  another stream (`a.set(host, stream=s)`) waits in that stream's queue until something is
  ordered after it (a `synchronize`, or a `wait_event` followed by work on the waiting
  stream): the latest a GPU may run it. Each stream keeps a vector clock of what it has
  waited for. Every operation records which blocks it reads and writes on which stream, and
  touching a block whose last write (or, for a write, last read) on another stream is not
  ordered before it raises `StreamOrderError`. A block freed while such work is unordered
  is reported in `hazards` (a destructor cannot raise); tests assert that list stays empty.

The streams, events and memory pool, and the checker itself, are standin_streams.py.

NOTE: stricter than CUDA in one place: the null stream does not synchronise implicitly with
other streams (CUDA's legacy default stream does, with blocking streams). minivgg only uses
`non_blocking=True` side streams, for which the two agree.
"""

import ctypes
import sys
import types

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

import standin_streams
from standin_streams import (
    Event, Stream, _host_clock, _issue, _pool, get_current_stream, hazards)

# CuPy's names for two pieces of the checker: the tests catch cupy.StreamOrderError
StreamOrderError = standin_streams.StreamOrderError
get_default_memory_pool = standin_streams.get_default_memory_pool

host_reads = []  # one entry per device-to-host read (`get`, `item`): each waits for the GPU
transfers = {"host_to_device": 0}  # copies made by `ndarray.set` (and so `asarray`)
cublas_calls = []  # (function, m, n, k, batch count, compute type) of every cuBLAS GEMM


# ----------------------------------------------------------------------------------------
# Device arrays
# ----------------------------------------------------------------------------------------

class _Pointer:
    def __init__(self, ptr, memory):
        self.ptr, self.mem = ptr, memory


class ndarray(NDArrayOperatorsMixin):
    """A device array: a NumPy view (`_a`) into a pool block (`_mem`)."""

    def __init__(self, view, memory):
        self._a, self._mem = view, memory

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    # --- facts that need no device access --------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray(self._a.T, self._mem))
    data = property(lambda self: _Pointer(self._a.__array_interface__["data"][0], self._mem))

    def __len__(self):
        return len(self._a)

    # --- host <-> device ---------------------------------------------------------------
    def get(self, stream=None, out=None):
        host_reads.append(self.shape)
        return _issue([self._mem], [], lambda: self._a.copy(), stream)

    def set(self, arr, stream=None):
        if not isinstance(arr, np.ndarray) or arr.shape != self.shape:
            raise ValueError("set: expects a NumPy array of the same shape")
        # NOTE: on another stream the host buffer is read when the copy runs, not now; and
        # the queued copy holds the memory, not this array, which may be freed meanwhile
        view = self._a
        transfers["host_to_device"] += 1
        return _issue([], [self._mem], lambda: np.copyto(view, arr), stream)

    def item(self):
        host_reads.append(self.shape)
        return _issue([self._mem], [], lambda: self._a.item())

    __float__ = lambda self: float(self.item())  # noqa: E731
    __int__ = lambda self: int(self.item())  # noqa: E731
    __bool__ = lambda self: bool(self.item())  # noqa: E731
    __index__ = lambda self: int(self._a.__index__())  # noqa: E731

    def __repr__(self):
        return f"standin.ndarray({self.get()!r})"

    # --- everything else is NumPy on the block, recorded on the current stream ----------
    def __getitem__(self, key):
        return _call(lambda k, a: a[k], (_key(key), self))

    def __setitem__(self, key, value):
        if isinstance(value, np.ndarray):
            value = asarray(value)  # CuPy copies a host value to the device first
        args, arrays = _unwrap((self, _key(key), value))
        view, key, value = args

        def assign():
            view[key] = value
        _issue([a._mem for a in arrays[1:]], [self._mem], assign)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getattr__(self, name):
        if name.startswith("_"):
            # NOTE: never lend out `__array_interface__` and friends, or np.asarray would
            # read the device array without a word, which CuPy refuses
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if not callable(attr):
            return attr
        writes = name in ("fill", "sort", "put", "partition")
        return lambda *args, **kwargs: _call(
            lambda a, *args, **kwargs: getattr(a, name)(*args, **kwargs),
            (self, *args), kwargs, in_place=writes)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if not all(isinstance(i, _ALLOWED + (np.ndarray,)) for i in inputs):
            return NotImplemented  # e.g. a Tensor: let its reflected operator run
        out = kwargs.get("out")
        result = _call(getattr(ufunc, method), inputs, kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return result

    def __array_function__(self, func, types, args, kwargs):
        return _call(func, args, kwargs)


_ALLOWED = (ndarray, int, float, complex, bool, np.generic, type(None))


def _key(key):
    """An index with NumPy index arrays allowed (CuPy accepts them), device arrays kept."""
    if isinstance(key, np.ndarray):
        return asarray(key)
    if isinstance(key, tuple):
        return tuple(asarray(k) if isinstance(k, np.ndarray) else k for k in key)
    return key


def _unwrap(obj, arrays=None):
    """obj with device arrays replaced by their NumPy views -> (obj, [device arrays])."""
    arrays = [] if arrays is None else arrays
    if isinstance(obj, ndarray):
        arrays.append(obj)
        return obj._a, arrays
    if isinstance(obj, np.ndarray):
        raise TypeError(f"Unsupported type {type(obj)}: a NumPy array where a device array "
                        "is needed (use cupy.asarray)")
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(o, arrays)[0] for o in obj), arrays
    if isinstance(obj, dict):
        return {k: _unwrap(v, arrays)[0] for k, v in obj.items()}, arrays
    return obj, arrays


def _owner(result, arrays):
    """The block of the device array that `result` (a NumPy view) points into, or None."""
    start = result.__array_interface__["data"][0]
    for a in arrays:
        if a._mem.ptr <= start < a._mem.ptr + a._mem.buffer.nbytes or (
                result.size == 0 and start == a._mem.ptr):
            return a._mem
    return None


def _call(fn, args, kwargs=None, in_place=False):
    """fn on the NumPy views of args, recorded as reading every device argument and writing
    its outputs (new blocks, `out=`, or the first argument when `in_place`)."""
    (args, kwargs), arrays = _unwrap((tuple(args), kwargs or {}))
    outs = kwargs.get("out")
    outs = (outs,) if isinstance(outs, np.ndarray) else outs or ()
    written = [_owner(o, arrays) for o in outs] + ([arrays[0]._mem] if in_place else [])
    result = _issue([a._mem for a in arrays], [w for w in written if w], lambda: fn(
        *args, **kwargs))
    return _wrap(result, arrays)


def _wrap(result, arrays):
    """NumPy results as device arrays: views of an argument's block stay views; anything
    new is copied into a pool block."""
    if isinstance(result, (list, tuple)):
        return type(result)(_wrap(r, arrays) for r in result)
    if isinstance(result, np.generic):
        result = np.asarray(result)  # CuPy's reductions return 0-d arrays
    if not isinstance(result, np.ndarray):
        return result
    owner = _owner(result, arrays)
    if owner is not None:
        return ndarray(result, owner)
    out = empty(result.shape, result.dtype)
    _issue([], [out._mem], lambda: np.copyto(out._a, result))
    return out


# ----------------------------------------------------------------------------------------
# The functions kernels/gpu.py and minivgg call by name; the rest come from NumPy
# ----------------------------------------------------------------------------------------

def empty(shape, dtype=float, order="C"):
    dtype = np.dtype(dtype)
    shape = (shape,) if np.isscalar(shape) else tuple(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    memory = _pool.malloc(nbytes)
    return ndarray(memory.buffer[:nbytes].view(dtype).reshape(shape), memory)


def empty_like(a, dtype=None):
    return empty(a.shape, dtype or a.dtype)


def zeros(shape, dtype=float):
    out = empty(shape, dtype)
    out.fill(0)
    return out


def zeros_like(a, dtype=None):
    return zeros(a.shape, dtype or a.dtype)


def asarray(a, dtype=None, order=None):
    """A device array: `a` itself when it is one already (cast if asked), else a copy of
    the host value into a new block."""
    if isinstance(a, ndarray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    host = np.asarray(a, dtype=dtype)
    out = empty(host.shape, host.dtype)
    out.set(host)
    return out


def array(a, dtype=None, copy=True, order="K"):
    """`asarray`, with a copy of a device array unless `copy=False` (order "C" or "K")."""
    if isinstance(a, ndarray) and copy:
        return _call(lambda v: np.array(v, dtype=dtype, order=order), (a,))
    return asarray(a, dtype)


def ascontiguousarray(a, dtype=None):
    if not isinstance(a, ndarray):
        raise TypeError(f"ascontiguousarray: a device array is needed, got {type(a)}")
    if a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return _call(lambda v: np.ascontiguousarray(v, dtype=dtype), (a,))


def asnumpy(a, stream=None):
    return a.get(stream) if isinstance(a, ndarray) else np.asarray(a)


def _numpy_function(name):
    fn = getattr(np, name)
    if isinstance(fn, type) or not callable(fn):
        return fn  # dtypes (cupy.float32), constants
    return lambda *args, **kwargs: _call(fn, args, kwargs)


# --- the pieces of cupy.cuda, cupy._core and cupyx that minivgg touches ------------------

class Device:
    """The one stand-in GPU, an H100 (compute capability 9.0); `synchronize` waits for every
    stream, as cudaDeviceSynchronize does."""

    compute_capability = "90"

    def __init__(self, device=None):
        self.id = 0 if device is None else device

    def synchronize(self):
        for stream in list(Stream.all):
            stream.synchronize()


# --- cuBLAS (cupy.cuda.cublas): GEMMs on raw device addresses, column-major -----------

_CUBLAS_TYPES = {0: np.float32, 1: np.float64}  # CUDA_R_32F, CUDA_R_64F
_CUBLAS_COMPUTE = {68: np.float32, 77: np.float32, 70: np.float64}  # 32F, 32F_FAST_TF32, 64F


def _column_major(address, data_type, rows, cols, ld, batch=1, stride=0):
    """(Memory, NumPy view) of `batch` column-major rows×cols matrices at a device address.

    NOTE: an address outside every live block, or a matrix reaching past its block, raises,
    as the GPU would fault."""
    memory = _pool.find(int(address))
    if memory is None:
        raise ValueError(f"cuBLAS: {int(address):#x} is not a device address")
    dtype = np.dtype(_CUBLAS_TYPES[data_type])
    if ld < max(1, rows):
        raise ValueError(f"cuBLAS: leading dimension {ld} < {rows} rows")
    view = np.ndarray((batch, rows, cols), dtype, buffer=memory.buffer,
                      offset=int(address) - memory.ptr,
                      strides=(stride * dtype.itemsize, dtype.itemsize, ld * dtype.itemsize))
    return memory, view


def _tf32(a):
    """float32 values rounded to TF32's 10 mantissa bits (to nearest), as tensor cores do."""
    bits = a.astype(np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def _gemm(name, transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B, Btype, ldb,
          strideB, beta, C, Ctype, ldc, strideC, batch, computeType):
    """C = alpha op(A) op(B) + beta C on the stand-in's memory, column-major as cuBLAS."""
    compute = _CUBLAS_COMPUTE[computeType]
    if not Atype == Btype == Ctype or _CUBLAS_TYPES[Ctype] != compute:
        raise TypeError(f"{name}: data types {Atype, Btype, Ctype} for compute type "
                        f"{computeType}")
    scalar = ctypes.c_double if compute == np.float64 else ctypes.c_float
    alpha, beta = scalar.from_address(alpha).value, scalar.from_address(beta).value
    a_mem, a = _column_major(A, Atype, *((m, k) if transa == 0 else (k, m)), lda, batch,
                             strideA)
    b_mem, b = _column_major(B, Btype, *((k, n) if transb == 0 else (n, k)), ldb, batch,
                             strideB)
    c_mem, c = _column_major(C, Ctype, m, n, ldc, batch, strideC)
    cublas_calls.append((name, m, n, k, batch, computeType))

    def run():
        opa = a if transa == 0 else a.transpose(0, 2, 1)
        opb = b if transb == 0 else b.transpose(0, 2, 1)
        if computeType == 77:  # CUBLAS_COMPUTE_32F_FAST_TF32
            opa, opb = _tf32(opa), _tf32(opb)
        product = np.matmul(opa, opb) * compute(alpha)
        # NOTE: with beta == 0, C is not read (cuBLAS's rule), so poisoned NaNs do not leak
        c[...] = product if beta == 0 else product + compute(beta) * c
    _issue([a_mem, b_mem] + ([c_mem] if beta != 0 else []), [c_mem], run)


def _gemm_ex(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C,
             Ctype, ldc, computeType, algo):
    _gemm("gemmEx", transa, transb, m, n, k, alpha, A, Atype, lda, 0, B, Btype, ldb, 0,
          beta, C, Ctype, ldc, 0, 1, computeType)


def _gemm_strided_batched_ex(handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA,
                             B, Btype, ldb, strideB, beta, C, Ctype, ldc, strideC,
                             batchCount, computeType, algo):
    _gemm("gemmStridedBatchedEx", transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B,
          Btype, ldb, strideB, beta, C, Ctype, ldc, strideC, batchCount, computeType)


cuda = types.SimpleNamespace(
    Stream=Stream, Event=Event, Device=Device, get_current_stream=get_current_stream,
    runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, getDevice=lambda: 0),
    cublas=types.SimpleNamespace(gemmEx=_gemm_ex,
                                 gemmStridedBatchedEx=_gemm_strided_batched_ex),
    device=types.SimpleNamespace(get_cublas_handle=lambda: 1),
)
random = types.SimpleNamespace(seed=lambda seed=None: None)

# NOTE: no cupy._core: minivgg uses none of CuPy's private modules (a test checks that a
# CuPy without them still counts as a GPU).

cupyx = types.ModuleType("cupyx")
cupyx.empty_pinned = lambda shape, dtype=float: np.empty(shape, dtype)

MODULES = {"cupyx": cupyx}


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _numpy_function(name)


def reset():
    """Forget every stream's state and every reported hazard (between tests)."""
    hazards.clear()
    host_reads.clear()
    cublas_calls.clear()
    transfers["host_to_device"] = 0
    _host_clock.clear()
    Stream._current.clear()
    Stream.null.__init__(null=True)


def install(monkeypatch):
    """Put this module in sys.modules as `cupy` (and its pieces), undone after the test."""
    monkeypatch.setitem(sys.modules, "cupy", sys.modules[__name__])
    for name, module in MODULES.items():
        monkeypatch.setitem(sys.modules, name, module)
