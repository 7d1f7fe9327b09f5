"""The training loop of Sec. 3.1: data, model, SGD, plateau schedule, checkpoints, metrics.

`fit(TrainConfig(...))` does a whole run; `examples/train_imagenet.py` only parses flags
into a `TrainConfig` (`minivgg.train_config`). `setup` (`minivgg.train_setup`) builds
everything a run needs into one `Run` (model, optimizer, schedule, loaders, statistics,
output paths); this module is what happens then, read top to bottom: `train` is the epoch
loop, and one epoch is:

    for each batch:   forward, softmax cross-entropy, backward, SGD step (Sec. 3.1)
    validation:       single centre crop at Q (Sec. 3.2): loss, top-1 and top-5 error
    schedule:         lr / 10 when val top-1 error stops improving, at most 3 times
    checkpoint:       last.npz every epoch, best.npz when val top-1 error improves

A checkpoint holds everything a resume needs to continue bit-identically on the CPU: the
weights, the momentum buffers, the schedule, the epoch, the host RNG (dropout) and the
loader seed (the loader's randomness is a function of (seed, epoch, index) only), the data
statistics and the best error so far (`minivgg.run_state.training_meta`). The files are
written by `minivgg.checkpoint`, metrics.csv by `minivgg.metrics` and its curves by
`minivgg.plots`; a resume is read and checked by `minivgg.run_state`.

When things go wrong (README, "Failure behaviour"): Ctrl-C or SIGTERM stops the run after
the batch in progress and writes last.npz at that exact point (epoch and batch), so a
resume continues as if nothing had happened; SIGUSR1 writes it and goes on
(`minivgg.interrupts`). A NaN/Inf loss or validation loss stops the run before any
checkpoint of those weights is written. A run never starts in a folder holding another
run's files unless told to, nor in one another live run holds: the folder is locked for the
run's life (`run_state.claim_run_folder`, `minivgg.folder_lock`).

Started by an MPI launcher (`mpirun -n 4 python examples/train_imagenet.py ...`), the same
loop trains one model on every process (`minivgg.distributed`, Sec. 3.3): each rank takes
its slice of every global batch, the gradients are averaged across ranks inside backward,
the step's loss and error counts are summed across ranks, and rank 0 alone prints and
writes. The checkpoint is the same for any number of ranks. A signal reaches the ranks at
different moments, so they agree on it in the step's sum: every rank stops, or saves,
after the same batch, and rank 0 writes the mid-epoch checkpoint. `run.replicas`
(`minivgg.replicas`) hides both the sums and the gradient averaging from the step.
"""

import math
import os
import sys
import time
from dataclasses import asdict

import numpy as np

from minivgg import backend, checkpoint, distributed, launch, metrics, plots, run_state
from minivgg import functional as F
from minivgg.prefetch import to_device_batches
from minivgg.replicas import Replicas
from minivgg.run_state import EpochProgress
from minivgg.tensor import Tensor, no_grad
# The API of a run, for `from minivgg.train import ...`: the config, its errors, the set-up.
from minivgg.train_config import (TrainConfig, TrainingDiverged, TrainingError,  # noqa: F401
                                  TrainingInterrupted, synthetic_config)
from minivgg.train_setup import Run, setup  # noqa: F401


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
    v = validate(run.model, run.val_loader, run.device, run.replicas)
    run.log(f"evaluation of {run.config.resume}: val loss {v['val_loss']:.4f}, top-1 error "
            f"{100 * v['val_top1_err']:.2f}%, top-5 error {100 * v['val_top5_err']:.2f}%")
    return v


