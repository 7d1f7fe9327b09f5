"""Does a deeper VGG give better features for a new task? App. B at small scale, on Imagenette.

    python examples/transfer_study.py ../shared/data/imagenette2-224          # run / go on
    python examples/transfer_study.py ../shared/data/imagenette2-224 --doc-only

Imagenette's ten classes are split in two: the *source* task is the first five wnids in
sorted order (tench, English springer, cassette player, chain saw, church), the *target*
task the other five (French horn, garbage truck, gas pump, golf ball, parachute). Runs, in
the order they are made (each net of a seed before the next seed, so that a study cut short
already has every kind of run):

* src-A-s<seed>, src-D-s<seed>: nets A and D trained on the source classes alone, with
  the README's small recipe (`reproduce_tables.RECIPE`: width 0.25, fc 512, 64-pixel crops
  from S = 72, batch 64, Glorot, lr 0.01 cut on val plateaus, --epochs 12).
* feat-src-A-s<seed> ...: their features of the target images (App. B: dense at
  Q in --scales, the paper's {256, 384, 512} scaled by 64/224 to {64, 96, 128}, averaged
  over flips and scales, L2-normalised; --layer relu7, which is Caffe's "fc7" blob, the
  penultimate layer App. B used), and a linear classifier (scikit-learn's LinearSVC, as
  App. B's linear SVM; `pip install -e '.[transfer]'`) trained on 5, 20 or all labelled
  target images per class (--shots), scored on the target val images.
* feat-untrained-A-s<seed> ...: the same with an untrained net (Glorot init of that seed):
  how much of the features comes from training, not from the architecture.
* scratch-A-k<k>-s<seed> ...: the same architecture trained from scratch on the k labelled
  target images per class (same recipe; a k-shot run takes more epochs so it gets a useful
  number of SGD steps: see `scratch_epochs`), scored with dense evaluation at the same
  scales with flips, as the features are made.

The labelled subset of seed s is the same for every method (`shot_indices`), so the
methods of one seed see the same images. The source nets' own val images are the source
classes'; the target val images are never trained on (k-shot scratch runs watch a subset
of 10 per class for their learning-rate plateaus).

Training goes through `examples/train_imagenet.py` (one subprocess per run, resumable,
`reproduce_tables.train`); each run works in OUT/<run>/ (default runs/transfer,
git-ignored). A finished run's *record* (metrics.csv and timing.json of a training run;
record.json with the scores and predictions.npz with every val prediction) goes to
RECORD/<run>/ (default docs/transfer/, committed), and a recorded run is done whatever OUT
holds. After every step docs/transfer.md is rewritten from the records (`write_report` of
examples/transfer_report.py), with "pending" for what is missing.
"""

import argparse
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # reproduce_tables

from minivgg import (checkpoint, data, evaluate, features, images, metrics,  # noqa: E402
                     models, run_state)
from reproduce_tables import (Interrupted, Run, last_checkpoint,  # noqa: E402
                              listen_to_sigint, lock_study_folder, read_json, train)
import transfer_report  # noqa: E402

LAYER, SCALES, SHOTS = "relu7", (64, 96, 128), ("5", "20", "all")
MONITOR_PER_CLASS = 10  # target val images per class a k-shot scratch run watches
UNTRAINED_MEAN_RGB = (123.68, 116.779, 103.939)  # ImageNet's; an untrained net has none


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", metavar="DIR", help="Imagenette-layout folder (train/, val/)")
    p.add_argument("--out", default=os.path.join("runs", "transfer"), metavar="DIR",
                   help="run folders (default runs/transfer)")
    p.add_argument("--record", default=os.path.join(ROOT, "docs", "transfer"),
                   metavar="DIR", help="finished runs' results (default docs/transfer)")
    p.add_argument("--doc", default=os.path.join(ROOT, "docs", "transfer.md"))
    p.add_argument("--epochs", type=int, default=12, help="epochs of a full run (12)")
    p.add_argument("--max-epochs", type=int, default=100,
                   help="most epochs of a k-shot scratch run (100)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per net (3)")
    p.add_argument("--archs", nargs="+", default=["A", "D"], help="nets (A D)")
    p.add_argument("--shots", nargs="+", default=list(SHOTS),
                   help="labelled target images per class: numbers and/or 'all'")
    p.add_argument("--scales", type=int, nargs="+", default=list(SCALES),
                   help="test scales Q of the features and of scratch nets (64 96 128)")
    p.add_argument("--layer", default=LAYER, help="feature layer (relu7)")
    p.add_argument("--C", type=float, default=1.0, help="LinearSVC's C (1.0)")
    p.add_argument("-j", "--workers", type=int, default=2, help="loader processes")
    p.add_argument("--doc-only", action="store_true",
                   help="rewrite the report from the records; train nothing")
    args = p.parse_args(argv)
    args.eval_limit = 0  # reproduce_tables' arguments this study does not use
    # NOTE: the runs start with the repository as their working directory
    # (reproduce_tables.supervise), so relative paths are made absolute here, against the
    # folder the user ran this from.
    for name in ("data", "out", "record", "doc"):
        setattr(args, name, os.path.abspath(getattr(args, name)))
    return args


