"""The test-protocol tables of docs/reproduction.md: Table 4 (multi-scale testing), Table 5
(dense, multi-crop, both) and Table 6 (fusion), each with its findings.

These compare protocols on the *same* trained nets and the same val images, so their tests
are paired: an exact McNemar test per net (only the images one protocol gets right and the
other wrong count), and a sign test across nets for a direction. Assembled, with the
seed-level tables of examples/reproduction_sections.py, by examples/reproduction_report.py.
"""

import math

import numpy as np

from minivgg import evaluate
from reproduction_seeds import p_text, paired_runs
from reproduction_stats import (
    PENDING, binomial_half_width, cell, diff_of, errors, paired_test, paired_verdict, paper,
    sign_test)

# The paper's numbers (paper.md, Sec. 4): top-1 / top-5 val error %.
PAPER_T5 = {"dense": (24.8, 7.5), "multicrop": (24.6, 7.5), "dense+multicrop": (24.4, 7.2)}
PAPER_T6 = {"dense": (24.0, 7.1), "dense+multicrop": (23.7, 6.8)}  # fusion of D and E


def table4(res):
    lines = ["| run | single Q: top-1 / top-5 | multi-scale Q: top-1 [95% CI] / top-5 | "
             "change (top-1) | paired test |", "|---|---|---|---|---|"]
    changes, significant = [], 0
    for run in res.study:  # the design: the nets of A..E, fixed S, Glorot's init
        if run.engine != "minivgg" or run.arch not in "ABCDE" or run.jitter or run.warm_from:
            continue
        single_out = res.combined([run.name], [f"dense@{run.q}"])
        multi_out = res.combined([run.name], [f"dense@{q}" for q in run.qs])
        single, multi = errors(single_out), errors(multi_out)
        change = diff_of(multi, single)
        if change is not None:
            changes.append(change)
        paired = PENDING
        if change is not None:
            only_multi, only_single, p = paired_test(multi_out, single_out)
            paired = (f"right only multi-scale {only_multi}, only single {only_single}: "
                      f"{p_text(p)}")
            significant += p < 0.05 and only_multi > only_single
        qs = ", ".join(map(str, run.qs))
        lines.append(f"| {run.name} (Q = {run.q} / {{{qs}}}) | {cell(single, False)} | "
                     f"{cell(multi)} | "
                     f"{PENDING if change is None else f'{change:+.1f}'} | {paired} |")
    lines.append("")
    lines.append("Paper: multi-scale testing takes D (jittered S) from 25.6 to 24.8 top-1.")
    if changes:
        n, better = len(changes), sum(c < 0 for c in changes)
        worse = sum(c > 0 for c in changes)
        p = min(1.0, 2 * sign_test(max(better, worse), better + worse))  # two-sided
        word = ("undecided" if p >= 0.05 else "reproduced" if better > worse
                else "contradicted")
        lines.append(f"\n- Multi-scale testing helps: better on {better} of {n} nets "
                     f"(worse on {worse}), mean change {np.mean(changes):+.2f} top-1 points "
                     f"— **{word}** (two-sided sign test over the nets of A..E, each seed "
                     f"an independent training run: {p_text(p)}). Net by net, an exact "
                     f"McNemar test on the same val images (the last column) finds the "
                     f"gain significant (p < 0.05) on {significant} of {n}. At Q ∈ "
                     f"{{64, 72, 80}} the score map is 1×1, so each scale sees the whole "
                     f"image once, and the scales differ by only ±8 pixels: small changes "
                     f"are expected.")
    return "\n".join(lines)


