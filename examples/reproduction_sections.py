"""The sections of docs/reproduction.md: one function per table, each with its findings.

Every function takes a `reproduction_stats.Results` and returns Markdown; a cell whose run
is not finished says "pending". The findings are one plain sentence each, worded by
`reproduction_stats.verdict` and `paired_verdict`. Assembled, with the plots, by
examples/reproduction_report.py.
"""

import numpy as np

from minivgg import evaluate, models
from reproduce_tables import FIXED_QS, JITTER_QS
from reproduction_stats import (
    LAST_EPOCHS, PENDING, binomial_half_width, cell, diff_of, errors, late_val, mean_error,
    noise_floor, p_text, paired_test, paired_verdict, seed_noise, sign_test, table3_runs,
    verdict)

# The paper's numbers (paper.md, Sec. 4): top-1 / top-5 val error %, fixed S = 256.
PAPER_T3 = {"A": (29.6, 10.4), "A-LRN": (29.7, 10.5), "B": (28.7, 9.9), "C": (28.1, 9.4),
            "D": (27.0, 8.8), "E": (27.3, 9.0)}
PAPER_JITTER_D = (25.6, 8.1)       # Table 3, D at S in [256; 512], Q = 384
PAPER_T4_D = (24.8, 7.5)           # Table 4, D jittered, Q in {256, 384, 512}
PAPER_T5 = {"dense": (24.8, 7.5), "multicrop": (24.6, 7.5), "dense+multicrop": (24.4, 7.2)}
PAPER_T6 = {"dense": (24.0, 7.1), "dense+multicrop": (23.7, 6.8)}  # fusion of D and E


# ----------------------------------------------------------------------------------------
# Shared by the tables
# ----------------------------------------------------------------------------------------

def paper(pair):
    return f"{pair[0]} / {pair[1]}" if pair else "—"


def depth(arch):
    """Weight layers of a Table 1 column (A: 11 ... E: 19)."""
    return sum(models.parse_layer(s)[0] == "conv" for b in models.CONFIGS[arch] for s in b) + 3


# ----------------------------------------------------------------------------------------
# The runs
# ----------------------------------------------------------------------------------------

