"""Intel AMX from Numba: the tile instructions as LLVM intrinsics, and whether this process
may use them (the CPU's flags, Linux's permission). kernels/cpu/amx.py builds the GEMM.

Each instruction is a `numba.extending.intrinsic` that emits one LLVM call
(`llvm.x86.tileloadd64`, `llvm.x86.tdpbf16ps`, ...); tile numbers must be compile-time
constants, hence `prefer_literal=True` and literal arguments at every call site.
"""

import ctypes
import os
import platform
import warnings

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from minivgg.kernels.cpu.machine import cpu_flags

# Tile geometry: rows per tile, bf16 per A-tile row (K per tdpbf16ps), fp32 per C-tile row.
TILE_M = 16
TILE_K = 32
TILE_N = 16
TILE_ELEMENTS = TILE_M * TILE_K  # bf16 per packed A or B tile (1 KB)

# Linux's arch_prctl(2) codes (asm/prctl.h) and the tile-data state component (18).
_SYS_ARCH_PRCTL = 158
_ARCH_GET_XCOMP_PERM = 0x1022
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


# ----------------------------------------------------------------------------------------
# The AMX instructions, as LLVM intrinsics Numba can call
# ----------------------------------------------------------------------------------------

_I8, _I64 = ir.IntType(8), ir.IntType(64)
_I8_PTR = _I8.as_pointer()


def _llvm_call(builder, name, arg_types, args):
    module = builder.module
    fn = module.globals.get(name) or ir.Function(
        module, ir.FunctionType(ir.VoidType(), arg_types), name=name)
    builder.call(fn, args)


