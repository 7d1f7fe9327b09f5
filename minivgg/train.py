"""The training loop of Sec. 3.1: data, model, SGD, plateau schedule, checkpoints, metrics.

`fit(TrainConfig(...))` does a whole run; `examples/train_imagenet.py` only parses flags
into a `TrainConfig`. One epoch is:

    for each batch:   forward, softmax cross-entropy, backward, SGD step (Sec. 3.1)
    validation:       single centre crop at Q (Sec. 3.2): loss, top-1 and top-5 error
    schedule:         lr / 10 when val top-1 error stops improving, at most 3 times
    checkpoint:       last.npz every epoch, best.npz when val top-1 error improves

A checkpoint holds everything a resume needs to continue bit-identically on the CPU: the
weights, the momentum buffers, the schedule, the epoch, the host RNG (dropout) and the
loader seed (the loader's randomness is a function of (seed, epoch, index) only), the data
statistics and the best error so far.
"""

import csv
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from minivgg import backend, checkpoint, models, optim
from minivgg import functional as F
from minivgg.data import (DataStats, EvalTransform, Loader, TrainTransform, check_crop,
                          compute_stats, open_imagenet)
from minivgg.tensor import Tensor, no_grad

METRICS_COLUMNS = ("epoch", "train_loss", "train_top1_err", "val_loss", "val_top1_err",
                   "val_top5_err", "lr", "images_per_s", "seconds")


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
    init_from: str = None        # weights of a trained A to warm-start from (Sec. 3.1)
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
# Metrics
# ----------------------------------------------------------------------------------------

def topk_errors(logits, labels, ks=(1, 5)):
    """Number of samples whose label is not among the k highest logits, for each k."""
    logits = backend.to_numpy(logits)
    labels = np.asarray(labels)
    order = np.argsort(-logits, axis=1)
    errors = []
    for k in ks:
        hit = (order[:, :min(k, logits.shape[1])] == labels[:, None]).any(axis=1)
        errors.append(int((~hit).sum()))
    return errors


def read_metrics(path, up_to_epoch):
    """Rows of an existing metrics.csv with epoch <= up_to_epoch (for a resumed run)."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if int(row["epoch"]) <= up_to_epoch]


def write_metrics(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRICS_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def plot_metrics(rows, path, title):
    """Loss and error curves to a PNG; returns False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    epoch = [int(r["epoch"]) for r in rows]
    col = {k: [float(r[k]) for r in rows] for k in METRICS_COLUMNS[1:6]}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epoch, col["train_loss"], "o-", label="train")
    ax1.plot(epoch, col["val_loss"], "o-", label="val")
    ax1.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax2.plot(epoch, [100 * v for v in col["train_top1_err"]], "o-", label="train top-1")
    ax2.plot(epoch, [100 * v for v in col["val_top1_err"]], "o-", label="val top-1")
    ax2.plot(epoch, [100 * v for v in col["val_top5_err"]], "o-", label="val top-5")
    ax2.set(xlabel="epoch", ylabel="error (%)", title="error", ylim=(0, 100))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------

def model_meta(model):
    return {"config": model.config, "num_classes": model.num_classes, "width": model.width,
            "fc_width": model.fc_width, "input_size": model.input_size}


def load_model(path, device="cpu"):
    """Rebuild the model saved in a training checkpoint -> (model, meta), in eval mode.

    Raises `checkpoint.CheckpointError` for a missing or corrupt file, or one that is not a
    minivgg training checkpoint (no model description, or weights that do not fit it).
    """
    state, _, meta = checkpoint.load(path)
    spec = meta.get("model")
    needed = ("config", "num_classes", "width", "fc_width", "input_size")
    if not isinstance(spec, dict) or any(k not in spec for k in needed):
        raise checkpoint.CheckpointError(
            f"checkpoint {path!r} does not describe a model (meta['model'] needs {needed}); "
            f"was it written by minivgg.train?")
    try:
        model = models.VGG(spec["config"], spec["num_classes"], spec["width"],
                           spec["fc_width"], spec["input_size"])
        model.load_state_dict(state)
    except ValueError as e:
        raise checkpoint.CheckpointError(f"checkpoint {path!r}: {e}") from e
    return model.to(device).eval(), meta


