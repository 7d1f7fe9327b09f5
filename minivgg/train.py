"""The training loop of Sec. 3.1: data, model, SGD, plateau schedule, checkpoints, metrics.

`fit(TrainConfig(...))` does a whole run; `examples/train_imagenet.py` only parses flags
into a `TrainConfig`. Read top to bottom: `setup` builds everything a run needs into one
`Run` (model, optimizer, schedule, loaders, statistics, output paths), `train` is the
epoch loop, and one epoch is:

    for each batch:   forward, softmax cross-entropy, backward, SGD step (Sec. 3.1)
    validation:       single centre crop at Q (Sec. 3.2): loss, top-1 and top-5 error
    schedule:         lr / 10 when val top-1 error stops improving, at most 3 times
    checkpoint:       last.npz every epoch, best.npz when val top-1 error improves

A checkpoint holds everything a resume needs to continue bit-identically on the CPU: the
weights, the momentum buffers, the schedule, the epoch, the host RNG (dropout) and the
loader seed (the loader's randomness is a function of (seed, epoch, index) only), the data
statistics and the best error so far. The files are written by `minivgg.checkpoint`
(`load_model` rebuilds a trained net), metrics.csv by `minivgg.metrics` and its curves by
`minivgg.plots`.

When things go wrong (README, "Failure behaviour"): Ctrl-C or SIGTERM stops the run after
the batch in progress and writes last.npz at that exact point (epoch and batch), so a
resume continues as if nothing had happened; SIGUSR1 writes it and goes on
(`minivgg.interrupts`). A NaN/Inf loss or validation loss stops the run before any
checkpoint of those weights is written. A run never starts in a folder holding another
run's files unless told to (`checkpoint.prepare_run_folder`).

Started by an MPI launcher (`mpirun -n 4 python examples/train_imagenet.py ...`), the same
loop trains one model on every process (`minivgg.distributed`, Sec. 3.3): each rank takes
its slice of every global batch, the gradients are averaged across ranks inside backward,
the step's loss and error counts are summed across ranks, and rank 0 alone prints and
writes. The checkpoint is the same for any number of ranks. A signal reaches the ranks at
different moments, so they agree on it in the step's sum (`StopSignals.votes`): every rank
stops, or saves, after the same batch, and rank 0 writes the mid-epoch checkpoint.
"""

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from minivgg import backend, checkpoint, distributed, metrics, models, optim, plots
from minivgg import functional as F
from minivgg.checkpoint import EpochProgress, RunPaths, epoch_progress
from minivgg.data import (DataStats, EvalTransform, TrainTransform, check_crop,
                          compute_stats, open_imagenet)
from minivgg.loader import Loader
from minivgg.interrupts import StopSignals
from minivgg.prefetch import to_device_batches
from minivgg.tensor import Tensor, no_grad


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
    lr_patience: int = 2         # epochs without improvement before a cut (paper: unstated)
    lr_decreases: int = 3        # Sec. 3.1: "decreased 3 times"
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


# ----------------------------------------------------------------------------------------
# Set-up: everything a run needs, in one object
# ----------------------------------------------------------------------------------------

@dataclass
class Run:
    """What `setup` builds and the epoch loop uses; `start_epoch`, `best` and `last_good`
    change as the run goes on."""
    config: TrainConfig
    model: models.VGG
    optimizer: optim.SGD
    scheduler: optim.ReduceLROnPlateau
    train_loader: Loader
    val_loader: Loader
    stats: DataStats            # mean RGB and PCA of the training set (Sec. 2.1, 3.1)
    classes: list
    data_name: str              # the data folder's name, or "synthetic"
    device: str
    paths: RunPaths
    loader_seed: int            # the loaders' randomness is a function of (seed, epoch, index)
    log: object = print         # log(message), with the "[synthetic] " label when it applies
    start_epoch: int = 0        # epochs already done (a resume)
    best: float = math.inf      # best val top-1 error so far
    last_good: str = None       # the checkpoint a divergence message points to
    resume_progress: "EpochProgress" = None  # how far into `start_epoch` the resume is
    progress: "EpochProgress" = None         # how far the epoch in progress has come
    group: object = distributed.SingleProcess()  # the processes training together
    reducer: object = distributed.NoReduction()  # averages their gradients (Sec. 3.3)

    @property
    def label(self):
        return _label(self.config)

    @property
    def title(self):
        data = ("synthetic data (drawn shapes and textures)" if self.config.synthetic
                else self.data_name)
        return f"VGG-{self.model.config} on {data}"

    def close(self):
        """Stop the loaders' worker processes."""
        self.train_loader.close()
        self.val_loader.close()


