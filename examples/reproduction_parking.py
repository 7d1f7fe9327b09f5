"""Parking: a stopped study's unfinished run, kept where git keeps it.

A run's checkpoint lives in runs/ (git-ignored), so a study stopped in the middle of a run
used to lose that run's progress with the machine: a fresh clone started it again from
epoch 1, an hour of a 2-core machine for a deep net. When the study is stopped (Ctrl-C,
SIGTERM) the run in progress has just saved; `park` copies what its resume needs, the
checkpoint (last.npz, or last.pt for the PyTorch twin), metrics.csv and timing.json, into
RECORD/parked/<name>/, which is committed with the records (10-15 MB a run). A study
started in a fresh clone finds the run folder empty, `unpark`s, and goes on with --resume:
it loses at most the epoch in progress, wherever it continues. The parked copy goes once
the run is recorded (`discard`).

parked.json, written last, marks a complete copy: a copy cut short is never unparked.
"""

import json
import os
import shutil
import time

from minivgg import checkpoint

MARKER = "parked.json"
CHECKPOINTS = ("last.npz", "last.pt")
FILES = CHECKPOINTS + ("metrics.csv", "timing.json")


def parked_folder(record, name):
    return os.path.join(record, "parked", name)


def is_parked(record, name):
    return os.path.isfile(os.path.join(parked_folder(record, name), MARKER))


def has_checkpoint(folder):
    return any(os.path.isfile(os.path.join(folder, c)) for c in CHECKPOINTS)


def park(run_dir, record, name, epochs):
    """Copy the resumable state of the run in `run_dir` to RECORD/parked/<name>/ -> the
    folder, or None when the run has no checkpoint yet (nothing to keep).

    `epochs`: the whole epochs the checkpoint holds (said in parked.json and the README's
    message; a mid-epoch checkpoint holds part of the next one too)."""
    if not has_checkpoint(run_dir):
        return None
    dst = parked_folder(record, name)
    os.makedirs(dst, exist_ok=True)
    marker = os.path.join(dst, MARKER)
    if os.path.exists(marker):  # an older parking: incomplete until the new marker
        os.remove(marker)
    kept = []
    for file in FILES:
        src = os.path.join(run_dir, file)
        if os.path.isfile(src):
            with open(src, "rb") as f:
                checkpoint.write_bytes(os.path.join(dst, file), f.read(), overwrite=True)
            kept.append(file)
        elif os.path.exists(os.path.join(dst, file)):  # from an older parking: not this one's
            os.remove(os.path.join(dst, file))
    checkpoint.write_json(marker, {"run": name, "epochs": int(epochs), "files": kept,
                                   "parked": time.strftime("%Y-%m-%d %H:%M")},
                          overwrite=True)
    return dst


def unpark(record, name, run_dir):
    """Copy a parked run back into an empty `run_dir` -> parked.json's content, or None
    when there is nothing to unpark. A run folder that holds a checkpoint of its own is
    left alone: it is where the parked copy came from, or newer."""
    if not is_parked(record, name) or has_checkpoint(run_dir):
        return None
    src = parked_folder(record, name)
    try:
        with open(os.path.join(src, MARKER)) as f:
            info = json.load(f)
        os.makedirs(run_dir, exist_ok=True)
        # NOTE: the checkpoint goes in last: a copy cut short leaves no checkpoint, so it is
        # simply redone, never resumed without its metrics.csv
        for file in sorted(info["files"], key=lambda name: name in CHECKPOINTS):
            with open(os.path.join(src, file), "rb") as f:
                checkpoint.write_bytes(os.path.join(run_dir, file), f.read(), overwrite=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OSError(f"the parked run {src} cannot be read ({type(e).__name__}: {e}); "
                      f"remove that folder to train {name} again from epoch 1") from None
    return info


def discard(record, name):
    """Remove a run's parked copy (once the run is recorded)."""
    shutil.rmtree(parked_folder(record, name), ignore_errors=True)
    parent = os.path.join(record, "parked")
    if os.path.isdir(parent) and not os.listdir(parent):
        os.rmdir(parent)
