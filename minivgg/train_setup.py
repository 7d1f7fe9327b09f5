"""Set-up of a training run: everything it needs, checked and built into one `Run`.

    run = setup(TrainConfig(...))   # flags checked, data opened, model built or restored
    train(run)                      # minivgg.train: the epoch loop

The order matters for a bit-identical resume: --resume is read first (it holds the data
statistics), the output folder is checked before any data is read (a bad --output costs
nothing), the host RNG is seeded before the weights are drawn, and a resume then
overwrites weights, momentum, schedule and RNG state (`minivgg.run_state.restore`).
"""

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from minivgg import backend, distributed, models, optim, pretrained, run_state
from minivgg.data import (DataStats, EvalTransform, TrainTransform, check_crop,
                          compute_stats, open_imagenet)
from minivgg.loader import Loader
from minivgg.replicas import Replicas
from minivgg.run_state import EpochProgress, RunPaths
from minivgg.train_config import TrainConfig, TrainingError, check_config


@dataclass(kw_only=True)
class Run:
    """What `setup` builds and the epoch loop uses; `start_epoch`, `best`, `last_good` and
    `progress` change as the run goes on."""
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
    resume_progress: EpochProgress = None  # how far into `start_epoch` the resume is
    progress: EpochProgress = None         # how far the epoch in progress has come
    replicas: Replicas = field(default_factory=Replicas)  # the processes training together
    lock: object = None         # the output folder's FolderLock (rank 0; None for -e)

    @property
    def group(self):
        """The processes training together (`minivgg.distributed`); one by default."""
        return self.replicas.group

    @property
    def title(self):
        data = ("synthetic data (drawn shapes and textures)" if self.config.synthetic
                else self.data_name)
        return f"VGG-{self.model.config} on {data}"

    def close(self):
        """Stop the loaders' worker processes and give the output folder back."""
        self.train_loader.close()
        self.val_loader.close()
        if self.lock is not None:
            self.lock.release()


def setup(cfg, log=print, group=None):
    """Check `cfg`, open the data, build or restore the model, optimizer and schedule -> Run.

    `group` (`minivgg.distributed`): the processes training together; one by default.
    """
    group = group or distributed.SingleProcess()
    device, arch = check_config(cfg)
    say = _with_label(log if group.is_root else _quiet, cfg.label)
    resumed = run_state.read_resume_checkpoint(cfg)  # first: it holds the data statistics
    choose_precision(cfg, resumed, device)
    paths, lock = prepare_output(cfg, arch, group, say)
    try:
        run = _build(cfg, group, say, resumed, arch, device)
    except BaseException:
        if lock is not None:  # a run that could not start leaves no empty folder behind
            lock.release(remove_if_empty=True)
        raise
    run.paths, run.lock = paths, lock
    return run


def _build(cfg, group, say, resumed, arch, device):
    """`setup` once the output folder is held: data, statistics, model, optimizer, loaders
    -> Run (its `paths` and `lock` are set by the caller)."""
    train_set, val_set, data_name = open_data(cfg, say)
    if resumed and resumed[2].get("classes") not in (None, list(train_set.classes)):
        raise TrainingError(f"{cfg.resume} was trained on other classes than {data_name}'s")
    if resumed and not cfg.evaluate:
        run_state.check_same_epochs(resumed[2], cfg, train_set, group.size)

    backend.manual_seed(cfg.seed)
    stats = training_stats(cfg, train_set, resumed, say)
    model = build_model(cfg, arch, len(train_set.classes), resumed, say).to(device)
    optimizer, scheduler = make_optimizer(cfg, model)
    start_epoch, best, progress = 0, math.inf, None
    if resumed:
        start_epoch, best, progress = run_state.restore(cfg, resumed, model, optimizer,
                                                        scheduler, say)
    # Sec. 3.3: every rank starts from rank 0's weights (and momentum, after a resume), so
    # ranks can never drift apart, whatever the initialisation did on each.
    group.broadcast_([p.data for p in model.parameters()] +
                     [v for v in optimizer.velocities if v is not None])

    seed = int(resumed[2]["rng"]["loader_seed"]) if resumed else cfg.seed
    train_loader, val_loader = make_loaders(cfg, train_set, val_set, stats, seed, group)
    say(describe(cfg, arch, model, train_set, val_set, device, resumed, group))
    return Run(config=cfg, model=model, optimizer=optimizer, scheduler=scheduler,
               train_loader=train_loader, val_loader=val_loader, stats=stats,
               classes=list(train_set.classes), data_name=data_name, device=device,
               paths=None, loader_seed=seed, log=say, start_epoch=start_epoch, best=best,
               last_good=cfg.resume, resume_progress=progress,
               replicas=Replicas(group, model.parameters()))