def check_args(args):
    """One clear line for each mistake, before anything is trained."""
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(args.data, split)):
            raise ValueError(f"{args.data!r} has no {split}/ folder (Imagenette layout)")
    bad = [s for s in args.shots if s != "all" and not (s.isdigit() and int(s) > 0)]
    if bad:
        raise ValueError(f"--shots: {bad} are not positive numbers or 'all'")
    unknown = [a for a in args.archs if a not in models.CONFIGS]
    if unknown:
        raise ValueError(f"--archs: unknown {unknown}; expected some of {list(models.CONFIGS)}")
    if args.seeds < 1 or args.epochs < 1 or min(args.scales) < 64:
        raise ValueError("--seeds and --epochs must be at least 1 and every --scales Q at "
                         "least 64 (the nets' crop)")


# ----------------------------------------------------------------------------------------
# The data: source and target class folders, k-shot subsets (symbolic links into DIR)
# ----------------------------------------------------------------------------------------

def split_classes(args):
    """(source wnids, target wnids): the first and the second half of the sorted classes."""
    classes = data.ImageFolder(os.path.join(args.data, "train"), warn=False).classes
    if len(classes) < 2:
        raise ValueError(f"{args.data}: needs at least two classes, found {classes}")
    half = len(classes) // 2
    return classes[:half], classes[half:]


def link_folder(dst, wnids, src_split, per_class=None):
    """dst/<wnid>/ for each wnid: a link to the whole class folder, or links to the files
    chosen by per_class[wnid] (a list of paths). Returns dst."""
    for wnid in wnids:
        target = os.path.join(dst, wnid)
        if os.path.lexists(target):
            continue
        os.makedirs(dst, exist_ok=True)
        if per_class is None:
            os.symlink(os.path.abspath(os.path.join(src_split, wnid)), target)
        else:
            os.makedirs(target + ".tmp", exist_ok=True)
            for path in per_class[wnid]:
                link = os.path.join(target + ".tmp", os.path.basename(path))
                if not os.path.lexists(link):
                    os.symlink(os.path.abspath(path), link)
            os.replace(target + ".tmp", target)
    return dst


def target_train(args):
    """The target classes' training images: ImageFolder (labels 0..4 in wnid order)."""
    _, target = split_classes(args)
    root = link_folder(os.path.join(args.out, "data", "target", "train"), target,
                       os.path.join(args.data, "train"))
    return data.ImageFolder(root, warn=False)


def shot_indices(labels, shots, seed):
    """Indices of `shots` ("5", "all") labelled images per class, drawn with `seed`: the
    same subset for every method of that seed."""
    if shots == "all":
        return np.arange(len(labels))
    rng = np.random.default_rng(1000 + seed)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        chosen += sorted(rng.choice(members, min(int(shots), len(members)), replace=False))
    return np.array(sorted(chosen))


def scratch_epochs(args, n_subset, n_all):
    """Epochs of a scratch run on n_subset images: as many SGD steps as a full run takes
    (args.epochs over n_all images), at most --max-epochs, never fewer than --epochs."""
    return int(max(args.epochs, min(args.max_epochs, math.ceil(args.epochs * n_all /
                                                               n_subset))))


def run_data(args, run):
    """The Imagenette-layout folder a training run learns from (made of links)."""
    source, target = split_classes(args)
    if run.name.startswith("src-"):
        root = os.path.join(args.out, "data", "source")
        for split in ("train", "val"):
            link_folder(os.path.join(root, split), source, os.path.join(args.data, split))
        return root
    root = os.path.join(args.out, "data", f"target-k{run.shots}-s{run.seed}")
    if run.shots == "all":
        for split in ("train", "val"):
            link_folder(os.path.join(root, split), target, os.path.join(args.data, split))
        return root
    ds = target_train(args)
    idx = shot_indices(ds.labels, run.shots, run.seed)
    link_folder(os.path.join(root, "train"), target, None,
                {w: [ds.paths[i] for i in idx if ds.labels[i] == c]
                 for c, w in enumerate(target)})
    val = data.ImageFolder(os.path.join(args.data, "val"), warn=False)
    watch = {w: [p for p, y in zip(val.paths, val.labels) if val.classes[y] == w]
             [:MONITOR_PER_CLASS] for w in target}
    link_folder(os.path.join(root, "val"), target, None, watch)
    return root