def train(run):
    """Epochs `run.start_epoch` to `config.epochs` (Sec. 3.1) -> all metrics rows of the run.
    With `stop_at_plateau`, the run ends sooner once the schedule has `ended`.

    Each epoch: train, validate, step the plateau schedule on val top-1 error, write
    last.npz (and best.npz), append a metrics.csv row and redraw metrics.png. A stop
    signal ends it with a resumable last.npz (`TrainingInterrupted`).
    """
    cfg, say, paths, root = run.config, run.log, run.paths, run.group.is_root
    if root and cfg.overwrite and not run_state.holds(paths.folder, cfg.resume):
        run_state.remove_run_files(paths.folder)  # asked for, and every check has passed
    rows = earlier_rows(run)
    plotted = False
    with run.replicas.listening() as replicas:  # signals become votes the ranks agree on
        for epoch in range(run.start_epoch, cfg.epochs):
            if cfg.stop_at_plateau and run.scheduler.ended:
                break  # a resume of a run that had ended (or --stop-at-plateau added)
            lr = run.optimizer.lr
            t0 = time.perf_counter()
            tr = train_one_epoch(run, epoch)
            va = validate(run.model, run.val_loader, run.device, replicas)
            if replicas.stop:  # part-way through the epoch or its validation
                raise stopped_mid_epoch(run, epoch, replicas.stop)
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
                plotted = write_metrics_files(run, rows)
            say(epoch_summary(run, epoch + 1, tr, va, lr, seconds, improved))
            if run.optimizer.lr != lr:
                say(f"val top-1 error stopped improving: lr {lr:g} -> {run.optimizer.lr:g}")
            if cfg.stop_at_plateau and run.scheduler.ended:
                say(f"val top-1 error stopped improving after the last lr cut: the run ends "
                    f"at epoch {epoch + 1} (--stop-at-plateau, Sec. 3.1)")
                break
            if replicas.agree() and epoch + 1 < cfg.epochs:
                raise TrainingInterrupted(
                    f"stopped by {replicas.stop} after epoch {epoch + 1}: {paths.last} "
                    f"holds it; --resume {paths.last} continues with epoch {epoch + 2}",
                    replicas.stop)
    say(f"done: best val top-1 error {100 * run.best:.2f}%; checkpoints and metrics.csv"
        f"{' and metrics.png' if rows and plotted else ''} in {paths.folder}")
    return rows


def stopped_mid_epoch(run, epoch, signal_name):
    """Write last.npz where epoch `epoch` stopped -> the TrainingInterrupted to raise."""
    progress, total, last = run.progress, len(run.train_loader), run.paths.last
    save_progress(run, epoch)
    where = ("" if progress.batch < total else " (its validation had not finished)")
    # NOTE: each sentence starts with a word of its own, never a path: capitalising a
    # sentence that starts with "runs/x" would name a folder that does not exist.
    best = (f"The best epoch so far is in {run.paths.best} (val top-1 error "
            f"{100 * run.best:.2f}%)" if os.path.isfile(run.paths.best)
            else "No epoch has finished yet, so there is no best.npz")
    return TrainingInterrupted(
        f"stopped by {signal_name}: {last} holds epoch {epoch + 1} up to batch "
        f"{progress.batch} of {total}{where}; --resume {last} continues exactly from there. "
        f"{best}.", signal_name)


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
    meta = run_state.training_meta(run, epochs_done)
    meta.update(val_top1_err=val["val_top1_err"], val_top5_err=val["val_top5_err"])
    state, opt_state = finite_state(run, f"after epoch {epochs_done}")  # on every rank
    if run.group.is_root:  # one writer: the files do not depend on the number of ranks
        checkpoint.save(run.paths.last, state, opt_state, meta)
        if improved:
            checkpoint.save(run.paths.best, state, opt_state, meta)
    run.last_good = f"{run.paths.last} (epoch {epochs_done})"


def save_progress(run, epoch):
    """last.npz part-way through epoch `epoch` (0-based): `run.progress` says how far."""
    meta = run_state.training_meta(run, epoch)
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


def write_metrics_files(run, rows):
    """metrics.csv and its curves, metrics.png -> False when matplotlib is missing.

    A failed write (a full disk) is one `checkpoint.WriteError` line that names the file
    and says that the checkpoints, written just before, are intact."""
    try:
        metrics.write_metrics(run.paths.metrics_csv, rows)
        return plot_run(run, rows)
    except OSError as e:
        kept = [p for p in (run.paths.last, run.paths.best) if os.path.isfile(p)]
        raise checkpoint.WriteError(f"{e}; the checkpoints {' and '.join(kept)} are intact "
                                    f"(--resume {run.paths.last} continues the run)") from None


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

def train_step(run, x, y):
    """Forward, softmax cross-entropy, backward, SGD step (Sec. 3.1) -> (summed loss, top-1
    errors, images) of the global batch: this rank's `x, y` and every other rank's slice.

    `run.replicas` adds the step's figures up over the ranks before backward, so every rank
    takes the same decision on a non-finite loss (and on a stop signal), and averages the
    gradients while backward runs (Sec. 3.3). A rank whose slice is empty still takes part.
    NOTE: when the loss is not finite the weights are left as they were (no backward, no
    step), so the last checkpoint and the model in memory stay usable.
    """
    model, optimizer, replicas, n = run.model, run.optimizer, run.replicas, len(y)
    loss, local = None, [0.0, 0, 0]
    with _finiteness_checked_here():
        if n:
            logits = model(Tensor(x))
            loss = F.cross_entropy(logits, y)
            local = [*_loss_and_errors(loss, logits, y), n]
        loss_sum, wrong, seen = replicas.sum(local)
        if seen and math.isfinite(loss_sum):
            optimizer.zero_grad()
            with replicas.averaging_gradients(n):
                if loss is not None:
                    loss.backward(on_leaf_done=replicas.grad_ready)
            optimizer.step()
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


