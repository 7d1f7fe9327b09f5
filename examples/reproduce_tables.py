"""The paper's Tables 3-6 at small scale on Imagenette: one resumable study.

    python examples/reproduce_tables.py ../shared/data/imagenette2-224          # run / go on
    python examples/reproduce_tables.py ../shared/data/imagenette2-224 --doc-only

Every run uses the README's small recipe (Sec. 3.1 scaled down): width 0.25, fc6/fc7 of 512,
crops of 64 from images rescaled to S = 72, batch 64, Glorot init, and the paper's schedule:
lr 0.01 cut by 10 when the val top-1 error has not improved for 3 epochs (patience 2), three
times, the run ending at the plateau after the third cut (or at --epochs, 60); `--cache`.
docs/reproduction.md's "Design" says why (written before the runs). The study, in the order
it runs (most informative first, so that a study cut short still answers the main ones):

    A-s0 .. E-s0, A-s1 .. E-s1, A-s2 .. E-s2 (every depth of Table 3, three seeds),
    torch-A-s0..2 (the PyTorch twin), A-LRN-s0..1, Djit-s0..1 (S jittered over
    [64, 128]), Dwarm-s0..1 (warm start from A-s0 and A-s1, Sec. 3.1)

Training goes through `examples/train_imagenet.py` (a subprocess per run: the real code path,
one process per run, as a user runs it) and the PyTorch twin through
`benchmarks/train_torch_twin.py`; evaluation through `minivgg.evaluate` (`EvalNet`,
`average`). Each run lives in OUT/<name>/ (default runs/repro, git-ignored):

* a run is *finished* when its schedule, replayed on the val errors of its metrics.csv
  (for minivgg: the epochs last.npz also holds), has ended, or its epochs reach the cap;
  it is skipped. An unfinished run with a checkpoint (last.npz; last.pt for the twin)
  continues with --resume, so a stopped study loses at most the epoch in progress; the
  stopped run is also *parked* in RECORD/parked/<name>/ (`reproduction_parking`), and a
  fresh clone continues from there.
* its test-set soft-max outputs go to OUT/<name>/posteriors.npz, one array per
  (method, Q), computed once; every table combines those arrays (multi-scale, dense +
  multi-crop and fusion are averages of soft-max outputs, Sec. 3.2 and 4.4).
* once a run is trained and evaluated, its *record* (metrics.csv, timing.json,
  posteriors.npz, and for a warm-start source its weights.npz) is copied to
  RECORD/<name>/ (default docs/reproduction/, committed with the report). A recorded run
  is finished whatever OUT holds (when its record.json has this study's PROTOCOL, and
  it ended at its plateau or reached this --epochs), and the report is built from the
  records: the study goes on in a fresh clone or on another machine, where runs/
  (checkpoints, logs) is gone.

After each step the report docs/reproduction.md and its plots are rewritten from whatever is
finished, with "pending" in the cells still missing; `--doc-only` just rewrites them.

Test scales and the 32-pixel stride. A net trained on 64-pixel crops has five 2×2 pools, so
dense evaluation's windows sit on a 32-pixel grid, and Imagenette-224's square images give a
1×1 score map for Q = 64..95 and 2×2 for 96..127. Fixed-S nets are tested at Q = S = 72 and
{64, 72, 80} (the paper's {S−32, S, S+32} scaled by 64/224 to ±8, rounded to the 8-pixel
steps of the rescaling); the jittered net, trained on S in [64, 128] (the paper's
[256, 512] = [S, 2S], with Smin put at the crop size), at its middle Q = 96 and at
{64, 96, 128}, all multiples of 32, where the grid drops no pixel. Elsewhere dense evaluation
centres the grid (`minivgg.evaluate.dense_crop`); the top-left grid is measured beside it.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # reproduction_report

from minivgg import (checkpoint, data, evaluate, folder_lock, images, metrics,  # noqa: E402
                     optim, run_state)
from minivgg.kernels.cpu import machine  # noqa: E402
from minivgg.pretrained import save_pretrained  # noqa: E402
import reproduction_parking as parking  # noqa: E402

RECIPE = ["--width", "0.25", "--fc-width", "512", "--crop", "64", "-b", "64",
          "--init", "glorot", "--cache"]
# The schedule (Sec. 3.1): lr 0.01 cut by 10 after PATIENCE + 1 epochs without a better
# val top-1 error, CUTS times (TrainConfig.lr_decreases' default; a test checks they agree);
# a run ends at the plateau after the last cut, or at --epochs.
PATIENCE, CUTS, CAP = 2, 3, 60
SCHEDULE = ["--lr-patience", str(PATIENCE), "--stop-at-plateau"]
# What makes a record this study's: the schedule, not the epoch cap (a run that ended at its
# plateau counts under any cap; one stopped by a cap, under any cap as high).
PROTOCOL = {"schedule": "plateau", "patience": PATIENCE, "cuts": CUTS}
FIXED_Q, FIXED_QS = 72, (64, 72, 80)
JITTER, JITTER_Q, JITTER_QS = (64, 128), 96, (64, 96, 128)


@dataclass
class Run:
    """One training run of the study and what is measured on it."""
    name: str
    arch: str
    seed: int = 0
    engine: str = "minivgg"          # or "torch": benchmarks/train_torch_twin.py
    jitter: bool = False             # S drawn from JITTER instead of fixed S = 72
    warm_from: str = None            # name of the A run to warm-start from (Sec. 3.1)
    multicrop: bool = False          # also 5×5×2 crops (Table 5/6), on the eval subset
    flags: list = field(default_factory=list)

    @property
    def q(self):
        return JITTER_Q if self.jitter else FIXED_Q

    @property
    def qs(self):
        return JITTER_QS if self.jitter else FIXED_QS


def _study():
    """The runs, in the order they run: most informative first, so that a study cut short
    still answers the main questions: one seed of every depth, then the second and third
    seeds, then the PyTorch twin, LRN, scale jittering and the warm start."""
    runs = []
    for seed in (0, 1, 2):
        runs += [Run(f"{arch}-s{seed}", arch, seed, multicrop=arch in ("D", "E"))
                 for arch in "ABCDE"]
    runs += [Run(f"torch-A-s{seed}", "A", seed, engine="torch") for seed in (0, 1, 2)]
    runs += [Run(f"A-LRN-s{seed}", "A-LRN", seed) for seed in (0, 1)]
    runs += [Run(f"Djit-s{seed}", "D", seed, jitter=True, multicrop=True) for seed in (0, 1)]
    runs += [Run(f"Dwarm-s{seed}", "D", seed, warm_from=f"A-s{seed}") for seed in (0, 1)]
    return runs


STUDY = _study()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", metavar="DIR", help="Imagenette-layout folder (train/, val/)")
    p.add_argument("--out", default=os.path.join("runs", "repro"), metavar="DIR",
                   help="run folders (default runs/repro)")
    p.add_argument("--record", default=os.path.join(ROOT, "docs", "reproduction"),
                   metavar="DIR", help="finished runs' results, committed "
                   "(default docs/reproduction)")
    p.add_argument("--epochs", type=int, default=CAP, help="most epochs per run: a run "
                   f"ends sooner, at its plateau after the third lr cut (default {CAP})")
    p.add_argument("--only", nargs="+", metavar="NAME", help="only these runs")
    p.add_argument("--eval-limit", type=int, default=500, metavar="N",
                   help="val images (evenly spaced) for the multi-crop protocols (500)")
    p.add_argument("-j", "--workers", type=int, default=2, help="loader processes")
    p.add_argument("--doc", default=os.path.join(ROOT, "docs", "reproduction.md"))
    p.add_argument("--doc-only", action="store_true",
                   help="rewrite the report from finished runs; train nothing")
    args = p.parse_args(argv)
    # NOTE: the runs start with the repository as their working directory (cwd=ROOT), so
    # relative paths are made absolute here, against the folder the user ran this from.
    for name in ("data", "out", "record", "doc"):
        setattr(args, name, os.path.abspath(getattr(args, name)))
    return args


# ----------------------------------------------------------------------------------------
# Training: skip finished runs, resume half-finished ones
# ----------------------------------------------------------------------------------------

def folder(args, run):
    return os.path.join(args.out, run.name)


def record_folder(args, run):
    return os.path.join(args.record, run.name)


def recorded(args, run):
    """True when RECORD/<name>/ holds this run finished under this study's PROTOCOL and
    this cap: ended at its plateau, or with as many epochs as args.epochs."""
    record = read_json(os.path.join(record_folder(args, run), "record.json"), {})
    if record.get("protocol") != PROTOCOL:
        return False
    return record.get("ended") == "plateau" or record.get("epochs", 0) >= args.epochs


class _Rate:
    lr = 0.01


def schedule_ended(rows):
    """Whether the plateau schedule, replayed on a run's val errors, has ended: the same
    `minivgg.optim.ReduceLROnPlateau` the run steps (patience PATIENCE, CUTS cuts)."""
    schedule = optim.ReduceLROnPlateau(_Rate(), mode="min", patience=PATIENCE,
                                       max_decreases=CUTS)
    for row in rows:
        schedule.step(float(row["val_top1_err"]))
    return schedule.ended


def finished(args, run):
    """A run is finished when recorded, or when its epochs reach the cap or its schedule
    has ended (the plateau after the third cut)."""
    if recorded(args, run):
        return True
    done = epochs_done(args, run)
    if done >= args.epochs:
        return True
    try:
        rows = metrics.read_metrics(os.path.join(folder(args, run), "metrics.csv"))
    except (OSError, ValueError):
        return False
    return done > 0 and schedule_ended(rows[:done])


def save_record(args, run):
    """Copy a finished run's results into RECORD/<name>/ (what the report is built from).

    Files go in under temporary names and record.json, written last, marks the record
    complete: an interrupted copy is simply redone."""
    src, dst = folder(args, run), record_folder(args, run)
    os.makedirs(dst, exist_ok=True)
    for name in ["metrics.csv", "timing.json"]:
        with open(os.path.join(src, name), "rb") as f:
            checkpoint.write_bytes(os.path.join(dst, name), f.read(), overwrite=True)
    if run.engine != "torch":
        compact_posteriors(os.path.join(src, "posteriors.npz"),
                           os.path.join(dst, "posteriors.npz"))
    if any(r.warm_from == run.name for r in STUDY):  # the weights a later run starts from
        model, _ = run_state.load_model(last_checkpoint(args, run))
        save_pretrained(model, os.path.join(dst, "weights.npz"), overwrite=True)
    rows = metrics.read_metrics(os.path.join(dst, "metrics.csv"))
    checkpoint.write_json(os.path.join(dst, "record.json"),
                          {"protocol": PROTOCOL, "epochs": len(rows), "cap": args.epochs,
                           "ended": "plateau" if schedule_ended(rows) else "cap",
                           "engine": run.engine, "arch": run.arch, "seed": run.seed,
                           "saved": time.strftime("%Y-%m-%d %H:%M")}, overwrite=True)
    parking.discard(args.record, run.name)  # recorded: its parked state is not needed


def park(args, run):
    """Park a stopped run (`reproduction_parking`) -> the sentence that says where."""
    kept = parking.park(folder(args, run), args.record, run.name, epochs_done(args, run))
    return (f"; its state is parked in {kept} (commit it, and a fresh clone continues "
            f"from there too)" if kept else "")


def compact_posteriors(src, dst):
    """Copy posteriors.npz with its soft-max outputs in float32, compressed: half the size
    in git or less, and far more precision than a top-1/top-5 error or an average needs."""
    parts = dict(np.load(src))
    for key, value in parts.items():
        if value.dtype == np.float64:
            parts[key] = value.astype(np.float32)
    checkpoint.write_npz(dst, parts, compressed=True, overwrite=True)


def results_folder(args, run):
    """Where the report reads a run from: its record once there is one, else OUT/<name>/."""
    return record_folder(args, run) if recorded(args, run) else folder(args, run)


def warm_weights(args, run):
    """The weights `run` warm-starts from: the source's record, else its checkpoint."""
    source = by_name(run.warm_from)
    kept = os.path.join(record_folder(args, source), "weights.npz")
    return kept if recorded(args, source) else last_checkpoint(args, source)


