"""Reading the study's runs, and the statistics the verdicts of docs/reproduction.md rest on.

`Results` gathers what the run folders hold (metrics.csv, timing.json, posteriors.npz) and
scores the soft-max outputs; the rest turns errors into the report's words:

* A single run's 95% interval is Wilson's binomial interval over the test images: it
  measures test-sample noise only (`wilson`, `cell`).
* Training noise is measured by the seeds: examples/reproduction_seeds.py compares nets
  on their per-seed errors (Welch, permutation, Holm) and words the verdicts.
* Two protocols or nets scored on the *same* images are compared by an exact McNemar test
  (`paired_test`), and a direction across nets by a sign test (`sign_test`).

Used by examples/reproduction_sections.py and reproduction_protocols.py (the tables) and
examples/reproduction_report.py (the plots and the document).
"""

import math
import os

import numpy as np

from minivgg import evaluate, metrics
from reproduce_tables import cpu_of, finished, read_json, results_folder
from reproduction_seeds import p_text  # noqa: F401 - also imported from here

PENDING = "pending"
MIN_CUTS = 2  # lr cuts a run needs to count as trained to its plateau (Design)


def cuts(rows):
    """lr cuts a run made, seen in its metrics.csv: the rate changed between epochs."""
    return len(cut_epochs(rows))


def cut_epochs(rows):
    """The last epoch at each lr of a run before its rate was cut (1-based)."""
    lrs = [float(r["lr"]) for r in rows]
    return [e + 1 for e, (a, b) in enumerate(zip(lrs, lrs[1:])) if b != a]


# ----------------------------------------------------------------------------------------
# Reading the runs
# ----------------------------------------------------------------------------------------

class Results:
    """What is known about each run: curves, timing and test-set soft-max outputs.

    `done`: finished (see reproduce_tables.finished). `counts`: done *and* trained through
    at least MIN_CUTS lr cuts, the study's definition of a run trained to its plateau
    (Design); only those runs' soft-max outputs are loaded, and only when they are of the
    run's last epoch, so no table or verdict can use a run that does not count, or the
    outputs of an older checkpoint of it."""

    def __init__(self, args, study):
        self.args, self.study, self.epochs = args, study, args.epochs
        self.rows, self.parts, self.timing, self.done, self.counts = {}, {}, {}, {}, {}
        for run in study:
            path = results_folder(args, run)
            try:
                self.rows[run.name] = metrics.read_metrics(os.path.join(path, "metrics.csv"))
            except (OSError, ValueError):
                self.rows[run.name] = []
            self.done[run.name] = finished(args, run)
            self.timing[run.name] = read_json(os.path.join(path, "timing.json"), [])
            rows = self.rows[run.name]
            self.counts[run.name] = self.done[run.name] and cuts(rows) >= MIN_CUTS
            npz = os.path.join(path, "posteriors.npz")
            parts = dict(np.load(npz)) if os.path.isfile(npz) else {}
            fresh = int(parts.get("epoch", -1)) == len(rows)
            self.parts[run.name] = parts if self.counts[run.name] and fresh else {}

    def probs(self, name, key, subset=False):
        """(probs, labels) of one run's part, restricted to the subset if asked; or None."""
        parts = self.parts.get(name, {})
        if key not in parts:
            return None
        probs, labels = parts[key], parts["labels"]
        if key.startswith("multicrop"):
            return probs, labels[parts["subset"]]
        if subset:
            return probs[parts["subset"]], labels[parts["subset"]]
        return probs, labels

    def combined(self, names, keys, subset=False):
        """Soft-max averaged over `keys` (scales, methods) and runs (fusion) -> (p, y)."""
        got = [self.probs(n, k, subset) for n in names for k in keys]
        if not got or any(g is None for g in got):
            return None
        return evaluate.average([p for p, _ in got]), got[0][1]

    def error(self, names, keys, subset=False):
        """(top-1 %, top-5 %, n) of the averaged soft-max, or None when pending."""
        return errors(self.combined(names, keys, subset))

    def final_val(self, name):
        """Last epoch's centre-crop val top-1 % from metrics.csv (None unless it counts)."""
        rows = self.rows.get(name) or []
        if not self.counts.get(name) or not rows:
            return None
        return 100.0 * float(rows[-1]["val_top1_err"])

    def wall_seconds(self, name):
        """The seconds of a run's epochs (training + validation), from its metrics.csv."""
        rows = self.rows.get(name) or []
        return sum(float(r["seconds"]) for r in rows if r.get("seconds")) if rows else None

    def cpu_hours(self, name):
        """CPU-hours of every invocation of a run (start-up and test evaluation included):
        wall time × the CPUs of its machine (2 where the timing predates keeping them)."""
        return sum(part["seconds"] * cpu_of(part)[1] / 3600
                   for part in self.timing.get(name, []))