def choose_precision(cfg, resumed, device):
    """Set the GEMMs' precision: --precision, else the one that trained the --resume
    checkpoint, else fp32; written back into `cfg` (and so into the checkpoints)."""
    stored = resumed[2].get("precision", "fp32") if resumed else "fp32"
    cfg.precision = cfg.precision or stored
    if cfg.precision != "fp32" and device != "cpu":
        raise TrainingError(f"--precision {cfg.precision} runs on the CPU only (AMX tiles); "
                            f"on {device} use --precision fp32")
    backend.set_precision(cfg.precision)


def prepare_output(cfg, arch, group, say):
    """The run's output folder (--output, the --resume folder, or runs/<data>-<arch>),
    checked and locked before any data is read -> (RunPaths, FolderLock or None); rank 0
    alone writes there, and -e writes nothing."""
    name = "synthetic" if cfg.synthetic else os.path.basename(os.path.normpath(cfg.data))
    paths = RunPaths(run_state.run_folder(cfg.output, cfg.resume, f"{name}-{arch}"))
    lock = None
    if not cfg.evaluate and group.is_root:
        lock, stale = run_state.claim_run_folder(paths.folder, cfg.resume, cfg.overwrite)
        for path in stale:
            say(f"removed {path}, left by a run killed while writing a checkpoint")
    return paths, lock


def make_optimizer(cfg, model):
    """SGD with momentum and weight decay, and the plateau schedule (Sec. 3.1)."""
    lr = 0.01 if cfg.lr is None else cfg.lr
    optimizer = optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    scheduler = optim.ReduceLROnPlateau(optimizer, mode="min", factor=cfg.lr_factor,
                                        patience=2 if cfg.lr_patience is None
                                        else cfg.lr_patience,
                                        max_decreases=cfg.lr_decreases)
    return optimizer, scheduler


def make_loaders(cfg, train_set, val_set, stats, seed, group):
    """The training loader (Sec. 3.1's augmentation) and the validation loader (centre
    crop at Q); -b is the global batch, each rank takes its slice."""
    shard = (group.rank, group.size)
    train_loader = Loader(train_set, TrainTransform(cfg.scales, cfg.crop, stats),
                          cfg.batch_size, shuffle=True, seed=seed, workers=cfg.workers,
                          shard=shard)
    val_loader = Loader(val_set, EvalTransform(cfg.Q, cfg.crop, stats), cfg.batch_size,
                        shuffle=False, seed=seed, workers=cfg.workers, shard=shard)
    return train_loader, val_loader


def describe(cfg, arch, model, train_set, val_set, device, resumed, group):
    """The one line that says what this run trains, on what, how."""
    return (f"VGG-{arch} width {cfg.width} fc {cfg.fc_width}, {model.num_parameters():,} "
            f"parameters, "
            f"{'weights from ' + cfg.resume if resumed else 'init ' + cfg.default_init()}"
            f"; {len(train_set)} train / {len(val_set)} val images, "
            f"{len(train_set.classes)} classes; S={cfg.scales[0]}"
            + (f"..{cfg.scales[1]}" if cfg.scale_jitter else "")
            + f", crop {cfg.crop}, Q={cfg.Q}; batch {cfg.batch_size}, {cfg.workers} "
            f"workers, device {device}, conv {cfg.conv_algo}"
            + (f", {cfg.precision} GEMMs" if cfg.precision not in (None, "fp32") else "")
            + (f"; {group.description}" if group.size > 1 else ""))


def _with_label(log, label):
    return lambda msg: log(label + msg)


def _quiet(msg):
    """The log of ranks other than 0: rank 0 speaks for the run."""


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
            a_model = pretrained.load_pretrained(cfg.init_from)
            copied = models.init_from_a(model, a_model.state_dict())
        except (ValueError, FileNotFoundError, ImportError) as e:
            raise TrainingError(f"--init-from {cfg.init_from}: {e}") from e
        log(f"warm start from {cfg.init_from} (VGG-{a_model.config}): "
            f"{', '.join(copied)}")
    return model