def epochs_done(args, run):
    """Epochs in the run's metrics.csv that its checkpoint (minivgg) also holds."""
    if recorded(args, run):
        return read_json(os.path.join(record_folder(args, run), "record.json"), {})["epochs"]
    csv_path = os.path.join(folder(args, run), "metrics.csv")
    try:
        rows = len(metrics.read_metrics(csv_path))
    except (OSError, ValueError):
        return 0
    if run.engine == "torch":  # NOTE: the twin writes metrics.csv after its last.pt
        return rows
    try:
        return min(rows, int(checkpoint.load(last_checkpoint(args, run))[2]["epoch"]))
    except (checkpoint.CheckpointError, KeyError, ValueError):
        return 0


def last_checkpoint(args, run):
    return os.path.join(folder(args, run), "last.npz")


def train_command(args, run):
    """The command line of one run: the user's own scripts, with the study's flags."""
    out = folder(args, run)
    if run.engine == "torch":
        cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "train_torch_twin.py"),
               args.data, "-a", run.arch, "--seed", str(run.seed), "--epochs",
               str(args.epochs), "--cache", "-j", str(args.workers), "--output", out,
               "--lr-patience", str(PATIENCE), "--stop-at-plateau"]
        last = os.path.join(out, "last.pt")
        return cmd + ["--resume", last] if os.path.isfile(last) else cmd
    cmd = [sys.executable, os.path.join(ROOT, "examples", "train_imagenet.py"), args.data,
           "-a", run.arch, "--seed", str(run.seed), "--epochs", str(args.epochs),
           "-j", str(args.workers), "--output", out, "-p", "20", *RECIPE, *SCHEDULE,
           *run.flags]
    if run.jitter:
        cmd += ["--scale-jitter", *map(str, JITTER), "--test-scale", str(JITTER_Q)]
    else:
        cmd += ["--scale", str(FIXED_Q)]
    if os.path.isfile(last_checkpoint(args, run)):
        cmd += ["--resume", last_checkpoint(args, run)]
    elif run.warm_from:
        cmd += ["--init-from", warm_weights(args, run)]
    return cmd