def _byte_pointer(context, builder, array_type, array, index):
    """An i8* to element `index` of a Numba array."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [index]), _I8_PTR)


def _tile(literal):
    return ir.Constant(_I8, literal.literal_value)


@intrinsic(prefer_literal=True)
def ldtilecfg(typingctx, config):
    """Load the 64-byte tile configuration `config` (uint8 array)."""
    def codegen(context, builder, sig, args):
        ptr = _byte_pointer(context, builder, sig.args[0], args[0], ir.Constant(_I64, 0))
        _llvm_call(builder, "llvm.x86.ldtilecfg", [_I8_PTR], [ptr])
        return context.get_dummy_value()
    return types.void(config), codegen


@intrinsic(prefer_literal=True)
def tilerelease(typingctx):
    """Give the tile state back (the thread's tiles become unconfigured)."""
    def codegen(context, builder, sig, args):
        _llvm_call(builder, "llvm.x86.tilerelease", [], [])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic(prefer_literal=True)
def tilezero(typingctx, tile):
    def codegen(context, builder, sig, args):
        _llvm_call(builder, "llvm.x86.tilezero", [_I8], [_tile(sig.args[0])])
        return context.get_dummy_value()
    if not isinstance(tile, types.IntegerLiteral):
        return None
    return types.void(tile), codegen


def _tile_memory_codegen(llvm_name):
    """The code of a tile load or store: `llvm_name`(tile, &array.flat[index], stride)."""
    def codegen(context, builder, sig, args):
        ptr = _byte_pointer(context, builder, sig.args[1], args[1], args[2])
        _llvm_call(builder, llvm_name, [_I8, _I8_PTR, _I64], [_tile(sig.args[0]), ptr, args[3]])
        return context.get_dummy_value()
    return codegen


@intrinsic(prefer_literal=True)
def tileload(typingctx, tile, array, index, stride_bytes):
    """tile <- 16 rows of 64 bytes starting at array.flat[index], rows stride_bytes apart."""
    if isinstance(tile, types.IntegerLiteral):
        return (types.void(tile, array, types.intp, types.intp),
                _tile_memory_codegen("llvm.x86.tileloadd64"))


@intrinsic(prefer_literal=True)
def tilestore(typingctx, tile, array, index, stride_bytes):
    """16 rows of 64 bytes at array.flat[index], stride_bytes apart <- tile."""
    if isinstance(tile, types.IntegerLiteral):
        return (types.void(tile, array, types.intp, types.intp),
                _tile_memory_codegen("llvm.x86.tilestored64"))


@intrinsic(prefer_literal=True)
def tdpbf16ps(typingctx, c, a, b):
    """Tile c (fp32) += tile a (bf16) @ tile b (bf16, VNNI pairs)."""
    def codegen(context, builder, sig, args):
        _llvm_call(builder, "llvm.x86.tdpbf16ps", [_I8, _I8, _I8],
                   [_tile(t) for t in sig.args])
        return context.get_dummy_value()
    if not all(isinstance(t, types.IntegerLiteral) for t in (c, a, b)):
        return None
    return types.void(c, a, b), codegen


def _tile_config():
    """The 64-byte tile configuration: palette 1, all eight tiles 16 rows x 64 bytes.

    Layout (Intel SDM, LDTILECFG): byte 0 the palette, bytes 16 + 2t the bytes per row of
    tile t (little-endian), byte 48 + t its rows.
    """
    config = np.zeros(64, np.uint8)
    config[0] = 1
    for t in range(8):
        config[16 + 2 * t] = 64
        config[48 + t] = TILE_M
    return config


TILE_CONFIG = _tile_config()


# ----------------------------------------------------------------------------------------
# Can this process use AMX?
# ----------------------------------------------------------------------------------------

def _request_permission():
    """Ask Linux for the tile-data state; None when granted, else why not."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
            errno = ctypes.get_errno()
            return (f"Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM: "
                    f"{os.strerror(errno)}; Linux 5.16 or later is needed)")
        granted = ctypes.c_uint64(0)
        libc.syscall(_SYS_ARCH_PRCTL, _ARCH_GET_XCOMP_PERM, ctypes.byref(granted))
        if not granted.value >> _XFEATURE_XTILEDATA & 1:
            return "Linux did not grant the AMX tile state (ARCH_GET_XCOMP_PERM)"
    except (OSError, AttributeError) as e:
        return f"could not ask Linux for the AMX tile state ({e})"
    return None


def _hardware_reason():
    """Why this machine cannot run the AMX kernel, or None (checked once per process)."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"AMX needs x86-64 Linux, this is {platform.system()} {platform.machine()}"
    missing = [f for f in ("amx_tile", "amx_bf16") if f not in cpu_flags()]
    if missing:
        return f"this CPU has no {' and no '.join(missing)} (/proc/cpuinfo flags)"
    # NOTE: Numba may be told to compile for another CPU (portable caches); LLVM would then
    # abort the process on the first AMX instruction instead of raising.
    if numba.config.DISABLE_JIT:
        return "NUMBA_DISABLE_JIT is set, and the AMX instructions exist in compiled code only"
    cpu_name = numba.config.CPU_NAME
    if cpu_name and cpu_name != "host":
        return f"Numba compiles for NUMBA_CPU_NAME={cpu_name}, not this CPU's AMX"
    return None


_hardware = {}    # "reason": the answer of `_hardware_reason`, once
_permission = {}  # process id: None (granted) or why not


def amx_available():
    """(True, "") when `gemm_bf16` runs on AMX tiles here, else (False, why not).

    Why not: MINIVGG_DISABLE_AMX=1 is set, not x86-64 Linux, a CPU without amx_tile /
    amx_bf16, NUMBA_DISABLE_JIT=1 or Numba compiling for another CPU, or Linux refusing the
    tile state. The first call in a process that can use AMX asks Linux for it.
    """
    if os.environ.get("MINIVGG_DISABLE_AMX", "") not in ("", "0"):
        return False, "MINIVGG_DISABLE_AMX is set"
    if "reason" not in _hardware:
        _hardware["reason"] = _hardware_reason()
    if _hardware["reason"]:
        return False, _hardware["reason"]
    pid = os.getpid()
    if pid not in _permission:
        _permission[pid] = _request_permission()
    if _permission[pid]:
        return False, _permission[pid]
    return True, ""


_warned = []


def warn_fallback(reason):
    if not _warned:
        _warned.append(reason)
        warnings.warn(f"minivgg: bf16 matmuls run as fp32 matmuls of bf16-rounded operands "
                      f"(same numbers up to summation order), no faster than fp32 here: "
                      f"{reason}", RuntimeWarning, stacklevel=3)