def setup(cfg, log=print, group=None):
    """Check `cfg`, open the data, build or restore the model, optimizer and schedule -> Run.

    The order matters for a bit-identical resume: the host RNG is seeded before the weights
    are drawn, and a resume then overwrites weights, momentum, schedule and RNG state.
    `group` (`minivgg.distributed`): the processes training together; one by default.
    """
    group = group or distributed.SingleProcess()
    device, arch = check_config(cfg)
    say = _with_label(log if group.is_root else _quiet, _label(cfg))
    resumed = read_resume_checkpoint(cfg)  # first: it holds the data statistics
    name = "synthetic" if cfg.synthetic else os.path.basename(os.path.normpath(cfg.data))
    paths = RunPaths(checkpoint.run_folder(cfg.output, cfg.resume, f"{name}-{arch}"))
    # Before any data is read, so a bad --output costs nothing; rank 0 alone writes there.
    if not cfg.evaluate and group.is_root:
        for stale in checkpoint.prepare_run_folder(paths.folder, cfg.resume, cfg.overwrite):
            say(f"removed {stale}, left by a run killed while writing a checkpoint")
    train_set, val_set, data_name = open_data(cfg, say)
    if resumed and resumed[2].get("classes") not in (None, list(train_set.classes)):
        raise TrainingError(f"{cfg.resume} was trained on other classes than {data_name}'s")

    backend.manual_seed(cfg.seed)
    stats = training_stats(cfg, train_set, resumed, say)
    model = build_model(cfg, arch, len(train_set.classes), resumed, say).to(device)
    lr = 0.01 if cfg.lr is None else cfg.lr
    optimizer = optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    scheduler = optim.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.lr_factor,
                                        patience=cfg.lr_patience,
                                        max_decreases=cfg.lr_decreases)
    start_epoch, best, progress = 0, math.inf, None
    if resumed:
        start_epoch, best, progress = restore(cfg, resumed, model, optimizer, scheduler, say)
    # Sec. 3.3: every rank starts from rank 0's weights (and momentum, after a resume), so
    # ranks can never drift apart, whatever the initialisation did on each.
    group.broadcast_([p.data for p in model.parameters()] +
                     [v for v in optimizer.velocities if v is not None])

    seed = int(resumed[2]["rng"]["loader_seed"]) if resumed else cfg.seed
    shard = (group.rank, group.size)  # -b is the global batch; each rank takes its slice
    train_loader = Loader(train_set, TrainTransform(cfg.scales, cfg.crop, stats),
                          cfg.batch_size, shuffle=True, seed=seed, workers=cfg.workers,
                          shard=shard)
    val_loader = Loader(val_set, EvalTransform(cfg.Q, cfg.crop, stats), cfg.batch_size,
                        shuffle=False, seed=seed, workers=cfg.workers, shard=shard)
    say(f"VGG-{arch} width {cfg.width} fc {cfg.fc_width}, {model.num_parameters():,} "
        f"parameters, {'weights from ' + cfg.resume if resumed else 'init ' + cfg.default_init()}"
        f"; {len(train_set)} train / {len(val_set)} val images, "
        f"{len(train_set.classes)} classes; S={cfg.scales[0]}"
        + (f"..{cfg.scales[1]}" if cfg.scale_jitter else "")
        + f", crop {cfg.crop}, Q={cfg.Q}; batch {cfg.batch_size}, {cfg.workers} workers, "
        f"device {device}, conv {cfg.conv_algo}"
        + (f"; {group.description}" if group.size > 1 else ""))
    return Run(cfg, model, optimizer, scheduler, train_loader, val_loader, stats,
               list(train_set.classes), data_name, device, paths, seed, say, start_epoch, best,
               last_good=cfg.resume, resume_progress=progress, group=group,
               reducer=group.gradient_reducer(model.parameters()))


def _label(cfg):
    """What starts every message of a synthetic run, so it is never taken for real data."""
    return "[synthetic] " if cfg.synthetic else ""


def _with_label(log, label):
    return lambda msg: log(label + msg)