class Interrupted(Exception):
    """The study was stopped by a signal; `code` is the training run's exit status."""

    def __init__(self, code):
        super().__init__(code)
        self.code = code


def train(args, run):
    """Train `run` until it is `finished`, unless it is already -> True when finished.

    Raises Interrupted when SIGINT or SIGTERM stopped the run (after it saved)."""
    parked = None if recorded(args, run) else parking.unpark(args.record, run.name,
                                                             folder(args, run))
    if parked:  # a fresh clone of a study that was stopped during this run
        print(f"== {run.name}: continues from its parked state ({parked['epochs']} epochs, "
              f"parked {parked['parked']})", flush=True)
    if finished(args, run):
        return True
    if run.warm_from and not os.path.isfile(last_checkpoint(args, run)):
        if not finished(args, by_name(run.warm_from)):
            print(f"== {run.name}: waits for {run.warm_from}", flush=True)
            return False
    os.makedirs(folder(args, run), exist_ok=True)
    cmd = train_command(args, run)
    print(f"== {run.name}: {' '.join(cmd)}", flush=True)
    start, load = time.time(), os.getloadavg()
    try:
        with open(os.path.join(folder(args, run), "train.log"), "a") as log:
            code = supervise(cmd, log)
    finally:  # every invocation's time counts, an interrupted one too
        record_time(args, run, start, load)
    done = finished(args, run)
    print(f"== {run.name}: exit {code}, {'finished' if done else 'NOT finished'} "
          f"after {time.time() - start:.0f}s (log: {folder(args, run)}/train.log)", flush=True)
    # NOTE: train_imagenet.py exits 130/143 after saving; the twin has no handler and dies
    # of the signal itself (Popen reports that as -2/-15), keeping its last epoch's
    # last.pt: both stop the study
    signum = code - 128 if code > 128 else -code if code < 0 else 0
    if signum in (signal.SIGINT, signal.SIGTERM):
        raise Interrupted(128 + signum)
    return done


