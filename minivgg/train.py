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
"""

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from minivgg import backend, checkpoint, metrics, models, optim, plots
from minivgg import functional as F
from minivgg.data import (DataStats, EvalTransform, Loader, TrainTransform, check_crop,
                          compute_stats, open_imagenet)
from minivgg.prefetch import to_device_batches
from minivgg.tensor import Tensor, no_grad


class TrainingError(Exception):
    """A run that cannot start or go on (bad flags, checkpoint, device); no traceback."""


class TrainingDiverged(TrainingError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


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
    init_from: str = None        # checkpoint of a trained A to warm-start from (Sec. 3.1)
    width: float = 1.0           # conv width multiplier (1.0 = Table 1)
    fc_width: int = 4096         # fc6/fc7 width (Sec. 2.1)
    workers: int = 2             # loader processes; 0 decodes in the training process
    cache: bool = False          # decode every image once into memory at the largest S
    seed: int = 0
    print_freq: int = 10         # refresh the progress bar's figures every N batches
    device: str = "cpu"
    output: str = None           # None: runs/<data name>-<arch>, or the --resume folder
    resume: str = None           # checkpoint to continue from
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
class RunPaths:
    """Where a run writes: its output folder and the files in it."""
    folder: str

    @property
    def last(self):         # every epoch: what a resume continues from
        return os.path.join(self.folder, "last.npz")

    @property
    def best(self):         # when val top-1 error improves
        return os.path.join(self.folder, "best.npz")

    @property
    def metrics_csv(self):  # one row per epoch (`minivgg.metrics`)
        return os.path.join(self.folder, "metrics.csv")

    @property
    def metrics_png(self):  # its curves (`minivgg.plots`)
        return os.path.join(self.folder, "metrics.png")


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


def setup(cfg, log=print):
    """Check `cfg`, open the data, build or restore the model, optimizer and schedule -> Run.

    The order matters for a bit-identical resume: the host RNG is seeded before the weights
    are drawn, and a resume then overwrites weights, momentum, schedule and RNG state.
    """
    device, arch = check_config(cfg)
    say = _with_label(log, _label(cfg))
    resumed = read_resume_checkpoint(cfg)  # first: it holds the data statistics
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
    start_epoch, best = 0, math.inf
    if resumed:
        start_epoch, best = restore(cfg, resumed, model, optimizer, scheduler, say)

    output = cfg.output or (os.path.dirname(os.path.abspath(cfg.resume)) if cfg.resume
                            else os.path.join("runs", f"{data_name}-{arch}"))
    seed = int(resumed[2]["rng"]["loader_seed"]) if resumed else cfg.seed
    train_loader = Loader(train_set, TrainTransform(cfg.scales, cfg.crop, stats),
                          cfg.batch_size, shuffle=True, seed=seed, workers=cfg.workers)
    val_loader = Loader(val_set, EvalTransform(cfg.Q, cfg.crop, stats), cfg.batch_size,
                        shuffle=False, seed=seed, workers=cfg.workers)
    paths = RunPaths(output)
    say(f"VGG-{arch} width {cfg.width} fc {cfg.fc_width}, {model.num_parameters():,} "
        f"parameters, {'weights from ' + cfg.resume if resumed else 'init ' + cfg.default_init()}"
        f"; {len(train_set)} train / {len(val_set)} val images, "
        f"{len(train_set.classes)} classes; S={cfg.scales[0]}"
        + (f"..{cfg.scales[1]}" if cfg.scale_jitter else "")
        + f", crop {cfg.crop}, Q={cfg.Q}; batch {cfg.batch_size}, {cfg.workers} workers, "
        f"device {device}")
    return Run(cfg, model, optimizer, scheduler, train_loader, val_loader, stats,
               list(train_set.classes), data_name, device, paths, seed, say, start_epoch, best,
               last_good=paths.last if start_epoch else None)


def _label(cfg):
    """What starts every message of a synthetic run, so it is never taken for real data."""
    return "[synthetic] " if cfg.synthetic else ""


def _with_label(log, label):
    return lambda msg: log(label + msg)


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
    try:
        return device, models.canonical_config(cfg.arch)
    except ValueError as e:
        raise TrainingError(str(e)) from e


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
        a_model, a_meta = checkpoint.load_model(cfg.init_from)
        try:
            copied = models.init_from_a(model, a_model.state_dict())
        except ValueError as e:
            raise TrainingError(f"--init-from {cfg.init_from}: {e}") from e
        log(f"warm start from {cfg.init_from} (VGG-{a_meta['model']['config']}): "
            f"{', '.join(copied)}")
    return model


def restore(cfg, resumed, model, optimizer, scheduler, log):
    """Load --resume's weights, momentum, schedule and RNG -> (epochs done, best error)."""
    state, opt_state, meta = resumed
    _check_same_model(meta, model, cfg.resume)
    model.load_state_dict(state)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(meta["scheduler"])
    backend.set_rng_state(meta["rng"]["host"])
    if cfg.lr is not None:  # NOTE: the command line wins over the stored rate
        optimizer.lr = cfg.lr
    start_epoch = int(meta["epoch"])
    if not cfg.evaluate:
        log(f"resumed {cfg.resume} at epoch {start_epoch}, lr {optimizer.lr:g}")
    return start_epoch, float(meta["best_val_top1_err"])


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

