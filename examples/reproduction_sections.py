"""The seed-level sections of docs/reproduction.md: the runs, Table 3 (depth, LRN, 1×1 vs
3×3), scale jittering, the warm start and the PyTorch twin, each with its verdicts.

Every function takes a `reproduction_stats.Results` and returns Markdown; a cell whose runs
are not finished says "pending". Nets are compared on their per-seed errors
(`reproduction_seeds`: Welch's t-test, a permutation test beside it, Holm's adjustment over
the depth family) and judged by the rules of the report's "Design" section; an exact
McNemar test on the seed-averaged soft-max adds the image-level view. The protocol tables
(4, 5, 6) are in examples/reproduction_protocols.py.
"""

import math

import numpy as np

from minivgg import models
from reproduce_tables import FIXED_QS, JITTER_QS, cpu_of, schedule_ended
from reproduction_seeds import (MARGIN, _stats, describe, holm, judge, p_text, seeds_text,
                               welch)
from reproduction_stats import (MIN_CUTS, PENDING, cut_epochs, interim, paired_test, paper,
                                table3_runs)

# The paper's numbers (paper.md, Sec. 4): top-1 / top-5 val error %, fixed S = 256.
PAPER_T3 = {"A": (29.6, 10.4), "A-LRN": (29.7, 10.5), "B": (28.7, 9.9), "C": (28.1, 9.4),
            "D": (27.0, 8.8), "E": (27.3, 9.0)}
PAPER_JITTER_D = "25.6 / 8.1 (S ∈ [256, 512], Q = 384; fixed S = 256: 27.0 / 8.8)"
SINGLE, MULTI = ["dense@72"], [f"dense@{q}" for q in FIXED_QS]

# Table 3's findings: (what, X, Y, null). X minus Y is tested; null: "X is no better".
FINDINGS = [
    ("LRN does not help (A-LRN vs A; the paper: 29.7 vs 29.6)", "A-LRN", "A", True),
    ("Depth helps: 13 layers beat 11 (B vs A; the paper: 28.7 vs 29.6)", "B", "A", False),
    ("1×1 convs help (C vs B; the paper: 28.1 vs 28.7)", "C", "B", False),
    ("3×3 beats 1×1 at equal depth (D vs C; the paper: 27.0 vs 28.1)", "D", "C", False),
    ("Depth helps: 16 layers beat 11 (D vs A; the paper: 27.0 vs 29.6)", "D", "A", False),
    ("Depth saturates at 19 layers: E no better than D (the paper: 27.3 vs 27.0)", "E", "D",
     True),
]
DEPTH_FAMILY = ("B", "C", "D")  # the directional depth findings, adjusted together (Holm)


def depth(arch):
    """Weight layers of a Table 1 column (A: 11 ... E: 19)."""
    return sum(models.parse_layer(s)[0] == "conv" for b in models.CONFIGS[arch] for s in b) + 3


def seed_errors(res, runs, keys, col=0):
    """Per-seed top-1 (col 0) or top-5 (col 1) % of the finished `runs` on protocol `keys`."""
    errs = [res.error([r.name], keys) for r in runs]
    return [e[col] for e in errs if e is not None]


# ----------------------------------------------------------------------------------------
# The runs
# ----------------------------------------------------------------------------------------

