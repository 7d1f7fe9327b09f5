"""Train VGG with the paper's recipe (Sec. 3.1) on ImageNet-layout folders, or on built-in
synthetic images when no folder is given.

    python examples/train_imagenet.py                       # synthetic demo, ~2 min on CPU
    python examples/train_imagenet.py ~/imagenet -a D       # Sec. 3.1's recipe
    python examples/train_imagenet.py ../shared/data/imagenette2-224 -a A --width 0.25 \\
        --fc-width 512 --scale 72 --crop 64 -b 64 --init glorot --epochs 12 --cache
    python examples/train_imagenet.py DIR --resume runs/x/last.npz      # continue a run
    python examples/train_imagenet.py DIR --resume runs/x/best.npz -e   # evaluate only
    mpirun -n 4 python examples/train_imagenet.py DIR -a D    # 4 processes, -b split 4 ways

The flags follow PyTorch's ImageNet example where they apply. All the work happens in
`minivgg.train.fit`; this file only turns flags into a `TrainConfig`.
"""

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minivgg import backend  # noqa: E402
from minivgg import distributed  # noqa: E402
from minivgg.checkpoint import CheckpointError, CheckpointWriteError  # noqa: E402
from minivgg.data import DataError  # noqa: E402
from minivgg.models import ALIASES, CONFIGS  # noqa: E402
from minivgg.train import (TrainConfig, TrainingDiverged, TrainingError,  # noqa: E402
                           TrainingInterrupted, fit, synthetic_config)
from minivgg.workers import WorkerError  # noqa: E402


def add_recipe_flags(p):
    """The optimisation flags of Sec. 3.1: epochs, batch, rate and its schedule, momentum,
    weight decay."""
    p.add_argument("--epochs", type=int, help="total epochs (Sec. 3.1: 74)")
    p.add_argument("-b", "--batch-size", type=int, help="mini-batch size (Sec. 3.1: 256)")
    p.add_argument("--lr", "--learning-rate", type=float, dest="lr",
                   help="initial rate (Sec. 3.1: 0.01); given with --resume it wins over "
                        "the stored rate")
    p.add_argument("--momentum", type=float, help="Sec. 3.1: 0.9")
    p.add_argument("--wd", "--weight-decay", type=float, dest="weight_decay",
                   help="Sec. 3.1: 5e-4")
    p.add_argument("--lr-patience", type=int, metavar="N",
                   help="the rate is cut by 10 after N + 1 epochs without a better val "
                        "top-1 error (default 2; the paper does not say); given with "
                        "--resume it wins over the stored one")
    p.add_argument("--stop-at-plateau", action="store_true", default=None,
                   help="end the run when the val error plateaus after the third cut "
                        "(Sec. 3.1 stopped there), even before --epochs")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DIR", nargs="?", default=None,
                   help="ILSVRC-layout folder with train/<wnid>/ and val/<wnid>/; "
                        "omit it for the synthetic demo")
    p.add_argument("-a", "--arch", metavar="ARCH", default="A",
                   choices=list(CONFIGS) + list(ALIASES) + [c.lower() for c in CONFIGS],
                   help="Table 1 column: A, A-LRN, B, C, D, E or vgg11/13/16/19 (default A)")
    p.add_argument("-j", "--workers", type=int, help="data loading processes (0 = inline)")
    add_recipe_flags(p)
    p.add_argument("--resume", metavar="PATH", help="checkpoint to continue from")
    p.add_argument("-e", "--evaluate", action="store_true",
                   help="evaluate the --resume checkpoint on the val set and stop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-p", "--print-freq", type=int, help="progress figures every N batches")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--conv-algo", choices=backend.CONV_ALGORITHMS, dest="conv_algo",
                   help="how 3x3 convs run: auto (default: Winograd F(4x4,3x3) or F(2x2,3x3) "
                   "where it was measured faster, by a fixed rule of the layer shape), "
                   "im2col, winograd (F(2x2,3x3)) or winograd4 (F(4x4,3x3))")
    p.add_argument("--precision", choices=backend.PRECISIONS,
                   help="the CPU's conv and fc GEMMs: fp32 (default for a new run) or bf16 "
                        "operands with fp32 sums on AMX tiles; a resume keeps the stored "
                        "one unless given (weights and checkpoints stay fp32)")
    p.add_argument("--threads", type=int,
                   help="kernel threads per process (default: all cores; under mpirun: "
                        "cores / processes on the machine)")
    # The paper's own flags.
    p.add_argument("--scale", type=int, metavar="S", help="training scale (Sec. 3.1: 256)")
    p.add_argument("--scale-jitter", type=int, nargs=2, metavar=("SMIN", "SMAX"),
                   help="draw S per image from [SMIN, SMAX] (Sec. 3.1: 256 512)")
    p.add_argument("--test-scale", type=int, metavar="Q",
                   help="val rescale Q (default S, or (SMIN+SMAX)/2)")
    p.add_argument("--crop", type=int, metavar="N", help="training crop (Sec. 2.1: 224)")
    p.add_argument("--init", choices=["gaussian", "glorot"],
                   help="gaussian N(0, 0.01) (Sec. 3.1; default for A) or glorot (default "
                        "for deeper nets)")
    p.add_argument("--init-from", metavar="WEIGHTS",
                   help="warm start from a trained A (Sec. 3.1): a checkpoint or any file "
                        "minivgg.pretrained reads")
    p.add_argument("--width", type=float, help="conv width multiplier (1.0 = Table 1)")
    p.add_argument("--fc-width", type=int, help="fc6/fc7 width (Sec. 2.1: 4096)")
    p.add_argument("--dropout", type=float, help="fc6/fc7 dropout (Sec. 3.1: 0.5)")
    p.add_argument("--cache", action="store_true",
                   help="decode every image once into memory at the largest scale")
    p.add_argument("--output", metavar="DIR",
                   help="checkpoints, metrics.csv and metrics.png (default runs/<data>-<arch>)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in the output folder (else an error)")
    p.add_argument("--synthetic-train", type=int, help="synthetic training images (2000)")
    p.add_argument("--synthetic-val", type=int, help="synthetic val images (500)")
    return p.parse_args(argv)