def _check_same_model(meta, model, path):
    saved, wanted = meta.get("model"), model_meta(model)
    if not isinstance(saved, dict):
        raise TrainingError(f"{path} is not a minivgg training checkpoint (no model entry)")
    diff = [f"{k} {saved.get(k)!r} (asked: {wanted[k]!r})" for k in wanted
            if saved.get(k) != wanted[k]]
    if diff:
        raise TrainingError(f"{path} holds a different network: " + ", ".join(diff) +
                            ". Pass the matching -a/--width/--fc-width/--crop flags.")


# ----------------------------------------------------------------------------------------
# One epoch
# ----------------------------------------------------------------------------------------

def train_one_epoch(model, optimizer, loader, epoch, device, label, print_freq=10,
                    last_good=None):
    """One pass over the training set -> dict of loss, top-1 error, images/s, skipped."""
    from tqdm import tqdm
    model.train()
    total = len(loader)
    tty = sys.stderr.isatty()
    bar = tqdm(total=total, desc=f"{label}epoch {epoch + 1}", unit="batch", leave=False,
               dynamic_ncols=True, mininterval=0.5 if tty else 30, file=sys.stderr)
    seen, loss_sum, wrong, start, waited = 0, 0.0, 0, time.perf_counter(), 0.0
    batches = iter(_to_device(loader.epoch(epoch), device))
    for step in range(total):
        t = time.perf_counter()
        batch = next(batches, None)  # time spent here is time the loader kept us waiting
        waited += time.perf_counter() - t
        if batch is None:
            break
        x, y = batch
        logits = model(Tensor(x))
        loss = F.cross_entropy(logits, y)
        value = float(loss.item())
        if not math.isfinite(value):
            bar.close()
            where = (f"the last good checkpoint is {last_good}" if last_good
                     else "no checkpoint had been written yet")
            raise TrainingDiverged(
                f"the training loss became {value} at epoch {epoch + 1}, batch {step + 1}; "
                f"stopping. The learning rate ({optimizer.lr:g}) is probably too high; "
                f"{where}.")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        n = len(y)
        seen += n
        loss_sum += value * n
        wrong += topk_errors(logits.data, backend.to_numpy(y), (1,))[0]
        bar.update(1)
        if (step + 1) % max(1, print_freq) == 0 or step + 1 == total:
            rate = seen / (time.perf_counter() - start)
            bar.set_postfix_str(f"loss={loss_sum / seen:.3f} top1_err={wrong / seen:.3f} "
                                f"img/s={rate:.1f}", refresh=False)
    bar.close()
    seconds = time.perf_counter() - start
    if seen == 0:
        raise TrainingError("an epoch produced no batch: every training image was skipped")
    return {"train_loss": loss_sum / seen, "train_top1_err": wrong / seen,
            "images_per_s": seen / seconds, "train_seconds": seconds,
            "data_wait": waited / seconds, "skipped": loader.skipped}


def validate(model, loader, device, epoch=0):
    """Loss, top-1 and top-5 error of single centre crops (Sec. 3.2) over `loader`."""
    model.eval()
    seen, loss_sum, wrong1, wrong5 = 0, 0.0, 0, 0
    with no_grad():
        for x, y in _to_device(loader.epoch(epoch), device):
            logits = model(Tensor(x))
            n = len(y)
            loss_sum += float(F.cross_entropy(logits, y).item()) * n
            e1, e5 = topk_errors(logits.data, backend.to_numpy(y), (1, 5))
            seen, wrong1, wrong5 = seen + n, wrong1 + e1, wrong5 + e5
    if seen == 0:
        raise TrainingError("validation produced no batch: every val image was skipped")
    return {"val_loss": loss_sum / seen, "val_top1_err": wrong1 / seen,
            "val_top5_err": wrong5 / seen, "val_skipped": loader.skipped}


def _to_device(batches, device):
    from minivgg.prefetch import to_device_batches
    return to_device_batches(batches, device)


# ----------------------------------------------------------------------------------------
# A whole run
# ----------------------------------------------------------------------------------------

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


