"""The blocked convolution's parts on the small recipe's 3×3 layers, against PyTorch.

Times, per layer (batch 32), as the CPU time of the calling thread (`time.thread_time`,
minimum over --repeats, one thread: another job on a shared machine then costs little):

    fwd        blocked_nchw.blocked_conv2d_forward(x, W, b)
    bwd        blocked_nchw.blocked_conv2d_backward(x, W, gy, need_gx=True)
    fwd+bwd    their sum
    gx         the input gradient alone (blocking the rotated filters, `conv2d_nchw`)
    gW+gb      the weight and bias gradients alone, from gy blocked and x's padded copy
    layouts    making those two: gy to nChw16c, x to its zero-bordered copy

and PyTorch 1 thread in a process of its own (`--torch-only` is that process): F.conv2d's
forward; forward + backward through autograd (x, W and b all needing gradients); and
aten.convolution_backward for all three gradients (bwd), gx alone, gW and gb alone.

    python benchmarks/bench_blocked_parts.py              # both, a table

Only for the conv algorithm "blocked"; bench_layers.py times whole layers, wall clock.
"""

import argparse
import json
import os
import subprocess
import sys
import time

# (name, C, OC, H): the small recipe's 3×3 layers that "auto" gives to the blocked kernel
LAYERS = [("conv2", 16, 32, 32), ("conv3_1", 32, 64, 16), ("conv3_2", 64, 64, 16),
          ("conv4_1", 64, 128, 8), ("conv4_2", 128, 128, 8), ("conv5", 128, 128, 4)]


def best(fn, repeats):
    """Minimum thread CPU time of fn() over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.thread_time()
        fn()
        times.append(time.thread_time() - t)
    return min(times)


def arrays(C, OC, H, batch, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, C, H, H)).astype(np.float32)
    W = (rng.standard_normal((OC, C, 3, 3)) * 0.1).astype(np.float32)
    b = rng.standard_normal(OC).astype(np.float32)
    gy = rng.standard_normal((batch, OC, H, H)).astype(np.float32)
    return x, W, b, gy


def least(a, b):
    """{layer: {what: min of a's and b's}} (a may be empty)."""
    return {k: {w: min(t, a.get(k, {}).get(w, t)) for w, t in r.items()} for k, r in b.items()}


def time_minivgg(batch, repeats):
    import numpy as np
    from minivgg.kernels.cpu import blocked_nchw as B
    from minivgg.kernels.cpu.blocked import block_bias, block_filters, conv2d_nchw, pad_images
    from minivgg.kernels.cpu.blocked_grad import weight_grad_from_padded
    rows = {}
    for name, C, OC, H in LAYERS:
        x, W, b, gy = arrays(C, OC, H, batch)
        gyb = B._to_blocked(gy, np.float32, "bench_gy").copy()
        xpad = pad_images(x, np.empty((batch, -(-C // 16) * 16, H + 2, H + 2), np.float32))
        rows[name] = {
            "fwd": best(lambda: B.blocked_conv2d_forward(x, W, b), repeats),
            "bwd": best(lambda: B.blocked_conv2d_backward(x, W, gy, True), repeats),
            "gx": best(lambda: conv2d_nchw(gy, block_filters(W, rotate=True),
                                           block_bias(None, C), C), repeats),
            "gW+gb": best(lambda: weight_grad_from_padded(xpad, gyb, C, OC), repeats),
            "layouts": best(lambda: (B._to_blocked(gy, np.float32, "blocked_gy"),
                                     pad_images(x, xpad)), repeats)}
    return rows


def time_torch(batch, repeats):
    import torch
    import torch.nn.functional as TF
    torch.set_num_threads(1)
    rows = {}
    for name, C, OC, H in LAYERS:
        x, W, b, gy = (torch.from_numpy(a) for a in arrays(C, OC, H, batch))
        x.requires_grad_(), W.requires_grad_(), b.requires_grad_()

        def fwd():
            with torch.no_grad():
                TF.conv2d(x, W, b, 1, 1)

        def fwd_bwd():
            x.grad = W.grad = b.grad = None
            TF.conv2d(x, W, b, 1, 1).backward(gy)

        def bwd(mask):
            return lambda: torch.ops.aten.convolution_backward(
                gy, x.detach(), W.detach(), [OC], [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                mask)
        rows[name] = {"fwd": best(fwd, repeats), "fwd+bwd": best(fwd_bwd, repeats),
                      "bwd": best(bwd([True, True, True]), repeats),
                      "gx": best(bwd([True, False, False]), repeats),
                      "gW+gb": best(bwd([False, True, True]), repeats)}
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--rounds", type=int, default=3,
                   help="PyTorch's process and ours take turns this many times; each time "
                        "is the minimum over all rounds (a busy spell then hits one round)")
    p.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ["NUMBA_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = "1"
    if args.torch_only:
        print(json.dumps(time_torch(args.batch, args.repeats)))
        return
    cmd = [sys.executable, __file__, "--torch-only", "--batch", str(args.batch),
           "--repeats", str(args.repeats)]
    ref, ours = {}, {}
    for _ in range(args.rounds):
        ref = least(ref, json.loads(subprocess.run(
            cmd, check=True, capture_output=True, text=True, env=dict(os.environ)).stdout))
        ours = least(ours, time_minivgg(args.batch, args.repeats))
    print(f"batch {args.batch}, 1 thread, CPU time (ms, best of {args.repeats} x "
          f"{args.rounds} rounds), load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(" | ".join(["layer", "fwd", "gx", "gW+gb", "(layouts)", "bwd", "fwd+bwd",
                      "torch fwd", "torch gx", "torch gW+gb", "torch bwd", "torch fwd+bwd",
                      "ratio fwd", "ratio bwd", "ratio fwd+bwd"]))
    for name, r in ours.items():
        t = ref[name]
        both = r["fwd"] + r["bwd"]
        cells = [r["fwd"], r["gx"], r["gW+gb"], r["layouts"], r["bwd"], both, t["fwd"],
                 t["gx"], t["gW+gb"], t["bwd"], t["fwd+bwd"]]
        print(" | ".join([name] + [f"{v * 1e3:.2f}" for v in cells]
                         + [f"{r['fwd'] / t['fwd']:.2f}", f"{r['bwd'] / t['bwd']:.2f}",
                            f"{both / t['fwd+bwd']:.2f}"]))


if __name__ == "__main__":
    main()
