"""Checkpoints: model and optimizer state in one `.npz`, readable without pickle.

Layout of the archive (every entry a plain array, so `np.load(allow_pickle=False)` reads it):

    model/<name>        one array per parameter, e.g. model/conv1_1.weight
    optim/velocity/<i>  the SGD momentum buffers that exist
    meta                a JSON string: config, epoch, lr, scheduler, RNG state, anything else;
                        meta["model"] = model_meta(model) for a training checkpoint

The file is written to a temporary name in the same folder, flushed to disk, then renamed
over the target, so a run killed at any moment leaves either the old or the new checkpoint,
never half of one.

`load_model` rebuilds the network a training checkpoint describes (`model_meta`), for the
scripts that only need the trained net: evaluation, visualisation, a warm start.
"""

import json
import os
import tempfile
import zipfile
import zlib

import numpy as np

from minivgg.models import VGG

FORMAT = "minivgg-checkpoint-v1"


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
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        # NOTE: mkstemp makes the file private (0600); give it the mode open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or not a minivgg checkpoint."""


def load(path):
    """Read a checkpoint -> (model_state, optimizer_state or None, meta).

    Raises `CheckpointError` with the reason for a missing, truncated or foreign file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # every .npz is a zip archive
                raise CheckpointError(f"checkpoint {path!r} is not an .npz archive (empty, "
                                      "truncated at the start, or another format)")
        with np.load(path, allow_pickle=False) as z:
            files = {k: z[k] for k in z.files}
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error) as e:
        raise CheckpointError(f"checkpoint {path!r} is corrupt or truncated "
                              f"({type(e).__name__}: {e})") from e
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
    missing = [k for k in meta.get("model_keys", []) if f"model/{k}" not in files]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} lists model entries it does not hold: "
                              f"{missing}")
    model_state = {k: files[f"model/{k}"] for k in meta.get("model_keys", [])}
    optimizer_state = None
    if "optimizer" in meta:
        opt = dict(meta["optimizer"])
        n = opt.pop("num_velocities")
        opt["velocities"] = [files.get(f"optim/velocity/{i}") for i in range(n)]
        optimizer_state = opt
    return model_state, optimizer_state, meta


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
