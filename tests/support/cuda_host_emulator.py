"""Run `kernels/gpu.py` and its CUDA C kernels on the CPU, for machines without a GPU.

CI has no GPU, yet the index arithmetic of the CUDA kernels and the way `kernels/gpu.py`
launches them (argument order, C types, shapes) are where GPU bugs hide. This module lets the
tests execute both here:

* each `.cu` file is compiled as ordinary C++ with g++, after a small prelude that turns
  `__global__`/`__device__`/`__constant__` into nothing, `__shared__` into `static` and
  `blockIdx`/`threadIdx` into per-thread globals;
* a generated launcher per kernel runs every (block, thread) of the grid one after another.
  That is exact for kernels whose threads each write only their own outputs. A kernel that
  calls `__syncthreads` (a block-wide reduction in shared memory) instead gets blockDim
  real threads, which run the blocks one after another and meet at a barrier wherever the
  kernel calls `__syncthreads` and after each block: its shared memory, one static array,
  then holds one block's data at a time, as on the GPU;
* `kernels/gpu.py` is loaded with `standin_cupy` in place of `cupy` (device arrays of
  their own type, a poisoning memory pool, a stream checker: see that module) plus a
  `RawModule` that hands out those launchers. The launcher checks every argument against the
  kernel's C parameter list (a device array of the right dtype for a pointer, a NumPy scalar
  of the exact width for a scalar), so a Python int passed where the kernel wants `int` is
  caught, and passes arrays as bare addresses, strides ignored, as CuPy does;
* with MINIVGG_EMULATOR_SANITIZE=1 in the environment the kernels are built with
  AddressSanitizer and UndefinedBehaviorSanitizer (test_cuda_standin.py runs the
  emulated tests so, with libasan preloaded).

What it cannot show: speed, races between threads, or NVRTC-specific compile errors (the
nvcc and NVRTC tests in test_cuda_compile.py cover the last).
"""

import ctypes
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

import standin_cupy as standin

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPU_PY = os.path.join(ROOT, "kernels", "gpu.py")

PRELUDE = r"""
// CUDA C compiled as host C++: every thread of the grid runs in turn (see launchers below).
#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>
struct Index3 { unsigned x, y, z; };
static thread_local Index3 threadIdx, blockIdx;
static Index3 blockDim, gridDim;
#define __global__
#define __device__
#define __constant__
#define __shared__ static
#define __forceinline__ inline
// The threads of one block meet here (__syncthreads), in blocks that use it.
struct BlockBarrier {
    std::mutex mutex;
    std::condition_variable cv;
    unsigned count, waiting = 0, generation = 0;
    explicit BlockBarrier(unsigned n) : count(n) {}
    void wait() {
        std::unique_lock<std::mutex> lock(mutex);
        unsigned gen = generation;
        if (++waiting == count) { waiting = 0; ++generation; cv.notify_all(); }
        else cv.wait(lock, [&] { return gen != generation; });
    }
};
[[maybe_unused]] static BlockBarrier* block_barrier;
#define __syncthreads() block_barrier->wait()
using std::exp; using std::log; using std::max; using std::min; using std::pow;
"""

# Sanitizers for the host build, when asked for; errors abort the process, so they cannot
# pass unnoticed.
SANITIZE = (["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
             "-fno-omit-frame-pointer", "-g"]
            if os.environ.get("MINIVGG_EMULATOR_SANITIZE") == "1" else [])

# C parameter type (after T is replaced) -> NumPy dtype of the argument, or of the array
# a pointer points to. A pointer to pointers is an array of uint64 device addresses.
SCALAR_DTYPES = {"int": np.int32, "long long": np.int64, "unsigned long long": np.uint64,
                 "float": np.float32, "double": np.float64}

KERNEL_RE = re.compile(r"template <typename T>\s*__global__ void (\w+)\(([^)]*)\)")