def _quiet(msg):
    """The log of ranks other than 0: rank 0 speaks for the run."""


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
    check_numbers(cfg)
    try:
        backend.set_conv_algorithm(cfg.conv_algo)
    except ValueError as e:
        raise TrainingError(f"--conv-algo: {e}") from e
    try:
        return device, models.canonical_config(cfg.arch)
    except ValueError as e:
        raise TrainingError(str(e)) from e


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
             ("-p/--print-freq", cfg.print_freq, cfg.print_freq >= 1, "at least 1")]
    for flag, value, ok, wanted in rules:
        if not ok:
            raise TrainingError(f"{flag} must be {wanted}, got {value}")


def read_resume_checkpoint(cfg):
    """(model state, optimizer state, meta) of --resume, or None for a new run."""
    if not cfg.resume:
        return None
    resumed = checkpoint.load(cfg.resume)
    synthetic = resumed[2].get("synthetic")
    if synthetic is not None and synthetic != cfg.synthetic:
        kind = "synthetic" if synthetic else "real"
        raise TrainingError(f"{cfg.resume} was trained on {kind} data; give the same "
                            f"data source to resume it")
    if cfg.evaluate:
        bad = checkpoint.nonfinite(resumed[0])
        if bad:
            raise TrainingError(f"{cfg.resume}: weights {', '.join(bad[:3])} hold NaN or "
                                f"Inf; refusing to evaluate them")
    else:  # a damaged file is found now, not after the data is read or an epoch is run
        checkpoint.check_resumable(cfg.resume, *resumed)
        epoch_progress(resumed[2], cfg.resume)
    return resumed


def open_data(cfg, log):
    """(train set, val set, name) for the config: an ImageFolder pair or synthetic data."""
    smin, smax = cfg.scales
    if smin > smax:
        raise TrainingError(f"--scale-jitter needs SMIN <= SMAX, got {smin} {smax}")
    check_crop(cfg.crop, smin)
    check_crop(cfg.crop, cfg.Q)
    if cfg.synthetic:
        from minivgg.synthetic import SyntheticImages
        if cfg.synthetic_size < smax:
            log(f"note: synthetic images are {cfg.synthetic_size}px, so S={smax} upscales")
        train = SyntheticImages(cfg.synthetic_train, cfg.synthetic_size, cfg.seed, "train")
        val = SyntheticImages(cfg.synthetic_val, cfg.synthetic_size, cfg.seed, "val")
        return train, val, "synthetic"
    train, val = open_imagenet(cfg.data)
    if cfg.cache:
        t = time.perf_counter()
        bad = train.cache_in_memory(smax, cfg.workers) + val.cache_in_memory(
            max(cfg.Q, cfg.crop), cfg.workers)
        log(f"decoded {len(train) + len(val)} images into memory (smallest side {smax} / "
            f"{cfg.Q}) in {time.perf_counter() - t:.1f}s"
            + (f"; {bad} unreadable, they will be skipped" if bad else ""))
    return train, val, os.path.basename(os.path.normpath(cfg.data))


def training_stats(cfg, train_set, resumed, log):
    """The training set's mean RGB and PCA (Sec. 2.1, 3.1): stored on resume, else computed."""
    if resumed:
        return DataStats.from_dict(resumed[2]["data_stats"])
    t = time.perf_counter()
    stats = compute_stats(train_set, seed=cfg.seed, workers=cfg.workers)
    log(f"training-set mean RGB {np.round(stats.mean_rgb, 2).tolist()} and PCA "
        f"eigenvalues {np.round(stats.pca_eigval, 1).tolist()} (0-255 scale), "
        f"{time.perf_counter() - t:.1f}s")
    return stats


def build_model(cfg, arch, num_classes, resumed, log):
    """A freshly initialised VGG (Sec. 3.1), warm-started from --init-from on a new run."""
    try:
        model = models.vgg(arch, num_classes=num_classes, width=cfg.width,
                           fc_width=cfg.fc_width, input_size=cfg.crop,
                           init=cfg.default_init(), dropout=cfg.dropout)
    except ValueError as e:
        raise TrainingError(str(e)) from e
    if cfg.init_from and not resumed:
        try:  # a minivgg checkpoint or published weights (Caffe, safetensors, .pth, .npz)
            a_model = models.load_pretrained(cfg.init_from)
            copied = models.init_from_a(model, a_model.state_dict())
        except (ValueError, FileNotFoundError, ImportError) as e:
            raise TrainingError(f"--init-from {cfg.init_from}: {e}") from e
        log(f"warm start from {cfg.init_from} (VGG-{a_model.config}): "
            f"{', '.join(copied)}")
    return model