def supervise(cmd, log):
    """Run `cmd` to its end -> its exit status; SIGINT and SIGTERM are passed on to it.

    NOTE: the child runs in a session of its own, so a Ctrl-C at the terminal reaches this
    process only, and this process sends it on once: the training script then finishes
    its batch, saves, and exits 130 (143 for SIGTERM), which `main` exits with too. A
    second Ctrl-C is passed on as well, and stops the child at once, as it would alone.
    (`subprocess.call` would kill the child on the KeyboardInterrupt instead.)
    """
    child, early = None, []

    def forward(signum, frame):
        if child is None:  # between the handler and the child's start: sent once it runs
            early.append(signum)
            return
        child.send_signal(signum)
        print(f"== {signal.Signals(signum).name} passed on to the training run (pid "
              f"{child.pid}); waiting for it to save", flush=True)

    # NOTE: the handlers go in before the child starts: a caught signal is reset to its
    # default at exec, an ignored one stays ignored. A study started in the background by
    # a script (`cmd &`, whose shell ignores SIGINT there) would otherwise start children
    # that ignore SIGINT until their training loop takes it: one passed on while a child
    # was still setting up was lost, and the study waited for the whole run.
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                 start_new_session=True)
        for signum in early:
            forward(signum, None)
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def record_time(args, run, start, load, part="training"):
    """Append the wall time, load averages and CPU of one invocation of the run's training
    (or of its test evaluation, `part`) to the run's timing.json."""
    path = os.path.join(folder(args, run), "timing.json")
    parts = read_json(path, [])
    parts.append({"start": time.strftime("%Y-%m-%d %H:%M", time.localtime(start)),
                  "seconds": round(time.time() - start, 1),
                  "load_start": round(load[0], 2), "load_end": round(os.getloadavg()[0], 2),
                  **machine.describe(), "part": part})
    checkpoint.write_json(path, parts, overwrite=True)