def runs_verdict(what, results, unit):
    """One finding from per-net results [(error change in points, only new right, only old
    right, McNemar p)]: decided across the nets, each an independent training run, by a
    two-sided one-sample t-test of the changes (`paired_runs`); the McNemar counts, per
    net and pooled, describe it (pooled over nets scored on the same images they are not
    independent, so they decide nothing)."""
    mean, p = paired_runs([r[0] for r in results])
    word = ("undecided" if not p < 0.05 else "reproduced" if mean < 0 else "contradicted")
    a, b = sum(r[1] for r in results), sum(r[2] for r in results)
    alone = sum(r[1] > r[2] and r[3] < 0.05 for r in results)
    test = "too few nets or no spread to test" if math.isnan(p) else f"t-test {p_text(p)}"
    return (f"{what}: **{word}** (mean change {mean:+.2f} top-1 points over "
            f"{len(results)} {unit}, {test}; better by its own McNemar test (p < 0.05) on "
            f"{alone}; right only with it on {a} images in all, only without it on {b}).")


# ----------------------------------------------------------------------------------------
# Table 5: test protocols; Table 6: fusion
# ----------------------------------------------------------------------------------------

def protocol_output(res, run, label, keys):
    """(probs, labels) of one Table 5 protocol for `run` on the val subset, or None.
    NOTE: dense+multicrop averages the two methods' multi-scale soft-max equally."""
    if label != "dense+multicrop":
        return res.combined([run.name], keys, subset=True)
    got = [res.combined([run.name], [f"{m}@{s}" for s in run.qs], True)
           for m in ("dense", "multicrop")]
    return None if None in got else (evaluate.average([g[0] for g in got]), got[0][1])


def protocol_rows(res, names, qs, q):
    """[(protocol, keys)] of Table 5 for nets `names` at scales qs."""
    return [("centre crop, one scale", ["center@%d" % q]),
            ("centre crop + flip, one scale", ["center-flip@%d" % q]),
            ("dense, top-left grid, one scale", ["dense-topleft@%d" % q]),
            ("dense, one scale", ["dense@%d" % q]),
            ("dense", [f"dense@{s}" for s in qs]),
            ("multicrop", [f"multicrop@{s}" for s in qs]),
            ("dense+multicrop", [f"dense@{s}" for s in qs] + [f"multicrop@{s}" for s in qs])]


def table5(res):
    nets = [r for r in res.study if r.multicrop]
    n = min(res.args.eval_limit, 3925)
    half = binomial_half_width(30.0, n)
    lines = [f"Top-1 / top-5 error % on {n} evenly spaced val images (the 95% interval of a "
             f"30% error is ±{half:.1f} points at this size); one-scale rows at each net's "
             "single Q, the others averaged over its Q set. NOTE: a 1×1 score map (Q = 64..95) "
             "makes centred dense evaluation the centre crop + flip exactly "
             "(`minivgg.evaluate.dense_crop`), so for the fixed-S nets, tested at "
             "{64, 72, 80}, dense adds nothing here; the jittered net's Q = 96 and 128 give "
             "2×2 and 3×3 maps, where it does.",
             "", "| protocol | " + " | ".join(r.name for r in nets) + " | paper (D) |",
             "|---|" + "---|" * (len(nets) + 1)]
    outputs = {}  # (protocol, run name) -> (probs, labels) or None
    for i, (label, _) in enumerate(protocol_rows(res, [], (0,), 0)):
        cells = []
        for run in nets:
            label_i, keys = protocol_rows(res, [run.name], run.qs, run.q)[i]
            out = protocol_output(res, run, label_i, keys)
            outputs[(label_i.split(" (")[0], run.name)] = out
            cells.append(cell(errors(out), False))
        ref = {"dense": PAPER_T5["dense"], "multicrop": PAPER_T5["multicrop"],
               "dense+multicrop": PAPER_T5["dense+multicrop"]}.get(label)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {paper(ref)} |")
    return "\n".join(lines + [""] + table5_findings(nets, outputs, n))


