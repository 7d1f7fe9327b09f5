"""Notes of the reproduction report (examples/reproduction_sections.py) on made-up runs whose
answer is known: the post-hoc note on the epoch of each run's first lr cut against its error
(`first_cut_note`, checked against an ordinary least-squares fit with one mean per net), the
interim mark of the PyTorch twin's verdict, the jittering note (`jitter_note`: the reasons
it gives only where the curves support them) and the verdicts at a glance
(examples/reproduction_report.py, `at_a_glance`)."""

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sections():
    pytest.importorskip("scipy")
    sys.path.insert(0, str(REPO / "examples"))
    load_script("examples/reproduce_tables.py", register=True)
    import reproduction_sections
    return reproduction_sections


def _rows(first_cut, epochs=50, wobble=(0.0, 0.03)):
    """metrics.csv rows: lr 0.01 until `first_cut`, then 0.001; val error wobbles."""
    return [{"lr": str(0.01 if e < first_cut else 0.001),
             "val_top1_err": str(0.5 + wobble[e % 2])} for e in range(epochs)]


def _res(sections, first_cuts, errors):
    """A stand-in for reproduction_stats.Results with runs <arch>-s<seed>."""
    study = [SimpleNamespace(name=name, arch=name[0], engine="minivgg", jitter=False,
                             warm_from=None) for name in first_cuts]
    return SimpleNamespace(study=study, counts={n: True for n in first_cuts},
                           rows={n: _rows(c) for n, c in first_cuts.items()},
                           error=lambda names, keys: (errors[names[0]], 5.0))


def test_the_within_net_slope_and_its_test_match_least_squares(sections):
    rng = np.random.default_rng(0)
    cuts, errs = {}, {}
    for i, arch in enumerate("ABCDE"):
        for seed in range(3):
            name = f"{arch}-s{seed}"
            cuts[name] = int(rng.integers(10, 40))
            errs[name] = 20 + 2 * i - 0.3 * cuts[name] + rng.normal(0, 1.0)
    text = sections.first_cut_note(_res(sections, cuts, errs))
    names = list(cuts)
    dummies = np.array([[float(n[0] == a) for a in "ABCDE"] for n in names])
    x = np.array([cuts[n] for n in names], float)
    y = np.array([errs[n] for n in names])
    beta = np.linalg.lstsq(np.column_stack([dummies, x]), y, rcond=None)[0]
    assert f"{10 * beta[-1]:+.1f} points of error for a first cut 10 epochs later" in text
    assert "the lower its dense error" in text and "9 degrees of freedom" in text
    assert "moves by 3.0 points from one epoch to the next" in text  # the wobble
    assert "the next design's remedy" in text  # significant, and in this direction


def test_no_relation_claims_no_remedy_and_too_few_runs_say_nothing(sections):
    rng = np.random.default_rng(1)
    cuts = {f"{a}-s{s}": int(c) for a in "ABCDE" for s, c in
            zip(range(3), rng.integers(10, 40, 3))}
    flat = {n: 25.0 + rng.normal(0, 1.0) for n in cuts}
    text = sections.first_cut_note(_res(sections, cuts, flat))
    assert "Spearman" in text and "remedy" not in text
    few = {n: c for n, c in cuts.items() if n.endswith("s0")}
    assert sections.first_cut_note(_res(sections, few, flat)) == ""


def test_runs_whose_seeds_were_all_cut_alike_give_no_note_and_no_warning(sections):
    import warnings
    cuts = {f"{a}-s{s}": 20 for a in "ABCDE" for s in range(3)}
    errors = {n: 20.0 + s for n, s in zip(cuts, range(15))}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sections.first_cut_note(_res(sections, cuts, errors)) == ""


def test_the_twin_verdict_is_interim_until_every_planned_seed_is_in(sections):
    names = ["A-s0", "A-s1", "A-s2", "torch-A-s0", "torch-A-s1", "torch-A-s2"]
    study = [SimpleNamespace(name=n, arch="A", engine="torch" if "torch" in n else "minivgg",
                             jitter=False, warm_from=None, seed=int(n[-1])) for n in names]
    final = {"A-s0": 23.0, "A-s1": 24.0, "A-s2": 25.0, "torch-A-s0": 24.5, "torch-A-s1": 25.5}
    res = SimpleNamespace(study=study, rows={n: [{}] * 40 for n in names},
                          final_val=final.get, wall_seconds=lambda name: 600.0)
    text = sections.twin_table(res)
    assert "(*interim, 5 of 6 runs*, minivgg − torch: -1.0 points" in text
    final["torch-A-s2"] = 24.0
    assert "interim" not in sections.twin_table(res)