def restore(cfg, resumed, model, optimizer, scheduler, log):
    """Load --resume's weights, momentum, schedule and RNG
    -> (epochs done, best error, progress into the next epoch or None)."""
    state, opt_state, meta = resumed
    _check_same_model(meta, model, cfg.resume)
    try:
        model.load_state_dict(state)
    except ValueError as e:
        raise checkpoint.CheckpointError(f"checkpoint {cfg.resume!r}: {e}") from None
    if cfg.evaluate:
        return 0, math.inf, None
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(meta["scheduler"])
    backend.set_rng_state(meta["rng"]["host"])
    if cfg.lr is not None:  # NOTE: the command line wins over the stored rate
        optimizer.lr = cfg.lr
    start_epoch, progress = int(meta["epoch"]), epoch_progress(meta, cfg.resume)
    log(f"resumed {cfg.resume} at epoch {start_epoch}"
        + (f" + {progress.batch} batches" if progress else "") + f", lr {optimizer.lr:g}")
    return start_epoch, float(meta["best_val_top1_err"]), progress


def _check_same_model(meta, model, path):
    saved, wanted = meta.get("model"), checkpoint.model_meta(model)
    if not isinstance(saved, dict):
        raise TrainingError(f"{path} is not a minivgg training checkpoint (no model entry)")
    diff = [f"{k} {saved.get(k)!r} (asked: {wanted[k]!r})" for k in wanted
            if saved.get(k) != wanted[k]]
    if diff:
        raise TrainingError(f"{path} holds a different network: " + ", ".join(diff) +
                            ". Pass the matching -a/--width/--fc-width/--crop flags.")


# ----------------------------------------------------------------------------------------
# A whole run: the epoch loop
# ----------------------------------------------------------------------------------------

def fit(cfg, log=print, group=None):
    """Run (or resume, or only evaluate) training as `cfg` says; returns the metrics rows.

    Raises `TrainingError` (and `DataError`, `CheckpointError`) with a message meant for
    the user; `TrainingDiverged` when the loss stops being finite. `group`: the processes
    training together (`distributed.init`, called here when not given).
    """
    if group is None:
        group = distributed.init(cfg.device, cfg.threads)
    run = setup(cfg, log, group)
    try:
        if cfg.evaluate:
            return [evaluate_only(run)]
        return train(run)
    finally:
        run.close()


def evaluate_only(run):
    """-e/--evaluate: validate the --resume checkpoint once and report it."""
    v = validate(run.model, run.val_loader, run.device, group=run.group)
    run.log(f"evaluation of {run.config.resume}: val loss {v['val_loss']:.4f}, top-1 error "
            f"{100 * v['val_top1_err']:.2f}%, top-5 error {100 * v['val_top5_err']:.2f}%")
    return v


def train(run):
    """Epochs `run.start_epoch` to `config.epochs` (Sec. 3.1) -> all metrics rows of the run.

    Each epoch: train, validate, step the plateau schedule on val top-1 error, write
    last.npz (and best.npz), append a metrics.csv row and redraw metrics.png. A stop
    signal ends it with a resumable last.npz (`TrainingInterrupted`).
    """
    cfg, say, paths, root = run.config, run.log, run.paths, run.group.is_root
    if root and cfg.overwrite and not checkpoint.holds(paths.folder, cfg.resume):
        checkpoint.remove_run_files(paths.folder)  # asked for, and every check has passed
    rows = earlier_rows(run)
    plotted = False
    with StopSignals(verbose=root) as signals:  # rank 0 says "SIGINT received" for all
        for epoch in range(run.start_epoch, cfg.epochs):
            lr = run.optimizer.lr
            t0 = time.perf_counter()
            tr = train_one_epoch(run, epoch, signals)
            va = validate(run.model, run.val_loader, run.device, group=run.group,
                          signals=signals)
            if signals.agreed_stop:  # part-way through the epoch or its validation
                raise stopped_mid_epoch(run, epoch, signals.agreed_stop)
            if not math.isfinite(va["val_loss"]):
                raise _diverged(run, f"the validation loss became {va['val_loss']}", epoch)
            seconds = time.perf_counter() - t0
            improved = va["val_top1_err"] < run.best
            run.best = min(run.best, va["val_top1_err"])
            run.scheduler.step(va["val_top1_err"])
            # NOTE: a cheap guard of the promise that ranks hold identical weights
            run.group.check_identical([p.data for p in run.model.parameters()], "weights")
            save_checkpoints(run, epoch + 1, va, improved)
            rows.append(metrics.epoch_row(epoch + 1, tr, va, lr, seconds))
            if root:  # one writer: the files do not depend on the number of ranks
                metrics.write_metrics(paths.metrics_csv, rows)
                plotted = plot_run(run, rows)
            say(epoch_summary(run, epoch + 1, tr, va, lr, seconds, improved))
            if run.optimizer.lr != lr:
                say(f"val top-1 error stopped improving: lr {lr:g} -> {run.optimizer.lr:g}")
            if signals.agree(run.group) and epoch + 1 < cfg.epochs:
                raise TrainingInterrupted(
                    f"stopped by {signals.agreed_stop} after epoch {epoch + 1}: {paths.last} "
                    f"holds it; --resume {paths.last} continues with epoch {epoch + 2}",
                    signals.agreed_stop)
    say(f"done: best val top-1 error {100 * run.best:.2f}%; checkpoints and metrics.csv"
        f"{' and metrics.png' if rows and plotted else ''} in {paths.folder}")
    return rows