def fit(cfg, log=print):
    """Run (or resume, or only evaluate) training as `cfg` says; returns the metrics rows.

    Raises `TrainingError` (and `DataError`, `CheckpointError`) with a message meant for
    the user; `TrainingDiverged` when the loss stops being finite.
    """
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
        arch = models.canonical_config(cfg.arch)
    except ValueError as e:
        raise TrainingError(str(e)) from e
    label = "[synthetic] " if cfg.synthetic else ""
    say = (lambda msg: log(label + msg))

    # --- a checkpoint to resume from is read first: it holds the data statistics ---------
    resumed = None
    if cfg.resume:
        resumed = checkpoint.load(cfg.resume)
        if resumed[2].get("synthetic") is not None and resumed[2]["synthetic"] != cfg.synthetic:
            kind = "synthetic" if resumed[2]["synthetic"] else "real"
            raise TrainingError(f"{cfg.resume} was trained on {kind} data; give the same "
                                f"data source to resume it")
    train_set, val_set, data_name = open_data(cfg, say)
    if resumed and resumed[2].get("classes") not in (None, list(train_set.classes)):
        raise TrainingError(f"{cfg.resume} was trained on other classes than {data_name}'s")

    # --- statistics, model, optimizer, schedule ------------------------------------------
    backend.manual_seed(cfg.seed)
    if resumed:
        stats = DataStats.from_dict(resumed[2]["data_stats"])
    else:
        t = time.perf_counter()
        stats = compute_stats(train_set, seed=cfg.seed, workers=cfg.workers)
        say(f"training-set mean RGB {np.round(stats.mean_rgb, 2).tolist()} and PCA "
            f"eigenvalues {np.round(stats.pca_eigval, 1).tolist()} (0-255 scale), "
            f"{time.perf_counter() - t:.1f}s")
    init = cfg.default_init()
    try:
        model = models.vgg(arch, num_classes=len(train_set.classes), width=cfg.width,
                           fc_width=cfg.fc_width, input_size=cfg.crop, init=init,
                           dropout=cfg.dropout)
    except ValueError as e:
        raise TrainingError(str(e)) from e
    if cfg.init_from and not resumed:
        try:  # a minivgg checkpoint or published weights (Caffe, safetensors, .pth, .npz)
            a_model = models.load_pretrained(cfg.init_from)
            copied = models.init_from_a(model, a_model.state_dict())
        except (ValueError, FileNotFoundError, ImportError) as e:
            raise TrainingError(f"--init-from {cfg.init_from}: {e}") from e
        say(f"warm start from {cfg.init_from} (VGG-{a_model.config}): "
            f"{', '.join(copied)}")
    model.to(device)
    lr = 0.01 if cfg.lr is None else cfg.lr
    optimizer = optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    scheduler = optim.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.lr_factor,
                                        patience=cfg.lr_patience,
                                        max_decreases=cfg.lr_decreases)
    start_epoch, best = 0, math.inf
    if resumed:
        state, opt_state, meta = resumed
        _check_same_model(meta, model, cfg.resume)
        model.load_state_dict(state)
        if opt_state is not None:
            optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(meta["scheduler"])
        backend.set_rng_state(meta["rng"]["host"])
        start_epoch, best = int(meta["epoch"]), float(meta["best_val_top1_err"])
        if cfg.lr is not None:  # NOTE: the command line wins over the stored rate
            optimizer.lr = cfg.lr
        if not cfg.evaluate:
            say(f"resumed {cfg.resume} at epoch {start_epoch}, lr {optimizer.lr:g}")

    output = cfg.output or (os.path.dirname(os.path.abspath(cfg.resume)) if cfg.resume
                            else os.path.join("runs", f"{data_name}-{arch}"))
    seed = int(resumed[2]["rng"]["loader_seed"]) if resumed else cfg.seed
    train_loader = Loader(train_set, TrainTransform(cfg.scales, cfg.crop, stats),
                          cfg.batch_size, shuffle=True, seed=seed, workers=cfg.workers)
    val_loader = Loader(val_set, EvalTransform(cfg.Q, cfg.crop, stats), cfg.batch_size,
                        shuffle=False, seed=seed, workers=cfg.workers)
    say(f"VGG-{arch} width {cfg.width} fc {cfg.fc_width}, {model.num_parameters():,} "
        f"parameters, {'weights from ' + cfg.resume if resumed else 'init ' + init}; "
        f"{len(train_set)} train / {len(val_set)} val images, "
        f"{len(train_set.classes)} classes; S={cfg.scales[0]}"
        + (f"..{cfg.scales[1]}" if cfg.scale_jitter else "")
        + f", crop {cfg.crop}, Q={cfg.Q}; batch {cfg.batch_size}, {cfg.workers} workers, "
        f"device {device}")
    try:
        if cfg.evaluate:
            v = validate(model, val_loader, device)
            say(f"evaluation of {cfg.resume}: val loss {v['val_loss']:.4f}, top-1 error "
                f"{100 * v['val_top1_err']:.2f}%, top-5 error {100 * v['val_top5_err']:.2f}%")
            return [v]
        return _train(cfg, model, optimizer, scheduler, train_loader, val_loader, stats,
                      train_set.classes, start_epoch, best, output, device, seed, say, label,
                      data_name)
    finally:
        train_loader.close()
        val_loader.close()


