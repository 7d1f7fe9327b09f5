"""The checks to run first on a GPU machine, before any benchmark: what is there, and whether
a training step is right and repeatable. `benchmarks/gpu_check.sh` calls it.

    python benchmarks/gpu_check.py env        # driver, CUDA, CuPy, cuBLAS, cuDNN, NCCL
    python benchmarks/gpu_check.py repeat     # one small-VGG step per conv algorithm:
                                              # bitwise repeatable on the GPU, equal to the CPU
    python benchmarks/gpu_check.py repeat --algos im2col --steps 1   # (under compute-sanitizer)

`env` exits 0 on a machine without a GPU too, saying why CuPy sees none; `repeat` then
exits 3 ("skipped: no GPU") so the calling script can tell a skip from a failure.

The repeatability check trains VGG-A at a small width (32×32 images, batch 4, dropout on,
momentum and weight decay as Sec. 3.1) for a few steps, twice from the same seed, and
compares every parameter bit for bit: a kernel that sums in a data-dependent order (atomics,
a reduction split by timing) shows up as a difference. The CPU runs the same steps for a
reference; the GPU's dropout masks come from another generator (a counter-based hash), so
that comparison is made with dropout off.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repository root on sys.path)

SKIPPED = 3  # exit code: no GPU here, nothing was checked


def cmd_env(args):
    from minivgg import backend
    for name, value in common.gpu_versions():
        print(f"{name:44s} {value}")
    ok = backend.cuda_available()
    print(f"{'minivgg.cuda_available()':44s} {ok}"
          + ("" if ok else f"  (why not: {backend.cuda_unavailable_reason()})"))
    return 0


# ----------------------------------------------------------------------------------------
# Repeatability: the same steps twice on the GPU, bit for bit; and against the CPU
# ----------------------------------------------------------------------------------------

def train_steps(device, algorithm, steps, dropout, seed=0):
    """Parameters (host arrays) after `steps` SGD steps of a small VGG-A from `seed`."""
    import numpy as np
    import minivgg
    from minivgg import Tensor, backend, functional as F, models, optim
    backend.set_conv_algorithm(algorithm)
    minivgg.manual_seed(seed)
    model = models.vgg("A", 10, width=0.125, fc_width=64, input_size=32, init="glorot",
                       seed=seed)
    model.to(device)
    model.train() if dropout else model.eval()
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x = Tensor(rng.standard_normal((4, 3, 32, 32)).astype(np.float32)).to(device)
        y = backend.to_device(rng.integers(0, 10, 4), device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [backend.to_numpy(p.data) for p in model.parameters()]


def cmd_repeat(args):
    import numpy as np
    from minivgg import backend
    if not backend.cuda_available():
        print(f"skipped: no GPU ({backend.cuda_unavailable_reason()})")
        return SKIPPED
    if args.no_pool:
        import cupy  # every allocation a cudaMalloc of its own, so sanitizers see them all
        cupy.cuda.set_allocator(None)
    failures = 0
    print(f"{'algorithm':10s} {'GPU run 1 == run 2':>20s} {'max |GPU - CPU| / max|CPU|':>28s}")
    for algo in args.algos.split(","):
        first = train_steps("cuda", algo, args.steps, dropout=True)
        second = train_steps("cuda", algo, args.steps, dropout=True)
        same = all(np.array_equal(a, b) for a, b in zip(first, second))
        gpu = train_steps("cuda", algo, args.steps, dropout=False)
        cpu = train_steps("cpu", algo, args.steps, dropout=False)
        rel = max(float(np.abs(g - c).max() / max(np.abs(c).max(), 1e-30))
                  for g, c in zip(gpu, cpu))
        ok = same and rel < args.tolerance
        failures += not ok
        print(f"{algo:10s} {'yes' if same else 'NO':>20s} {rel:28.2e}"
              + ("" if ok else "   <- FAILED"))
    return 1 if failures else 0


def main(argv=None):
    from minivgg.backend import CONV_ALGORITHMS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="versions, and whether minivgg sees a GPU")
    r = sub.add_parser("repeat", help="bitwise repeatability of a small training step")
    r.add_argument("--algos", default=",".join(CONV_ALGORITHMS),
                   help="comma-separated conv algorithms (default: all)")
    r.add_argument("--steps", type=int, default=3)
    r.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest relative GPU-CPU difference of any parameter (float32, "
                        "TF32 off; the sums run in other orders on the two devices)")
    r.add_argument("--no-pool", action="store_true",
                   help="bypass CuPy's memory pool (for compute-sanitizer's initcheck)")
    args = p.parse_args(argv)
    return {"env": cmd_env, "repeat": cmd_repeat}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
