"""docs/reproduction.md and its plots, from whatever runs of the study are finished.

Called by `examples/reproduce_tables.py` after every run (and by its --doc-only). Every
number is computed from the run records: metrics.csv (training curves, lr cuts, wall
time), timing.json (wall time and load of each invocation) and posteriors.npz (the val
soft-max outputs of each (method, Q)). A cell whose runs are not finished says "pending".

Errors are top-1 / top-5 on Imagenette's 3,925 val images (the multi-crop table: on the
evenly spaced subset). Nets are compared over seeds (Welch's t-test, a permutation test,
Holm's adjustment: training noise), protocols on the same images (exact McNemar tests:
test-sample noise); the "Design" section, written before the runs, fixes the rules.

In six modules, each importing those before it:

    reproduction_design.py     the design, written before the runs
    reproduction_seeds.py      seed-level statistics and the verdict rules
    reproduction_stats.py      reading the runs (`Results`); intervals, paired tests
    reproduction_sections.py   the runs, Table 3, jittering, warm start, the PyTorch twin
    reproduction_protocols.py  Tables 4, 5 and 6: test protocols on the same nets
    reproduction_report.py     the plots, the verdicts at a glance and the document:
                               write_report(args, study)

`Results`, `sign_test`, `paired_test` and `p_text` are importable from here as before.
"""

import os
import re
import time

import numpy as np

from minivgg import checkpoint, metrics, models
from minivgg.plots import import_pyplot, save_figure
from reproduce_tables import ROOT
from reproduction_design import design
from reproduction_protocols import protocol_output, protocol_rows, table4, table5, table6
from reproduction_seeds import p_text, t_interval
from reproduction_sections import (
    SINGLE, depth, first_cut_pairs, jitter_table, runs_table, seed_errors, table3,
    table3_findings, twin_table, warm_table, within_net)
from reproduction_stats import PENDING, Results, errors, paired_test, sign_test, table3_runs

__all__ = ["write_report", "Results", "sign_test", "paired_test", "p_text"]


# ----------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------

# Panels of the curves figure: (title, which runs it shows)
PANELS = (("A", "A"), ("A-LRN", "A-LRN"), ("B", "B"), ("C", "C"), ("D", "D"), ("E", "E"),
          ("D, S ∈ [64, 128]", "jitter"), ("D, warm from A", "warm"),
          ("A, PyTorch twin", "torch"))


def in_panel(run, panel):
    if panel == "jitter":
        return run.jitter
    if panel == "warm":
        return bool(run.warm_from)
    if panel == "torch":
        return run.engine == "torch"
    return run.arch == panel and run.engine == "minivgg" and not run.jitter \
        and not run.warm_from


def plot_curves(res, path):
    """Train (dashed) and val (solid) top-1 error per epoch of every run, one panel per
    net, one colour per seed; a ▼ marks each epoch after which the lr was cut."""
    plt = import_pyplot()
    fig, axes = plt.subplots(3, 3, figsize=(12, 10), sharex=True, sharey=True)
    for ax, (title, panel) in zip(axes.flat, PANELS):
        for run in (r for r in res.study if in_panel(r, panel)):
            rows = res.rows.get(run.name)
            if not rows:
                continue
            col = metrics.metric_columns(rows)
            colour = f"C{run.seed}"
            ax.plot(col["epoch"], 100 * np.array(col["train_top1_err"]), "--", lw=1,
                    color=colour)
            val = 100 * np.array(col["val_top1_err"])
            ax.plot(col["epoch"], val, "-", lw=1.3, color=colour, label=f"seed {run.seed}")
            lrs = np.array(col["lr"], dtype=float)
            cut = np.flatnonzero(lrs[1:] != lrs[:-1])  # last epoch at the old rate
            ax.plot(np.array(col["epoch"])[cut], val[cut], "v", color=colour, ms=6)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, PENDING, transform=ax.transAxes, ha="center", color="grey")
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    for ax in axes[:, 0]:
        ax.set_ylabel("top-1 error (%)")
    fig.suptitle("Training curves: val (solid, centre crop) and train (dashed) top-1 error; "
                 "▼ the last epoch before each lr cut", fontsize=11)
    fig.tight_layout()
    save_figure(fig, path)