def runs_table(res):
    lines = ["| run | config | S | engine | epochs | last val top-1 (centre) | train+val "
             "time | load average (start of each invocation) |", "|---|---|---|---|---|---|"
             "---|---|"]
    for run in res.study:
        rows = res.rows.get(run.name) or []
        final = res.final_val(run.name)
        wall = res.wall_seconds(run.name)
        loads = ", ".join(str(t["load_start"]) for t in res.timing.get(run.name, [])) or "—"
        s = "64..128" if run.jitter else "72"
        init = f"warm from {run.warm_from}" if run.warm_from else f"seed {run.seed}"
        lines.append(f"| {run.name} | {run.arch}, {init} | {s} | {run.engine} | "
                     f"{len(rows)}/{res.epochs} | "
                     f"{PENDING if final is None else f'{final:.1f}'} | "
                     f"{'—' if not wall else f'{wall / 60:.0f} min'} | {loads} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Table 3: depth, LRN, 1×1 vs 3×3; and why the deeper nets trail
# ----------------------------------------------------------------------------------------

def table3(res):
    lines = ["| ConvNet | weight layers | seeds | dense, Q = 72: top-1 [95% CI] / top-5 | "
             "per seed top-1 | centre crop / + flip top-1 | centre crop, mean of the last "
             f"{LAST_EPOCHS} epochs | paper (S = 256) |",
             "|---|---|---|---|---|---|---|---|"]
    for arch in ("A", "A-LRN", "B", "C", "D", "E"):
        runs = table3_runs(res, arch)
        mean, errs = mean_error(res, runs, ["dense@72"])
        seeds = ", ".join(f"{e[0]:.1f}" for e in errs) or PENDING
        centre = [mean_error(res, runs, [k])[0] for k in ("center@72", "center-flip@72")]
        centre = (" / ".join(f"{c[0]:.1f}" for c in centre) if None not in centre
                  else PENDING)  # seed means, as the dense column
        recent = [late_val(res, r.name) for r in runs if res.done[r.name]]
        recent = (f"{np.mean(recent):.1f}" if recent else PENDING)
        lines.append(f"| {arch} | {depth(arch)} | {len(errs)} | {cell(mean)} | {seeds} | "
                     f"{centre} | {recent} | {paper(PAPER_T3[arch])} |")
    done = [n for n, ok in res.done.items() if ok and res.rows.get(n)]
    cut = sorted(n for n in done if len({r["lr"] for r in res.rows[n]}) > 1)
    lr_note = (f"the lr was cut in {', '.join(cut)}" if cut else
               "no finished run reached a plateau, so the lr stayed at its first value")
    return "\n".join(lines) + (
        f"\n\nThe val error swings from epoch to epoch at this budget ({lr_note}), so the "
        f"last epoch is one draw from a noisy trajectory; the mean of the last "
        f"{LAST_EPOCHS} epochs' centre-crop error (no model selection: every one of those "
        f"epochs counts) shows where each net stands with less of that noise.")


def table3_findings(res):
    noise = seed_noise(res)
    e = {arch: mean_error(res, table3_runs(res, arch), ["dense@72"])[0]
         for arch in models.CONFIGS}
    lines = [
        verdict(diff_of(e["A-LRN"], e["A"]), noise, expect_negative=False,
                what="LRN does not help (A-LRN vs A; the paper: no gain, 29.7 vs 29.6)",
                null_finding=True),
        verdict(diff_of(e["D"], e["A"]), noise, what="Depth helps (D vs A)"),
        verdict(diff_of(e["B"], e["A"]), noise, what="Depth helps (B vs A)"),
        verdict(diff_of(e["C"], e["B"]), noise, what="1×1 convs help (C vs B)"),
        verdict(diff_of(e["D"], e["C"]), noise, what="3×3 beats 1×1 (D vs C)"),
        saturation_verdict(e, noise),
    ]
    return "\n".join(f"- {line}" for line in lines) + depth_explanation(res)


def saturation_verdict(e, noise):
    """The paper's E vs D finding is a *saturation*: 19 layers no better than 16 (Sec. 4.1,
    Table 3: E 27.3 vs D 27.0 top-1 at S = 256), so 'reproduced' means a difference within
    noise."""
    what = "Depth saturates at 19 layers (E vs D; the paper: E 27.3 vs D 27.0 at S = 256)"
    diff = diff_of(e["E"], e["D"])
    if diff is None:
        return f"{what}: {PENDING}."
    floor, source = noise_floor(noise)
    word = "consistent (within noise)" if abs(diff) <= floor else "not reproduced"
    why = ("E is better, so depth has not saturated at D's 16 layers here" if diff < -floor
           else "E is worse" if diff > floor
           else "E does not pull ahead of D; but with noise this wide the check has "
           "little power")
    below_a = [k for k in ("D", "E") if e["A"] is not None and e[k][0] - e["A"][0] > floor]
    if len(below_a) == 2:
        why += ("; but both trail the 11-layer A, so at this budget there is no gain from "
                "depth for E to saturate")
    return (f"{what}: **{word}** ({why}; difference {diff:+.1f} top-1 points; noise taken "
            f"as {floor:.1f} points, {source}).")


def depth_explanation(res):
    """Where the deeper nets stand against A, from their last epoch's training error:
    behind in training error too means they underfit (have not finished learning); level in
    training error but behind on val means they overfit. A gap counts only beyond the same
    noise floor as the verdicts above."""
    last = {}
    for arch in ("A", "B", "C", "D", "E"):
        rows = [res.rows[r.name][-1] for r in table3_runs(res, arch) if res.done[r.name]]
        if rows:
            last[arch] = (100 * np.mean([float(r["train_top1_err"]) for r in rows]),
                          100 * np.mean([float(r["val_top1_err"]) for r in rows]))
    if "A" not in last:
        return ""
    floor, _ = noise_floor(seed_noise(res))
    behind = [a for a in ("B", "C", "D", "E") if a in last and last[a][1] > last["A"][1]]
    if not behind:
        return ""
    cells = ", ".join(f"{a} {last[a][0]:.1f}% train / {last[a][1]:.1f}% val" for a in
                      ["A"] + behind)
    under = all(last[a][0] > last["A"][0] for a in behind)
    fit = ("they are behind in *training* error too, so they **underfit**: they have not "
           "finished learning, rather than learned something worse" if under else
           "their training error is no worse, so they **overfit** the 9,469 images")
    beyond = [a for a in behind if last[a][1] - last["A"][1] > floor]
    size = (f"{', '.join(beyond)} trail{'s' if len(beyond) == 1 else ''} A by more than "
            f"the noise ({floor:.1f} points)" if beyond else
            f"none trails A by more than the noise ({floor:.1f} points), so this budget "
            f"cannot tell whether depth helps")
    return (f"\n\nWhere the deeper nets stand at the last epoch (centre crop, top-1 error, "
            f"seed means): {cells}. Of those behind A on val, {fit}; {size}. Twelve epochs "
            "of 148 steps at lr 0.01 from Glorot's initialisation are far from the paper's "
            "74 epochs (370K iterations, lr cut 3 times) on 1000 classes, and Sec. 3.1 "
            "warm-started its deep nets from A because a poor initialisation can stall "
            "learning in deep nets (later finding Glorot's enough); at 64-pixel crops the "
            "last blocks also work on 4×4 and 2×2 maps. So this budget measures how fast "
            "each depth learns, not how well it ends." + warm_depth_note(res, floor))


def warm_depth_note(res, floor):
    """What the warm-started D says about depth: given A's start, does D pass A?"""
    warm = [r for r in res.study if r.warm_from and res.done[r.name]]
    a = mean_error(res, table3_runs(res, "A"), ["dense@72"])[0]
    w = mean_error(res, warm, ["dense@72"])[0]
    if a is None or w is None:
        return " The warm start from A (Dwarm-s0) and more epochs are the tests of the claim."
    diff = w[0] - a[0]
    where = ("passes A" if diff < -floor else "trails A" if diff > floor else
             "is level with A, within noise")
    then = ("so with A's start the deeper net does gain, as the paper reports" if diff < -floor
            else "so 16 layers still show no gain over 11 at this budget")
    parent = res.error([warm[0].warm_from], ["dense@72"])
    return (f" Warm-started from {warm[0].warm_from} (Sec. 3.1), D ends at {w[0]:.1f}% dense "
            f"top-1 error against A's {a[0]:.1f}% (seed mean; its own parent "
            f"{warm[0].warm_from}: {parent[0]:.1f}%) and Glorot D's "
            f"{mean_error(res, table3_runs(res, 'D'), ['dense@72'])[0][0]:.1f}%: given A's "
            f"start it {where} ({diff:+.1f} points), {then}; more epochs and seeds are what "
            "a firmer test of the paper's depth claim needs.")


# ----------------------------------------------------------------------------------------
# Scale jittering; Table 4: multi-scale testing
# ----------------------------------------------------------------------------------------

def jitter_table(res):
    """Sec. 3.1/4.1: D trained at fixed S against D trained with S jittered, each tested
    at its own scales. Every fixed-S seed gets its rows (at this budget D's seeds differ
    by far more than any protocol does); the verdicts use the fixed-S seed mean, as
    Table 3 does."""
    fixed = table3_runs(res, "D")
    jit = [r.name for r in res.study if r.jitter]
    fixed_sets = (("72", ["dense@72"], "27.0 / 8.8 (S = 256, Q = 256)"),
                  ("64, 72, 80", [f"dense@{q}" for q in FIXED_QS], "—"),
                  ("64, 96, 128", [f"dense@{q}" for q in JITTER_QS], "—"))
    rows = [(f"D, S = 72, seed {r.seed}", [r.name], q, keys, ref)
            for r in fixed for q, keys, ref in fixed_sets]
    rows += [("D, S ∈ [64, 128]", jit, "96", ["dense@96"], paper(PAPER_JITTER_D)
              + " (Q = 384)"),
             ("D, S ∈ [64, 128]", jit, "64, 72, 80", [f"dense@{q}" for q in FIXED_QS], "—"),
             ("D, S ∈ [64, 128]", jit, "64, 96, 128", [f"dense@{q}" for q in JITTER_QS],
              paper(PAPER_T4_D) + " (Q ∈ {256, 384, 512})")]
    lines = ["| net | test Q (dense) | top-1 [95% CI] / top-5 | paper |", "|---|---|---|---|"]
    for net, names, q, keys, ref in rows:
        err = res.error(names, keys) if names else None
        lines.append(f"| {net} | {q} | {cell(err)} | {ref} |")
    noise = seed_noise(res)
    single = diff_of(res.error(jit, ["dense@96"]) if jit else None,
                     mean_error(res, fixed, ["dense@72"])[0])
    multi = diff_of(res.error(jit, [f"dense@{q}" for q in JITTER_QS]) if jit else None,
                    mean_error(res, fixed, [f"dense@{q}" for q in FIXED_QS])[0])
    seeds = f"fixed S: mean of its {len(fixed)} seed(s)"
    what = "Scale jittering beats fixed S ({}, each at its own {}; " + seeds + ")"
    lines += ["", "- " + verdict(single, noise, what=what.format("single scale", "Q")),
              "- " + verdict(multi, noise, what=what.format("multi-scale", "Q set"))]
    return "\n".join(lines) + jitter_explanation(res, fixed, jit)


def jitter_explanation(res, fixed, jit):
    """Why the jittered net can lag at this budget, from the runs' own training curves."""
    done = [r.name for r in fixed if res.done[r.name]]
    if not jit or not res.done[jit[0]] or not done:
        return ""

    def train(name, at=-1):  # training top-1 error (%) at epoch index `at`
        return 100 * float(res.rows[name][at]["train_top1_err"])

    def first_half(name):
        return train(name, len(res.rows[name]) // 2 - 1)

    return (f"\n\nThe jittered net ends at {train(jit[0]):.1f}% training error on its own "
            f"crops (from {first_half(jit[0]):.1f}% at mid-run), fixed S at "
            f"{np.mean([train(n) for n in done]):.1f}% (seed mean): still learning, as every "
            "net here. Jittering is augmentation: a 64-pixel crop from an image rescaled to "
            "S = 128 shows half its side, so the task is harder and pays off, in the paper, "
            "after full training; the paper also fine-tuned its jittered nets from the "
            "fixed S = 384 net (Sec. 3.1), where this one starts from Glorot's "
            "initialisation with the same 12-epoch budget as the rest.")


def table4(res):
    lines = ["| run | single Q: top-1 / top-5 | multi-scale Q: top-1 [95% CI] / top-5 | "
             "change (top-1) | paired test |", "|---|---|---|---|---|"]
    changes, significant = [], 0
    by_config = {}  # one net per configuration: seeds of one net, or a net grown from
    for run in res.study:  # another (the warm start), are not independent trials
        if run.engine != "minivgg":
            continue
        single_out = res.combined([run.name], [f"dense@{run.q}"])
        multi_out = res.combined([run.name], [f"dense@{q}" for q in run.qs])
        single, multi = errors(single_out), errors(multi_out)
        change = diff_of(multi, single)
        if change is not None:
            changes.append(change)
            if not run.warm_from:
                by_config.setdefault((run.arch, bool(run.jitter)), change)
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
        k = len(by_config)  # the verdict counts each configuration once
        k_better = sum(c < 0 for c in by_config.values())
        p_better = sign_test(k_better, k)
        p_worse = sign_test(sum(c > 0 for c in by_config.values()), k)
        word = ("reproduced" if p_better < 0.05 else "not reproduced" if p_worse < 0.05
                else "within noise")
        lines.append(f"\n- Multi-scale testing helps: better on {better} of {n} nets, "
                     f"mean change {np.mean(changes):+.2f} top-1 points — **{word}** "
                     f"(one net per configuration, so that seeds and the warm-started net "
                     f"do not count twice: better on {k_better} of {k}, one-sided sign test "
                     f"{p_text(p_better)}"
                     + ("; at least 5 are needed for p < 0.05" if k < 5 else "")
                     + f"). Net by net, an exact McNemar test on the same val images "
                     f"(the last column) finds the gain significant (p < 0.05) on "
                     f"{significant} of {n}. The changes are small: at Q ∈ {{64, 72, 80}} "
                     f"the score map is 1×1, so each scale sees the whole image once, and "
                     f"the scales differ by only ±8 pixels.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Table 5: test protocols; Table 6: fusion; warm start; the PyTorch twin
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
    lines.append("")
    for run in nets:
        d, m, b = (errors(outputs.get((k, run.name)))
                   for k in ("dense", "multicrop", "dense+multicrop"))
        c = errors(outputs.get(("centre crop + flip, one scale", run.name)))
        if None in (d, m, b, c):
            lines.append(f"- {run.name}: {PENDING}.")
            continue
        out = {k: outputs[(k, run.name)] for k in ("dense", "multicrop", "dense+multicrop")}
        best = "dense" if d[0] <= m[0] else "multicrop"
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
    return "\n".join(lines)


def table6(res):
    """Fusion (Sec. 4.4, Table 6): soft-max averaged over nets, each at its multi-scale dense Q set.

    Rows fuse the best two and three nets by their own multi-scale dense error, and the
    paper's pair, D + E. Each is paired against its best member on the same images."""
    ranked = []
    for run in res.study:
        if run.engine == "minivgg":
            err = res.error([run.name], [f"dense@{q}" for q in run.qs])
            if err is not None:
                ranked.append((err[0], run))
    ranked.sort(key=lambda t: t[0])
    lines = ["| fused nets | dense, multi-scale: top-1 [95% CI] / top-5 | its best member "
             "| paired against it | paper (D + E) |", "|---|---|---|---|---|"]
    if len(ranked) < 2:
        lines.append(f"| {PENDING} | {PENDING} | {PENDING} | {PENDING} | "
                     f"{paper(PAPER_T6['dense'])} |")
        return "\n".join(lines)
    groups = [(f"best {k}", [r for _, r in ranked[:k]]) for k in (2, 3) if len(ranked) >= k]
    evaluated = [r for _, r in ranked]
    pair = [r for r in res.study if r.name in ("D-s0", "E-s0") and r in evaluated]
    if len(pair) == 2:
        groups.append(("the paper's pair", pair))
    findings = []
    for label, nets in groups:
        singles = [res.combined([r.name], [f"dense@{q}" for q in r.qs]) for r in nets]
        out = evaluate.average([p for p, _ in singles]), singles[0][1]
        err = errors(out)
        best_err, best = min(((e, r) for e, r in ranked if r in nets), key=lambda t: t[0])
        best_out = singles[nets.index(best)]
        only_fused, only_best, p = paired_test(out, best_out)
        names = " + ".join(r.name for r in nets)
        lines.append(f"| {names} ({label}) | {cell(err)} | {best_err:.1f} ({best.name}) "
                     f"| right only fused {only_fused}, only {best.name} {only_best}: "
                     f"{p_text(p)} | {paper(PAPER_T6['dense'])} |")
        findings.append(f"- Fusing {names} beats its best member ({best.name}): "
                        + paired_verdict(out, best.name, best_out)
                        + f"; {err[0] - best_err:+.1f} top-1 points.")
    lines += ["", "The paper fused its best two nets, D and E (24.0 against D's 24.8 "
              "top-1); here the best nets by their own multi-scale dense error are fused, "
              "and D + E as in the paper. NOTE: the 'best' nets are picked by their error on "
              "the same val images (Imagenette has no separate test set), which flatters "
              "their absolute errors a little; the comparison with the best member is fair, "
              "since that member is picked the same way. Each fusion is paired with its best "
              "member on the same images (exact McNemar test, p < 0.05 called a "
              "difference)."]
    return "\n".join(lines + [""] + findings)


def warm_table(res):
    """Sec. 3.1's warm start (7 of D's 16 layers copied from a trained A) against Glorot's
    initialisation on D. Every Glorot seed gets its row; the verdict uses their mean."""
    glorot = table3_runs(res, "D")
    warm = [r for r in res.study if r.warm_from]
    lines = ["| D initialised by | dense Q = 72: top-1 [95% CI] / top-5 | val top-1 (centre "
             f"crop) after epoch 1 / mean of the last {LAST_EPOCHS} / last |", "|---|---|---|"]
    rows = [(f"Glorot, seed {r.seed}", r) for r in glorot]
    rows += [(f"warm start from {r.warm_from} (Sec. 3.1), seed {r.seed}", r) for r in warm]
    for label, run in rows:
        err = res.error([run.name], ["dense@72"])
        curve = res.rows.get(run.name) if res.done[run.name] else None
        curve = (f"{100 * float(curve[0]['val_top1_err']):.1f} / "
                 f"{late_val(res, run.name):.1f} / "
                 f"{100 * float(curve[-1]['val_top1_err']):.1f}" if curve else PENDING)
        lines.append(f"| {label} | {cell(err)} | {curve} |")
    diff = diff_of(mean_error(res, glorot, ["dense@72"])[0],
                   mean_error(res, warm, ["dense@72"])[0])
    lines += ["", "The paper gives no number: it warm-started its deeper nets from A, then found "
              "Glorot's initialisation trains them as well without it. NOTE: the warm-started "
              "net's copied layers have had A's 12 epochs of training already, so it has seen "
              "more steps than the Glorot runs; a gain here is partly that extra training.", "",
              "- " + verdict(diff, seed_noise(res),
                             what=f"Glorot needs no warm start (Glorot, mean of its "
                                  f"{len(glorot)} seed(s), minus warm start; 'not "
                                  "reproduced' if the warm start wins beyond the noise)",
                             null_finding=True)]
    return "\n".join(lines)


def twin_table(res):
    pairs = [r for r in res.study if r.arch == "A" and not r.jitter and not r.warm_from]
    lines = ["| run | engine | val top-1 per epoch (centre crop, %) | last | wall time |",
             "|---|---|---|---|---|"]
    finals = {}
    for run in pairs:
        rows = res.rows.get(run.name) or []
        curve = ", ".join(f"{100 * float(r['val_top1_err']):.1f}" for r in rows) or PENDING
        final = res.final_val(run.name)
        finals[run.name] = final
        wall = res.wall_seconds(run.name)
        lines.append(f"| {run.name} | {run.engine} | {curve} | "
                     f"{PENDING if final is None else f'{final:.1f}'} | "
                     f"{PENDING if not wall else f'{wall / 60:.0f} min'} |")
    mine = [v for k, v in finals.items() if not k.startswith("torch") and v is not None]
    torch = [v for k, v in finals.items() if k.startswith("torch") and v is not None]
    if mine and torch:
        spread = max(mine) - min(mine) if len(mine) > 1 else None
        diff = float(np.mean(mine)) - torch[0]
        swing = epoch_swing(res, [r.name for r in pairs if res.final_val(r.name) is not None])
        if spread is None:
            word = (f"**undecided until A-s1 is done**: the last four epochs of these runs "
                    f"swing by up to {swing:.1f} points from one epoch to the next, so one "
                    f"last-epoch number per engine cannot separate {abs(diff):.1f} points "
                    f"from seed noise")
        else:
            word = ("**within seed noise**" if abs(diff) <= max(spread, 1.5)
                    else "**outside seed noise**")
        lines += ["", f"- minivgg A (mean of {len(mine)} seed(s)) minus the PyTorch twin: "
                      f"{diff:+.1f} top-1 points at the last epoch"
                      + (f"; seed spread {spread:.1f}" if spread is not None else "")
                      + f" — {word}. The two engines take the same steps from the same "
                      "weights (tests/test_torch_twin.py), so only their random draws "
                      "(initial weights, dropout masks) and float32 rounding differ."]
    else:
        lines += ["", f"- minivgg vs PyTorch twin: {PENDING}."]
    return "\n".join(lines)


def epoch_swing(res, names, last=4):
    """Largest change of val top-1 (points) between consecutive epochs among the last few."""
    swings = [0.0]
    for name in names:
        err = [100 * float(r["val_top1_err"]) for r in (res.rows.get(name) or [])][-last:]
        swings += [abs(b - a) for a, b in zip(err, err[1:])]
    return max(swings)