# ----------------------------------------------------------------------------------------
# The runs
# ----------------------------------------------------------------------------------------

def study(args):
    """[(kind, Run)] in the order they are made; Run.shots is set on scratch runs."""
    out = []
    for seed in range(args.seeds):
        for arch in args.archs:
            out.append(("train", TRun(f"src-{arch}-s{seed}", arch, seed)))
            out.append(("features", TRun(f"feat-src-{arch}-s{seed}", arch, seed)))
            out.append(("features", TRun(f"feat-untrained-{arch}-s{seed}", arch, seed)))
        for arch in args.archs:
            for k in args.shots:
                out.append(("scratch", TRun(f"scratch-{arch}-k{k}-s{seed}", arch, seed,
                                            shots=k)))
    return out


class TRun(Run):
    """A run of this study: reproduce_tables.Run (so its training code applies) + shots."""

    def __init__(self, name, arch, seed, shots=None):
        super().__init__(name, arch, seed)
        self.shots = shots


def run_args(args, run):
    """args as reproduce_tables.train sees them for `run`: its own data folder and
    epochs, and its record folder under --record."""
    epochs = args.epochs
    if run.name.startswith("scratch-") and run.shots != "all":
        ds = target_train(args)
        epochs = scratch_epochs(args, len(shot_indices(ds.labels, run.shots, run.seed)),
                                len(ds))
    return argparse.Namespace(**{**vars(args), "data": run_data(args, run),
                                 "epochs": epochs})


def recorded(args, name):
    return read_json(os.path.join(args.record, name, "record.json"), None) is not None


def save_record(args, name, record, arrays=None, copy=()):
    """RECORD/<name>/: the files in `copy` from OUT/<name>/, predictions.npz, and
    record.json written last (its presence marks the record complete)."""
    dst = os.path.join(args.record, name)
    os.makedirs(dst, exist_ok=True)
    for fname in copy:
        with open(os.path.join(args.out, name, fname), "rb") as f:
            checkpoint.write_bytes(os.path.join(dst, fname), f.read(), overwrite=True)
    if arrays:
        checkpoint.write_npz(os.path.join(dst, "predictions.npz"), arrays, compressed=True,
                             overwrite=True)
    record = dict(record, saved=time.strftime("%Y-%m-%d %H:%M"))
    checkpoint.write_json(os.path.join(dst, "record.json"), record, overwrite=True)


def do_train(args, run):
    """Train a source net (or find it trained) -> True when finished."""
    if recorded(args, run.name):
        return True
    rargs = run_args(args, run)
    if not train(rargs, run):
        return False
    rows = metrics.read_metrics(os.path.join(args.out, run.name, "metrics.csv"))
    save_record(args, run.name, dict(kind="train", arch=run.arch, seed=run.seed,
                                     epochs=rargs.epochs, classes=split_classes(args)[0],
                                     final_val_top1_err=float(rows[-1]["val_top1_err"])),
                copy=("metrics.csv", "timing.json"))
    return True


def target_images(args):
    """(train images, train labels, val images, val labels) of the target classes, decoded
    once, rescaled to the largest Q (kept in memory: about 0.3 GB for Imagenette)."""
    _, target = split_classes(args)
    val_root = link_folder(os.path.join(args.out, "data", "target", "val"), target,
                           os.path.join(args.data, "val"))
    out = []
    for ds in (target_train(args), data.ImageFolder(val_root, warn=False)):
        skipped = ds.cache_in_memory(max(args.scales), workers=args.workers)
        keep = [i for i in range(len(ds)) if ds.cache[i] is not None]
        if skipped:
            print(f"== skipped {skipped} unreadable images of {ds.root}", flush=True)
        out += [[ds.cache[i] for i in keep], ds.labels[keep]]
    return out


def net_for(args, run):
    """(model in eval mode, its input transform) of a features run."""
    if "untrained" in run.name:
        model = models.vgg(run.arch, 5, 0.25, 512, 64, init="glorot", seed=run.seed)
        mean = UNTRAINED_MEAN_RGB
    else:
        model, meta = run_state.load_model(last_checkpoint(args, TRun(
            run.name[len("feat-"):], run.arch, run.seed)))
        mean = meta["data_stats"]["mean_rgb"]
    mean = np.asarray(mean, dtype=np.float32)
    return model.eval(), (lambda img: images.to_chw_float32(img, mean))