def cpu_of(part):
    """(model, CPU count, AMX?) of one timing.json entry. Older entries keep all three in
    one string, "model, N CPUs[, AMX]"; the first ones keep nothing, and ran on 2 CPUs
    (model "—")."""
    if "cpus" in part:
        return part["cpu"], part["cpus"], part["amx"]
    model, *rest = part.get("cpu", "—, 2 CPUs").split(", ")
    return model, int(rest[0].split()[0]), "AMX" in rest


def read_json(path, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def by_name(name):
    return next(r for r in STUDY if r.name == name)


# ----------------------------------------------------------------------------------------
# Evaluation: soft-max outputs per (method, Q), cached in posteriors.npz
# ----------------------------------------------------------------------------------------

def needed_parts(run):
    """[(key, method, align, Q, subset?)] measured on a run: keys like 'dense@72'.

    Every part covers all val images, except multi-crop, which covers the evenly spaced
    `subset` (its tables index the other parts by the same subset, so rows compare)."""
    parts = [("center@%d" % run.q, "center", "center", run.q, False),
             ("center-flip@%d" % run.q, "center-flip", "center", run.q, False),
             ("dense-topleft@%d" % run.q, "dense", "top-left", run.q, False)]
    parts += [("dense@%d" % q, "dense", "center", q, False) for q in run.qs]
    if run.arch == "D":  # the jitter comparison tests D at the other net's scales too
        other = FIXED_QS if run.jitter else JITTER_QS
        parts += [("dense@%d" % q, "dense", "center", q, False) for q in other
                  if q not in run.qs]
    if run.multicrop:  # 50 crops per image and scale: on the `subset` images only
        parts += [("multicrop@%d" % q, "multicrop", "center", q, True) for q in run.qs]
    return parts


def val_items(args, classes):
    """[(path, label)] of DIR/val, labels in the model's class order."""
    val = data.ImageFolder(os.path.join(args.data, "val"))
    index = {wnid: i for i, wnid in enumerate(classes)}
    return [(p, index[val.classes[y]]) for p, y in zip(val.paths, val.labels)]


def subset_indices(n, limit):
    """`limit` indices evenly spaced over n sorted images (every class present)."""
    return np.unique(np.linspace(0, n - 1, min(limit, n)).round().astype(int))


def evaluate_run(args, run):
    """Fill the run's posteriors.npz with every part of `needed_parts` not there yet.

    The file remembers the checkpoint's epoch; outputs of an older checkpoint are redone."""
    if run.engine == "torch":
        return
    path = os.path.join(folder(args, run), "posteriors.npz")
    have = dict(np.load(path)) if os.path.isfile(path) else {}
    model, meta = run_state.load_model(last_checkpoint(args, run))
    if int(have.get("epoch", -1)) != int(meta["epoch"]):  # outputs of an older checkpoint
        have = {"epoch": np.array(meta["epoch"])}
    todo = [p for p in needed_parts(run) if p[0] not in have]
    if not todo:
        return
    mean = np.asarray(meta["data_stats"]["mean_rgb"], dtype=np.float32)
    nets = {align: evaluate.EvalNet(model, lambda img: images.to_chw_float32(img, mean),
                                    meta["classes"], run.name, dense_align=align)
            for align in evaluate.DENSE_ALIGNS}
    items = val_items(args, meta["classes"])
    subset = subset_indices(len(items), args.eval_limit)
    have["labels"] = np.array([y for _, y in items])
    have["subset"] = subset
    start, load = time.time(), os.getloadavg()
    try:
        for on_subset in (False, True):
            jobs = [p for p in todo if p[4] == on_subset]
            if jobs:
                chosen = [items[i] for i in subset] if on_subset else items
                have.update(posteriors(nets, chosen, jobs))
                checkpoint.write_npz(path, have, overwrite=True)
    finally:  # the CPU-hours count the test evaluation too
        record_time(args, run, start, load, part="evaluation")
    print(f"== {run.name}: evaluated {len(todo)} parts in {time.time() - start:.0f}s",
          flush=True)


def posteriors(nets, items, jobs, chunk=64):
    """{key: (N, K) soft-max} for jobs [(key, method, align, Q, _)], images decoded once."""
    out = {key: [] for key, *_ in jobs}
    scales = sorted({q for _, _, _, q, _ in jobs})
    for start in range(0, len(items), chunk):
        decoded, _ = evaluate.decode(images.load_rgb, items[start:start + chunk])
        for q in scales:
            inputs = [nets["center"].to_input(images.rescale_smallest_side(img, q))
                      for img in decoded]
            for key, method, align, jq, _ in jobs:
                if jq == q:
                    out[key].append(nets[align].posteriors(inputs, method))
    return {key: np.concatenate(parts) for key, parts in out.items()}


# ----------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    listen_to_sigint()
    runs = [r for r in STUDY if not args.only or r.name in args.only]
    unknown = set(args.only or []) - {r.name for r in STUDY}
    if unknown:
        print(f"error: --only: unknown run(s) {sorted(unknown)}; the study has "
              f"{[r.name for r in STUDY]}", file=sys.stderr)
        return 2
    if not os.path.isdir(os.path.join(args.data, "val")):
        print(f"error: {args.data!r} has no val/ folder", file=sys.stderr)
        return 2
    from reproduction_report import write_report  # examples/, beside this file
    lock = lock_study_folder(args.out)
    if lock is None:
        return 2
    with lock:
        try:
            return run_study(args, runs, write_report)
        except OSError as e:  # a full disk while recording: the message names the file
            print(f"error: {e}", file=sys.stderr)
            return 1


def listen_to_sigint():
    """SIGINT is how a study is stopped (README): take it (KeyboardInterrupt) even when a
    script started the study in the background, where the shell makes SIGINT ignored."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def lock_study_folder(out):
    """Make and lock the study's --out for this process -> FolderLock, or None after one
    error line (another study holds it): one study per folder at a time, as one training
    run per run folder (each run locks its own)."""
    try:
        os.makedirs(out, exist_ok=True)
        return folder_lock.lock_folder(out, "--out")
    except (OSError, folder_lock.FolderBusy) as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def run_study(args, runs, write_report):
    """Train, evaluate and record `runs` (skipping what is done), then write the report
    -> the exit status (main's)."""
    unfinished = []
    if not args.doc_only:
        for run in runs:
            if recorded(args, run):
                continue
            try:
                done = train(args, run)
            except Interrupted as stop:
                print(f"== stopped: {run.name} saved where it was; run the same command "
                      f"again to continue{park(args, run)}", flush=True)
                return stop.code
            if done:
                try:  # in this process: a Ctrl-C here stops between whole steps
                    evaluate_run(args, run)
                    save_record(args, run)
                except KeyboardInterrupt:
                    print(f"== stopped while evaluating {run.name}: its training is saved; "
                          f"run the same command again to evaluate it{park(args, run)}",
                          flush=True)
                    return 130
            else:
                unfinished.append(run.name)
            report(args, write_report)
    if not report(args, write_report):
        return 1
    print(f"== report: {args.doc}", flush=True)
    if unfinished:
        print(f"error: {len(unfinished)} run(s) did not finish: {', '.join(unfinished)} "
              f"(see their train.log under {args.out})", file=sys.stderr)
        return 1
    return 0


def report(args, write_report):
    """Rewrite the report -> True; on an error, say so and go on -> False: a report that
    fails must not stop a study of many hours (its records are what counts)."""
    try:
        write_report(args, STUDY)
        return True
    except Exception as e:  # noqa: BLE001 - any failure of the report; the study goes on
        print(f"error: the report could not be written ({type(e).__name__}: {e}); the "
              f"study goes on, and --doc-only rewrites it", file=sys.stderr, flush=True)
        return False


if __name__ == "__main__":
    sys.exit(main())
