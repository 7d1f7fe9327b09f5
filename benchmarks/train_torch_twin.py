"""A PyTorch twin of minivgg's small Imagenette recipe: the same net, data and schedule.

    python benchmarks/train_torch_twin.py ../shared/data/imagenette2-224 --cache \\
        --output runs/torch-twin

It trains VGG-A (or any Table 1 column) at width 0.25 with fc6/fc7 of 512, crops of 64 from
images rescaled to S = 72, batch 64, Glorot init, lr 0.01 cut by 10 on a val plateau
(patience 2, at most 3 cuts; `--stop-at-plateau` ends the run at the plateau after the
third, as train_imagenet.py's), momentum 0.9, weight decay 5e-4, dropout 0.5, 12 epochs: the
README's recipe (Sec. 3.1 scaled down). Everything but the network and the optimizer step is
minivgg's own code, so the two runs differ only where the engines do:

* data: `minivgg.data`'s ImageFolder, training statistics, TrainTransform (random crop,
  flip, PCA colour shift, Sec. 3.1), EvalTransform (centre crop at Q) and Loader, with the
  same seed, so both engines see the same images in the same order with the same
  augmentation;
* the net: `torch_net.torch_vgg`, built from `minivgg.models.CONFIGS` (Table 1) with
  torch.nn layers, floor-mode pools, inverted dropout; Glorot-uniform weights drawn by
  torch (`--seed`), zero biases;
* the schedule: `minivgg.optim.ReduceLROnPlateau` itself, driving torch.optim.SGD, whose
  momentum convention minivgg's SGD follows;
* the record: metrics.csv with minivgg's columns (`minivgg.metrics`), so the study and
  `examples/visualize.py curves` read it like a minivgg run's;
* the checkpoint: OUTPUT/last.pt after every epoch (weights, momentum, schedule, torch's
  random state and the rows so far, written atomically by `minivgg.checkpoint`), which
  `--resume OUTPUT/last.pt` continues from, so a stopped run loses at most the epoch in
  progress and ends as it would have without the stop. A folder that already holds a run
  is never started over: without --resume that is an error.

It runs in its own process with `--threads` torch threads (default 2, the machine's cores).
PyTorch is needed here only; minivgg never imports it.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from minivgg import checkpoint, data, folder_lock, metrics, optim  # noqa: E402
from minivgg.loader import Loader  # noqa: E402
from torch_net import torch_vgg  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", metavar="DIR", help="ILSVRC-layout folder (train/, val/)")
    p.add_argument("-a", "--arch", default="A", help="Table 1 column (default A)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("-b", "--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--lr-patience", type=int, default=2, metavar="N")
    p.add_argument("--stop-at-plateau", action="store_true",
                   help="end at the plateau after the third cut, as train_imagenet.py")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--wd", type=float, default=5e-4, dest="weight_decay")
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--fc-width", type=int, default=512)
    p.add_argument("--scale", type=int, default=72, metavar="S")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--cache", action="store_true", help="decode every image once")
    p.add_argument("--output", default="runs/torch-twin", metavar="DIR")
    p.add_argument("--resume", metavar="PATH", help="continue from this last.pt")
    return p.parse_args(argv)


class TorchRate:
    """The `lr` attribute minivgg's ReduceLROnPlateau reads and writes, on a torch optimizer."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    @property
    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value):
        for group in self.optimizer.param_groups:
            group["lr"] = value


def open_data(args):
    """minivgg's data pipeline, exactly as `minivgg.train.setup` builds it."""
    train_set, val_set = data.open_imagenet(args.data)
    if args.cache:
        train_set.cache_in_memory(args.scale, args.workers)
        val_set.cache_in_memory(max(args.scale, args.crop), args.workers)
    stats = data.compute_stats(train_set, seed=args.seed, workers=args.workers)
    train_loader = Loader(train_set, data.TrainTransform((args.scale, args.scale),
                                                         args.crop, stats),
                          args.batch_size, shuffle=True, seed=args.seed,
                          workers=args.workers)
    val_loader = Loader(val_set, data.EvalTransform(args.scale, args.crop, stats),
                        args.batch_size, shuffle=False, seed=args.seed,
                        workers=args.workers)
    return train_set, train_loader, val_loader


