"""Checkpoints: model and optimizer state in one `.npz`, readable without pickle.

Layout of the archive (every entry a plain array, so `np.load(allow_pickle=False)` reads it):

    model/<name>        one array per parameter, e.g. model/conv1_1.weight
    optim/velocity/<i>  the SGD momentum buffers that exist
    meta                a JSON string: config, epoch, lr, scheduler, RNG state, anything else;
                        meta["model"] = model_meta(model) for a training checkpoint

The file is written to a temporary name in the same folder, flushed to disk, then renamed
over the target, so a run killed at any moment leaves either the old or the new checkpoint,
never half of one. A run that starts removes the temporary files such a kill leaves
(`remove_stale_temporaries`); a full disk is reported in one line that says the previous
checkpoint is intact (`CheckpointWriteError`).

Reading checks every member's `.npy` header against the member's size before any array
is allocated, so a damaged or hostile file is a `CheckpointError`, never a MemoryError or
an object array; `check_resumable` checks what a resume needs before any training starts.

`load_model` rebuilds the network a training checkpoint describes (`model_meta`), for the
scripts that only need the trained net: evaluation, visualisation, a warm start.
"""

import errno
import json
import math
import os
import re
import tempfile
import zipfile
import zlib
from dataclasses import asdict, dataclass

import numpy as np

from minivgg.data import DataError, DataStats
from minivgg.models import VGG
from minivgg.optim import ReduceLROnPlateau

FORMAT = "minivgg-checkpoint-v1"
TEMP_PREFIX, TEMP_SUFFIX = ".tmp-", ".npz"
# What tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX) names: 8 characters
# from [a-z0-9_] in between. Nothing else in a run folder can match it.
_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r"[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX))


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or not a minivgg checkpoint."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (full disk, read-only folder); the old one is kept.

    Also an `OSError`, so code that treats failed writes as such keeps working."""


def save(path, model_state, optimizer_state=None, meta=None):
    """Write a checkpoint atomically. `model_state` is a state_dict; `meta` is JSON-able."""
    arrays = {f"model/{k}": np.asarray(v) for k, v in model_state.items()}
    meta = dict(meta or {})
    meta["format"] = FORMAT
    meta["model_keys"] = list(model_state.keys())
    if optimizer_state is not None:
        velocities = optimizer_state["velocities"]
        for i, v in enumerate(velocities):
            if v is not None:
                arrays[f"optim/velocity/{i}"] = np.asarray(v)
        meta["optimizer"] = {k: v for k, v in optimizer_state.items() if k != "velocities"}
        meta["optimizer"]["num_velocities"] = len(velocities)
    arrays["meta"] = np.array(json.dumps(meta, default=_to_json))

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    existed = os.path.exists(path)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=folder)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        # NOTE: mkstemp makes the file private (0600); give it the mode open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException as e:
        if tmp is not None:
            _remove_quietly(tmp)
        if isinstance(e, OSError):
            raise CheckpointWriteError(_write_failure(e, path, folder, existed)) from None
        raise


def _write_failure(error, path, folder, existed):
    """One line for a failed write: what went wrong, where, and what is still there."""
    kept = (f"the previous checkpoint {path} is intact" if existed
            else f"no earlier checkpoint was at {path}")
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"no space left on the disk holding {folder} while writing {path}; {kept}"
    return f"cannot write {path} ({error.strerror or error}); {kept}"


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def remove_stale_temporaries(folder):
    """Delete the temporary checkpoint files a killed run left in `folder` -> their paths.

    Only names `save` itself makes (`.tmp-XXXXXXXX.npz`) are touched; call it when a run
    starts in its own folder, where no other run writes at the same time.
    """
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed  # no folder (yet): nothing stale
    for name in sorted(names):
        path = os.path.join(folder, name)
        if _TEMP_NAME.fullmatch(name) and os.path.isfile(path):
            _remove_quietly(path)
            removed.append(path)
    return removed


def _umask():
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _to_json(value):
    """NumPy scalars and small arrays in `meta` (a float32 loss, an RNG key) as plain JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"checkpoint meta: {type(value).__name__} is not JSON-serialisable")