def runs_table(res):
    lines = ["| run | config | S | engine | epochs | lr cuts (after epoch) | ended by | last val "
             "top-1 (centre) | train+val time | load average (start of each invocation) | "
             "CPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in res.study:
        rows = res.rows.get(run.name) or []
        final, wall = res.final_val(run.name), res.wall_seconds(run.name)
        loads = ", ".join(str(t["load_start"]) for t in res.timing.get(run.name, [])) or "—"
        init = f"warm from {run.warm_from}" if run.warm_from else f"seed {run.seed}"
        ended = ("—" if not res.done[run.name] else "plateau" if schedule_ended(rows)
                 else f"cap ({len(rows)})")
        lines.append(f"| {run.name} | {run.arch}, {init} | "
                     f"{'64..128' if run.jitter else '72'} | {run.engine} | {len(rows)} | "
                     f"{cuts_text(rows)} | {ended} | "
                     f"{PENDING if final is None else f'{final:.1f}'} | "
                     f"{'—' if not wall else f'{wall / 60:.0f} min'} | {loads} | "
                     f"{cpus(res.timing.get(run.name, []))} |")
    short = [r.name for r in res.study if res.done[r.name] and not res.counts[r.name]]
    done = sum(res.done.values())
    note = (f"\n\n**Runs with fewer than {MIN_CUTS} lr cuts** do not count as trained to the "
            f"plateau and are left out of every table below (to be continued with a cap "
            f"higher than {res.epochs}): {', '.join(short)}." if short else
            f"\n\nEvery finished run ({done}) was trained through at least {MIN_CUTS} lr "
            f"cuts." if done else "")
    return "\n".join(lines) + note + (
        "\n\nThe CPU column names the machine of each invocation; — is an invocation from "
        "before the timing kept it (those ran on the 2-core AMD EPYC: see the design's "
        "second amendment). The numbers do not depend on the machine, the times do.")


def cuts_text(rows):
    """"3 (after 30, 41, 50)": the lr cuts and the last epoch before each."""
    if not rows:
        return "—"
    epochs = cut_epochs(rows)
    return f"{len(epochs)} (after {', '.join(map(str, epochs))})" if epochs else "0"


def cpus(timing):
    """The distinct CPUs of a run's invocations, in order, shortly named."""
    names = []
    for part in timing:
        model, _, amx = cpu_of(part)
        model = model.replace("(R)", "").replace("(TM)", "").replace(" Processor", "")
        name = model + (" (AMX)" if amx else "")
        if name not in names:
            names.append(name)
    return ", ".join(names) or "—"


# ----------------------------------------------------------------------------------------
# Table 3: depth, LRN, 1×1 vs 3×3
# ----------------------------------------------------------------------------------------

def table3(res):
    lines = ["| ConvNet | weight layers | dense, Q = 72: top-1, mean ± 95% CI (per seed) | "
             "top-5 | dense, Q ∈ {64, 72, 80}: top-1 | centre crop: top-1 | training top-1 "
             "at the last epoch | paper (S = 256) |", "|---|---|---|---|---|---|---|---|"]
    for arch in ("A", "A-LRN", "B", "C", "D", "E"):
        runs = table3_runs(res, arch)
        single = seed_errors(res, runs, SINGLE)
        if not single:
            lines.append(f"| {arch} | {depth(arch)} | {PENDING} | | | | | "
                         f"{paper(PAPER_T3[arch])} |")
            continue
        top5 = np.mean(seed_errors(res, runs, SINGLE, col=1))
        multi = seeds_text(seed_errors(res, runs, MULTI)).split(" (")[0]
        centre = seeds_text(seed_errors(res, runs, ["center@72"])).split(" (")[0]
        train = np.mean([100 * float(res.rows[r.name][-1]["train_top1_err"])
                         for r in runs if res.counts[r.name]])
        lines.append(f"| {arch} | {depth(arch)} | {seeds_text(single)} | {top5:.1f} | "
                     f"{multi} | {centre} | {train:.1f} | {paper(PAPER_T3[arch])} |")
    return "\n".join(lines) + (
        "\n\nTop-1 / top-5 error % on the 3,925 val images at each run's last epoch; "
        "mean ± the half-width of the 95% Student-t interval over seeds, each seed in "
        "brackets. The training error is measured on the augmented crops during the last "
        "epoch (dropout on), so it is an upper bound of the fit. At Q = 72 the dense score "
        "map is 1×1, so dense evaluation here is the centre crop + flip (Table 5's note).")


def table3_findings(res):
    """One line per finding: the test, the verdict, and the image-level view."""
    compared = {}
    for what, x, y, null in FINDINGS:
        compared[(x, y)] = welch(seed_errors(res, table3_runs(res, x), SINGLE),
                                 seed_errors(res, table3_runs(res, y), SINGLE))
    family = [(x, y) for _, x, y, null in FINDINGS if not null and x in DEPTH_FAMILY]
    ready = [k for k in family if compared[k] is not None]
    adjusted = dict(zip(ready, holm([compared[k].p for k in ready])))
    lines = []
    for what, x, y, null in FINDINGS:
        c = compared[(x, y)]
        if c is None:
            lines.append(f"- {what}: {PENDING} (two seeds of each needed).")
            continue
        planned = min(len(table3_runs(res, x)), len(table3_runs(res, y)))
        mark = (f"*interim, {len(c.x)} and {len(c.y)} seeds*, "
                if min(len(c.x), len(c.y)) < planned else "")
        lines.append(f"- {what}: **{judge(c, null)}** ({mark}{x} − {y}: "
                     f"{describe(c, adjusted.get((x, y)))}; {image_level(res, x, y)}).")
    return "\n".join(lines) + (
        f"\n\nVerdict rules (Design): a claimed improvement is *reproduced* at Welch p < "
        f"0.05 in the paper's direction, *contradicted* at p < 0.05 the other way, else "
        f"*undecided*; a claimed absence of improvement is *contradicted* when the net is "
        f"better at p < 0.05, *reproduced* when the 95% interval also rules out a gain above "
        f"{MARGIN:.0f} points, else undecided. Holm's adjustment covers the four "
        f"directional findings (B − A, C − B, D − C, D − A), not the two claims of no "
        f"gain (LRN, E − D); the verdicts use the unadjusted p, as designed. With two "
        f"seeds of A-LRN, or three a side with seeds a point or two apart, the 95% "
        f"interval is about ±2-4 points, as wide as the {MARGIN:.0f}-point margin or "
        f"wider: a claim of no gain reads *reproduced* only if the net also comes out "
        f"worse on average (by up to {MARGIN:.0f} points), so those two will most likely "
        f"stay undecided.") + fit_note(res)


def image_level(res, x, y):
    """Exact McNemar test of the seed-averaged nets x and y on the same val images."""
    # NOTE: the same seeds on both sides: an average of 3 seeds beats one of 2 by
    # averaging alone, whichever net it is
    have = {arch: {r.seed: r.name for r in table3_runs(res, arch) if res.parts.get(r.name)}
            for arch in (x, y)}
    seeds = sorted(set(have[x]) & set(have[y]))
    if not seeds:
        return "image level pending"
    a = res.combined([have[x][s] for s in seeds], SINGLE)
    b = res.combined([have[y][s] for s in seeds], SINGLE)
    only_x, only_y, p = paired_test(a, b)
    return (f"soft-max averaged over seeds {', '.join(map(str, seeds))} of each: right only "
            f"with {x} on {only_x} images, only with "
            f"{y} on {only_y}, McNemar {p_text(p)}")


def fit_note(res):
    """Where the deeper nets stand in *training* error at the end, against A (behind in
    training error too means they did not fit: underfit), and when each net's lr was first
    cut (a cut early in the run leaves fewer steps at the large rate)."""
    train, first = {}, {}
    for arch in "ABCDE":
        runs = [r for r in table3_runs(res, arch) if res.counts[r.name]]
        if runs:
            train[arch] = np.mean([100 * float(res.rows[r.name][-1]["train_top1_err"])
                                   for r in runs])
            first[arch] = [cut_epochs(res.rows[r.name])[0] for r in runs]
    if "A" not in train or len(train) < 2:
        return ""
    cells = ", ".join(f"{a} {v:.1f}%" for a, v in train.items())
    cuts = "; ".join(f"{a} {', '.join(map(str, e))}" for a, e in first.items())
    return (f"\n\nTraining top-1 error at the last epoch (seed means): {cells}. The first lr "
            f"cut came after epoch (per seed) {cuts}. Two things here can weigh against "
            "the deeper nets and are not depth itself. (1) The plateau rule cuts the lr "
            "when the val error stalls for a few epochs, and a noisy val curve can stall "
            "early: a net cut early spends fewer epochs at lr 0.01 and can end behind in "
            "training error as well. (2) At 64-pixel crops block 4 works on 8×8 maps and "
            "block 5 on 4×4, where 31% of a 3×3 filter's taps read the zero border "
            "(Design): the layers that B..E add see less image than at 224. (2) bears on "
            "depth but not on D against C, which have the same depth.") + first_cut_note(res)


# ----------------------------------------------------------------------------------------
# Scale jittering, the warm start, the PyTorch twin
# ----------------------------------------------------------------------------------------

def jitter_table(res):
    """Sec. 3.1/4.1: D trained at fixed S = 72 against D trained with S jittered over
    [64, 128], each tested at its own scale(s)."""
    fixed = table3_runs(res, "D")
    jit = [r for r in res.study if r.jitter]
    rows = [("D, S = 72", fixed, "72", SINGLE), ("D, S = 72", fixed, "64, 72, 80", MULTI),
            ("D, S = 72", fixed, "64, 96, 128", [f"dense@{q}" for q in JITTER_QS]),
            ("D, S ∈ [64, 128]", jit, "96", ["dense@96"]),
            ("D, S ∈ [64, 128]", jit, "64, 72, 80", MULTI),
            ("D, S ∈ [64, 128]", jit, "64, 96, 128", [f"dense@{q}" for q in JITTER_QS])]
    lines = ["| net | test Q (dense) | top-1, mean ± 95% CI (per seed) |", "|---|---|---|"]
    for net, runs, q, keys in rows:
        errs = seed_errors(res, runs, keys)
        lines.append(f"| {net} | {q} | {seeds_text(errs) if errs else PENDING} |")
    lines += ["", f"Paper: D at {PAPER_JITTER_D}.", ""]
    for label, jk, fk in (("single scale, each at its own Q", ["dense@96"], SINGLE),
                          ("three scales, each at its own Q set",
                           [f"dense@{q}" for q in JITTER_QS], MULTI)):
        c = welch(seed_errors(res, jit, jk), seed_errors(res, fixed, fk))
        what = f"- Scale jittering beats fixed S ({label})"
        mark = "" if c is None else interim(min(len(c.x), len(c.y)),
                                            min(len(jit), len(fixed)), "seeds")
        lines.append(f"{what}: {PENDING}." if c is None else
                     f"{what}: **{judge(c)}** ({mark}jittered − fixed: {describe(c)}).")
    three_scales = c  # the loop's last comparison: the note reads the three-scale verdict
    return "\n".join(lines) + jitter_note(res, jit, fixed, three_scales)


def fit_gap(res, runs):
    """(training top-1 %, val top-1 %) at the last epoch, means over the counted runs, from
    metrics.csv (training error on the run's own augmented crops); None if none counts."""
    last = [res.rows[r.name][-1] for r in runs if res.counts.get(r.name) and res.rows[r.name]]
    if not last:
        return None
    return tuple(100 * float(np.mean([float(row[k]) for row in last]))
                 for k in ("train_top1_err", "val_top1_err"))


def jitter_note(res, jit, fixed, c):
    """What the training curves add to the jittering verdict (`c`: the three-scale
    comparison, jittered minus fixed, or None while pending): how far each net fits its
    training crops better than the val images. Sec. 3.1 uses
    jittering as augmentation, which pays where a net over-fits; when the jittered net comes
    out behind, the note says what about the small scale could explain it."""
    fit, jitted = fit_gap(res, fixed), fit_gap(res, jit)
    if fit is None or jitted is None:
        return ""
    text = (f"\n\nAt the last epoch (seed means; val: centre crop at each net's own Q): "
            f"D at fixed S has "
            f"{fit[0]:.1f}% training top-1 error on its crops and {fit[1]:.1f}% val, a gap of "
            f"{fit[1] - fit[0]:+.1f} points; D with jittered S {jitted[0]:.1f}% and "
            f"{jitted[1]:.1f}%, a gap of {jitted[1] - jitted[0]:+.1f} (its crops, taken "
            "from images up to 128 pixels, are harder to fit).")
    if c is None or c.diff <= 0:
        return text
    why = []
    if jitted[1] - jitted[0] < fit[1] - fit[0]:
        why.append("Jittering is augmentation (Sec. 3.1): it pays where a net over-fits, and "
                   "a net of a quarter of the paper's width that over-fits less with it can "
                   "lose more in fitting than it gains in generalising.")
    why += ["The paper fine-tuned its jittered net from the S = 384 net; here it is trained "
            "from scratch on the fixed-S nets' schedule, so it must learn every scale in as "
            "many epochs.",
            "A 64-pixel crop of a 128-pixel image holds a quarter of it, in a twelfth of the "
            "pixels that a 224-pixel crop of a 512-pixel image keeps at the same ratio, so "
            "small objects are left a few pixels wide."]
    return text + (" Where the jittered net is behind, these things about the small scale "
                   "can explain it: " + " ".join(f"({i}) {w}" for i, w in enumerate(why, 1)))


def warm_table(res):
    """Sec. 3.1's warm start (7 of D's 16 layers copied from a trained A) against Glorot's
    initialisation on D. The paper found Glorot's as good: a null finding."""
    glorot = table3_runs(res, "D")
    warm = [r for r in res.study if r.warm_from]
    lines = ["| D initialised by | seeds | dense Q = 72: top-1, mean ± 95% CI (per seed) | "
             "epochs (mean) |", "|---|---|---|---|"]
    for label, runs in (("Glorot", glorot), ("warm start from A (Sec. 3.1)", warm)):
        errs = seed_errors(res, runs, SINGLE)
        epochs = [len(res.rows[r.name]) for r in runs if res.counts[r.name]]
        lines.append(f"| {label} | {len(errs)} | {seeds_text(errs) if errs else PENDING} | "
                     f"{f'{np.mean(epochs):.1f}' if epochs else PENDING} |")
    c = welch(seed_errors(res, warm, SINGLE), seed_errors(res, glorot, SINGLE))
    what = "- Glorot's initialisation needs no warm start (warm-started D no better)"
    lines += ["", "The paper gives no number: it warm-started its deeper nets from A, then "
              "found Glorot's initialisation trains them as well. NOTE: the copied layers "
              "have had A's whole training already, so the warm-started net has seen more "
              "steps than the Glorot runs.", "",
              f"{what}: {PENDING}." if c is None else
              f"{what}: **{judge(c, null=True)}** ("
              f"{interim(min(len(c.x), len(c.y)), min(len(warm), len(glorot)), 'seeds')}"
              f"warm − Glorot: {describe(c)})."]
    return "\n".join(lines)


def twin_table(res):
    """minivgg's A against PyTorch's (the twin shares the data pipeline and schedule): the
    last epoch's centre-crop val error, per seed (the twin keeps no soft-max outputs)."""
    groups = {"minivgg": table3_runs(res, "A"),
              "torch": [r for r in res.study if r.engine == "torch"]}
    lines = ["| engine | seeds | last val top-1 (centre), mean ± 95% CI (per seed) | epochs "
             "| train+val time per run |", "|---|---|---|---|---|"]
    finals = {}
    for engine, runs in groups.items():
        done = [r for r in runs if res.final_val(r.name) is not None]
        finals[engine] = [res.final_val(r.name) for r in done]
        epochs = ", ".join(str(len(res.rows[r.name])) for r in done) or PENDING
        wall = [res.wall_seconds(r.name) / 60 for r in done]
        lines.append(f"| {engine} | {len(done)} | "
                     f"{seeds_text(finals[engine]) if done else PENDING} | {epochs} | "
                     f"{f'{np.mean(wall):.0f} min' if wall else PENDING} |")
    c = welch(finals["minivgg"], finals["torch"])
    if c is None:
        return "\n".join(lines + ["", f"- minivgg's A against PyTorch's: {PENDING}."])
    word = ("the same within the noise" if c.p >= 0.05 and max(-c.low, c.high) <= MARGIN
            else "different" if c.p < 0.05 else "undecided (the interval is too wide)")
    mark = interim(sum(map(len, finals.values())), sum(map(len, groups.values())), "runs")
    return "\n".join(lines + ["", f"- minivgg's A against PyTorch's: **{word}** ({mark}minivgg − "
                              f"torch: {describe(c)}; 'the same' needs p ≥ 0.05 and the "
                              f"interval inside ±{MARGIN:.0f} points)."])


def first_cut_pairs(res):
    """{net: [(epoch of the first lr cut, dense top-1 %)]} over the counted runs of A..E."""
    by_net = {}
    for arch in "ABCDE":
        for r in table3_runs(res, arch):
            err = res.error([r.name], SINGLE)
            if res.counts[r.name] and err is not None:
                by_net.setdefault(arch, []).append((cut_epochs(res.rows[r.name])[0], err[0]))
    return by_net


def within_net(by_net):
    """(the nets with 2 or more runs as arrays of (x, y) rows, x and y less their net's
    mean): what a correlation within nets is computed from."""
    groups = [np.array(ps, dtype=float) for ps in by_net.values() if len(ps) >= 2]
    if not groups:
        return groups, np.zeros(0), np.zeros(0)
    return (groups, np.concatenate([g[:, 0] - g[:, 0].mean() for g in groups]),
            np.concatenate([g[:, 1] - g[:, 1].mean() for g in groups]))


def first_cut_note(res):
    """Post hoc (not in the design): does the epoch of a run's first lr cut (Sec. 3.1: lr
    ÷10 when the val error stops improving) predict its dense error? Spearman over every
    counted run of A..E, then a partial correlation within nets (each net's seed mean taken
    off both the epoch and the error), which depth cannot explain, with its slope in points
    per 10 epochs."""
    by_net = first_cut_pairs(res)
    pairs = [p for ps in by_net.values() for p in ps]
    groups, res_x, res_y = within_net(by_net)
    n, k = len(res_x), len(groups)
    if len(pairs) < 6 or n - k - 1 < 3:
        return ""
    if min(res_x @ res_x, res_y @ res_y) == 0:  # every seed of a net cut alike: no relation
        return ""
    stats = _stats()
    rho, p = stats.spearmanr(*zip(*pairs))
    r = float(res_x @ res_y / math.sqrt((res_x @ res_x) * (res_y @ res_y)))
    df = n - k - 1  # k net means taken off: k - 1 more parameters than a plain correlation
    p_within = 2 * stats.t.sf(abs(r) * math.sqrt(df / (1 - r * r)), df)
    slope = 10 * float(res_x @ res_y / (res_x @ res_x))
    noise = np.median([val_noise(res.rows[r.name]) for a in by_net for r in table3_runs(res, a)
                       if res.counts[r.name]])
    later = "lower" if rho < 0 else "higher"
    text = (f"\n\n*Post hoc (not in the design): the epoch of the first lr cut and the "
            f"error.* Over the {len(pairs)} runs of A..E, the later a run's lr was first cut, "
            f"the {later} its dense error: Spearman ρ = {rho:+.2f} ({p_text(p)}). Within "
            f"nets (each net's seed mean taken off both, so depth cannot explain it; {n} runs "
            f"of {k} nets): partial r = {r:+.2f} ({p_text(p_within)}, {df} degrees of "
            f"freedom), {slope:+.1f} points of error for a first cut 10 epochs later. The "
            f"plateau rule (patience 2) reacts to the val error's epoch-to-epoch noise: at lr "
            f"0.01 it moves by {noise:.1f} points from one epoch to the next (the median over "
            f"runs of each run's median).")
    if p_within < 0.05 and r < 0:
        text += (" At this scale the schedule itself is a large part of the seed spread that "
                 "keeps the depth verdicts undecided; a fixed schedule (the cuts at set "
                 "epochs), a longer patience or a smoothed val error would be the next "
                 "design's remedy.")
    return text


def val_noise(rows):
    """Median |change| of the val top-1 error (points) between epochs at the first lr."""
    lr = float(rows[0]["lr"])
    first = [100 * float(r["val_top1_err"]) for r in rows if float(r["lr"]) == lr]
    return float(np.median(np.abs(np.diff(first)))) if len(first) > 1 else float("nan")
