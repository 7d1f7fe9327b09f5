"""A training run on disk: its folder, what its checkpoints hold, resuming it, its model.

    run folder       RunPaths (last.npz, best.npz, metrics.csv, metrics.png), run_folder,
                     claim_run_folder: one run per folder at a time (a lock), never
                     overwrite an earlier run by accident, find an unwritable folder
                     before any data is read
    what to keep     training_meta(run): everything but the arrays that a resume needs;
                     model_meta(model): what rebuilds the architecture
    resume           read_resume_checkpoint, check_resumable, check_same_model: whatever
                     would stop a resume, in one error, before any training starts;
                     restore: weights, momentum, schedule and RNG back in place
    the model        load_model(path): the trained net a training checkpoint describes, for
                     evaluation, visualisation and a warm start

The file format itself (atomic writes, pickle-free reads) is `minivgg.checkpoint`'s.
"""

import hashlib
import math
import os
import tempfile
from dataclasses import asdict, dataclass

import numpy as np

from minivgg import backend
from minivgg.checkpoint import (TEMP_PREFIX, TEMP_SUFFIX, CheckpointError, load, nonfinite,
                                remove_stale_temporaries)
from minivgg.data import DataError, DataStats
from minivgg.folder_lock import FolderBusy, lock_folder
from minivgg.models import VGG
from minivgg.optim import ReduceLROnPlateau
from minivgg.train_config import TrainingError

# ----------------------------------------------------------------------------------------
# The run folder: never overwrite an earlier run by accident, find an unwritable one early
# ----------------------------------------------------------------------------------------

RUN_FILES = ("last.npz", "best.npz", "metrics.csv", "metrics.png")


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
class EpochProgress:
    """How far an epoch has come; a mid-epoch checkpoint stores it to continue exactly.
    The counts are those of the global batches (every rank's images), so they do not
    depend on the number of ranks."""
    batch: int = 0              # training batches done
    seen: int = 0               # images trained on
    loss_sum: float = 0.0       # sum of their losses
    wrong: int = 0              # top-1 mistakes among them
    skipped: int = 0            # unreadable images skipped (in the train loop: before the
                                # resume; `train.skipped_so_far` adds the rest)


def epoch_progress(meta, path):
    """The EpochProgress a checkpoint stopped at, or None when it is an epoch's end."""
    if not meta.get("batch"):
        return None
    try:
        return EpochProgress(**meta["progress"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path!r} cannot be resumed: it stopped at batch "
                              f"{meta['batch']!r} but its progress entry is damaged "
                              f"({e})") from None


def run_folder(output, resume, default_name):
    """Where a run writes: --output, else the --resume checkpoint's folder, else
    runs/<default_name> (the data folder's name and the configuration, e.g.
    runs/imagenette2-224-A)."""
    if output:
        return output
    if resume:
        return os.path.dirname(os.path.abspath(resume))
    return os.path.join("runs", default_name)


def training_meta(run, epochs_done):
    """Everything but the arrays that a resume of `run` (a `minivgg.train.Run`) needs
    after `epochs_done` epochs: the entries `check_resumable` checks on the way back."""
    cfg = run.config
    return {"model": model_meta(run.model), "classes": list(run.classes),
            "data_stats": run.stats.to_dict(), "epoch": epochs_done,
            "scheduler": run.scheduler.state_dict(),
            "rng": {"host": backend.get_rng_state(), "loader_seed": run.loader_seed},
            "best_val_top1_err": run.best, "synthetic": cfg.synthetic,
            "precision": backend.get_precision(),  # the weights themselves stay fp32
            "data_order": data_order(run.train_loader.dataset),
            "config": {k: v for k, v in asdict(cfg).items() if k != "extra"}}


def data_order(dataset):
    """What fixes an epoch's order besides the seed: the number of training images and a
    hash of their names (relative to the data folder, which may move) and labels.
    Computed once per dataset (a million ImageNet names take a second) and kept on it."""
    known = getattr(dataset, "order_digest", None)
    if known is not None:
        return known
    digest = hashlib.sha256()
    root = os.path.join(getattr(dataset, "root", ""), "")
    for path, label in zip(dataset.paths, dataset.labels):
        name = path[len(root):] if root != os.sep and path.startswith(root) else path
        digest.update(f"{name}\t{int(label)}\n".encode())
    dataset.order_digest = {"images": len(dataset.paths), "sha256": digest.hexdigest()[:16]}
    return dataset.order_digest