def plot_depth(res, path):
    """Dense top-1 error (Q = 72) against depth: every seed, and the mean ± 95% t interval."""
    plt = import_pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arch in models.CONFIGS:
        # NOTE: A and A-LRN both have 11 weight layers, C and D 16: nudge one of each pair
        x = depth(arch) + (0.3 if arch in ("A-LRN", "C") else 0.0)
        errs = seed_errors(res, table3_runs(res, arch), SINGLE)
        if not errs:
            continue
        colour = "C1" if arch in ("A-LRN", "C") else "C0"
        ax.plot([x] * len(errs), errs, "o", color=colour, alpha=0.5, ms=4)
        mean, half = t_interval(errs)
        ax.errorbar(x + 0.12, mean, yerr=half or 0.0, fmt="s", color=colour, capsize=4)
        ax.annotate(arch, (x + 0.12, mean), textcoords="offset points", xytext=(7, -3),
                    fontsize=8)
    low, high = ax.get_ylim()  # two seeds give a wide t interval: keep the axis in 0..100
    ax.set_ylim(max(low, 0.0), min(high, 100.0))
    ax.set(xlabel="weight layers", ylabel="val top-1 error (%, dense, Q = 72)",
           title="Error vs depth (dots: seeds; squares: mean ± 95% t interval)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def plot_first_cut(res, path):
    """Dense top-1 error against the epoch of each run's first lr cut, one colour per net
    (the report's post-hoc note), with the within-net least-squares slope."""
    plt = import_pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_net = first_cut_pairs(res)
    for i, (arch, pairs) in enumerate(by_net.items()):
        x, y = np.array(pairs, dtype=float).T
        ax.plot(x, y, "o", color=f"C{i}", label=arch)
    groups, dx, dy = within_net(by_net)
    if groups and dx @ dx > 0:  # drawn through the mean of every run
        every = np.concatenate(groups)
        xs = np.array([every[:, 0].min(), every[:, 0].max()])
        ax.plot(xs, every[:, 1].mean() + (dx @ dy) / (dx @ dx) * (xs - every[:, 0].mean()),
                "k--", lw=1, label="within-net slope")
    ax.set(xlabel="epochs before the first lr cut", ylabel="val top-1 error (%, dense, Q = 72)",
           title="Error vs the first lr cut (post hoc; one dot per run)")
    ax.grid(alpha=0.3)
    if by_net:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_protocols(res, path):
    plt = import_pyplot()
    nets = [r for r in res.study if r.multicrop and res.parts.get(r.name)]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = [label for label, _ in protocol_rows(res, [], (0,), 0)]
    width = 0.8 / max(len(nets), 1)
    for j, run in enumerate(nets):
        values = []
        for label, keys in protocol_rows(res, [run.name], run.qs, run.q):
            err = errors(protocol_output(res, run, label, keys))
            values.append(np.nan if err is None else err[0])
        ax.bar(np.arange(len(labels)) + j * width, values, width, label=run.name)
    ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2)
    ax.set_xticklabels([label.replace(", ", ",\n") for label in labels], fontsize=7)
    ax.set(ylabel="val top-1 error (%)", title="Test protocols (Table 5), "
           f"{res.args.eval_limit} val images")
    ax.grid(alpha=0.3, axis="y")
    if nets:  # one row of labels above the bars, with head-room so it covers none
        ax.set_ylim(top=ax.get_ylim()[1] * 1.15)
        ax.legend(fontsize=8, ncol=len(nets), loc="upper center")
    fig.tight_layout()
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------

# (file name beside the report, caption, drawn by): its plots, in the order it shows them
PLOTS = (("reproduction_curves.png", "Training curves", plot_curves),
         ("reproduction_depth.png", "Error vs depth", plot_depth),
         ("reproduction_first_cut.png", "Error vs the first lr cut", plot_first_cut),
         ("reproduction_protocols.png", "Test protocols", plot_protocols))


def write_report(args, study):
    """Write args.doc, and its plots beside it, from the runs of `study` finished so far."""
    res = Results(args, study)
    shown = draw_plots(res, os.path.dirname(os.path.abspath(args.doc)))
    body = sections(res)
    text = (introduction(args, res) + "\n" + at_a_glance(body) + "\n" + design(args) + "\n"
            + body)
    text += "".join(f"![{caption}]({name})\n\n" for name, caption in shown)
    checkpoint.write_bytes(args.doc, text.encode(), overwrite=True)


def draw_plots(res, docs):
    """Draw `PLOTS` into the folder `docs` -> [(file name, caption)] of those to show:
    none without matplotlib."""
    try:
        for name, _, draw in PLOTS:
            draw(res, os.path.join(docs, name))
    except ImportError:
        return []
    return [(name, caption) for name, caption, _ in PLOTS]