def train_one_epoch(torch, net, opt, loader, epoch):
    net.train()
    seen, loss_sum, wrong, start = 0, 0.0, 0, time.perf_counter()
    for x, y in loader.epoch(epoch):
        x, y = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y).long()
        logits = net(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        value = float(loss.item())
        if not math.isfinite(value):
            raise SystemExit(f"error: the training loss became {value} at epoch {epoch + 1}")
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(y)
        loss_sum += value * len(y)
        wrong += metrics.topk_errors(logits.detach().numpy(), y.numpy(), (1,))[1]
    seconds = time.perf_counter() - start
    return {"train_loss": loss_sum / seen, "train_top1_err": wrong / seen,
            "images_per_s": seen / seconds}


def validate(torch, net, loader):
    """Loss, top-1 and top-5 error of single centre crops, as `minivgg.train.validate`."""
    net.eval()
    seen, loss_sum, wrong1, wrong5 = 0, 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader.epoch(0):
            logits = net(torch.from_numpy(np.ascontiguousarray(x)))
            y = torch.from_numpy(y).long()
            loss_sum += float(torch.nn.functional.cross_entropy(logits, y)) * len(y)
            errors = metrics.topk_errors(logits.numpy(), y.numpy(), (1, 5))
            seen, wrong1, wrong5 = seen + len(y), wrong1 + errors[1], wrong5 + errors[5]
    return {"val_loss": loss_sum / seen, "val_top1_err": wrong1 / seen,
            "val_top5_err": wrong5 / seen}


# Checkpoint: what a resumed run needs to go on exactly as the run would have
# ----------------------------------------------------------------------------------------

RECIPE_KEYS = ("arch", "seed", "width", "fc_width", "crop", "scale", "batch_size",
               "momentum", "weight_decay", "dropout", "lr_patience")


class ResumeError(Exception):
    """A --resume checkpoint that is missing, unreadable or from another recipe."""


def save_state(torch, path, net, opt, scheduler, rows, args):
    """Write last.pt all or nothing: a kill during the write leaves the previous one."""
    state = {"net": net.state_dict(), "opt": opt.state_dict(),
             "schedule": scheduler.state_dict(), "rng": torch.get_rng_state(),
             "rows": rows, "recipe": json.dumps({k: getattr(args, k) for k in RECIPE_KEYS})}
    checkpoint.atomic_write(path, lambda f: torch.save(state, f), suffix=".pt",
                            overwrite=True, what="checkpoint")


def load_state(torch, path, net, opt, scheduler, args):
    """Restore what `save_state` wrote into the fresh net, optimizer and schedule -> rows."""
    if not os.path.isfile(path):
        raise ResumeError(f"--resume {path}: no such file")
    try:  # NOTE: weights_only: tensors, dicts, lists, strings and numbers, never code
        state = torch.load(path, weights_only=True)
        recipe = json.loads(state["recipe"])
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        scheduler.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        rows = list(state["rows"])
    except Exception as e:  # a damaged file fails in torch.load or in the key lookups
        raise ResumeError(f"--resume {path}: not a readable twin checkpoint "
                          f"({type(e).__name__}: {e})") from None
    changed = [f"--{k.replace('_', '-')} {recipe.get(k)} -> {getattr(args, k)}"
               for k in RECIPE_KEYS if recipe.get(k) != getattr(args, k)]
    if changed:
        raise ResumeError(f"--resume {path}: the run was trained with another recipe "
                          f"({', '.join(changed)})")
    return rows


def check_output(args):
    """Raise ResumeError when --output holds an earlier run that --resume does not continue:
    a run is never started over in its own folder, nor overwritten by another."""
    resumed_from = os.path.dirname(os.path.abspath(args.resume or ""))
    here = bool(args.resume) and os.path.isdir(resumed_from) and os.path.samefile(
        resumed_from, args.output)
    for name in ("last.pt", "metrics.csv"):
        if not here and os.path.exists(os.path.join(args.output, name)):
            raise ResumeError(f"--output {args.output} holds an earlier run ({name}): pass "
                              f"--resume {os.path.join(args.output, 'last.pt')} to continue "
                              f"it, or choose another --output")


def main(argv=None):
    args = parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.output, exist_ok=True)
    try:  # one run per folder, as minivgg's own runs
        lock = folder_lock.lock_folder(args.output, "--output")
    except folder_lock.FolderBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with lock:
        return train_twin(torch, args)


def train_twin(torch, args):
    """Check --output, build the data, net, optimizer and schedule, start or resume, and
    train -> exit status. The rows trained so far: none, or the checkpoint's (--resume)."""
    try:
        check_output(args)  # before the minute of decoding the images
    except ResumeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train_set, train_loader, val_loader = open_data(args)
    try:
        net = torch_vgg(torch, args.arch, len(train_set.classes), args.width, args.fc_width,
                        args.crop, args.dropout, init="glorot")
        opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum,
                              weight_decay=args.weight_decay)
        scheduler = optim.ReduceLROnPlateau(TorchRate(opt), mode="min", factor=0.1,
                                            max_decreases=3, patience=args.lr_patience)
        try:
            rows = (load_state(torch, args.resume, net, opt, scheduler, args)
                    if args.resume else [])
        except ResumeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"torch {torch.__version__}, {args.threads} threads: VGG-{args.arch} width "
              f"{args.width} fc {args.fc_width}, "
              f"{sum(p.numel() for p in net.parameters()):,} parameters"
              + (f"; resumed after epoch {len(rows)}" if rows else ""), flush=True)
        t_run = time.perf_counter()
        run_epochs(torch, args, net, opt, scheduler, rows, (train_loader, val_loader))
        print(f"done in {time.perf_counter() - t_run:.0f}s; metrics.csv in {args.output}")
        return 0
    finally:
        train_loader.close()
        val_loader.close()


def run_epochs(torch, args, net, opt, scheduler, rows, loaders):
    """Train from epoch len(rows) + 1 to --epochs or the plateau; checkpoint every epoch."""
    metrics_path = os.path.join(args.output, "metrics.csv")
    metrics.write_metrics(metrics_path, rows)  # drops an epoch the checkpoint lacks
    for epoch in range(len(rows), args.epochs):
        if args.stop_at_plateau and scheduler.ended:
            break
        lr, t0 = opt.param_groups[0]["lr"], time.perf_counter()
        tr = train_one_epoch(torch, net, opt, loaders[0], epoch)
        va = validate(torch, net, loaders[1])
        seconds = time.perf_counter() - t0
        scheduler.step(va["val_top1_err"])
        rows.append(metrics.epoch_row(epoch + 1, tr, va, lr, seconds))
        save_state(torch, os.path.join(args.output, "last.pt"), net, opt, scheduler, rows,
                   args)
        metrics.write_metrics(metrics_path, rows)
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {tr['train_loss']:.4f} | val "
              f"top-1 err {100 * va['val_top1_err']:.2f}% top-5 err "
              f"{100 * va['val_top5_err']:.2f}% | lr {lr:g} | {tr['images_per_s']:.1f} img/s"
              f" | {seconds:.1f}s", flush=True)
    if args.stop_at_plateau and scheduler.ended:
        print(f"val top-1 error stopped improving after the last lr cut: the run ends at "
              f"epoch {len(rows)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