def check_same_epochs(meta, cfg, train_set, ranks=1):
    """Raise `TrainingError` unless resuming `meta` with `cfg` on `train_set` continues the
    sequence of batches the run was on: the same --seed (the loader's and dropout's
    randomness continue from the checkpoint, so another seed would be ignored), and, for a
    checkpoint taken part-way through an epoch, the same -b and training images in the
    same order (else the rest of that epoch would skip or repeat images). The number of
    ranks may change: the global batches and their order do not depend on it (`ranks` is
    only named in the message)."""
    saved, path = meta.get("config") or {}, cfg.resume
    if "seed" in saved and saved["seed"] != cfg.seed:
        raise TrainingError(f"--seed {cfg.seed} differs from the run's --seed {saved['seed']}, "
                            f"whose random state {path} continues; resume with --seed "
                            f"{saved['seed']}, or start a new run in another --output")
    if not meta.get("batch"):
        return  # an epoch's end: the next epoch's order is drawn afresh
    where = f"{path} stopped part-way through epoch {meta.get('epoch', 0) + 1}"
    if "batch_size" in saved and saved["batch_size"] != cfg.batch_size:
        raise TrainingError(
            f"-b {cfg.batch_size} differs from the run's -b {saved['batch_size']}, and {where} "
            f"(batch {meta['batch']}): resume it with -b {saved['batch_size']} (on any number "
            f"of processes, {ranks} now); -b can change when a checkpoint of an epoch's end "
            f"is resumed")
    order, now = meta.get("data_order"), data_order(train_set)
    if order is not None and order != now:
        change = (f"{order.get('images')} images then, {now['images']} now"
                  if order.get("images") != now["images"] else "the same number of "
                  "images, but other names or labels")
        raise TrainingError(f"the training images changed ({change}), and {where}, so the "
                            f"rest of it would skip or repeat images; restore the data folder "
                            f"as it was, or resume from a checkpoint of an epoch's end")


def prepare_run_folder(folder, resume=None, overwrite=False):
    """`claim_run_folder` without keeping the lock -> the stale temporaries removed."""
    lock, removed = claim_run_folder(folder, resume, overwrite)
    lock.release()
    return removed


def claim_run_folder(folder, resume=None, overwrite=False):
    """Check `folder` for a run before any data is read, and lock it for this process
    -> (`FolderLock`, the stale temporaries removed).

    Raises `CheckpointError`, in one line, when the folder cannot be written (read-only,
    a file in the way), when another live run holds it (naming its pid and start time:
    `minivgg.folder_lock`), or when it holds another run's files and this is neither a
    resume of that run nor `overwrite` (`remove_run_files` then clears them, once the new
    run has passed its own checks, so a mistyped flag never costs the earlier run). The
    lock's `created` says whether the folder was made here (`FolderLock.release` can then
    remove it again if it is still empty).
    """
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise CheckpointError(f"--output {folder!r} is a file, not a folder")
    created = not os.path.exists(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=folder)
        os.close(fd)
        os.remove(probe)
        lock = lock_folder(folder, "--output")
    except FolderBusy as e:
        raise CheckpointError(str(e)) from None
    except OSError as e:
        raise CheckpointError(f"--output {folder!r} is not a folder minivgg can write to "
                              f"({e.strerror or e})") from None
    lock.created = created
    try:
        held = run_files(folder)
        if held and not holds(folder, resume) and not overwrite:
            last = os.path.join(folder, "last.npz")
            raise CheckpointError(
                f"{folder} already holds a run ({', '.join(held)}); to continue it use "
                f"--resume {last}, to replace it add --overwrite, or choose another --output")
        # NOTE: only under the lock: another run's temporary file is its checkpoint
        # being written, not a killed run's leftover.
        return lock, remove_stale_temporaries(folder)
    except BaseException:
        lock.release()
        raise


def holds(folder, path):
    """True when the file `path` (None: no file) lies directly in `folder`."""
    return path is not None and (os.path.realpath(os.path.dirname(os.path.abspath(path)))
                                 == os.path.realpath(folder))


def run_files(folder):
    """The names of `RUN_FILES` present in `folder`."""
    return [name for name in RUN_FILES if os.path.isfile(os.path.join(folder, name))]


def remove_run_files(folder):
    """Delete an earlier run's files from `folder` (what --overwrite asked for)."""
    for name in run_files(folder):
        os.remove(os.path.join(folder, name))


# ----------------------------------------------------------------------------------------
# What a resume needs, checked when the file is opened
# ----------------------------------------------------------------------------------------


def require_finite(model, path, doing):
    """Raise ValueError naming `path` if `model`'s weights hold a NaN or an Inf: a diverged
    run's weights give numbers that look like results, so the scripts refuse `doing` with
    them (classify, evaluate, draw)."""
    bad = nonfinite(model.state_dict())
    if bad:
        raise ValueError(f"weights file {os.fspath(path)!r}: weights {', '.join(bad[:3])} "
                         f"hold NaN or Inf; refusing to {doing} them (a diverged run?)")


