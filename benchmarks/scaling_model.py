"""A scaling model on paper: VGG-16 step time on N data-parallel ranks (Sec. 3.3).

    python benchmarks/scaling_model.py            # the tables of benchmarks/scaling_model.md
    python benchmarks/scaling_model.py --help     # every assumption is a flag

Nothing here is measured: it is arithmetic on stated assumptions, so that the numbers in
scaling_model.md can be re-derived and changed. The model of one step of a global batch B
on N ranks, each computing B/N images:

    compute   C = (B/N) * t_img,  forward F = f_fwd * C,  backward C - F
              (f_fwd from Table 1's multiply-adds: forward 2 FLOPs each, backward 4,
              conv1_1 needs no input gradient)
    buckets   minivgg's own plan (distributed.plan_buckets, 64 MiB): fc8+fc7, fc6, convs;
              a bucket is ready when backward has passed its first layer (by FLOPs)
    allreduce of b bytes, ring: 2(N-1)/N * b / bandwidth + 2(N-1) * latency
    overlap   the link takes the buckets one after another, each as soon as it is ready
              and the link is free; the step ends when backward and the last bucket are
              done:  T = F + max(backward, end of the last allreduce)
    no overlap  T = C + sum of the allreduces
    efficiency  C / T  (one rank would spend N*C on the same batch: speed-up = N * C / T)

The SGD update, data loading and the other overheads are left out: they make the real
efficiency lower, never higher.
"""

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from minivgg import distributed  # noqa: E402

# Sustained training FLOP/s of one accelerator. NOTE: assumptions, not measurements.
GPUS = {
    # Titan Black: 2880 cores x 0.889 GHz x 2 = 5.1 TFLOP/s FP32 peak. The paper's "2-3
    # weeks per net on four" for 74 epochs of 1.28M images is ~64 ms per image per GPU at
    # 2.5 weeks, i.e. ~1.5 TFLOP/s of the 93 GFLOP a VGG-16 image needs: 30% of peak.
    "Titan Black (the paper's)": 0.30 * 5.1e12,
    # A current data-centre GPU in TF32 on tensor cores: 100 TFLOP/s sustained, about 20% of
    # an H100 SXM's 495 TFLOP/s dense TF32 peak, or 32% of an A100's 312.
    "current GPU, 100 TFLOP/s": 100e12,
}

# Link: (bandwidth each rank can push in one direction, bytes/s; latency per ring step, s).
LINKS = {
    # 25 Gb/s = 3.1 GB/s; TCP reaches about 80% of it.
    "25 Gb/s Ethernet": (0.8 * 25e9 / 8, 30e-6),
    # 100 Gb/s EDR InfiniBand = 12.5 GB/s; RDMA reaches about 90%.
    "100 Gb/s InfiniBand": (0.9 * 100e9 / 8, 3e-6),
    # NVLink 4 (H100): 450 GB/s per direction per GPU; NCCL's ring reaches about 80%.
    # NOTE: within one 8-GPU machine; 64 GPUs on NVLink need an NVLink Switch System.
    "NVLink 4": (0.8 * 450e9, 2e-6),
}

RANKS = (4, 8, 64)


def vgg16_facts(config="D", bucket_bytes=distributed.BUCKET_BYTES):
    """(training FLOPs per image, forward fraction, [(bucket bytes, ready fraction of
    backward)], MB of layer outputs per image) from Table 1 and minivgg's bucket plan."""
    model, rows = common.layer_rows(config)
    activations = sum(4 * math.prod(r.out_shape) for r in rows) / 1e6
    first_conv = next(r.name for r in rows if r.kind.startswith("conv"))
    fwd = {r.name: 2 * r.macs for r in rows}
    bwd = {r.name: 2 * r.macs * (1 if r.name == first_conv else 2) for r in rows}
    total = sum(fwd.values()) + sum(bwd.values())
    order = [r.name for r in rows]  # backward runs this list from the end
    named = list(model.named_parameters())
    plan = distributed.plan_buckets([p.size for _, p in named], 4, bucket_bytes)
    buckets = []
    for indices in plan:
        layers = {named[i][0].split(".")[0] for i in indices}
        first = min(order.index(name) for name in layers)
        done = sum(bwd[name] for name in order[first:])  # backward up to that layer
        nbytes = 4 * sum(named[i][1].size for i in indices)
        buckets.append((nbytes, done / sum(bwd.values())))
    return total, sum(fwd.values()) / total, buckets, activations


