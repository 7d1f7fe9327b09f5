"""The report of examples/transfer_study.py: docs/transfer.md, written from the run records.

    write_report(args, names)    names: every run of the study, in order (`study(args)`)

Cells are seed means with the half-width of the 95% t interval; comparisons are Welch's
two-sided t-tests over seeds (scipy). The depth finding names the shot counts at which the
difference is significant (p < 0.05) and those at which it is not, and the source nets'
own errors are compared too: a net that learned its source task less well in the same
number of epochs (the deeper one, at 12 epochs) is not a fair witness for its depth.
"""

import os
import time


from minivgg import checkpoint
from reproduce_tables import read_json
import reproduction_seeds as seeds
from reproduction_seeds import p_text, t_interval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The paper's App. B (D and E as fixed feature extractors, linear SVM), for orientation.
PAPER_APP_B = [("VOC-2007", "89.7 mAP"), ("VOC-2012", "89.3 mAP"),
               ("Caltech-101", "92.7% accuracy"), ("Caltech-256", "86.2% accuracy")]


def load_records(args):
    out = {}
    if os.path.isdir(args.record):
        for name in sorted(os.listdir(args.record)):
            rec = read_json(os.path.join(args.record, name, "record.json"), None)
            if rec is not None:
                out[name] = rec
    return out


def accuracies(records, prefix, arch, k):
    """Accuracies (%) over seeds of the runs named prefix-arch-...: features or scratch."""
    vals = []
    for name, rec in records.items():
        if rec.get("arch") != arch or not name.startswith(prefix + f"-{arch}-"):
            continue
        if prefix == "scratch" and rec.get("shots") != k:
            continue
        if k in rec.get("accuracy", {}):
            vals.append(100.0 * rec["accuracy"][k])
    return vals


def seed_interval(vals):
    """(mean, half-width of the 95% t interval over seeds) or (mean, None) for one seed."""
    return t_interval(vals) if vals else (None, None)


def cell(vals):
    mean, half = seed_interval(vals)
    if mean is None:
        return "pending"
    if half is None:
        return f"{mean:.1f} (1 seed)"
    return f"{mean:.1f} ± {half:.1f} (n={len(vals)})"


def welch(a, b):
    """(difference of means, two-sided Welch p) of two seed samples, or None."""
    c = seeds.welch(a, b)
    return None if c is None else (c.diff, c.p)


def comparison(name_a, a, name_b, b, k):
    w = welch(a, b)
    if w is None:
        return f"| {name_a} vs {name_b} | {k} | pending (2 seeds each needed) | |"
    diff, p = w
    word = ("no significant difference" if p >= 0.05 else
            f"{name_a if diff > 0 else name_b} better")
    return f"| {name_a} vs {name_b} | {k} | {diff:+.1f} points, Welch {p_text(p)} | {word} |"


def depth_finding(records, args):
    """One sentence: which depth transfers better, judged by Welch's test per shot count,
    naming the shot counts where the difference is significant and those where it is not."""
    a_arch, d_arch = args.archs[0], args.archs[-1]
    if a_arch == d_arch:
        return "One net only (--archs): no depth comparison."
    parts, wins, ties = [], {}, []
    for k in args.shots:
        w = welch(accuracies(records, "feat-src", d_arch, k),
                  accuracies(records, "feat-src", a_arch, k))
        if w is None:
            parts.append(f"{k} shots: pending")
            continue
        diff, p = w
        parts.append(f"{k} shots: {d_arch} − {a_arch} = {diff:+.1f} points ({p_text(p)})")
        if p < 0.05:
            wins.setdefault(d_arch if diff > 0 else a_arch, []).append(k)
        else:
            ties.append(k)
    pending = len(parts) > len(ties) + sum(map(len, wins.values()))
    if not wins:
        verdict = ("not yet decided" if pending else
                   f"no significant difference between {a_arch} and {d_arch} at p < 0.05")
    elif len(wins) > 1:
        verdict = "mixed: " + "; ".join(f"{arch} better at {_per_class(ks)}"
                                        for arch, ks in wins.items())
    else:
        (arch, ks), = wins.items()
        verdict = f"{arch}'s features transfer better"
        if ties or pending:
            verdict += f" at {_per_class(ks)}"
            if ties:
                verdict += f"; no significant difference at {_per_class(ties)}"
    return f"**{verdict}** (Welch's t-test over seeds; {'; '.join(parts)})."


def _per_class(shots):
    return " and ".join(shots) + " labelled images per class"


def source_finding(records, args):
    """How well each net learned its source task: mean final val error over seeds, with
    Welch's test, since features can only be as good as the net that made them."""
    errs = {arch: [100 * rec["final_val_top1_err"] for name, rec in records.items()
                   if rec.get("kind") == "train" and rec.get("arch") == arch]
            for arch in args.archs}
    a_arch, d_arch = args.archs[0], args.archs[-1]
    w = welch(errs[d_arch], errs[a_arch])
    if a_arch == d_arch or w is None:
        return ""
    diff, p = w
    text = (f"On their own (source) task the nets ended at {cell(errs[a_arch])} ({a_arch}) "
            f"and {cell(errs[d_arch])} ({d_arch}) % val error: {d_arch} − {a_arch} = "
            f"{diff:+.1f} points ({p_text(p)}).")
    if diff > 0:
        text += (f" After {args.epochs} epochs the deeper net is, on average, the less trained "
                 "one" + ("" if p < 0.05 else " (not significantly at p < 0.05)") + ", so this "
                 "compares the two depths at an equal, short training budget, not at convergence "
                 "(the paper trained every net for 74 epochs with the learning rate cut three "
                 "times, the deeper ones started from A's layers: Sec. 3.1).")
    return text