def check_resumable(path, model_state, optimizer_state, meta, model=None):
    """Raise one `CheckpointError` listing whatever would stop a resume of this checkpoint.

    Checked before any training, so a damaged file costs seconds, not an epoch: the
    epoch, best error, scheduler and RNG state, data statistics and classes in `meta`;
    finite weights; momentum buffers that match their weights in number, shape and
    finiteness; and, given the `model` that will be trained, every weight's name and shape.
    """
    problems = _meta_problems(meta)
    bad = nonfinite(model_state)
    if bad:
        problems.append(f"weights {', '.join(bad[:3])}{'...' if len(bad) > 3 else ''} "
                        f"hold NaN or Inf")
    if model is not None:
        own = {k: tuple(p.shape) for k, p in model.named_parameters()}
        got = {k: tuple(np.shape(v)) for k, v in model_state.items()}
        if own != got:
            diff = [f"{k}: file {got.get(k)}, model {own.get(k)}" for k in {**own, **got}
                    if own.get(k) != got.get(k)]
            problems.append(f"weights do not fit the network ({'; '.join(diff[:3])}"
                            f"{'...' if len(diff) > 3 else ''})")
    if optimizer_state is not None:
        problems += _optimizer_problems(optimizer_state, model_state)
    if problems:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} cannot be resumed: "
                              + "; ".join(problems))


def _is_number(v, integer=False):
    kinds = (int,) if integer else (int, float)
    return isinstance(v, kinds) and not isinstance(v, bool)


def _meta_problems(meta):
    problems = []
    needed = ("model", "epoch", "best_val_top1_err", "scheduler", "rng", "data_stats",
              "classes")
    absent = [k for k in needed if k not in meta]
    if absent:
        problems.append(f"no {', '.join(repr(k) for k in absent)} entry")
    spec = meta.get("model")
    if "model" in meta and not (isinstance(spec, dict) and all(k in spec for k in MODEL_KEYS)):
        problems.append(f"the model entry needs {MODEL_KEYS}, got {spec!r:.80}")
    if "epoch" in meta and not (_is_number(meta["epoch"], True) and meta["epoch"] >= 0):
        problems.append(f"epoch {meta['epoch']!r} is not a count")
    if "best_val_top1_err" in meta and not _is_number(meta["best_val_top1_err"]):
        problems.append(f"best_val_top1_err {meta['best_val_top1_err']!r} is not a number")
    if "scheduler" in meta:
        wanted = ReduceLROnPlateau(None).state_dict()
        sched = meta["scheduler"] if isinstance(meta["scheduler"], dict) else {}
        wrong = [k for k, v in wanted.items()
                 if k not in sched or type(sched[k]) is not type(v) and not (
                     _is_number(v) and _is_number(sched[k]))]
        if wrong:
            problems.append(f"scheduler state lacks or garbles {wrong}")
    if "rng" in meta:
        rng = meta["rng"] if isinstance(meta["rng"], dict) else {}
        try:
            np.random.default_rng().bit_generator.state = rng["host"]
            if not _is_number(rng["loader_seed"], True):
                raise TypeError("loader_seed")
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"RNG state is damaged ({type(e).__name__}: {e})")
    if "data_stats" in meta:
        try:
            DataStats.from_dict(meta["data_stats"])
        except DataError as e:
            problems.append(str(e))
    if "classes" in meta:
        classes, spec = meta["classes"], meta.get("model")
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            problems.append("'classes' is not a list of names")
        elif isinstance(spec, dict) and spec.get("num_classes") != len(classes):
            problems.append(f"{len(classes)} class names for {spec.get('num_classes')!r} "
                            f"outputs")
    return problems


def _optimizer_problems(optimizer_state, model_state):
    problems = []
    for key in ("lr", "momentum", "weight_decay"):
        value = optimizer_state.get(key)
        if not (_is_number(value) and math.isfinite(value) and value >= 0):
            problems.append(f"optimizer {key} {value!r} is not a finite number >= 0")
    velocities, weights = optimizer_state["velocities"], list(model_state.items())
    if len(velocities) != len(weights):
        problems.append(f"{len(velocities)} momentum buffers for {len(weights)} weights")
        return problems
    for i, (v, (name, w)) in enumerate(zip(velocities, weights)):
        if v is None:
            continue
        if v.shape != np.shape(w) or not np.issubdtype(v.dtype, np.floating):
            problems.append(f"momentum buffer {i} ({name}) is {v.dtype} {v.shape}, the "
                            f"weight is {np.shape(w)}")
        elif not np.isfinite(v).all():
            problems.append(f"momentum buffer {i} ({name}) holds NaN or Inf")
    return problems