def make_config(args):
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    if args.data is None:
        return synthetic_config(**overrides)
    return TrainConfig(**overrides)


def main(argv=None):
    """Train as the flags say -> exit status: 0 done, 2 bad input (one `error:` line),
    1 a failure during the run, 128 + N when signal N stopped it (README, "Failure
    behaviour")."""
    args = parse_args(argv)
    if args.threads is not None and args.threads < 1:
        print(f"error: --threads must be positive, got {args.threads}", file=sys.stderr)
        return 2
    # NOTE: before anything that can fail on one rank only: from here on a failing rank
    # ends the whole job (MPI_Abort) instead of leaving the others waiting for it.
    try:
        group = distributed.init(args.device, args.threads)
    except distributed.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with group.guard():
        return train(args, group)


def train(args, group):
    try:
        fit(make_config(args), group=group)
    except TrainingInterrupted as e:
        # NOTE: the ranks agreed to stop after the same batch (minivgg.interrupts) and
        # rank 0 wrote the checkpoint: every rank ends cleanly, with rank 0's message
        if group.is_root:
            print(e, file=sys.stderr)
        return 128 + signal.Signals[e.signal_name].value
    except TrainingDiverged as e:
        # NOTE: every rank saw the same summed loss and stopped at the same step, so the
        # job ends cleanly on all of them, with rank 0's message alone
        if group.is_root:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except (CheckpointWriteError, WorkerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return stop_all(group, 1)
    except (TrainingError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return stop_all(group, 2)
    except OSError as e:  # e.g. a full disk while writing metrics.csv
        print(f"error: {e}", file=sys.stderr)
        return stop_all(group, 1)
    except KeyboardInterrupt:  # during set-up, before training (and its handler) started
        print("interrupted before training started; nothing was written", file=sys.stderr)
        return stop_all(group, 130)
    return 0


def stop_all(group, code):
    """`code`; with several ranks the failure may be this rank's alone (its images, its
    disk), and the others would wait for it forever: end every rank (MPI_Abort)."""
    if group.size > 1:
        group.abort(f"stopped with exit status {code}", code)
    return code


if __name__ == "__main__":
    sys.exit(main())