def do_features(args, run, cache):
    """Features of the target images, and a linear classifier per number of shots."""
    from sklearn.svm import LinearSVC
    if recorded(args, run.name):
        return True
    source = run.name.replace("feat-", "")
    if "untrained" not in run.name and not recorded(args, source):
        return False
    checkpoint_path = os.path.join(args.out, source, "last.npz")
    if "untrained" not in run.name and not os.path.isfile(checkpoint_path):
        print(f"== {run.name}: needs {checkpoint_path}, which is gone although {source} is "
              f"recorded; delete {os.path.join(args.record, source)} to train it again",
              flush=True)
        return False
    path = os.path.join(args.out, run.name, "features.npz")
    if not os.path.isfile(path):
        if "images" not in cache:
            cache["images"] = target_images(args)
        tr, ytr, va, yva = cache["images"]
        model, to_input = net_for(args, run)
        start = time.time()
        Xtr = features.extract(model, tr, args.layer, args.scales, flip=True,
                               to_input=to_input)
        Xva = features.extract(model, va, args.layer, args.scales, flip=True,
                               to_input=to_input)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        checkpoint.write_npz(path, dict(Xtr=Xtr, ytr=ytr, Xva=Xva, yva=yva,
                                        seconds=time.time() - start), overwrite=True)
    f = np.load(path)
    scores, preds = {}, {"labels": f["yva"]}
    for k in args.shots:
        idx = shot_indices(f["ytr"], k, run.seed)
        clf = LinearSVC(C=args.C, max_iter=20000).fit(f["Xtr"][idx], f["ytr"][idx])
        preds[f"k{k}"] = clf.predict(f["Xva"])
        scores[k] = float(np.mean(preds[f"k{k}"] == f["yva"]))
    save_record(args, run.name, dict(kind="features", arch=run.arch, seed=run.seed,
                                     layer=args.layer, scales=args.scales, C=args.C,
                                     dims=int(f["Xtr"].shape[1]), accuracy=scores,
                                     seconds=float(f["seconds"])), preds)
    return True


def do_scratch(args, run, cache):
    """Train on the k-shot subset, then score on all target val images (dense, flips)."""
    if recorded(args, run.name):
        return True
    rargs = run_args(args, run)
    if not train(rargs, run):
        return False
    if "images" not in cache:
        cache["images"] = target_images(args)
    _, _, va, yva = cache["images"]
    model, meta = run_state.load_model(last_checkpoint(args, run))
    mean = np.asarray(meta["data_stats"]["mean_rgb"], dtype=np.float32)
    net = evaluate.EvalNet(model, lambda img: images.to_chw_float32(img, mean))
    probs = evaluate.average([
        net.posteriors([net.to_input(images.rescale_smallest_side(img, q)) for img in va],
                       "dense") for q in args.scales])
    pred = probs.argmax(1)
    save_record(args, run.name, dict(kind="scratch", arch=run.arch, seed=run.seed,
                                     shots=run.shots, epochs=rargs.epochs,
                                     accuracy={run.shots: float(np.mean(pred == yva))}),
                {"labels": yva, f"k{run.shots}": pred}, copy=("metrics.csv", "timing.json"))
    return True


def write_report(args):
    """docs/transfer.md from the records (`transfer_report.write_report`)."""
    transfer_report.write_report(args, [run.name for _, run in study(args)])


# ----------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    listen_to_sigint()
    try:
        check_args(args)
        if not args.doc_only:
            import sklearn  # noqa: F401  (fail now, not after hours of training)
    except ImportError:
        print("error: the transfer study needs scikit-learn: pip install -e '.[transfer]'",
              file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.doc_only:
        lock = lock_study_folder(args.out)
        if lock is None:
            return 2
        with lock:
            try:
                run_study(args)
            except Interrupted as stop:  # the run saved where it was (reproduce_tables)
                print("== stopped: the run in progress saved where it was; run the same "
                      "command again to continue", flush=True)
                return stop.code
            except OSError as e:  # a full disk while recording: the message names the file
                print(f"error: {e}", file=sys.stderr)
                return 1
    write_report(args)
    print(f"== report: {args.doc}", flush=True)
    return 0


def run_study(args):
    """Every step of the study not done yet, in order, the report rewritten after each."""
    cache = {}
    for kind, run in study(args):
        if kind == "train":
            do_train(args, run)
        elif kind == "features":
            do_features(args, run, cache)
        else:
            do_scratch(args, run, cache)
        write_report(args)


if __name__ == "__main__":
    sys.exit(main())