def fit(cfg, log=print):
    """Run (or resume, or only evaluate) training as `cfg` says; returns the metrics rows.

    Raises `TrainingError` (and `DataError`, `CheckpointError`) with a message meant for
    the user; `TrainingDiverged` when the loss stops being finite.
    """
    run = setup(cfg, log)
    try:
        if cfg.evaluate:
            return [evaluate_only(run)]
        return train(run)
    finally:
        run.close()


def evaluate_only(run):
    """-e/--evaluate: validate the --resume checkpoint once and report it."""
    v = validate(run.model, run.val_loader, run.device)
    run.log(f"evaluation of {run.config.resume}: val loss {v['val_loss']:.4f}, top-1 error "
            f"{100 * v['val_top1_err']:.2f}%, top-5 error {100 * v['val_top5_err']:.2f}%")
    return v


def train(run):
    """Epochs `run.start_epoch` to `config.epochs` (Sec. 3.1) -> all metrics rows of the run.

    Each epoch: train, validate, step the plateau schedule on val top-1 error, write
    last.npz (and best.npz), append a metrics.csv row and redraw metrics.png.
    """
    cfg, say, paths = run.config, run.log, run.paths
    os.makedirs(paths.folder, exist_ok=True)
    rows = earlier_rows(run)
    plotted = False
    for epoch in range(run.start_epoch, cfg.epochs):
        lr = run.optimizer.lr
        t0 = time.perf_counter()
        tr = train_one_epoch(run, epoch)
        va = validate(run.model, run.val_loader, run.device)
        seconds = time.perf_counter() - t0
        improved = va["val_top1_err"] < run.best
        run.best = min(run.best, va["val_top1_err"])
        run.scheduler.step(va["val_top1_err"])
        save_checkpoints(run, epoch + 1, va, improved)
        rows.append(metrics.epoch_row(epoch + 1, tr, va, lr, seconds))
        metrics.write_metrics(paths.metrics_csv, rows)
        plotted = plot_run(run, rows)
        say(epoch_summary(run, epoch + 1, tr, va, lr, seconds, improved))
        if run.optimizer.lr != lr:
            say(f"val top-1 error stopped improving: lr {lr:g} -> {run.optimizer.lr:g}")
    say(f"done: best val top-1 error {100 * run.best:.2f}%; checkpoints and metrics.csv"
        f"{' and metrics.png' if rows and plotted else ''} in {paths.folder}")
    return rows


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
    cfg = run.config
    meta = {"model": checkpoint.model_meta(run.model), "classes": list(run.classes),
            "data_stats": run.stats.to_dict(), "epoch": epochs_done,
            "scheduler": run.scheduler.state_dict(),
            "rng": {"host": backend.get_rng_state(), "loader_seed": run.loader_seed},
            "best_val_top1_err": run.best, "synthetic": cfg.synthetic,
            "config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
            "val_top1_err": val["val_top1_err"], "val_top5_err": val["val_top5_err"]}
    state, opt_state = run.model.state_dict(), run.optimizer.state_dict()
    checkpoint.save(run.paths.last, state, opt_state, meta)
    if improved:
        checkpoint.save(run.paths.best, state, opt_state, meta)
    run.last_good = f"{run.paths.last} (epoch {epochs_done})"


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