def stopped_mid_epoch(run, epoch, signal_name):
    """Write last.npz where epoch `epoch` stopped -> the TrainingInterrupted to raise."""
    progress, total, last = run.progress, len(run.train_loader), run.paths.last
    save_progress(run, epoch)
    where = ("" if progress.batch < total else " (its validation had not finished)")
    best = (f"{run.paths.best} holds the best epoch so far (val top-1 error "
            f"{100 * run.best:.2f}%)" if os.path.isfile(run.paths.best)
            else "no epoch has finished yet, so there is no best.npz")
    return TrainingInterrupted(
        f"stopped by {signal_name}: {last} holds epoch {epoch + 1} up to batch "
        f"{progress.batch} of {total}{where}; --resume {last} continues exactly from there. "
        f"{best[0].upper() + best[1:]}.", signal_name)


def earlier_rows(run):
    """The metrics.csv rows of the epochs a resumed run already did ([] for a new run)."""
    path = run.paths.metrics_csv
    if not run.start_epoch or not os.path.isfile(path):
        return []
    try:
        return metrics.read_metrics(path, run.start_epoch)
    except ValueError as e:
        raise TrainingError(f"cannot continue the metrics of the resumed run: {e}") from e


def save_checkpoints(run, epochs_done, val, improved):
    """last.npz after every epoch, best.npz when val top-1 error improved (atomic writes)."""
    meta = checkpoint.training_meta(run, epochs_done)
    meta.update(val_top1_err=val["val_top1_err"], val_top5_err=val["val_top5_err"])
    state, opt_state = finite_state(run, f"after epoch {epochs_done}")  # on every rank
    if run.group.is_root:  # one writer: the files do not depend on the number of ranks
        checkpoint.save(run.paths.last, state, opt_state, meta)
        if improved:
            checkpoint.save(run.paths.best, state, opt_state, meta)
    run.last_good = f"{run.paths.last} (epoch {epochs_done})"


def save_progress(run, epoch):
    """last.npz part-way through epoch `epoch` (0-based): `run.progress` says how far."""
    meta = checkpoint.training_meta(run, epoch)
    progress = dict(asdict(run.progress), skipped=skipped_so_far(run))
    meta.update(batch=run.progress.batch, progress=progress)
    state, opt_state = finite_state(run, f"at epoch {epoch + 1}, batch {run.progress.batch}")
    if run.group.is_root:
        checkpoint.save(run.paths.last, state, opt_state, meta)
    run.last_good = f"{run.paths.last} (epoch {epoch + 1}, batch {run.progress.batch})"


def finite_state(run, when):
    """(model state, optimizer state), checked finite: "last good" never means NaN."""
    state, opt_state = run.model.state_dict(), run.optimizer.state_dict()
    velocities = {f"momentum of {k}": v for k, v in zip(state, opt_state["velocities"])}
    bad = checkpoint.nonfinite(state) + checkpoint.nonfinite(velocities)
    if bad:
        raise _diverged(run, f"{', '.join(bad[:3])} became NaN or Inf {when}")
    return state, opt_state


