"""Wall time of the small Imagenette recipe: minivgg against a plain PyTorch script, back to back.

    python benchmarks/wall_time.py                         # 12 epochs each, 2 threads
    python benchmarks/wall_time.py DIR --epochs 12 --threads 2
    python benchmarks/wall_time.py --resume runs/wall-time/20261204-183000   # finish a pair

Issue 26's last target: minivgg's `examples/train_imagenet.py` with the README's small
recipe and `--cache` (images decoded once into memory) must take no longer than
`train_torch_plain.py`, the same recipe as a PyTorch user writes it. Each runs in its own
process, one after the other (minivgg first); the clock runs from the process start to its
exit, so start-up, imports, decoding and validation count on both sides, as with
`/usr/bin/time`.

Every pair gets a folder of its own under `--runs-dir` (the date and time, UTC): each run's
output, its log and, once it has finished, a small JSON file of its result. An interrupted
pair is finished with `--resume FOLDER`, which runs only what has no result yet. The row
(date, load average at each start, commands, seconds, best val top-1 of each, time ratio)
is appended to `--results` (default benchmarks/wall_time.md) once both are done, and only
once per folder: earlier rows are never rewritten.
"""

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "imagenette2-224")
COLUMNS = ["date (UTC)", "epochs", "threads", "load minivgg / torch", "minivgg s", "torch s",
           "minivgg best top-1", "torch best top-1", "time ratio", "folder", "commands"]
HEADER = f"""# Wall time of the small Imagenette recipe: minivgg against plain PyTorch

Rows appended by `python benchmarks/wall_time.py` (issue 26: minivgg's time / the script's
time <= 1.0 on a quiet machine). Load: the 1-minute load average when each run started.

| {" | ".join(COLUMNS)} |
|---|---:|---:|---|---:|---:|---:|---:|---:|---|---|
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("data", metavar="DIR", nargs="?", default=DEFAULT_DATA)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "wall-time"))
    p.add_argument("--results", default=os.path.join(HERE, "wall_time.md"))
    p.add_argument("--resume", metavar="FOLDER", help="finish the pair in FOLDER")
    return p.parse_args(argv)


def commands(args, folder):
    """{name: argv} of the two runs, minivgg first."""
    minivgg = [sys.executable, os.path.join(ROOT, "examples", "train_imagenet.py"), args.data,
               "-a", "A", "--width", "0.25", "--fc-width", "512", "--scale", "72",
               "--crop", "64", "-b", "64", "--init", "glorot", "--epochs", str(args.epochs),
               "--cache", "-j", "1", "--threads", str(args.threads),
               # the pair's own folder; --overwrite for a run re-started by --resume
               "--output", os.path.join(folder, "minivgg"), "--overwrite"]
    torch = [sys.executable, os.path.join(HERE, "train_torch_plain.py"), "--data", args.data,
             "--epochs", str(args.epochs), "--threads", str(args.threads)]
    return {"minivgg": minivgg, "torch": torch}


def best_top1(name, folder, log):
    """The best val top-1 accuracy of a finished run, from its metrics.csv or its log."""
    if name == "minivgg":
        with open(os.path.join(folder, "minivgg", "metrics.csv"), newline="") as f:
            return 1.0 - min(float(row["val_top1_err"]) for row in csv.DictReader(f))
    found = re.findall(r"best val top-1 ([0-9.]+)%", log)
    if not found:
        raise RuntimeError("the torch script's log has no 'best val top-1' line")
    return float(found[-1]) / 100


def shown(argv):
    """The command as a reader would type it from the repository root."""
    def short(arg):
        inside = os.path.isabs(arg) and not os.path.relpath(arg, ROOT).startswith("..")
        return os.path.relpath(arg, ROOT) if inside else arg
    return " ".join(["python"] + [short(a) for a in argv[1:]])


def run_one(name, argv, folder):
    """Run one side to its end, its output in FOLDER/<name>.log -> its result."""
    load, started = os.getloadavg()[0], time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    start = time.perf_counter()
    with open(os.path.join(folder, f"{name}.log"), "w") as log:
        code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    seconds = time.perf_counter() - start
    with open(os.path.join(folder, f"{name}.log")) as f:
        text = f.read()
    if code != 0:
        raise RuntimeError(f"the {name} run exited with status {code}; its log: "
                           f"{os.path.join(folder, name + '.log')}\n{text[-2000:]}")
    return {"seconds": seconds, "load": load, "top1": best_top1(name, folder, text),
            "command": shown(argv), "started": started}


def save_result(folder, name, result):
    tmp = os.path.join(folder, f".{name}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, os.path.join(folder, f"{name}.json"))  # a result is whole or absent


def row(args, folder, results):
    m, t = results["minivgg"], results["torch"]
    cells = [m["started"], args.epochs, args.threads, f"{m['load']:.2f} / {t['load']:.2f}",
             f"{m['seconds']:.1f}", f"{t['seconds']:.1f}", f"{100 * m['top1']:.2f}%",
             f"{100 * t['top1']:.2f}%", f"**{m['seconds'] / t['seconds']:.2f}**",
             os.path.relpath(folder, ROOT),
             f"`{m['command']}`; `{t['command']}`"]
    return "| " + " | ".join(str(c) for c in cells) + " |\n"


def record(args, folder, results):
    """Append the pair's row to args.results, once per folder."""
    marker = os.path.join(folder, "recorded")
    if os.path.exists(marker):
        print(f"this pair is already in {args.results}; nothing appended")
        return
    text = row(args, folder, results)
    if not os.path.exists(args.results):
        text = HEADER + text
    with open(args.results, "a") as f:  # append only: earlier rows are never rewritten
        f.write(text)
    open(marker, "w").close()
    print(f"appended to {args.results}:\n{text.splitlines()[-1]}")


def pair_folder(args):
    """A new folder for this pair, or the --resume one with the pair's settings restored
    (the data, epochs and threads it was started with) -> folder, or None."""
    if args.resume:
        folder = args.resume
        settings = os.path.join(folder, "pair.json")
        if not os.path.isfile(settings):
            print(f"error: --resume {folder}: not a folder made by wall_time.py (no "
                  f"pair.json)", file=sys.stderr)
            return None
        with open(settings) as f:
            vars(args).update(json.load(f))
        return folder
    folder = os.path.join(args.runs_dir, time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    os.makedirs(folder)  # a new folder each time: an existing one is an error
    with open(os.path.join(folder, "pair.json"), "w") as f:
        json.dump({"data": args.data, "epochs": args.epochs, "threads": args.threads}, f)
    return folder


def main(argv=None, run=run_one):
    args = parse_args(argv)
    # the runs start in the repository root: paths typed relative to here must still hold
    args.data = os.path.abspath(args.data)
    folder = pair_folder(args)
    if folder is None:
        return 2
    folder = os.path.abspath(folder)
    results = {}
    for name, argv_ in commands(args, folder).items():
        path = os.path.join(folder, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                results[name] = json.load(f)
            print(f"{name}: done before ({results[name]['seconds']:.1f}s), not run again")
            continue
        print(f"{name}: {' '.join(argv_)}", flush=True)
        results[name] = run(name, argv_, folder)
        save_result(folder, name, results[name])
        print(f"{name}: {results[name]['seconds']:.1f}s, best val top-1 "
              f"{100 * results[name]['top1']:.2f}%", flush=True)
    record(args, folder, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
