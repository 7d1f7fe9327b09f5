"""Where a bf16 conv layer's time goes: the parts of one im2col chunk, fp32 against bf16.

For the first chunk of each VGG-16 3×3 layer at 224×224 (the chunk `kernels/common.py`
plans for `--batch` images and the CPU's 16 MB im2col budget), on one thread:

- fp32 im2col: `im2col_chunk` into the float32 cols (CKK, P);
- fp32 GEMM: W (OC, CKK) @ cols, NumPy's BLAS, as the fp32 forward runs it;
- bf16 cols→tiles: `im2col_bf16.im2col_operand`, cols written straight into packed bf16
  tiles (what the bf16 forward runs instead of the two above, with the GEMM below);
- AMX GEMM: the same product on AMX tiles, both operands packed;
- bf16 colsᵀ→tiles and AMX gW GEMM: the weight gradient's operand and product.

Times are the thread's CPU time (`time.thread_time`: every part runs on the calling thread,
so time the thread spent descheduled does not count), the minimum of `--repeats`
interleaved calls: on a shared machine the figures least disturbed by other processes,
though they still share its caches and memory bandwidth. Needs AMX.

    python benchmarks/bf16_parts.py
    python benchmarks/bf16_parts.py --batch 8 --repeats 20
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repository root on sys.path)
common.set_threads(1)  # before NumPy loads its BLAS: one thread, as a conv chunk's GEMM has

import numpy as np  # noqa: E402

from minivgg.kernels.common import conv_chunks  # noqa: E402
from minivgg.kernels.cpu import amx, conv, im2col_bf16  # noqa: E402
from minivgg.kernels.cpu.amx_isa import amx_available  # noqa: E402
from winograd_accuracy import VGG16_CONVS  # noqa: E402

COLUMNS = ("fp32 im2col", "fp32 GEMM", "bf16 cols→tiles", "AMX GEMM", "bf16 colsᵀ→tiles",
           "AMX gW GEMM")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=10)
    return p.parse_args(argv)


def chunk_parts(C, OC, H, batch, repeats, rng):
    """(P, {column: ms}) for the first im2col chunk of a 3×3/s1/p1 layer."""
    x = rng.standard_normal((batch, C, H, H), dtype=np.float32)
    W = rng.standard_normal((OC, C * 9), dtype=np.float32)
    n0, n1, oy0, oy1 = conv_chunks(batch, H, H, C * 9, 4, conv.IM2COL_CHUNK_BYTES, 2)[0]
    P = (n1 - n0) * (oy1 - oy0) * H
    cols, out = np.empty((C * 9, P), np.float32), np.empty((OC, P), np.float32)
    gy, gW = rng.standard_normal((OC, P), dtype=np.float32), np.empty_like(W)
    a, a_gy = amx.pack_a(W, parallel=False), amx.pack_a(gy, parallel=False)
    b = im2col_bf16.im2col_operand(x, n0, n1, oy0, oy1, 3, 3, 1, 1, False)
    bt = im2col_bf16.im2col_operand(x, n0, n1, oy0, oy1, 3, 3, 1, 1, True)
    fns = dict(zip(COLUMNS, [
        lambda: conv.im2col_chunk(x, n0, n1, oy0, oy1, 3, 3, 1, 1, 1, 1, cols),
        lambda: np.matmul(W, cols, out=out),
        lambda: im2col_bf16.im2col_operand(x, n0, n1, oy0, oy1, 3, 3, 1, 1, False),
        lambda: amx._gemm_packed(a, b, out, parallel=False),
        lambda: im2col_bf16.im2col_operand(x, n0, n1, oy0, oy1, 3, 3, 1, 1, True),
        lambda: amx._gemm_packed(a_gy, bt, gW, parallel=False)]))
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.thread_time()
            fn()
            best[name] = min(best[name], time.thread_time() - t0)
    return P, {name: t * 1e3 for name, t in best.items()}


def main(argv=None):
    args = parse_args(argv)
    available, why_not = amx_available()
    if not available:
        raise SystemExit(f"no AMX here ({why_not}): nothing to measure")
    rng = np.random.default_rng(0)
    rows, seen = [], set()
    for name, C, OC, H in VGG16_CONVS[1:]:  # conv1_1 (3 channels) runs direct convolution
        if (C, OC, H) in seen:
            continue
        seen.add((C, OC, H))
        P, ms = chunk_parts(C, OC, H, args.batch, args.repeats, rng)
        rows.append([name, C * 9, P] + [f"{ms[c]:.2f}" for c in COLUMNS])
        print(" | ".join(str(v) for v in rows[-1]), file=sys.stderr, flush=True)
    text = common.header(f"bf16 conv parts, one im2col chunk, 1 thread, batch {args.batch}",
                         1) + "\n" + common.markdown_table(
        ["layer", "CKK", "P"] + [f"{c} ms" for c in COLUMNS], rows) + (
        f"\n\nThread CPU time, minimum of {args.repeats} interleaved calls. "
        "Forward per chunk: fp32 = im2col + fp32 GEMM; bf16 = cols→tiles + AMX GEMM "
        "(W packed once per layer call).")
    print(text)


if __name__ == "__main__":
    main()