def step_time(images_per_rank, t_img, ranks, link, f_fwd, buckets, overlap=True):
    """(step seconds, compute seconds) of one rank; see the module docstring."""
    bandwidth, latency = link
    compute = images_per_rank * t_img
    forward, backward = f_fwd * compute, (1 - f_fwd) * compute

    def allreduce(nbytes):
        return 2 * (ranks - 1) / ranks * nbytes / bandwidth + 2 * (ranks - 1) * latency

    if not overlap:
        return compute + sum(allreduce(b) for b, _ in buckets), compute
    link_free = 0.0
    for nbytes, ready in buckets:  # times from the start of backward
        link_free = max(link_free, ready * backward) + allreduce(nbytes)
    return forward + max(backward, link_free), compute


def batch_for(target, t_img, ranks, link, f_fwd, buckets, overlap=True, limit=2**20):
    """The smallest global batch (a multiple of `ranks`) with efficiency >= target."""
    per_rank = 1
    while per_rank <= limit:
        step, compute = step_time(per_rank, t_img, ranks, link, f_fwd, buckets, overlap)
        if compute / step >= target:
            return per_rank * ranks
        per_rank = per_rank + 1 if per_rank < 64 else int(per_rank * 1.05) + 1
    return None


def tables(args):
    flops, f_fwd, buckets, activations = vgg16_facts(
        bucket_bytes=int(args.bucket_mb * 2**20))
    out = [f"VGG-16: {flops / 1e9:.1f} GFLOP per training image (forward {100 * f_fwd:.0f}%),"
           f" {activations:.0f} MB of layer outputs per image (float32, kept for backward);"
           f" {len(buckets)} buckets of " + ", ".join(
               f"{b / 1e6:.0f} MB ready after {100 * r:.1f}% of backward"
               for b, r in buckets) + ".", ""]
    for gpu, flop_rate in GPUS.items():
        t_img = flops / flop_rate
        out += [f"#### {gpu}: {1e3 * t_img:.2f} ms per image "
                f"({flop_rate / 1e12:.1f} TFLOP/s sustained)", ""]
        rows = []
        for link_name, link in LINKS.items():
            for n in RANKS:
                ring = sum(2 * (n - 1) / n * b / link[0] for b, _ in buckets)
                step, compute = step_time(args.batch / n, t_img, n, link, f_fwd, buckets)
                serial, _ = step_time(args.batch / n, t_img, n, link, f_fwd, buckets,
                                      overlap=False)
                need = batch_for(args.target, t_img, n, link, f_fwd, buckets)
                need_serial = batch_for(args.target, t_img, n, link, f_fwd, buckets, False)
                rows.append([link_name, n, f"{1e3 * ring:.1f}", f"{1e3 * compute:.0f}",
                             f"{1e3 * step:.0f}", f"{n * compute / step:.2f}",
                             f"{100 * compute / serial:.0f}%",
                             f"{100 * compute / step:.0f}%",
                             _batch(need, n), _batch(need_serial, n)])
        out += [common.markdown_table(
            ["link", "N", "allreduce ms (553 MB)", f"compute ms (B={args.batch})",
             "step ms (overlap)", "speed-up", "efficiency, no overlap",
             "efficiency, overlap", f"B for {100 * args.target:.0f}% (overlap)",
             f"B for {100 * args.target:.0f}% (no overlap)"], rows), ""]
    return "\n".join(out)


def _batch(global_batch, ranks):
    if global_batch is None:
        return "none"
    return f"{global_batch} ({global_batch // ranks}/rank)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--batch", type=int, default=256, help="global batch (Sec. 3.1: 256)")
    p.add_argument("--target", type=float, default=0.9, help="efficiency to reach")
    p.add_argument("--bucket-mb", type=float, default=distributed.BUCKET_BYTES / 2**20,
                   help="gradient bucket size in MiB (default %(default)g, minivgg's)")
    print(tables(p.parse_args(argv)))


if __name__ == "__main__":
    main()