def accuracy_rows(records, args):
    """The table's rows: each method and net, a cell per shot count."""
    rows = []
    for label, prefix in (("features of the source-trained net", "feat-src"),
                          ("features of an untrained net", "feat-untrained"),
                          ("trained from scratch on the labels", "scratch")):
        for arch in args.archs:
            rows.append(f"| {arch} | {label} | " + " | ".join(
                cell(accuracies(records, prefix, arch, k)) for k in args.shots) + " |")
    return rows


def test_rows(records, args):
    """Welch's tests: D against A features, and each net's features against its untrained
    twin and against training from scratch, per shot count."""
    tests = []
    for k in args.shots:
        a, d = args.archs[0], args.archs[-1]
        if a != d:
            tests.append(comparison(f"{d} features", accuracies(records, "feat-src", d, k),
                                    f"{a} features", accuracies(records, "feat-src", a, k),
                                    k))
        for arch in args.archs:
            feats = accuracies(records, "feat-src", arch, k)
            tests.append(comparison(f"{arch} features", feats, f"{arch} untrained",
                                    accuracies(records, "feat-untrained", arch, k), k))
            tests.append(comparison(f"{arch} features", feats, f"{arch} scratch",
                                    accuracies(records, "scratch", arch, k), k))
    return tests


def setting_text(args):
    """The report's "Setting" paragraph: the split, the recipe, the features, the baselines."""
    return f"""**Setting.** The first half of the classes in sorted wnid order is the
source task (on Imagenette: tench, English springer, cassette player, chain saw, church),
the second half the target task (French horn, garbage truck, gas pump, golf ball,
parachute). Nets
{' and '.join(args.archs)} are trained on the source classes only ({args.seeds} seed(s)
each, the README's small recipe: width 0.25, fc 512, 64-pixel crops from S = 72,
{args.epochs} epochs). Their `{args.layer}` features of the target
images (dense at Q ∈ {{{', '.join(map(str, args.scales))}}}, averaged over flips and
scales, L2-normalised: App. B's recipe, its Q scaled by 64/224) feed a linear SVM
(scikit-learn's LinearSVC, C = {args.C}) trained on k labelled target images per class
(the same k images for every method of a seed), scored on all target val images. The
baselines: the same features from an untrained net (Glorot init), and the same
architecture trained from scratch on the k labelled images (up to {args.max_epochs}
epochs, so a small k still gets SGD steps), scored densely at the same Q with flips.
Cells: mean target val accuracy (%) over seeds ± the half-width of the 95% t interval;
comparisons use Welch's t-test over seeds (two-sided)."""


def write_report(args, names):
    """docs/transfer.md (args.doc) from the records in args.record; `names`: every run."""
    records = load_records(args)
    done = sum(n in records for n in names)
    rows, tests = accuracy_rows(records, args), test_rows(records, args)
    source = [f"| {n} | {rec['epochs']} | {100 * rec['final_val_top1_err']:.1f} |"
              for n, rec in records.items() if rec.get("kind") == "train"]
    paper = ";\n".join(f"{task} {score}" for task, score in PAPER_APP_B)
    shots = " | ".join(f"{k} per class" for k in args.shots)
    # the command as run from the repository, with paths relative to it (the doc is committed)
    data, out = (os.path.relpath(path, ROOT) for path in (args.data, args.out))
    text = f"""# Transfer study: VGG features for a new task (App. B at small scale)

Generated by `examples/transfer_study.py` ({time.strftime('%Y-%m-%d %H:%M')}): {done} of
{len(names)} runs recorded. Re-run

```bash
PYTHONPATH=$PWD python examples/transfer_study.py {data} --out {out}
PYTHONPATH=$PWD python examples/transfer_study.py {data} --out {out} --doc-only
```

{setting_text(args)}

## Target val accuracy (%)

| net | method | {shots} |
|---|---|{'---|' * len(args.shots)}
{chr(10).join(rows)}

## Which depth transfers better

{depth_finding(records, args)}

{source_finding(records, args)}

| comparison | labelled per class | difference (first − second) | verdict |
|---|---|---|---|
{chr(10).join(tests)}

For orientation, the paper's App. B (D and E on ImageNet as fixed feature extractors,
combined, linear SVM, no fine-tuning):
{paper}. Those are full-size nets trained on 1000
ImageNet classes and tested on other data sets; here the nets are a quarter wide, trained
on five classes for minutes, and the target task is five other Imagenette classes, so only
the direction of the findings can compare, not the numbers.

## Source nets (five source classes)

| run | epochs | final val top-1 error % (source classes, centre crop) |
|---|---|---|
{chr(10).join(source) or '| pending | | |'}
"""
    os.makedirs(os.path.dirname(os.path.abspath(args.doc)), exist_ok=True)
    checkpoint.write_bytes(args.doc, text.encode(), overwrite=True)