def kernel_signatures(source):
    """{kernel name: [(C type with T left in, parameter name), ...]} of every template kernel."""
    signatures = {}
    for name, params in KERNEL_RE.findall(source):
        parsed = []
        for param in params.split(","):
            param = " ".join(param.split())
            ctype, pname = re.match(r"(.*?)\s*(\w+)$", param).groups()
            parsed.append((ctype, pname))
        signatures[name] = parsed
    return signatures


def _concrete(ctype, t):
    return re.sub(r"\bT\b", t, ctype)


def _launcher_source(name, params, t, synchronises):
    args = ", ".join(f"*({_concrete(c, t)}*)args[{i}]" for i, (c, _) in enumerate(params))
    if synchronises:
        return f"""
extern "C" void launch_{name}_{t}(unsigned grid, unsigned block, void** args) {{
    gridDim.x = grid; blockDim.x = block;
    BlockBarrier barrier(block);
    block_barrier = &barrier;
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; ++t)
        threads.emplace_back([&, t] {{
            for (unsigned b = 0; b < grid; ++b) {{
                blockIdx.x = b; threadIdx.x = t;
                {name}<{t}>({args});
                barrier.wait();  // the whole block is done before the next one starts
            }}
        }});
    for (auto& thread : threads) thread.join();
}}
"""
    return f"""
extern "C" void launch_{name}_{t}(unsigned grid, unsigned block, void** args) {{
    gridDim.x = grid; blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b)
        for (unsigned t = 0; t < block; ++t) {{
            blockIdx.x = b; threadIdx.x = t;
            {name}<{t}>({args});
        }}
}}
"""


def _expected_dtype(ctype):
    """(is_pointer, dtype) for a concrete C parameter type."""
    base = ctype.replace("const", "").strip()
    if base.count("*") == 2:
        return True, np.uint64
    if base.endswith("*"):
        return True, SCALAR_DTYPES[base[:-1].strip()]
    return False, SCALAR_DTYPES[base]


class EmulatedKernel:
    """A compiled launcher, called like a `cupy.RawKernel`: kernel(grid, block, args).

    As CuPy does, it passes each device array as the address of its first element, strides
    ignored. It also checks what CuPy cannot: every argument against the kernel's C type,
    and, for the stand-in's stream checker, which blocks the launch reads (`const T*`) and
    writes (`T*`), including the blocks a table of pointers (`T* const*`) points to.
    """

    def __init__(self, function, name, params, t):
        self.function, self.name, self.t = function, name, t
        self.params = [(_concrete(c, t), p) for c, p in params]

    def __call__(self, grid, block, args):
        if len(args) != len(self.params):
            raise TypeError(f"{self.name}<{self.t}>: {len(args)} arguments for "
                            f"{len(self.params)} parameters")
        values, reads, writes = [], [], []
        for arg, (ctype, pname) in zip(args, self.params):
            is_pointer, dtype = _expected_dtype(ctype)
            where = f"{self.name}<{self.t}> parameter {pname} ({ctype})"
            if is_pointer:
                if not isinstance(arg, standin.ndarray) or arg.dtype != dtype:
                    raise TypeError(f"{where}: expected a {np.dtype(dtype)} device array, "
                                    f"got {type(arg).__name__} {getattr(arg, 'dtype', '')}")
                value = ctypes.c_void_p(arg.data.ptr)
                touched = [arg._mem]
                if ctype.count("*") == 2:  # a table of device pointers, read by the kernel
                    reads.append(arg._mem)
                    touched = [_block_at(address, where) for address in arg._a]
                (reads if ctype.startswith("const") else writes).extend(touched)
            else:
                if not isinstance(arg, np.generic) or arg.dtype != dtype:
                    raise TypeError(f"{where}: expected a NumPy {np.dtype(dtype)} scalar, "
                                    f"got {type(arg).__name__} {arg!r}")
                value = np.array(arg, dtype=dtype)  # a buffer holding the value
            values.append(value)
        pointers = [ctypes.addressof(v) if isinstance(v, ctypes.c_void_p) else v.ctypes.data
                    for v in values]
        argv = (ctypes.c_void_p * len(pointers))(*pointers)
        standin._issue(reads, writes, lambda: self.function(
            ctypes.c_uint(grid[0]), ctypes.c_uint(block[0]), argv))


