"""What a training run is asked to do: `TrainConfig`, its flag checks and its errors.

`TrainConfig`'s defaults are Sec. 3.1's recipe for ImageNet-sized data; `synthetic_config`
is the no-download demo and says why it departs from it. `check_config` checks every flag
that can be checked before a file is read, so a mistyped flag costs nothing; each problem
is one `TrainingError` line naming the flag and the value.
"""

import math
from dataclasses import dataclass, field

from minivgg import backend, images, models


class TrainingError(Exception):
    """A run that cannot start or go on (bad flags, checkpoint, device); no traceback."""


class TrainingDiverged(TrainingError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


class TrainingInterrupted(TrainingError):
    """SIGINT or SIGTERM stopped the run; the message says which file holds what."""

    def __init__(self, message, signal_name):
        super().__init__(message)
        self.signal_name = signal_name


@dataclass
class TrainConfig:
    """One training run. The defaults are Sec. 3.1's recipe for ImageNet-sized data."""
    data: str = None             # ILSVRC-layout folder (train/, val/); None: synthetic
    arch: str = "A"              # Table 1 column, or vgg11/13/16/19
    epochs: int = 74             # 370K iterations at batch 256 ~ 74 epochs (Sec. 3.1)
    batch_size: int = 256        # Sec. 3.1
    lr: float = None             # None: 1e-2 (Sec. 3.1) for a new run, stored rate on resume
    momentum: float = 0.9        # Sec. 3.1
    weight_decay: float = 5e-4   # Sec. 3.1: L2 penalty multiplier 5e-4
    dropout: float = 0.5         # Sec. 3.1: on fc6 and fc7
    lr_factor: float = 0.1       # Sec. 3.1: "decreased by a factor of 10"
    lr_patience: int = None      # epochs without improvement let pass (the cut comes after
    #                              one more); None: 2 (new run) or the stored one (resume).
    #                              The paper does not say.
    lr_decreases: int = 3        # Sec. 3.1: "decreased 3 times"
    stop_at_plateau: bool = False  # end at the plateau after the last decrease (Sec. 3.1)
    scale: int = 256             # training scale S, fixed (Sec. 3.1)
    scale_jitter: tuple = None   # (Smin, Smax), e.g. (256, 512), overrides `scale`
    crop: int = 224              # Sec. 2.1: 224x224 input
    test_scale: int = None       # Q; None: S, or (Smin+Smax)/2 when jittering (Sec. 4.1)
    init: str = None             # None: "gaussian" for A (Sec. 3.1), "glorot" deeper
    init_from: str = None        # weights of a trained A to warm-start from (Sec. 3.1)
    width: float = 1.0           # conv width multiplier (1.0 = Table 1)
    fc_width: int = 4096         # fc6/fc7 width (Sec. 2.1)
    workers: int = 2             # loader processes; 0 decodes in the training process
    cache: bool = False          # decode every image once into memory at the largest S
    seed: int = 0
    print_freq: int = 10         # refresh the progress bar's figures every N batches
    device: str = "cpu"
    # 3×3 convs by im2col, Winograd ("winograd", "winograd4"), or "auto": a fixed rule per
    # layer shape (kernels/winograd.py), so a resume with the same flag stays bit-identical
    conv_algo: str = "auto"
    # the CPU's conv and fc GEMMs: "fp32", or "bf16" operands with fp32 sums on AMX tiles
    # (backend.set_precision); None: fp32 for a new run, the stored one on resume
    precision: str = None
    threads: int = None          # kernel threads; None: all cores, or under MPI
                                 # cores / ranks on the machine (distributed.init)
    output: str = None           # None: runs/<data name>-<arch>, or the --resume folder
    resume: str = None           # checkpoint to continue from
    overwrite: bool = False      # replace the run already in `output` (else: an error)
    evaluate: bool = False       # only evaluate the --resume checkpoint on val
    # The synthetic data set (used when `data` is None).
    synthetic_train: int = 2000
    synthetic_val: int = 500
    synthetic_size: int = 36
    extra: dict = field(default_factory=dict)

    @property
    def synthetic(self):
        return self.data is None

    @property
    def label(self):
        """What starts every message of a synthetic run, so it is never taken for real
        data."""
        return "[synthetic] " if self.synthetic else ""

    @property
    def scales(self):
        """(Smin, Smax) of the training images."""
        return tuple(self.scale_jitter) if self.scale_jitter else (self.scale, self.scale)

    @property
    def Q(self):
        if self.test_scale is not None:
            return self.test_scale
        smin, smax = self.scales
        return int(round((smin + smax) / 2))

    def default_init(self):
        """Sec. 3.1: A from N(0, 0.01); deeper nets with Glorot, which the authors later
        found trains them without the warm start from A (and needs no trained A)."""
        if self.init:
            return self.init
        return "gaussian" if models.canonical_config(self.arch) in ("A", "A-LRN") else "glorot"


def synthetic_config(**overrides):
    """The no-download default: a small A on 32x32 drawn images (< 5 min on 2 CPU cores).

    Departures from Sec. 3.1, each measured on this data (2000 images, 10 classes):
    lr 1e-3, because at the paper's 1e-2 this small net on mean-subtracted 0-255 pixels
    stalled at 40-55% val error for 5 epochs, while 1e-3 passes 90% accuracy in 3; no
    dropout (0.5 on a 256-wide fc6/fc7 needed more epochs: 27% vs 16% error after the
    first); batch 16, for more steps per epoch. Glorot init (A at width 0.25).
    """
    settings = dict(data=None, arch="A", epochs=4, batch_size=16, lr=0.001, width=0.25,
                    fc_width=256, dropout=0.0, scale=36, crop=32, init="glorot", workers=0)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**settings)


