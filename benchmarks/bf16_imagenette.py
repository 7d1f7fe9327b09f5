"""Does bf16 train as well as fp32? The small Imagenette recipe in both, two seeds each.

    python benchmarks/bf16_imagenette.py                          # seeds 0 and 1, 12 epochs
    python benchmarks/bf16_imagenette.py DIR --seeds 0 1 2 --epochs 12

Issue 23, item 4: the README's small recipe (A at width 0.25, fc 512, 64-pixel crops from
S = 72, batch 64, Glorot, 12 epochs, `--cache`) trained with `--precision fp32` and with
`--precision bf16`, the same command otherwise, one seed after the other. Each run lives in
`--runs-dir`/<precision>-s<seed>/ (git-ignored) and is resumable: a run whose metrics.csv
has every epoch is done, one with a checkpoint goes on with `--resume`. Once every run is
done the report (`--report`, default benchmarks/bf16_imagenette.md) is rewritten from the
metrics: each run's best and final val top-1 error, each precision's mean over seeds, and
the verdict. "Within seed noise" here means: the bf16 − fp32 difference of the mean best
errors is no larger than the larger spread (max − min) between the seeds of one precision;
Welch's t-test is given beside it, which with two seeds each has little power.
"""

import argparse
import csv
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "imagenette2-224")
PRECISIONS = ("fp32", "bf16")
RECIPE = ["-a", "A", "--width", "0.25", "--fc-width", "512", "--scale", "72", "--crop", "64",
          "-b", "64", "--init", "glorot", "--cache", "-j", "2"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("data", metavar="DIR", nargs="?", default=DEFAULT_DATA)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "bf16-imagenette"))
    p.add_argument("--report", default=os.path.join(HERE, "bf16_imagenette.md"))
    p.add_argument("--report-only", action="store_true", help="rewrite the report only")
    args = p.parse_args(argv)
    if not args.report_only and not os.path.isdir(os.path.join(args.data, "train")):
        p.error(f"{args.data} has no train/ folder (an ImageNet-layout folder is needed)")
    return args


def metrics(folder):
    """The rows of a run's metrics.csv ([] when it has none yet)."""
    path = os.path.join(folder, "metrics.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def train(args, precision, seed):
    """Train one run to its last epoch (or go on with it) -> its folder."""
    folder = os.path.join(args.runs_dir, f"{precision}-s{seed}")
    if len(metrics(folder)) >= args.epochs:
        return folder
    argv = [sys.executable, os.path.join(ROOT, "examples", "train_imagenet.py"), args.data,
            *RECIPE, "--epochs", str(args.epochs), "--seed", str(seed),
            "--precision", precision, "--output", folder]
    last = os.path.join(folder, "last.npz")
    if os.path.exists(last):
        argv += ["--resume", last]
    os.makedirs(args.runs_dir, exist_ok=True)
    print(f"== {precision}-s{seed}: {' '.join(argv[1:])}", flush=True)
    start = time.perf_counter()
    code = subprocess.run(argv, cwd=ROOT).returncode
    if code != 0:
        raise SystemExit(f"error: the {precision}-s{seed} run exited with status {code}; "
                         f"run the same command again to continue it")
    print(f"== {precision}-s{seed}: done in {time.perf_counter() - start:.0f} s", flush=True)
    return folder


def summary(args):
    """{precision: [(seed, best err %, final err %, seconds)]} of the finished runs."""
    out = {p: [] for p in PRECISIONS}
    for p in PRECISIONS:
        for seed in args.seeds:
            rows = metrics(os.path.join(args.runs_dir, f"{p}-s{seed}"))
            if len(rows) < args.epochs:
                continue
            errs = [100 * float(r["val_top1_err"]) for r in rows[:args.epochs]]
            seconds = sum(float(r["seconds"]) for r in rows[:args.epochs])
            out[p].append((seed, min(errs), errs[-1], seconds))
    return out


def verdict(runs):
    """The sentence that says whether bf16's best errors are within fp32's seed noise."""
    from scipy import stats
    best = {p: [r[1] for r in runs[p]] for p in PRECISIONS}
    if any(len(v) < 2 for v in best.values()):
        return "Pending: two finished seeds of each precision are needed."
    diff = sum(best["bf16"]) / len(best["bf16"]) - sum(best["fp32"]) / len(best["fp32"])
    spread = max(max(v) - min(v) for v in best.values())
    p = stats.ttest_ind(best["bf16"], best["fp32"], equal_var=False).pvalue
    within = abs(diff) <= spread
    return (f"bf16 − fp32 = {diff:+.2f} points of mean best val top-1 error; the seeds of one "
            f"precision spread by up to {spread:.2f} points; Welch p = {p:.2f}. "
            + ("**Within seed noise**: bf16 trains this recipe as well as fp32."
               if within else "**Outside seed noise**: bf16 trains this recipe differently."))


def write_report(args):
    runs = summary(args)
    lines = [f"| {p} | {seed} | {best:.2f} | {final:.2f} | {secs:.0f} |"
             for p in PRECISIONS for seed, best, final, secs in runs[p]]
    text = f"""# bf16 against fp32: the small Imagenette recipe, two seeds each

Written by `python benchmarks/bf16_imagenette.py` ({time.strftime('%Y-%m-%d %H:%M UTC',
time.gmtime())}). Each run: `python examples/train_imagenet.py DIR {' '.join(RECIPE)}
--epochs {args.epochs} --seed S --precision P`. Val top-1 error on Imagenette's val set
(centre crop), in %; seconds are the epochs' own (training + validation), on a 2-core
machine that may have run other work beside them.

| precision | seed | best val top-1 err | final val top-1 err | seconds |
|---|---:|---:|---:|---:|
{chr(10).join(lines) or '| pending | | | | |'}

{verdict(runs)}
"""
    tmp = args.report + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, args.report)  # the report is whole or the old one
    print(f"== report: {args.report}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    if not args.report_only:
        for seed in args.seeds:
            for precision in PRECISIONS:
                train(args, precision, seed)
    write_report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