def read_npz(path, what="checkpoint"):
    """{name: array} of an `.npz`, with no pickle and no allocation the file cannot back.

    Raises `CheckpointError` (naming `what` and the path) for a missing file, a folder, a
    damaged archive, a member whose header claims more data than it holds (a header can
    claim 10^11 elements in a few bytes), and a member of Python objects.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{what} {path!r} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} {path!r} is not a file")
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # every .npz is a zip archive
                raise CheckpointError(f"{what} {path!r} is not an .npz archive (empty, "
                                      "truncated at the start, or another format)")
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                _check_member(archive, info, path, what)
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except CheckpointError:
        raise
    except MemoryError:
        raise CheckpointError(f"{what} {path!r} is too large to read into memory") from None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError, zlib.error) as e:
        # NOTE: never pass on NumPy's own text here: for an object array it suggests
        # allow_pickle=True, i.e. running whatever code the file carries.
        reason = ("it holds Python objects, which minivgg never unpickles"
                  if "pickle" in str(e) else f"{type(e).__name__}: {e}")
        raise CheckpointError(f"{what} {path!r} is corrupt or truncated ({reason})") from None


def _check_member(archive, info, path, what):
    """Check one `.npy` member's header against its size before NumPy allocates it."""
    if not info.filename.endswith(".npy"):
        return
    name = info.filename[:-4]
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(f)
        header_bytes = f.tell()
    if dtype.hasobject:
        raise CheckpointError(f"{what} {path!r}: member {name!r} holds Python objects "
                              f"(dtype {dtype}), which minivgg never unpickles")
    claimed = math.prod(shape) * dtype.itemsize
    held = info.file_size - header_bytes
    if claimed != held:
        raise CheckpointError(f"{what} {path!r}: member {name!r} claims shape {shape} of "
                              f"{dtype} ({claimed:,} bytes) but holds {held:,} bytes; the "
                              f"file is damaged")


def load(path):
    """Read a checkpoint -> (model_state, optimizer_state or None, meta).

    Raises `CheckpointError` with the reason for a missing, truncated or foreign file.
    """
    path = os.fspath(path)
    files = read_npz(path)
    if "meta" not in files:
        raise CheckpointError(f"checkpoint {path!r} has no 'meta' entry: not a minivgg "
                              "checkpoint")
    try:
        meta = json.loads(str(files["meta"]))
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path!r}: its 'meta' entry is not JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"checkpoint {path!r} has format {found!r}, "
                              f"expected {FORMAT!r}")
    keys, opt = meta.get("model_keys", []), meta.get("optimizer")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CheckpointError(f"checkpoint {path!r}: 'model_keys' is not a list of names")
    missing = [k for k in keys if f"model/{k}" not in files]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} lists model entries it does not hold: "
                              f"{missing}")
    model_state = {k: files[f"model/{k}"] for k in keys}
    optimizer_state = None
    if opt is not None:
        n = opt.get("num_velocities") if isinstance(opt, dict) else None
        if not isinstance(n, int) or n < 0:
            raise CheckpointError(f"checkpoint {path!r}: the optimizer entry has no valid "
                                  f"'num_velocities' (got {opt!r:.80})")
        optimizer_state = {k: v for k, v in opt.items() if k != "num_velocities"}
        optimizer_state["velocities"] = [files.get(f"optim/velocity/{i}") for i in range(n)]
    return model_state, optimizer_state, meta


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
    from minivgg import backend
    cfg = run.config
    return {"model": model_meta(run.model), "classes": list(run.classes),
            "data_stats": run.stats.to_dict(), "epoch": epochs_done,
            "scheduler": run.scheduler.state_dict(),
            "rng": {"host": backend.get_rng_state(), "loader_seed": run.loader_seed},
            "best_val_top1_err": run.best, "synthetic": cfg.synthetic,
            "config": {k: v for k, v in asdict(cfg).items() if k != "extra"}}


def prepare_run_folder(folder, resume=None, overwrite=False):
    """Check `folder` for a run before any data is read -> the stale temporaries removed.

    Raises `CheckpointError`, in one line, when the folder cannot be written (read-only,
    a file in the way), or when it holds another run's files and this is neither a resume
    of that run nor `overwrite` (`remove_run_files` then clears them, once the new run has
    passed its own checks, so a mistyped flag never costs the earlier run).
    """
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise CheckpointError(f"--output {folder!r} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"--output {folder!r} is not a folder minivgg can write to "
                              f"({e.strerror or e})") from None
    held = run_files(folder)
    if held and not holds(folder, resume) and not overwrite:
        last = os.path.join(folder, "last.npz")
        raise CheckpointError(
            f"{folder} already holds a run ({', '.join(held)}); to continue it use "
            f"--resume {last}, to replace it add --overwrite, or choose another --output")
    return remove_stale_temporaries(folder)


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

def nonfinite(state):
    """Names of the arrays in {name: array} that hold a NaN or an Inf."""
    return [k for k, v in state.items()
            if v is not None and np.issubdtype(np.asarray(v).dtype, np.inexact)
            and not np.isfinite(v).all()]


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