def check_config(cfg):
    """The flags that can be checked before any file is read -> (device, canonical arch)."""
    try:
        device = backend.check_device(cfg.device)
    except (RuntimeError, ValueError) as e:
        raise TrainingError(str(e)) from e
    if cfg.evaluate and not cfg.resume:
        raise TrainingError("-e/--evaluate needs a checkpoint: give --resume PATH")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise TrainingError(f"--epochs and --batch-size must be positive, got "
                            f"{cfg.epochs} and {cfg.batch_size}")
    if cfg.lr_patience is not None and cfg.lr_patience < 0:
        raise TrainingError(f"--lr-patience must be 0 or more, got {cfg.lr_patience}")
    check_numbers(cfg)
    check_sizes(cfg)
    try:
        backend.set_conv_algorithm(cfg.conv_algo)
    except ValueError as e:
        raise TrainingError(f"--conv-algo: {e}") from e
    if cfg.precision not in (None, *backend.PRECISIONS):
        raise TrainingError(f"--precision must be one of {', '.join(backend.PRECISIONS)}, "
                            f"got {cfg.precision!r}")
    try:
        return device, models.canonical_config(cfg.arch)
    except ValueError as e:
        raise TrainingError(str(e)) from e


def check_sizes(cfg):
    """Scales and crop within the per-image budget (`images.MAX_PIXELS`): a scale of
    100000 is one error line now, not an out-of-memory kill after the data is read."""
    scale_flag = "--scale-jitter SMAX" if cfg.scale_jitter else "--scale"
    for flag, size in ((scale_flag, max(cfg.scales)), ("--test-scale", cfg.Q),
                       ("--crop", cfg.crop)):
        try:
            images.check_scale(int(size), flag)
        except ValueError as e:
            raise TrainingError(str(e)) from None


def check_numbers(cfg):
    """Rates, widths and counts in their ranges; one error line naming flag and value."""
    def finite(v):
        return isinstance(v, (int, float)) and math.isfinite(v)
    rules = [("--lr", cfg.lr, cfg.lr is None or finite(cfg.lr) and cfg.lr > 0,
              "a positive number"),
             ("--momentum", cfg.momentum, finite(cfg.momentum) and 0 <= cfg.momentum < 1,
              "in [0, 1)"),
             ("--wd", cfg.weight_decay, finite(cfg.weight_decay) and cfg.weight_decay >= 0,
              "a number >= 0"),
             ("--dropout", cfg.dropout, finite(cfg.dropout) and 0 <= cfg.dropout < 1,
              "in [0, 1)"),
             ("--width", cfg.width, finite(cfg.width) and cfg.width > 0, "positive"),
             ("--fc-width", cfg.fc_width, cfg.fc_width >= 1, "at least 1"),
             ("-j/--workers", cfg.workers, cfg.workers >= 0, "0 or more"),
             # NOTE: NumPy's and CuPy's generators take 0..2^32-1 (CuPy's, 32 bits)
             ("--seed", cfg.seed, isinstance(cfg.seed, int) and 0 <= cfg.seed < 2**32,
              "an integer in 0..4294967295"),
             ("-p/--print-freq", cfg.print_freq, cfg.print_freq >= 1, "at least 1")]
    for flag, value, ok, wanted in rules:
        if not ok:
            raise TrainingError(f"{flag} must be {wanted}, got {value}")