def table5_findings(nets, outputs, n):
    """Per net, and pooled over the nets: does multi-crop beat dense, and both beat the
    better of the two alone (the paper: 24.6 and 24.4 against dense's 24.8)?"""
    lines, both_pairs, crop_pairs = [], [], []
    for run in nets:
        d, m, b = (errors(outputs.get((k, run.name)))
                   for k in ("dense", "multicrop", "dense+multicrop"))
        c = errors(outputs.get(("centre crop + flip, one scale", run.name)))
        if None in (d, m, b, c):
            lines.append(f"- {run.name}: {PENDING}.")
            continue
        out = {k: outputs[(k, run.name)] for k in ("dense", "multicrop", "dense+multicrop")}
        best = "dense" if d[0] <= m[0] else "multicrop"
        both_pairs.append((b[0] - min(d[0], m[0]),
                           *paired_test(out["dense+multicrop"], out[best])))
        crop_pairs.append((m[0] - d[0], *paired_test(out["multicrop"], out["dense"])))
        lines.append(f"- {run.name}: dense {d[0]:.1f}, multi-crop {m[0]:.1f}, both "
                     f"{b[0]:.1f}, centre crop + flip {c[0]:.1f}. Both beat the better "
                     f"alone ({best.replace('multicrop', 'multi-crop')}): "
                     + paired_verdict(out["dense+multicrop"], best.replace(
                         "multicrop", "multi-crop"), out[best])
                     + "; multi-crop beats dense: "
                     + paired_verdict(out["multicrop"], "dense", out["dense"]) + ".")
    lines.append(f"\nEach verdict pairs the two protocols on the same {n} images (an exact "
                 "McNemar test: only the images one gets right and the other wrong count), "
                 "so it is far more sensitive than the ±%.1f-point interval of one error "
                 "rate; p < 0.05 is called a difference." % binomial_half_width(30.0, n))
    if crop_pairs:
        lines += ["", "- " + runs_verdict("Multi-crop beats dense (all nets above)",
                                          crop_pairs, "nets"),
                  "- " + runs_verdict("Dense + multi-crop beats the better of the two "
                                      "alone (all nets above)", both_pairs, "nets")]
    return lines


def table6(res):
    """Fusion (Sec. 4.4, Table 6): the soft-max of two nets averaged, each at its
    multi-scale dense Q set. The paper fused D and E (24.0 against D's 24.8 top-1); here D
    and E of the same seed are fused, one pair per seed, each paired against its better
    member on the same images; the verdict is decided across seeds (`runs_verdict`)."""
    lines = ["| fused nets | dense, multi-scale: top-1 [95% CI] / top-5 | its better member "
             "| paired against it | paper (D + E) |", "|---|---|---|---|---|"]
    gains = []
    for seed in sorted({r.seed for r in res.study}):
        pair = [r for r in res.study if r.name in (f"D-s{seed}", f"E-s{seed}")]
        singles = [res.combined([r.name], [f"dense@{q}" for q in r.qs]) for r in pair]
        if len(pair) < 2:
            continue
        names = " + ".join(r.name for r in pair)
        if None in singles:
            lines.append(f"| {names} | {PENDING} | {PENDING} | {PENDING} | "
                         f"{paper(PAPER_T6['dense'])} |")
            continue
        out = evaluate.average([p for p, _ in singles]), singles[0][1]
        member = [errors(x)[0] for x in singles]
        best = int(np.argmin(member))
        only_fused, only_best, p = paired_test(out, singles[best])
        gains.append((errors(out)[0] - member[best], only_fused, only_best, p))
        lines.append(f"| {names} | {cell(errors(out))} | {member[best]:.1f} "
                     f"({pair[best].name}) | right only fused {only_fused}, only "
                     f"{pair[best].name} {only_best}: {p_text(p)} | "
                     f"{paper(PAPER_T6['dense'])} |")
    lines += ["", "Fusion picks no net by its val error here (the pairs are fixed in advance), "
              "so nothing is flattered by the choice; each fusion is paired with its better "
              "member on the same images (exact McNemar test)."]
    if gains:
        lines.append("\n- " + runs_verdict("Fusing D and E beats the better of the two",
                                           gains, "seeds"))
    return "\n".join(lines)
