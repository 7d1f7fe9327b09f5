"""bfloat16 numbers for the matrix engine (kernels/cpu/amx.py).

bf16 is the top half of a float32: 1 sign bit, float32's 8 exponent bits and 7 of its 23
mantissa bits, so it covers float32's range at about 2-3 significant digits (unit
roundoff 2^-8). Rounding a float32 to bf16 is integer arithmetic on its bits (`to_bf16`),
and a bf16 back to float32 is a shift (`from_bf16`). `reference_gemm_bf16` is the product
the AMX kernel is held to.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from minivgg.kernels.cpu.runtime import JIT, map_ranges


def to_bf16(x):
    """bf16 bit patterns (uint16, same shape) of x, rounded to nearest, ties to even.

    bf16 is the top half of a float32. Adding 0x7FFF plus the lowest kept bit, then
    truncating, rounds to nearest with ties to the even neighbour; overflow to inf is the
    correct rounding. NOTE: a NaN whose payload lies only in the dropped bits would turn
    into inf that way, so NaNs keep their sign and top bits and get the quiet bit set.
    float64 input is first rounded to float32 (NumPy's cast), then to bf16.
    """
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded[nan] = ((u[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded


def from_bf16(u):
    """float32 values of bf16 bit patterns (uint16): exact, bf16 is a float32 prefix."""
    return (np.asarray(u, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def round_to_bf16(x, parallel=True):
    """x rounded to the nearest bf16 value, as float32 (what the AMX kernel multiplies).

    `from_bf16(to_bf16(x))` in one compiled pass on the runtime's threads (the fallback
    rounds whole im2col matrices with it; NumPy's version makes five passes). parallel:
    see `gemm_bf16`.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = np.empty(x.shape, np.uint32)
    flat_x, flat_bits = x.reshape(-1), bits.reshape(-1)
    spread(lambda i0, i1: _round_range(flat_x, flat_bits, i0, i1), flat_x.size,
            flat_x.size, parallel)
    return bits.view(np.float32)


def _float32_bits(x):
    """The bit pattern of a float32 as uint32 (plain Python, for NUMBA_DISABLE_JIT=1)."""
    return np.float32(x).view(np.uint32)


@intrinsic
def _float32_bits_register(typingctx, x):
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@overload(_float32_bits)
def _float32_bits_compiled(x):
    """In compiled code: a register bitcast."""
    return lambda x: _float32_bits_register(x)


@njit(**JIT)
def bf16_bits(value):
    """`to_bf16` of one float32, for the packing kernels (branch-free, so loops vectorise)."""
    u = _float32_bits(np.float32(value))
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    quiet_nan = (u >> np.uint32(16)) | np.uint32(0x0040)
    is_nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.uint16(quiet_nan if is_nan else rounded)


@njit(**JIT)
def _round_range(x, bits, i0, i1):
    """bits[i0:i1] = the float32 bits of x[i0:i1] rounded to bf16 (`round_to_bf16`)."""
    for i in range(i0, i1):
        bits[i] = np.uint32(bf16_bits(x[i])) << np.uint32(16)


def spread(job, n_items, elements, parallel):
    """`runtime.map_ranges`, or job(0, n_items) on this thread when not parallel."""
    if parallel:
        map_ranges(job, n_items, elements)
    elif n_items:
        job(0, n_items)


def reference_gemm_bf16(A, B):
    """The definition the kernel is held to: the float64 product of the bf16-rounded
    operands (exact products, exact-ish sums). The kernel differs from it by its fp32 sums;
    tdpbf16ps's internal rounding is not documented to the bit, so no simple fp32 loop
    reproduces its bits (pairwise, sequential and per-tile orders were tried)."""
    return round_to_bf16(A).astype(np.float64) @ round_to_bf16(B).astype(np.float64)