def introduction(args, res):
    """Title, how far the study is, how to re-run it, and its setting."""
    study, finished = res.study, sum(res.done.values())
    total_min = sum(res.wall_seconds(r.name) or 0 for r in study) / 60
    so_far = "" if finished == len(study) else " so far"
    cpu_hours = sum(res.cpu_hours(r.name) for r in study)
    early = sum(res.done[r.name] and r.engine == "minivgg" and not any(
        t.get("part") == "evaluation" for t in res.timing[r.name]) for r in study)
    missing = (f"; the evaluations of {early} runs recorded before timing.json kept them, "
               f"a few minutes each, are not" if early else "")
    data, out = (os.path.relpath(path, ROOT) for path in (args.data, args.out))
    return f"""# Reproducing the paper's Tables 3-6 at small scale, trained to the plateau

Generated by `examples/reproduce_tables.py` ({time.strftime('%Y-%m-%d %H:%M')}): {finished} of
{len(study)} runs finished, {total_min:.0f} min of training and validation{so_far}
({cpu_hours:.1f} CPU-hours of every invocation, start-up and test evaluation included{missing}).
Re-run

```bash
PYTHONPATH=$PWD python examples/reproduce_tables.py {data} \\
    --out {out}            # trains what is missing, then rewrites this file
PYTHONPATH=$PWD python examples/reproduce_tables.py {data} \\
    --out {out} --doc-only # only rewrites this file (and its plots)
```

Each finished run's results (metrics.csv, timing.json, posteriors.npz: the val soft-max
outputs every table below is computed from) are kept beside this file in
`docs/reproduction/<run>/`, so the tables can be recomputed, and the study continued,
from a fresh clone.

**Setting.** Imagenette (10 ImageNet classes, 9,469 train / 3,925 val images, all 224×224),
every net at width 0.25 (16..128 channels), fc6/fc7 of 512, 64-pixel crops from images
rescaled to S = 72, batch 64, Glorot init, SGD lr 0.01 / momentum 0.9 / weight decay 5e-4,
dropout 0.5, lr ÷10 on val plateaus three times, each run ending at the plateau after the
third cut (at most {args.epochs} epochs; the paper: 224 crops, S = 256, 1000 classes, 74
epochs). Errors are % on all 3,925 val images (Table 5: a subset). Evaluation uses each
run's last checkpoint (no model selection on val, which is also the test set here).

**Machine.** 2-core machines (the runs table names each run's CPU), the study niced in
the background (load averages in the runs table), so wall times are upper bounds, not
benchmarks.
"""


# A verdict line of the sections: "- <finding>: [<counts> — ]**<verdict>** (<test>; ...)."
VERDICT_LINE = re.compile(r"^- (?P<what>[^*]+?): (?P<pre>[^:*]*— )?\*\*(?P<verdict>[^*]+)\*\* "
                          r"\((?P<test>.*)$")


def at_a_glance(body):
    """Every verdict of the sections below as one table, with its section, its difference
    and its test: gathered from the sections' own verdict lines, so it cannot disagree
    with them. Table 5's per-net lines (a sentence of errors, then three verdicts) are
    left out: the table has the verdicts over all nets."""
    rows, section = [], ""
    for line in body.splitlines():
        if line.startswith("## "):
            section = line[3:].split(" (")[0]
        m = VERDICT_LINE.match(line)
        if m and ". " not in m["what"]:
            test = m["test"].split("; ")[0].split(").")[0].removesuffix(")")
            pre = m["pre"].removesuffix(" — ") + "; " if m["pre"] else ""
            rows.append(f"| {section} | {m['what']} | **{m['verdict']}** | {pre}{test} |")
        elif line.startswith("- ") and line.endswith(f": {PENDING}."):
            rows.append(f"| {section} | {line[2:-len(PENDING) - 3]} | {PENDING} | |")
    if not rows:
        return ""
    return "\n".join(["## Verdicts at a glance", "",
                      "Each finding's verdict as its section below states it, with the "
                      "difference (a net or protocol minus the one it is tested against, "
                      "top-1 points) and its test; the sections give the paper's numbers "
                      "beside, the image-level tests and the rules (Design).", "",
                      "| section | finding | verdict | difference and test |",
                      "|---|---|---|---|", *rows, ""])


def sections(res):
    """The tables, each under its heading, and the heading of the plots."""
    return f"""## Runs

{runs_table(res)}

## Table 3: depth, LRN, 1×1 vs 3×3 (single test scale, dense)

{table3(res)}

{table3_findings(res)}

## Scale jittering (D, fixed S vs S ∈ [64, 128], the paper's [256, 512] scaled)

{jitter_table(res)}

## Table 4: multi-scale testing (dense)

{table4(res)}

## Table 5: dense vs multi-crop vs both

{table5(res)}

## Table 6: fusion

{table6(res)}

## Warm start from A vs Glorot (D)

{warm_table(res)}

## Accuracy against a PyTorch twin of the recipe

`benchmarks/train_torch_twin.py`: the same net, data pipeline (minivgg's own loader, same
seed, same augmentation) and schedule, in torch.nn.

{twin_table(res)}

## Plots

"""