def errors(out):
    """(top-1 %, top-5 %, n) of soft-max outputs (probs, labels), or None when pending."""
    if out is None:
        return None
    probs, labels = out
    miss = metrics.topk_errors(probs, labels, (1, 5))
    n = len(labels)
    return 100.0 * miss[1] / n, 100.0 * miss[5] / n, n


def wilson(err_percent, n, z=1.96):
    """95% Wilson interval (in %) of an error rate measured on n images."""
    p = err_percent / 100.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100 * (centre - half), 100 * (centre + half)


def binomial_half_width(err_percent, n, z=1.96):
    """Half-width (points) of the normal-approximation 95% interval of an error rate."""
    p = err_percent / 100.0
    return 100 * z * math.sqrt(max(p * (1 - p), 1e-4) / n)


def cell(err, with_ci=True):
    """'42.3 [40.8, 43.9] / 8.1' or 'pending'."""
    if err is None:
        return PENDING
    top1, top5, n = err
    if not with_ci:
        return f"{top1:.1f} / {top5:.1f}"
    lo, hi = wilson(top1, n)
    return f"{top1:.1f} [{lo:.1f}, {hi:.1f}] / {top5:.1f}"


# ----------------------------------------------------------------------------------------
# Paired comparisons
# ----------------------------------------------------------------------------------------

def sign_test(k, n):
    """P(at least k of n fair coin flips land one way): the one-sided sign test."""
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n


def paired_test(a, b):
    """Exact McNemar test of two protocols scored on the *same* images.

    a, b: (probs, labels). Only the images where exactly one of the two is right (top-1)
    tell them apart; under "no difference" each such image is a fair coin flip. Returns
    (only a right, only b right, two-sided p). Far more sensitive than comparing two
    binomial intervals, which treat the two error rates as independent samples."""
    right_a = a[0].argmax(1) == a[1]
    right_b = b[0].argmax(1) == b[1]
    only_a, only_b = int(np.sum(right_a & ~right_b)), int(np.sum(right_b & ~right_a))
    n = only_a + only_b  # two-sided: twice the tail beyond the larger count
    return only_a, only_b, min(1.0, 2 * sign_test(max(only_a, only_b), n))


def paired_verdict(expected_winner, other_name, other):
    """'reproduced' when `expected_winner` is right on significantly more images than
    `other`, 'contradicted' when on significantly fewer, else 'undecided'."""
    only_new, only_old, p = paired_test(expected_winner, other)
    word = ("undecided" if p >= 0.05 else
            "reproduced" if only_new > only_old else "contradicted")
    return (f"**{word}** (right only with it on {images(only_new)}, only with "
            f"{other_name} on {only_old}: McNemar {p_text(p)})")


def interim(done, planned, unit):
    """'*interim, 2 of 3 seeds*, ' while fewer than the planned runs are in, else ''
    (Design: a verdict computed before every planned run is recorded is interim)."""
    return f"*interim, {done} of {planned} {unit}*, " if done < planned else ""


def images(k):
    return plural(k, "image")


def plural(k, noun):
    """'1 image', '3 images'."""
    return f"{k} {noun}" + ("" if k == 1 else "s")


def paper(pair):
    """The paper's (top-1, top-5) as a cell, or a dash."""
    return f"{pair[0]} / {pair[1]}" if pair else "—"


def diff_of(a, b):
    return None if a is None or b is None else a[0] - b[0]


# ----------------------------------------------------------------------------------------
# Picking runs
# ----------------------------------------------------------------------------------------

def table3_runs(res, arch):
    """minivgg runs of `arch` at fixed S with Glorot init: Table 3's seeds."""
    return [r for r in res.study if r.arch == arch and r.engine == "minivgg" and not r.jitter
            and not r.warm_from]