def plot_run(run, rows):
    """Redraw metrics.png; False when matplotlib is missing (training goes on without it)."""
    try:
        plots.plot_curves(rows, run.paths.metrics_png, run.title)
    except ImportError:
        return False
    return True


def epoch_summary(run, epochs_done, tr, va, lr, seconds, improved):
    """The one line printed after each epoch."""
    skipped = tr["skipped"] + va["val_skipped"]
    return (f"epoch {epochs_done}/{run.config.epochs}: train loss {tr['train_loss']:.4f} "
            f"top-1 err {100 * tr['train_top1_err']:.2f}% | val loss {va['val_loss']:.4f} "
            f"top-1 err {100 * va['val_top1_err']:.2f}% top-5 err "
            f"{100 * va['val_top5_err']:.2f}% | lr {lr:g} | {tr['images_per_s']:.1f} img/s "
            f"({100 * tr['data_wait']:.0f}% waiting for data) | {seconds:.1f}s"
            + (f" | {skipped} unreadable images skipped" if skipped else "")
            + (" | best" if improved else ""))


# ----------------------------------------------------------------------------------------
# One epoch
# ----------------------------------------------------------------------------------------

def train_step(run, x, y, signals=None):
    """Forward, softmax cross-entropy, backward, SGD step (Sec. 3.1) -> (summed loss, top-1
    errors, images) of the global batch: this rank's `x, y` and every other rank's slice.

    With several ranks (Sec. 3.3) the step's sums are added across ranks before backward,
    so every rank takes the same decision on a non-finite loss, and `run.reducer` averages
    the gradients while backward runs. A rank whose slice is empty still takes part.
    `signals` (`StopSignals`): this rank's stop and save requests join the same sum, so
    every rank settles on them after this step (`signals.agreed_stop`, `agreed_save`).
    NOTE: when the loss is not finite the weights are left as they were (no backward, no
    step), so the last checkpoint and the model in memory stay usable.
    """
    n, loss, local = len(y), None, [0.0, 0, 0]
    with _finiteness_checked_here():
        if n:
            logits = run.model(Tensor(x))
            loss = F.cross_entropy(logits, y)
            local = [float(loss.item()) * n, metrics.topk_errors(logits.data, y, (1,))[1], n]
        totals = run.group.sum(local + (signals.votes() if signals else []))
        loss_sum, wrong, seen = totals[:3]
        if signals:
            signals.settle(totals[3:])
        if seen and math.isfinite(loss_sum):
            run.optimizer.zero_grad()
            run.reducer.start(n)
            if loss is not None:
                loss.backward(on_leaf_done=run.reducer.grad_ready)
            run.reducer.finish()
            run.optimizer.step()
    return loss_sum, int(wrong), int(seen)


def _finiteness_checked_here():
    """NumPy's floating-point warnings off for a step or a validation pass.

    NOTE: a diverging run (say `--lr 1e9`) overflows in a matmul long before the loss is
    NaN, and NumPy would print "RuntimeWarning: overflow encountered ..." lines above the
    one error line that matters. The loop checks the summed loss (and the validation loss)
    with `math.isfinite` and stops with `TrainingDiverged`, so these warnings say nothing
    the user is not told anyway. Only the calling thread is affected (NumPy's errstate is
    context-local); the Numba and CuPy kernels never warn.
    """
    return np.errstate(over="ignore", invalid="ignore", divide="ignore")