def _train(cfg, model, optimizer, scheduler, train_loader, val_loader, stats, classes,
           start_epoch, best, output, device, seed, say, label, data_name):
    os.makedirs(output, exist_ok=True)
    last_path, best_path = os.path.join(output, "last.npz"), os.path.join(output, "best.npz")
    csv_path = os.path.join(output, "metrics.csv")
    rows = read_metrics(csv_path, start_epoch) if start_epoch else []
    last_good = last_path if start_epoch else None
    title = (f"VGG-{model.config} on synthetic data (drawn shapes and textures)"
             if cfg.synthetic else f"VGG-{model.config} on {data_name}")
    plotted = False
    for epoch in range(start_epoch, cfg.epochs):
        lr = optimizer.lr
        t0 = time.perf_counter()
        tr = train_one_epoch(model, optimizer, train_loader, epoch, device, label,
                             cfg.print_freq, last_good)
        va = validate(model, val_loader, device)
        seconds = time.perf_counter() - t0
        improved = va["val_top1_err"] < best
        best = min(best, va["val_top1_err"])
        scheduler.step(va["val_top1_err"])
        meta = {"model": model_meta(model), "classes": list(classes),
                "data_stats": stats.to_dict(), "epoch": epoch + 1,
                "scheduler": scheduler.state_dict(),
                "rng": {"host": backend.get_rng_state(), "loader_seed": seed},
                "best_val_top1_err": best, "synthetic": cfg.synthetic,
                "config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
                "val_top1_err": va["val_top1_err"], "val_top5_err": va["val_top5_err"]}
        checkpoint.save(last_path, model.state_dict(), optimizer.state_dict(), meta)
        if improved:
            checkpoint.save(best_path, model.state_dict(), optimizer.state_dict(), meta)
        last_good = f"{last_path} (epoch {epoch + 1})"
        rows.append({"epoch": epoch + 1, "train_loss": f"{tr['train_loss']:.6f}",
                     "train_top1_err": f"{tr['train_top1_err']:.6f}",
                     "val_loss": f"{va['val_loss']:.6f}",
                     "val_top1_err": f"{va['val_top1_err']:.6f}",
                     "val_top5_err": f"{va['val_top5_err']:.6f}", "lr": f"{lr:.6g}",
                     "images_per_s": f"{tr['images_per_s']:.2f}", "seconds": f"{seconds:.2f}"})
        write_metrics(csv_path, rows)
        plotted = plot_metrics(rows, os.path.join(output, "metrics.png"), title)
        skipped = tr["skipped"] + va["val_skipped"]
        say(f"epoch {epoch + 1}/{cfg.epochs}: train loss {tr['train_loss']:.4f} top-1 err "
            f"{100 * tr['train_top1_err']:.2f}% | val loss {va['val_loss']:.4f} top-1 err "
            f"{100 * va['val_top1_err']:.2f}% top-5 err {100 * va['val_top5_err']:.2f}% | "
            f"lr {lr:g} | {tr['images_per_s']:.1f} img/s ({100 * tr['data_wait']:.0f}% "
            f"waiting for data) | {seconds:.1f}s"
            + (f" | {skipped} unreadable images skipped" if skipped else "")
            + (" | best" if improved else ""))
        if optimizer.lr != lr:
            say(f"val top-1 error stopped improving: lr {lr:g} -> {optimizer.lr:g}")
    say(f"done: best val top-1 error {100 * best:.2f}%; checkpoints and metrics.csv"
        f"{' and metrics.png' if rows and plotted else ''} in {output}")
    return rows