def train_step(model, optimizer, x, y):
    """Forward, softmax cross-entropy, backward, SGD step (Sec. 3.1) -> (loss, logits).

    NOTE: when the loss is not finite the weights are left as they were (no backward, no
    step), so the last checkpoint and the model in memory stay usable.
    """
    logits = model(Tensor(x))
    loss = F.cross_entropy(logits, y)
    value = float(loss.item())
    if math.isfinite(value):
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return value, logits


def train_one_epoch(run, epoch):
    """One pass over the training set -> dict of loss, top-1 error, images/s, skipped."""
    run.model.train()
    total = len(run.train_loader)
    bar = _progress_bar(f"{run.label}epoch {epoch + 1}", total)
    seen, loss_sum, wrong, start, waited = 0, 0.0, 0, time.perf_counter(), 0.0
    batches = iter(to_device_batches(run.train_loader.epoch(epoch), run.device))
    for step in range(total):
        t = time.perf_counter()
        batch = next(batches, None)  # time spent here is time the loader kept us waiting
        waited += time.perf_counter() - t
        if batch is None:
            break
        x, y = batch
        value, logits = train_step(run.model, run.optimizer, x, y)
        if not math.isfinite(value):
            bar.close()
            raise _diverged(run, value, epoch, step)
        seen += len(y)
        loss_sum += value * len(y)
        wrong += metrics.topk_errors(logits.data, y, (1,))[1]
        bar.update(1)
        if (step + 1) % max(1, run.config.print_freq) == 0 or step + 1 == total:
            rate = seen / (time.perf_counter() - start)
            bar.set_postfix_str(f"loss={loss_sum / seen:.3f} top1_err={wrong / seen:.3f} "
                                f"img/s={rate:.1f}", refresh=False)
    bar.close()
    seconds = time.perf_counter() - start
    if seen == 0:
        raise TrainingError("an epoch produced no batch: every training image was skipped")
    return {"train_loss": loss_sum / seen, "train_top1_err": wrong / seen,
            "images_per_s": seen / seconds, "train_seconds": seconds,
            "data_wait": waited / seconds, "skipped": run.train_loader.skipped}


def _progress_bar(desc, total):
    """tqdm on stderr; refreshed at most every 30 s when stderr is a log file, not a tty."""
    from tqdm import tqdm
    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True,
                mininterval=0.5 if tty else 30, file=sys.stderr)


def _diverged(run, value, epoch, step):
    where = (f"the last good checkpoint is {run.last_good}" if run.last_good
             else "no checkpoint had been written yet")
    return TrainingDiverged(
        f"the training loss became {value} at epoch {epoch + 1}, batch {step + 1}; "
        f"stopping. The learning rate ({run.optimizer.lr:g}) is probably too high; "
        f"{where}.")


def validate(model, loader, device, epoch=0):
    """Loss, top-1 and top-5 error of single centre crops (Sec. 3.2) over `loader`."""
    model.eval()
    seen, loss_sum, wrong1, wrong5 = 0, 0.0, 0, 0
    with no_grad():
        for x, y in to_device_batches(loader.epoch(epoch), device):
            logits = model(Tensor(x))
            n = len(y)
            loss_sum += float(F.cross_entropy(logits, y).item()) * n
            errors = metrics.topk_errors(logits.data, y, (1, 5))
            seen, wrong1, wrong5 = seen + n, wrong1 + errors[1], wrong5 + errors[5]
    if seen == 0:
        raise TrainingError("validation produced no batch: every val image was skipped")
    return {"val_loss": loss_sum / seen, "val_top1_err": wrong1 / seen,
            "val_top5_err": wrong5 / seen, "val_skipped": loader.skipped}