def _fit_res(gaps):
    """Runs D-s0..2 (fixed S) and Djit-s0..1 whose last epoch has the given (train, val)."""
    study = [SimpleNamespace(name=f"D-s{s}", arch="D", jitter=False) for s in range(3)]
    study += [SimpleNamespace(name=f"Djit-s{s}", arch="D", jitter=True) for s in range(2)]
    rows = {r.name: [{"train_top1_err": str(gaps[r.jitter][0]),
                      "val_top1_err": str(gaps[r.jitter][1])}] for r in study}
    res = SimpleNamespace(study=study, rows=rows, counts={r.name: True for r in study})
    return res, [r for r in study if r.jitter], [r for r in study if not r.jitter]


@pytest.mark.parametrize("jit_gap, reasons", [((0.31, 0.32), 3), ((0.10, 0.30), 2)])
def test_the_jitter_note_explains_a_jittered_net_behind_by_what_the_curves_show(
        sections, jit_gap, reasons):
    res, jit, fixed = _fit_res({False: (0.20, 0.27), True: jit_gap})
    text = sections.jitter_note(res, jit, fixed, SimpleNamespace(diff=+3.0))
    assert "20.0% training top-1 error on its crops and 27.0% val, a gap of +7.0" in text
    assert f"a gap of {100 * (jit_gap[1] - jit_gap[0]):+.1f}" in text
    assert f"({reasons}) " in text and f"({reasons + 1}) " not in text
    # the augmentation reason only where the jittered net over-fits less than the fixed one
    assert ("(1) Jittering is augmentation" in text) == (reasons == 3)


def test_the_jitter_note_claims_no_reasons_when_jittering_is_ahead_or_pending(sections):
    res, jit, fixed = _fit_res({False: (0.20, 0.27), True: (0.25, 0.26)})
    ahead = sections.jitter_note(res, jit, fixed, SimpleNamespace(diff=-1.0))
    assert "a gap of +1.0" in ahead and "behind" not in ahead
    assert "behind" not in sections.jitter_note(res, jit, fixed, None)
    res.counts = {name: not name.startswith("Djit") for name in res.counts}
    assert sections.jitter_note(res, jit, fixed, SimpleNamespace(diff=+3.0)) == ""


def test_the_verdicts_at_a_glance_gather_every_verdict_line_and_only_those(sections):
    import reproduction_report
    body = "\n".join([
        "## Table 3: depth (single test scale, dense)", "",
        "- Depth helps (B vs A; the paper: 28.7 vs 29.6): **undecided** (B − A: -1.4 points "
        "[-4.9, +2.2], Welch p = 0.34 (Holm-adjusted p = 1.00), permutation p = 0.40; soft-max "
        "averaged over seeds: McNemar p = 0.12).",
        "## Table 4: multi-scale testing (dense)",
        "- Multi-scale testing helps: better on 15 of 15 runs (worse on 0), mean change -1.01 "
        "top-1 points — **reproduced** (two-sided sign test: p < 0.001). Run by run, more.",
        "## Table 5: dense vs multi-crop",
        "- D-s0: dense 30.0, multi-crop 29.0. Both beat dense: **undecided** (McNemar p = 1).",
        "## Warm start from A vs Glorot (D)",
        "- Glorot's initialisation needs no warm start: pending."])
    table = reproduction_report.at_a_glance(body).splitlines()
    rows = [r for r in table if r.startswith("| ") and not r.startswith("| section")]
    assert rows == [
        "| Table 3: depth | Depth helps (B vs A; the paper: 28.7 vs 29.6) | **undecided** | "
        "B − A: -1.4 points [-4.9, +2.2], Welch p = 0.34 (Holm-adjusted p = 1.00), "
        "permutation p = 0.40 |",
        "| Table 4: multi-scale testing | Multi-scale testing helps | **reproduced** | better "
        "on 15 of 15 runs (worse on 0), mean change -1.01 top-1 points; two-sided sign test: "
        "p < 0.001 |",
        "| Warm start from A vs Glorot | Glorot's initialisation needs no warm start | pending "
        "| |"]
    assert reproduction_report.at_a_glance("## Runs\n\nno verdicts yet") == ""