# ----------------------------------------------------------------------------------------
# The model a training checkpoint holds
# ----------------------------------------------------------------------------------------

MODEL_KEYS = ("config", "num_classes", "width", "fc_width", "input_size")


def model_meta(model):
    """What rebuilds `model`'s architecture: meta["model"] of a training checkpoint.

    "ceil_mode" is written only when True (Caffe-style pools), so older checkpoints, which
    lack it, still describe the same (floor-mode) nets.
    """
    meta = {k: getattr(model, k) for k in MODEL_KEYS}
    if getattr(model, "ceil_mode", False):
        meta["ceil_mode"] = True
    return meta


def load_model(path, device="cpu"):
    """Rebuild the model saved in a training checkpoint -> (model, meta), in eval mode.

    Raises `CheckpointError` for a missing or corrupt file, or one that is not a minivgg
    training checkpoint (no model description, or weights that do not fit it).
    """
    state, _, meta = load(path)
    spec = meta.get("model")
    if not isinstance(spec, dict) or any(k not in spec for k in MODEL_KEYS):
        raise CheckpointError(
            f"checkpoint {path!r} does not describe a model (meta['model'] needs "
            f"{MODEL_KEYS}); was it written by minivgg.train?")
    try:
        model = VGG(spec["config"], spec["num_classes"], spec["width"], spec["fc_width"],
                    spec["input_size"], ceil_mode=bool(spec.get("ceil_mode", False)))
        model.load_state_dict(state)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path!r}: {e}") from e
    return model.to(device).eval(), meta


# ----------------------------------------------------------------------------------------
# Resuming: read --resume, check it fits the run asked for, restore its state
# ----------------------------------------------------------------------------------------

def read_resume_checkpoint(cfg):
    """(model state, optimizer state, meta) of --resume, or None for a new run."""
    if not cfg.resume:
        return None
    resumed = load(cfg.resume)
    synthetic = resumed[2].get("synthetic")
    if synthetic is not None and synthetic != cfg.synthetic:
        kind = "synthetic" if synthetic else "real"
        raise TrainingError(f"{cfg.resume} was trained on {kind} data; give the same "
                            f"data source to resume it")
    if cfg.evaluate:
        bad = nonfinite(resumed[0])
        if bad:
            raise TrainingError(f"{cfg.resume}: weights {', '.join(bad[:3])} hold NaN or "
                                f"Inf; refusing to evaluate them")
    else:  # a damaged file is found now, not after the data is read or an epoch is run
        check_resumable(cfg.resume, *resumed)
        epoch_progress(resumed[2], cfg.resume)
    return resumed


def restore(cfg, resumed, model, optimizer, scheduler, log):
    """Load --resume's weights, momentum, schedule and RNG
    -> (epochs done, best error, progress into the next epoch or None)."""
    state, opt_state, meta = resumed
    check_same_model(meta, model, cfg.resume)
    try:
        model.load_state_dict(state)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {cfg.resume!r}: {e}") from None
    if cfg.evaluate:
        return 0, math.inf, None
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(meta["scheduler"])
    backend.set_rng_state(meta["rng"]["host"])
    if cfg.lr is not None:  # NOTE: the command line wins over the stored rate
        optimizer.lr = cfg.lr
    if cfg.lr_patience is not None:  # and over the stored patience
        scheduler.patience = cfg.lr_patience
    start_epoch, progress = int(meta["epoch"]), epoch_progress(meta, cfg.resume)
    log(f"resumed {cfg.resume} at epoch {start_epoch}"
        + (f" + {progress.batch} batches" if progress else "") + f", lr {optimizer.lr:g}")
    return start_epoch, float(meta["best_val_top1_err"]), progress


def check_same_model(meta, model, path):
    """Raise `TrainingError` unless the checkpoint's meta["model"] describes `model`'s
    architecture (configuration, classes, widths, input size)."""
    saved, wanted = meta.get("model"), model_meta(model)
    if not isinstance(saved, dict):
        raise TrainingError(f"{path} is not a minivgg training checkpoint (no model entry)")
    diff = [f"{k} {saved.get(k)!r} (asked: {wanted[k]!r})" for k in wanted
            if saved.get(k) != wanted[k]]
    if diff:
        raise TrainingError(f"{path} holds a different network: " + ", ".join(diff) +
                            ". Pass the matching -a/--width/--fc-width/--crop flags.")