def _loss_and_errors(loss, logits, y):
    """(loss × images, top-1 errors) of a batch, from one read of the device.

    NOTE: the step must read its loss anyway (a non-finite one stops it before backward);
    the top-1 guesses come along in the same copy, so a GPU step waits once. `y` is on the
    host. Ties go to the lowest class index, as in `metrics.topk_errors`.
    """
    xp = backend.array_module(logits.data)
    guesses = logits.data.argmax(axis=1).astype(np.float64)
    both = backend.to_numpy(xp.concatenate([loss.data.astype(np.float64).reshape(1), guesses]))
    return float(both[0]) * len(y), int((both[1:] != backend.to_numpy(y)).sum())


def train_one_epoch(run, epoch):
    """One pass over the training set -> dict of loss, top-1 error, images/s, skipped.

    A resumed epoch starts where its checkpoint stopped (`run.resume_progress`). On a stop
    signal it returns after the batch in progress; `run.progress` says how far it came.
    """
    run.model.train()
    total = len(run.train_loader)
    p = run.progress = run.resume_progress or EpochProgress()
    run.resume_progress = None
    bar = _progress_bar(f"{run.config.label}epoch {epoch + 1}", total, p.batch,
                        run.group.is_root)
    start, waited, seen_before = time.perf_counter(), 0.0, p.seen
    batches = iter(to_device_batches(run.train_loader.epoch(epoch, start=p.batch), run.device,
                                     move=(0,)))  # the labels stay on the host
    for step in range(p.batch, total):
        t = time.perf_counter()
        batch = next(batches, None)  # time spent here is time the loader kept us waiting
        waited += time.perf_counter() - t
        if batch is None:
            break
        x, y = batch
        launch.seed_dropout(run.group, run.loader_seed, epoch, step)
        step_loss, step_wrong, step_seen = train_step(run, x, y)
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
        if run.replicas.take_save():  # SIGUSR1: checkpoint now, go on
            save_progress(run, epoch)
            run.log(f"saved {run.paths.last} (epoch {epoch + 1} up to batch {p.batch} of "
                    f"{total}); training goes on")
        if run.replicas.stop:
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


def validate(model, loader, device, replicas=None, epoch=0):
    """Loss, top-1 and top-5 error of single centre crops (Sec. 3.2) over `loader`; with
    `replicas` of several ranks, each validates its slices and the sums are added up.
    None when a stop signal came first (see `train`): agreed by the ranks in that sum."""
    replicas = replicas or Replicas()
    if replicas.stop:
        return None
    model.eval()
    seen, loss_sum, wrong1, wrong5 = 0, 0.0, 0, 0
    with no_grad(), _finiteness_checked_here():  # train() checks the loss; loads refuse NaN
        for x, y in to_device_batches(loader.epoch(epoch), device, move=(0,)):
            if replicas.stop_received:  # this rank's own; the others learn it below
                break
            n = len(y)
            if n == 0:  # this rank's slice of a short last batch
                continue
            logits = model(Tensor(x)).data
            loss = F.cross_entropy(logits, y).data
            xp = backend.array_module(logits)  # one read of the device: loss and scores
            both = backend.to_numpy(xp.concatenate([loss.reshape(1), logits.ravel()]))
            loss_sum += float(both[0]) * n
            errors = metrics.topk_errors(both[1:].reshape(logits.shape), y, (1, 5))
            seen, wrong1, wrong5 = seen + n, wrong1 + errors[1], wrong5 + errors[5]
    totals = replicas.sum([loss_sum, wrong1, wrong5, seen, loader.skipped])
    if replicas.stop:
        return None
    loss_sum, wrong1, wrong5, seen, skipped = totals
    seen, skipped = int(seen), int(skipped)
    if seen == 0:
        raise TrainingError("validation produced no batch: every val image was skipped")
    return {"val_loss": loss_sum / seen, "val_top1_err": wrong1 / seen,
            "val_top5_err": wrong5 / seen, "val_skipped": skipped}