def _block_at(address, where):
    memory = standin.get_default_memory_pool().find(int(address))
    if memory is None:
        raise TypeError(f"{where}: table entry {int(address):#x} is not a device address")
    return memory


class HostRawModule:
    """Stands in for `cupy.RawModule(code=..., name_expressions=[...])`."""

    build_dir = None

    def __init__(self, code, name_expressions, options=()):
        self.signatures = kernel_signatures(code)
        launchers = "".join(_launcher_source(name, params, t, _synchronises(code, name))
                            for name, params in self.signatures.items()
                            for t in ("float", "double"))
        source = PRELUDE + code + launchers
        digest = hashlib.sha1(source.encode()).hexdigest()[:16]
        src = os.path.join(self.build_dir, f"k{digest}.cpp")
        lib = os.path.join(self.build_dir, f"k{digest}.so")
        if not os.path.exists(lib):
            with open(src, "w") as f:
                f.write(source)
            # NOTE: `#pragma unroll` is nvcc's; g++ does not know it
            subprocess.run(["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-pthread", "-Wall",
                            "-Werror", "-Wno-unused-function", "-Wno-unknown-pragmas",
                            *SANITIZE, "-o", lib, src],
                           check=True, capture_output=True, text=True)
        self.lib = ctypes.CDLL(lib)
        self.name_expressions = list(name_expressions)

    def get_function(self, expression):
        if expression not in self.name_expressions:
            raise KeyError(f"{expression} is not among the module's name_expressions")
        name, t = re.match(r"(\w+)<(\w+)>$", expression).groups()
        return EmulatedKernel(getattr(self.lib, f"launch_{name}_{t}"), name,
                              self.signatures[name], t)


def _synchronises(code, name):
    """Whether kernel `name`'s body (up to the next line holding only `}`) calls
    __syncthreads."""
    start = code.index(f"__global__ void {name}(")
    end = code.find("\n}\n", start)
    return "__syncthreads()" in code[start:end if end >= 0 else None]


def have_compiler():
    return shutil.which("g++") is not None


def load_emulated_cuda_kernels():
    """`kernels/gpu.py` as a module running on NumPy arrays with host-compiled kernels."""
    if HostRawModule.build_dir is None:  # one per process: each test module loads its own
        HostRawModule.build_dir = tempfile.mkdtemp(prefix="minivgg-cuda-emulation-")
    standin.RawModule = HostRawModule
    saved = sys.modules.get("cupy")
    sys.modules["cupy"] = standin
    try:
        spec = importlib.util.spec_from_file_location("minivgg_gpu_emulated", GPU_PY)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del sys.modules["cupy"]
        else:
            sys.modules["cupy"] = saved
    return module


def use_standin(monkeypatch, module):
    """Make minivgg's "cuda" device the stand-in for one test: `backend` imports it as CuPy
    and registers its arrays, and `module` (the emulated kernels/gpu.py) is the kernel
    table it hands out for them. Everything is undone after the test."""
    from minivgg import backend
    standin.install(monkeypatch)
    monkeypatch.setitem(sys.modules, "minivgg.kernels.gpu", module)
    monkeypatch.setattr(sys.modules["minivgg.kernels"], "gpu", module, raising=False)
    for name in ("_BACKENDS", "_BY_NAME"):  # a private copy of the registry
        monkeypatch.setattr(backend, name, dict(getattr(backend, name)))
    for name in ("_cupy", "_cupy_error", "_tf32_supported"):
        monkeypatch.setattr(backend, name, None)
    assert backend.cuda_available()
