"""Seed-level statistics of the reproduction study, and the verdicts built on them.

A net's error is a random variable: another seed (initial weights, image order, every
augmentation draw) gives another number. So each net is trained with several seeds and
two nets are compared on their per-seed errors (docs/reproduction.md, "Design"):

    mean ± t-interval      t_interval([37.9, 42.4, 40.1])        -> (40.1, 5.6)
    Welch's t-test         welch(errors_x, errors_y)             -> Comparison
    permutation test       (inside `welch`: every split of the seeds, exact)
    Holm's adjustment      holm([0.01, 0.04, 0.30])              -> [0.03, 0.08, 0.30]

and judged by `judge`: for "X is better than Y", reproduced / contradicted / undecided by
the direction and p < 0.05; for "X is no better than Y" (the paper's null findings: LRN,
E against D), reproduced only when the interval also rules out a gain above `MARGIN`.

The t distribution and both tests are SciPy's (`scipy.stats`); Holm's step-down is four
lines and written here.
"""

import math
import warnings
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05    # a difference is called when p < ALPHA
MARGIN = 2.0    # top-1 points: "no better" must rule out a larger gain (Design, Statistics)


def _stats():
    try:
        from scipy import stats
    except ImportError as e:  # the report needs it; training never does
        raise ImportError("the reproduction report's tests need SciPy: pip install "
                          "'minivgg[study]' (or scipy)") from e
    return stats


def t_interval(values, level=0.95):
    """(mean, half-width of the Student-t interval); half-width None below 2 values."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, None
    sem = values.std(ddof=1) / math.sqrt(len(values))
    return mean, float(_stats().t.ppf(0.5 + level / 2, len(values) - 1) * sem)


@dataclass
class Comparison:
    """X minus Y in top-1 points (negative: X is better), from per-seed errors."""
    x: list
    y: list
    diff: float          # mean(x) - mean(y)
    low: float           # 95% Welch interval of the difference
    high: float
    p: float             # two-sided Welch t-test
    p_perm: float        # two-sided exact permutation test on the same numbers


def welch(x, y):
    """Compare per-seed errors x and y -> Comparison, or None below two seeds a side."""
    if len(x) < 2 or len(y) < 2:
        return None
    stats = _stats()
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    diff = float(x.mean() - y.mean())
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(vx + vy)
    if se == 0.0:  # identical seeds on both sides: no spread to test against, undecided
        p = low = high = math.nan
    else:
        df = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
        half = float(stats.t.ppf(0.975, df)) * se
        low, high = diff - half, diff + half
        with warnings.catch_warnings():  # SciPy warns when seeds agree to many digits
            warnings.simplefilter("ignore", RuntimeWarning)
            p = float(stats.ttest_ind(x, y, equal_var=False).pvalue)
    perm = stats.permutation_test((x, y), lambda a, b: np.mean(a) - np.mean(b),
                                  permutation_type="independent", n_resamples=np.inf,
                                  alternative="two-sided")
    return Comparison([float(v) for v in x], [float(v) for v in y], diff, low, high, p,
                      float(perm.pvalue))


def holm(ps):
    """Holm's step-down adjustment of p-values (same order as given)."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    adjusted, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adjusted[i] = running
    return adjusted


def judge(c, null=False):
    """'reproduced', 'contradicted' or 'undecided' for the paper's "X better than Y"
    (null=False) or "X no better than Y" (null=True), from Comparison c (X minus Y)."""
    called = c.p < ALPHA
    if not null:
        return ("reproduced" if c.diff < 0 else "contradicted") if called else "undecided"
    if called and c.diff < 0:
        return "contradicted"
    return "reproduced" if c.low > -MARGIN else "undecided"


def paired_runs(diffs):
    """(mean, two-sided p) of per-run differences (points; each run an independent
    training) by a one-sample t-test against 0; p is NaN below 2 runs or without spread."""
    diffs = np.asarray(diffs, dtype=float)
    if len(diffs) < 2 or np.all(diffs == diffs[0]):
        return float(diffs.mean()) if len(diffs) else math.nan, math.nan
    return float(diffs.mean()), float(_stats().ttest_1samp(diffs, 0.0).pvalue)


def p_text(p):
    """A p-value as the report prints it: small ones as a bound, not as 0.00."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}" if p < 0.01 else f"p = {p:.2f}"


def describe(c, holm_p=None):
    """'+2.1 points [-0.5, +4.7], Welch p = 0.09 (Holm-adjusted p = 0.27), permutation
    p = 0.10': X minus Y, its 95% interval and the tests."""
    if math.isnan(c.p):
        return f"{c.diff:+.1f} points, no spread between the seeds to test it against"
    holm_text = "" if holm_p is None else f" (Holm-adjusted {p_text(holm_p)})"
    return (f"{c.diff:+.1f} points [{c.low:+.1f}, {c.high:+.1f}], Welch {p_text(c.p)}"
            f"{holm_text}, permutation {p_text(c.p_perm)}")


def seeds_text(values):
    """'40.1 ± 5.6 (37.9, 42.4, 40.1)': mean ± 95% t half-width, then each seed."""
    mean, half = t_interval(values)
    each = ", ".join(f"{v:.1f}" for v in values)
    return f"{mean:.1f}" + ("" if half is None else f" ± {half:.1f}") + f" ({each})"