def train_one_epoch(run, epoch, signals=None):
    """One pass over the training set -> dict of loss, top-1 error, images/s, skipped.

    A resumed epoch starts where its checkpoint stopped (`run.resume_progress`). On a stop
    signal it returns after the batch in progress; `run.progress` says how far it came.
    """
    run.model.train()
    total = len(run.train_loader)
    p = run.progress = run.resume_progress or EpochProgress()
    run.resume_progress = None
    bar = _progress_bar(f"{run.label}epoch {epoch + 1}", total, p.batch,
                        run.group.is_root)
    start, waited, seen_before = time.perf_counter(), 0.0, p.seen
    batches = iter(to_device_batches(run.train_loader.epoch(epoch, start=p.batch), run.device))
    for step in range(p.batch, total):
        t = time.perf_counter()
        batch = next(batches, None)  # time spent here is time the loader kept us waiting
        waited += time.perf_counter() - t
        if batch is None:
            break
        x, y = batch
        distributed.seed_dropout(run.group, run.loader_seed, epoch, step)
        step_loss, step_wrong, step_seen = train_step(run, x, y, signals)
        if not math.isfinite(step_loss):
            bar.close()
            raise _diverged(run, f"the training loss became {step_loss / step_seen}", epoch,
                            step)
        p.batch, p.seen, p.loss_sum = step + 1, p.seen + step_seen, p.loss_sum + step_loss
        p.wrong += step_wrong
        bar.update(1)
        if (step + 1) % max(1, run.config.print_freq) == 0 or step + 1 == total:
            rate = (p.seen - seen_before) / (time.perf_counter() - start)
            bar.set_postfix_str(f"loss={p.loss_sum / p.seen:.3f} top1_err={p.wrong / p.seen:.3f}"
                                f" img/s={rate:.1f}", refresh=False)
        if signals and signals.take_agreed_save():  # SIGUSR1: checkpoint now, go on
            save_progress(run, epoch)
            run.log(f"saved {run.paths.last} (epoch {epoch + 1} up to batch {p.batch} of "
                    f"{total}); training goes on")
        if signals and signals.agreed_stop:
            break
    bar.close()
    seconds = max(time.perf_counter() - start, 1e-9)  # a resume can start at the end
    if p.seen == 0:
        raise TrainingError("an epoch produced no batch: every training image was skipped")
    return {"train_loss": p.loss_sum / p.seen, "train_top1_err": p.wrong / p.seen,
            "images_per_s": (p.seen - seen_before) / seconds, "train_seconds": seconds,
            "data_wait": waited / seconds, "skipped": skipped_so_far(run)}


def skipped_so_far(run):
    """Unreadable training images skipped in this epoch, on every rank and before a
    resume. NOTE: a collective: every rank calls it at the same point."""
    here = run.train_loader.skipped
    return run.progress.skipped + int(run.group.sum([here])[0])


def _progress_bar(desc, total, initial=0, show=True):
    """tqdm on stderr; refreshed at most every 30 s when stderr is a log file, not a tty."""
    from tqdm import tqdm
    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, unit="batch", leave=False,
                dynamic_ncols=True, mininterval=0.5 if tty else 30, file=sys.stderr,
                disable=not show)


def _diverged(run, what, epoch=None, step=None):
    """The TrainingDiverged error for `what`, pointing to the last good checkpoint."""
    at = "" if epoch is None else f" at epoch {epoch + 1}" + (
        "" if step is None else f", batch {step + 1}")
    where = (f"the last good checkpoint is {run.last_good}" if run.last_good
             else "no checkpoint had been written yet")
    return TrainingDiverged(
        f"{what}{at}; stopping without writing a checkpoint of these weights. The "
        f"learning rate ({run.optimizer.lr:g}) is probably too high; {where}.")


def validate(model, loader, device, epoch=0, group=None, signals=None):
    """Loss, top-1 and top-5 error of single centre crops (Sec. 3.2) over `loader`; with a
    `group` of ranks, each validates its slices and the sums are added across ranks.
    None when a stop signal came first (see `train`): agreed by the ranks in that sum."""
    if signals and signals.agreed_stop:
        return None
    model.eval()
    seen, loss_sum, wrong1, wrong5 = 0, 0.0, 0, 0
    with no_grad(), _finiteness_checked_here():  # train() checks the loss; loads refuse NaN
        for x, y in to_device_batches(loader.epoch(epoch), device):
            if signals and signals.stop:  # this rank's own; the others learn it below
                break
            n = len(y)
            if n == 0:  # this rank's slice of a short last batch
                continue
            logits = model(Tensor(x))
            loss_sum += float(F.cross_entropy(logits, y).item()) * n
            errors = metrics.topk_errors(logits.data, y, (1, 5))
            seen, wrong1, wrong5 = seen + n, wrong1 + errors[1], wrong5 + errors[5]
    group = group or distributed.SingleProcess()
    totals = group.sum([loss_sum, wrong1, wrong5, seen, loader.skipped]
                       + (signals.votes() if signals else []))
    if signals and signals.settle(totals[5:]):
        return None
    loss_sum, wrong1, wrong5, seen, skipped = totals[:5]
    seen, skipped = int(seen), int(skipped)
    if seen == 0:
        raise TrainingError("validation produced no batch: every val image was skipped")
    return {"val_loss": loss_sum / seen, "val_top1_err": wrong1 / seen,
            "val_top5_err": wrong5 / seen, "val_skipped": skipped}
