"""The checkpoint file format: model and optimizer state in one `.npz`, without pickle.

Layout of the archive (every entry a plain array, so `np.load(allow_pickle=False)` reads it):

    model/<name>        one array per parameter, e.g. model/conv1_1.weight
    optim/velocity/<i>  the SGD momentum buffers that exist
    meta                a JSON string: config, epoch, lr, scheduler, RNG state, anything else

Every file is written by `atomic_write`: to a temporary name in the same folder, flushed to
disk, then renamed over the target, so a run killed at any moment leaves either the old or
the new file, never half of one. A run that starts removes the temporary files such a kill
leaves (`remove_stale_temporaries`); a full disk is reported in one line that says the
previous checkpoint is intact (`CheckpointWriteError`).

Reading checks every member's `.npy` header against the member's size before any array
is allocated, so a damaged or hostile file is a `CheckpointError`, never a MemoryError or
an object array.

This module is a leaf: it imports nothing of minivgg. What a training run keeps in `meta`,
and what a resume checks of it, is `minivgg.run_state`'s.
"""

import errno
import json
import math
import os
import re
import tempfile
import zipfile
import zlib

import numpy as np

FORMAT = "minivgg-checkpoint-v1"
TEMP_PREFIX, TEMP_SUFFIX = ".tmp-", ".npz"
# What tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=...) names for `atomic_write`: 8
# characters from [a-z0-9_] in between, then one of the suffixes minivgg writes. Nothing
# else in a run folder can match it.
WRITTEN_SUFFIXES = (".npz", ".csv", ".png", ".json", ".safetensors", ".onnx", ".md")
_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r"[a-z0-9_]{8}(" +
                        "|".join(re.escape(x) for x in WRITTEN_SUFFIXES) + ")")


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
    existed = os.path.exists(path)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write(path, lambda f: np.savez(f, **arrays), overwrite=True,
                     what="checkpoint")
    except WriteError as e:
        raise CheckpointWriteError(str(e)) from None
    except OSError as e:
        raise CheckpointWriteError(write_failure(e, path, existed, "checkpoint")) from None


class WriteError(OSError):
    """A file could not be written; the message names the user's path, never the
    temporary file, and says whether an earlier file under that name is intact."""


def atomic_write(path, write, suffix=TEMP_SUFFIX, overwrite=False, what="file"):
    """Write the file `path` all or nothing: `write(f)` fills a binary file open under a
    temporary name in the same folder, which is flushed to disk and then given its name.

    The one way minivgg writes a file. An existing `path` is replaced only with
    `overwrite`; otherwise it is kept and `FileExistsError` raised (a hard link gives the
    name, so a file that appears meanwhile is not clobbered either). Whatever goes wrong
    (an error in `write`, a full disk, a missing or read-only folder, Ctrl-C), the
    temporary file is removed and `path` is left as it was. An `OSError` comes back as a
    `WriteError` naming `path` (see `write_failure`; `what` names the kind of file).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    existed = os.path.exists(path)
    if existed and not overwrite:
        raise FileExistsError(_exists_message(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=suffix, dir=folder)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # NOTE: mkstemp makes the file private (0600); give it the mode open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        _publish(tmp, path, overwrite)
    except FileExistsError:
        raise
    except OSError as e:
        failure = WriteError(write_failure(e, path, existed, what))
        failure.errno = e.errno
        raise failure from None
    finally:
        if tmp is not None:
            _remove_quietly(tmp)


def _publish(tmp, path, overwrite):
    """Give the finished temporary file the name `path` (the caller removes `tmp`)."""
    if overwrite:
        os.replace(tmp, path)  # atomic on POSIX and Windows
        return
    try:
        os.link(tmp, path)  # fails if the name was taken meanwhile, unlike a rename
    except FileExistsError:
        raise FileExistsError(_exists_message(path)) from None
    except OSError:  # a file system without hard links: check, then rename
        if os.path.exists(path):
            raise FileExistsError(_exists_message(path)) from None
        os.replace(tmp, path)


def write_bytes(path, data, overwrite=False):
    """`atomic_write` of `data` (bytes), the temporary named after `path`'s extension."""
    suffix = os.path.splitext(os.fspath(path))[1] or TEMP_SUFFIX
    atomic_write(path, lambda f: f.write(data), suffix=suffix, overwrite=overwrite)


def write_json(path, value, overwrite=False):
    """`atomic_write` of `value` as indented JSON."""
    write_bytes(path, json.dumps(value, indent=1).encode(), overwrite)


def write_npz(path, arrays, compressed=False, overwrite=False):
    """`atomic_write` of {name: array} as an `.npz` (zip-compressed with `compressed`)."""
    savez = np.savez_compressed if compressed else np.savez
    atomic_write(path, lambda f: savez(f, **arrays), overwrite=overwrite)


def _exists_message(path):
    return (f"{path} exists; it was left as it is (add --overwrite to replace it, or "
            f"choose another name)")


def write_failure(error, path, existed, what="file"):
    """One line for a failed write of `path`: what went wrong, where, what is still there."""
    folder = os.path.dirname(os.path.abspath(path))
    kept = (f"the previous {what} {path} is intact" if existed
            else f"no earlier {what} was at {path}")
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"no space left on the disk holding {folder} while writing {path}; {kept}"
    if error.errno == errno.ENOENT and not os.path.isdir(folder):
        return (f"cannot write {path} ({error.strerror or error}: the folder {folder} does "
                f"not exist)")
    return f"cannot write {path} ({error.strerror or error}); {kept}"


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def remove_stale_temporaries(folder):
    """Delete the temporary checkpoint files a killed run left in `folder` -> their paths.

    Only names `atomic_write` itself makes (`.tmp-XXXXXXXX.npz`, or .csv, .png...) are
    touched; call it when a run holds its folder's lock (`minivgg.folder_lock`), so that
    no other run writes there at the same time.
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


def nonfinite(state):
    """Names of the arrays in {name: array} that hold a NaN or an Inf."""
    return [k for k, v in state.items()
            if v is not None and np.issubdtype(np.asarray(v).dtype, np.inexact)
            and not np.isfinite(v).all()]
