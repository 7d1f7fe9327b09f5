"""examples/reproduce_tables.py: which runs it skips, resumes or starts, and a report that
marks what is missing as pending. Nothing here trains (that is the study itself)."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(REPO / "examples"))
    return load_script("examples/reproduce_tables.py", register=True)


def _args(study, tmp_path, *extra):
    (tmp_path / "data" / "val").mkdir(parents=True, exist_ok=True)
    return study.parse_args([str(tmp_path / "data"), "--out", str(tmp_path / "runs"),
                             "--doc", str(tmp_path / "docs" / "reproduction.md"),
                             "--record", str(tmp_path / "record"), *extra])


def _finish(study, args, run, epochs):
    """A run folder whose metrics.csv and last.npz say `epochs` epochs are done."""
    from minivgg import checkpoint, metrics, models
    from minivgg.run_state import model_meta
    out = Path(study.folder(args, run))
    out.mkdir(parents=True, exist_ok=True)
    row = dict(train_loss=1.0, train_top1_err=0.5, val_loss=1.0, val_top1_err=0.4,
               val_top5_err=0.1, images_per_s=10.0)
    metrics.write_metrics(str(out / "metrics.csv"),
                          [metrics.epoch_row(e + 1, row, row, 0.01 * 0.1 ** min(e, 3), 60.0)
                           for e in range(epochs)])  # cut after every epoch: the run counts
    if run.engine == "minivgg":
        model = models.vgg("A", 10, 1 / 16, 16, 64)
        checkpoint.save(str(out / "last.npz"), model.state_dict(), None,
                        {"model": model_meta(model), "epoch": epochs})


def test_finished_runs_are_skipped_and_half_finished_ones_resume(study, tmp_path):
    args = _args(study, tmp_path, "--epochs", "3")
    a, twin = study.by_name("A-s0"), study.by_name("torch-A-s0")
    assert study.epochs_done(args, a) == 0
    assert "--resume" not in study.train_command(args, a)
    _finish(study, args, a, 2)
    assert study.epochs_done(args, a) == 2
    cmd = study.train_command(args, a)
    assert cmd[cmd.index("--resume") + 1] == study.last_checkpoint(args, a)
    assert "examples/train_imagenet.py" in cmd[1].replace("\\", "/")
    _finish(study, args, a, 3)
    assert study.train(args, a)  # finished: nothing is run
    assert "--resume" not in study.train_command(args, twin)
    _finish(study, args, twin, 2)
    (Path(study.folder(args, twin)) / "last.pt").write_bytes(b"the twin's checkpoint")
    assert study.epochs_done(args, twin) == 2
    cmd = study.train_command(args, twin)
    assert "benchmarks/train_torch_twin.py" in cmd[1].replace("\\", "/")
    assert cmd[cmd.index("--resume") + 1] == os.path.join(study.folder(args, twin), "last.pt")


def test_a_run_is_finished_when_its_replayed_schedule_has_ended(study, tmp_path):
    """A constant val error: patience 2 cuts after epochs 4, 7 and 10, and the plateau of
    epochs 11-13 ends the run (Sec. 3.1's three cuts), well before the cap of 60."""
    args = _args(study, tmp_path)
    assert args.epochs == study.CAP == 60
    for run in (study.by_name("A-s0"), study.by_name("torch-A-s0")):
        cmd = study.train_command(args, run)
        assert "--stop-at-plateau" in cmd and cmd[cmd.index("--lr-patience") + 1] == "2"
        _finish(study, args, run, 12)
        assert not study.finished(args, run)
        _finish(study, args, run, 13)
        assert study.finished(args, run) and study.epochs_done(args, run) == 13


def test_a_record_that_ended_at_its_plateau_counts_under_a_higher_cap(study, tmp_path):
    args = _args(study, tmp_path)
    a, b = study.by_name("A-s0"), study.by_name("B-s0")
    _record(study, args, "A-s0", 0.4, 0)  # 13 epochs, constant val error: ended at 13
    assert study.recorded(args, a) and study.finished(args, a)
    higher = _args(study, tmp_path, "--epochs", "80")
    assert study.recorded(higher, a)
    _finish(study, args, b, 12)  # 12 epochs: no plateau yet; recorded as if capped at 12
    Path(study.folder(args, b), "timing.json").write_text("[]")
    np.savez(Path(study.folder(args, b)) / "posteriors.npz", epoch=np.array(12))
    twelve = _args(study, tmp_path, "--epochs", "12")
    study.save_record(twelve, b)
    record = json.loads((Path(args.record) / "B-s0" / "record.json").read_text())
    assert record["ended"] == "cap" and record["cap"] == 12 and record["protocol"] == study.PROTOCOL
    assert study.recorded(twelve, b) and not study.recorded(higher, b)


def test_schedule_constants_agree_with_the_training_script(study):
    from minivgg.train_config import TrainConfig
    assert study.CUTS == TrainConfig().lr_decreases and study.PATIENCE == 2


def test_a_twin_killed_by_a_signal_stops_the_study(study, tmp_path, monkeypatch):
    """The twin has no signal handler: Popen reports -2 for SIGINT, which must stop the
    study as train_imagenet.py's exit 130 does."""
    args = _args(study, tmp_path)
    monkeypatch.setattr(study, "supervise", lambda cmd, log: -2)
    with pytest.raises(study.Interrupted) as stop:
        study.train(args, study.by_name("torch-A-s0"))
    assert stop.value.code == 130


def test_warm_start_run_starts_from_the_a_run(study, tmp_path):
    args = _args(study, tmp_path)
    warm = study.by_name("Dwarm-s0")
    assert not study.train(args, warm)  # A-s0 is not finished: it waits
    cmd = study.train_command(args, warm)
    assert cmd[cmd.index("--init-from") + 1] == study.last_checkpoint(
        args, study.by_name("A-s0"))


def test_a_recorded_run_is_finished_in_a_fresh_clone(study, tmp_path):
    """The record (committed) outlives runs/ (git-ignored): a fresh clone skips the run,
    warm-starts from the recorded weights and builds the report from the record."""
    import shutil
    from minivgg import pretrained
    args = _args(study, tmp_path, "--epochs", "3")
    a = study.by_name("A-s0")
    _finish(study, args, a, 3)
    labels = np.arange(20) % 10
    np.savez(Path(study.folder(args, a)) / "posteriors.npz", epoch=np.array(3), labels=labels,
             subset=np.arange(0, 20, 2), **{"dense@72": np.eye(10, dtype=np.float32)[labels]})
    Path(study.folder(args, a), "timing.json").write_text("[]")
    assert not study.recorded(args, a)
    study.save_record(args, a)
    shutil.rmtree(args.out)  # a fresh clone: no run folders at all
    assert study.recorded(args, a) and study.epochs_done(args, a) == 3
    assert study.train(args, a)  # finished: nothing is run
    warm = study.by_name("Dwarm-s0")
    cmd = study.train_command(args, warm)
    weights = cmd[cmd.index("--init-from") + 1]
    assert weights == str(tmp_path / "record" / "A-s0" / "weights.npz")
    assert pretrained.load_pretrained(weights).config == "A"
    from reproduction_report import Results
    res = Results(args, study.STUDY)
    assert res.done["A-s0"] and res.error(["A-s0"], ["dense@72"])[0] == 0.0
    other = study.parse_args([args.data, "--out", args.out, "--doc", args.doc,
                              "--record", args.record, "--epochs", "4"])
    assert not study.recorded(other, a)  # a record of another budget is not this study's


def test_test_scales_and_parts(study):
    jit = study.by_name("Djit-s0")
    assert (jit.q, jit.qs) == (96, (64, 96, 128))
    keys = [p[0] for p in study.needed_parts(jit)]
    assert {"dense@64", "dense@96", "dense@128", "dense@72", "dense@80",
            "dense-topleft@96", "center-flip@96", "multicrop@96"} <= set(keys)
    assert all(p[4] == p[0].startswith("multicrop") for p in study.needed_parts(jit))
    np.testing.assert_array_equal(study.subset_indices(9, 3), [0, 4, 8])


def test_report_marks_missing_runs_pending(study, tmp_path):
    pytest.importorskip("matplotlib")
    args = _args(study, tmp_path)
    (tmp_path / "docs").mkdir()
    assert study.main([*sys.argv[:0], args.data, "--out", args.out, "--doc", args.doc,
                       "--record", args.record, "--doc-only"]) == 0
    text = Path(args.doc).read_text()
    assert "0 of\n24 runs finished" in text and "pending" in text
    assert "| A | 11 | pending |" in text and "## Design (written" in text
    assert (tmp_path / "docs" / "reproduction_curves.png").is_file()


def test_unknown_run_name_is_one_line_error(study, tmp_path, capsys):
    args = _args(study, tmp_path)
    assert study.main([args.data, "--out", args.out, "--record", args.record,
                       "--only", "Z-s9"]) == 2
    assert "error: --only: unknown run(s) ['Z-s9']" in capsys.readouterr().err


def test_multi_scale_finding_needs_a_significant_direction(study):
    """One net better is not a finding: the sign test across nets decides."""
    from reproduction_report import sign_test
    assert sign_test(5, 5) == 1 / 32 and sign_test(0, 3) == 1.0
    assert sign_test(1, 1) == 0.5 and sign_test(4, 4) > 0.05  # 4 nets can never show it


def test_paired_test_counts_only_the_images_the_two_disagree_on(study):
    """McNemar: 3 images right only with a, 1 only with b, 2 right with both, 1 wrong with
    both -> p = P(at most 1 of 4 coin flips one way, either way) = 2 * 5/16."""
    from reproduction_report import paired_test, p_text
    labels = np.array([0, 0, 0, 0, 0, 0, 0])
    right, wrong = [0.9, 0.1], [0.1, 0.9]
    a = np.array([right, right, right, wrong, right, right, wrong])
    b = np.array([wrong, wrong, wrong, right, right, right, wrong])
    assert paired_test((a, labels), (b, labels)) == (3, 1, 0.625)
    assert paired_test((a, labels), (a, labels)) == (0, 0, 1.0)
    assert p_text(0.0004) == "p < 0.001" and p_text(0.004) == "p = 0.004"


def test_table5_tests_the_combination_against_each_protocol_alone(study):
    """Not against "the better of the two" picked per net on the same images (biased
    low): here the combination beats dense on every net and loses to multi-crop on every
    net, so one finding is reproduced and the other contradicted, and with 3 of the 4
    planned nets in, both say interim."""
    pytest.importorskip("scipy")
    from collections import namedtuple
    from reproduction_protocols import table5_findings
    labels = np.zeros(100, dtype=int)

    def right_on(k):  # (probs, labels) right on the first k of 100 images
        probs = np.tile([0.1, 0.9], (100, 1))
        probs[:k] = [0.9, 0.1]
        return probs, labels

    Net = namedtuple("Net", "name")
    nets = [Net(f"N{i}") for i in range(4)]
    outputs = {}
    for i, net in enumerate(nets[:3]):  # right on (error %): dense 60+i, combined 65+2i,
        for label, k in (("dense", 60 + i), ("dense+multicrop", 65 + 2 * i),  # multi-crop
                         ("multicrop", 70 + 3 * i),  # 70+3i: -5..-7 and +5..+7 points
                         ("centre crop + flip, one scale", 60)):
            outputs[(label, net.name)] = right_on(k)
    lines = "\n".join(table5_findings(nets, outputs, 100))
    assert "- N3: pending." in lines
    beats = {alone: next(x for x in lines.splitlines()
                         if x.startswith(f"- Dense + multi-crop beats {alone} alone"))
             for alone in ("dense", "multi-crop")}
    assert "**reproduced** (*interim, 3 of 4 nets*, mean change -6.00" in beats["dense"]
    assert "**contradicted** (*interim, 3 of 4 nets*, mean change +6.00" in \
        beats["multi-crop"]
    assert "N0: dense 40.0, multi-crop 30.0, both 35.0" in lines


def test_the_runs_table_names_the_cpu_of_each_invocation(study):
    from reproduction_sections import cpus
    xeon = {"cpu": "Intel(R) Xeon(R) Processor, 2 CPUs, AMX"}
    assert cpus([{"seconds": 1.0}, xeon, xeon, {"cpu": "AMD EPYC 9R14, 2 CPUs"}]) == \
        "—, Intel Xeon (AMX), AMD EPYC 9R14"
    assert cpus([]) == "—"
    from reproduction_stats import Results
    res = object.__new__(Results)  # only its timing: an old invocation, then a new one
    res.timing = {"A-s0": [{"seconds": 1800.0}, {"seconds": 5400.0, **xeon}]}
    assert res.cpu_hours("A-s0") == pytest.approx(2 * 0.5 + 2 * 1.5)
    assert res.cpu_hours("B-s0") == 0
    new = {"cpu": "AMD EPYC 9R14", "cpus": 4, "amx": False, "seconds": 900.0}
    res.timing["C-s0"] = [new]
    assert res.cpu_hours("C-s0") == pytest.approx(4 * 0.25)
    assert cpus([xeon, new]) == "Intel Xeon (AMX), AMD EPYC 9R14"
    assert study.cpu_of(xeon) == ("Intel(R) Xeon(R) Processor", 2, True)
    assert study.cpu_of({}) == ("—", 2, False)  # the first records kept no CPU


def test_the_runs_table_gives_the_epoch_before_each_lr_cut(study):
    from reproduction_sections import cuts_text
    rows = [{"lr": lr} for lr in ["0.01"] * 3 + ["0.001"] * 2 + ["0.0001"]]
    assert cuts_text(rows) == "2 (after 3, 5)"
    assert cuts_text(rows[:3]) == "0" and cuts_text([]) == "—"


def test_report_from_the_committed_records(study, tmp_path):
    """The report built from docs/reproduction/ (the study's committed results) fills the
    cells of every finished run, with no run folders at all."""
    pytest.importorskip("matplotlib")
    record = REPO / "docs" / "reproduction"
    finished = sorted(p.name for p in record.iterdir() if (p / "record.json").is_file()) \
        if record.is_dir() else []
    if not {"A-s0", "B-s0"} <= set(finished):
        pytest.skip("the study has not recorded A-s0 and B-s0")
    (tmp_path / "docs").mkdir()
    doc = tmp_path / "docs" / "reproduction.md"
    args = _args(study, tmp_path)
    assert study.main([args.data, "--out", args.out, "--doc", str(doc), "--record",
                       str(record), "--doc-only"]) == 0
    text = doc.read_text()
    assert f"{len(finished)} of\n{len(study.STUDY)} runs finished" in text
    runs_table = text.split("## Runs")[1].split("## Table 3")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in runs_table.splitlines()
            if line.startswith("| ") and not line.startswith("| run ")}
    for name in finished:
        assert "pending" not in rows[name]
    if len(finished) == len(study.STUDY):  # the whole study: no cell is left pending
        assert "pending" not in text
    import re
    if len([n for n in finished if re.fullmatch("[A-E]-s[0-9]", n)]) < 15:  # Table 4's runs
        line = next(x for x in text.splitlines() if x.startswith("- Multi-scale testing helps"))
        assert "*interim, " in line and " of 15 runs*" in line, line


# ----------------------------------------------------------------------------------------
# Seed-level statistics and the verdicts (examples/reproduction_seeds.py)
# ----------------------------------------------------------------------------------------

def test_welch_interval_and_permutation_match_their_definitions(study):
    stats = pytest.importorskip("scipy.stats")
    import itertools
    from reproduction_seeds import t_interval, welch
    x, y = [37.9, 42.4, 40.1], [30.1, 31.0, 29.5]
    c = welch(x, y)
    assert c.diff == pytest.approx(np.mean(x) - np.mean(y))
    assert c.p == pytest.approx(stats.ttest_ind(x, y, equal_var=False).pvalue)
    assert c.low < c.diff < c.high and (c.high - c.low) / 2 > 1.96 * np.sqrt(
        np.var(x, ddof=1) / 3 + np.var(y, ddof=1) / 3)  # t, not normal, quantiles
    splits = [abs(np.mean(a) - np.mean([v for v in x + y if v not in a]))
              for a in itertools.combinations(x + y, 3)]
    assert c.p_perm == pytest.approx(np.mean(np.array(splits) >= abs(c.diff) - 1e-12))
    assert c.p_perm == pytest.approx(0.1)  # 3 against 3: the smallest two-sided p there is
    mean, half = t_interval([1.0, 2.0, 3.0])
    assert (mean, half) == pytest.approx((2.0, stats.t.ppf(0.975, 2) / np.sqrt(3)))
    assert t_interval([5.0]) == (5.0, None) and welch([1.0], [2.0, 3.0]) is None


def test_holm_and_the_verdict_rules(study):
    pytest.importorskip("scipy")
    from reproduction_seeds import Comparison, holm, judge
    assert holm([0.01, 0.04, 0.30]) == pytest.approx([0.03, 0.08, 0.30])
    assert holm([0.04, 0.01]) == pytest.approx([0.04, 0.02])  # monotone in the p order

    def c(diff, low, high, p):
        return Comparison([], [], diff, low, high, p, 0.1)

    # "X is better than Y": the direction at p < 0.05 decides
    assert judge(c(-3.0, -5.0, -1.0, 0.01)) == "reproduced"
    assert judge(c(+3.0, +1.0, +5.0, 0.01)) == "contradicted"
    assert judge(c(-3.0, -7.0, +1.0, 0.20)) == "undecided"
    # "X is no better than Y": a significant gain contradicts; no gain needs a tight interval
    assert judge(c(-3.0, -5.0, -1.0, 0.01), null=True) == "contradicted"
    assert judge(c(+0.5, -1.5, +2.5, 0.60), null=True) == "reproduced"
    assert judge(c(+0.5, -4.0, +5.0, 0.80), null=True) == "undecided"
    assert judge(c(+3.0, +1.0, +5.0, 0.01), null=True) == "reproduced"


def _record(study, args, name, error_rate, seed_offset, cut=True):
    """A record of run `name` whose dense soft-max gets `error_rate` of 400 images wrong."""
    import json
    n, wrong = 400, int(round(error_rate * 400))
    labels = np.arange(n) % 10
    guess = labels.copy()
    rng = np.random.default_rng(seed_offset)
    miss = rng.choice(n, wrong, replace=False)
    guess[miss] = (labels[miss] + 1) % 10
    probs = np.full((n, 10), 0.01, np.float32)
    probs[np.arange(n), guess] = 0.91
    folder = Path(args.record) / name
    folder.mkdir(parents=True)
    parts = {f"{m}@{q}": probs for m in ("dense", "center", "center-flip", "dense-topleft")
             for q in (64, 72, 80)}
    np.savez(folder / "posteriors.npz", labels=labels, subset=np.arange(0, n, 8),
             epoch=np.array(13), **parts)  # outputs of the last of its 13 epochs
    from minivgg import metrics
    row = dict(train_loss=1.0, train_top1_err=error_rate, val_loss=1.0,
               val_top1_err=error_rate, val_top5_err=0.1, images_per_s=10.0)
    lrs = [0.01] * 4 + [0.001] * 3 + [1e-4] * 3 + [1e-5] * 3 if cut else [0.01] * 13
    metrics.write_metrics(str(folder / "metrics.csv"),
                          [metrics.epoch_row(e + 1, row, row, lr, 60.0)
                           for e, lr in enumerate(lrs)])
    (folder / "timing.json").write_text("[]")
    (folder / "record.json").write_text(json.dumps(  # a constant val error: ended at 13
        {"protocol": study.PROTOCOL, "epochs": len(lrs), "ended": "plateau"}))


def test_report_gives_seed_level_verdicts_from_records(study, tmp_path):
    """Three seeds of A at 40% error and of B at 30%: B beats A, reproduced, with Welch's
    p and the image-level McNemar test; C (one seed) is pending."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("scipy")
    args = _args(study, tmp_path)
    for seed, (a, b) in enumerate([(0.40, 0.30), (0.42, 0.31), (0.39, 0.29)]):
        _record(study, args, f"A-s{seed}", a, seed)
        _record(study, args, f"B-s{seed}", b, 10 + seed)
    _record(study, args, "C-s0", 0.35, 20)
    _record(study, args, "D-s0", 0.20, 30, cut=False)  # 13 epochs, no cut: does not count
    (tmp_path / "docs").mkdir()
    assert study.main([args.data, "--out", args.out, "--doc", args.doc, "--record",
                       args.record, "--doc-only"]) == 0
    text = Path(args.doc).read_text()
    line = next(x for x in text.splitlines() if x.startswith("- Depth helps: 13 layers"))
    assert "**reproduced**" in line and "B − A: -10.3 points" in line, line
    assert "Holm-adjusted p = 0.001" in line and "only with A on 67, McNemar p = 0.002" in line
    assert "- 1×1 convs help (C vs B; the paper: 28.1 vs 28.7): pending" in text
    assert "| A | 11 | 40.3 ± " in text and "(40.0, 42.0, 39.0)" in text
    assert "**Runs with fewer than 2 lr cuts** do not count" in text and ": D-s0." in text
    assert "| D | 16 | pending |" in text  # left out of Table 3
    assert (Path(args.doc).parent / "reproduction_curves.png").stat().st_size > 10_000


# ----------------------------------------------------------------------------------------
# The study as a parent process: signals, failures, relative paths (real processes)
# ----------------------------------------------------------------------------------------

FAKE_TRAINING = r'''
import signal, sys, time
if sys.argv[1] == "setup":  # SIGINT as Python leaves it while train_imagenet.py sets up
    try:
        print("setting up", flush=True)
        time.sleep(30)
    except KeyboardInterrupt:
        print("interrupted before training started", flush=True)
        sys.exit(130)
    sys.exit(3)
stop = []
signal.signal(signal.SIGINT, lambda *a: stop.append("SIGINT"))
signal.signal(signal.SIGTERM, lambda *a: stop.append("SIGTERM"))
mode = sys.argv[1]
print("training", flush=True)
if mode == "fail":
    print("error: data directory 'data/sub' does not exist", flush=True)
    sys.exit(1)
deadline = time.time() + 60
while not stop and time.time() < deadline:
    time.sleep(0.02)
time.sleep(0.5)  # "finishing the batch and saving"
print(f"{stop[0] if stop else 'timeout'} received; saved", flush=True)
sys.exit(130 if stop == ["SIGINT"] else 143 if stop else 3)
'''


def _study_process(tmp_path, mode, ignore_sigint=False):
    """The study in a process of its own, with a stand-in training script of `mode`;
    `ignore_sigint`: started as `cmd &` in a script starts it, with SIGINT ignored."""
    import signal
    import subprocess
    (tmp_path / "fake.py").write_text(FAKE_TRAINING)
    (tmp_path / "data" / "val").mkdir(parents=True, exist_ok=True)
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'examples')!r}); "
            f"import reproduce_tables as s; "
            f"s.train_command = lambda a, r: [sys.executable, {str(tmp_path / 'fake.py')!r}, "
            f"{mode!r}]; sys.exit(s.main(['data', '--out', 'runs', '--only', 'A-s0', "
            f"'--record', 'record', '--doc', 'doc.md']))")
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    return subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=ignore)


def test_a_study_started_in_the_background_stops_a_run_that_is_still_setting_up(tmp_path):
    """A script's `study &` starts it with SIGINT ignored, which its children would inherit:
    a SIGINT passed on while the training run set up was lost, and the study waited for
    the whole run. Now the run gets it (KeyboardInterrupt in its set-up) and both stop."""
    import os
    import signal
    import time
    parent = _study_process(tmp_path, "setup", ignore_sigint=True)
    log = tmp_path / "runs" / "A-s0" / "train.log"
    deadline = time.time() + 30
    while not (log.exists() and "setting up" in log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(parent.pid, signal.SIGINT)
    out, _ = parent.communicate(timeout=20)  # the child alone would sleep 30 s
    assert parent.returncode == 130, out
    assert "interrupted before training started" in log.read_text()
    assert "== stopped: A-s0 saved where it was" in out, out


@pytest.mark.parametrize("sig, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_to_the_study_reaches_the_training_run_which_saves_before_both_exit(
        tmp_path, sig, status):
    import json
    import os
    import signal
    import time
    parent = _study_process(tmp_path, "wait")
    log = tmp_path / "runs" / "A-s0" / "train.log"
    deadline = time.time() + 30
    while not (log.exists() and "training" in log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(parent.pid, getattr(signal, sig))
    out, _ = parent.communicate(timeout=30)
    assert parent.returncode == status, out
    assert f"{sig} received; saved" in log.read_text()  # the child finished its save
    assert f"{sig} passed on to the training run" in out and "Traceback" not in out, out
    timing = json.loads((tmp_path / "runs" / "A-s0" / "timing.json").read_text())
    assert len(timing) == 1 and timing[0]["seconds"] >= 0.5  # the interrupted time counts
    assert timing[0]["cpus"] == os.cpu_count() and timing[0]["amx"] in (True, False)
    assert timing[0]["part"] == "training"


def test_a_failing_training_run_makes_the_study_exit_nonzero(tmp_path):
    parent = _study_process(tmp_path, "fail")
    out, _ = parent.communicate(timeout=60)
    assert parent.returncode == 1, out
    assert "A-s0: exit 1, NOT finished" in out
    assert "error: 1 run(s) did not finish: A-s0" in out


def test_relative_paths_are_taken_from_where_the_study_was_started(study, tmp_path,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = study.parse_args(["data/sub", "--out", "runs", "--record", "rec"])
    assert args.data == str(tmp_path / "data" / "sub")
    assert args.out == str(tmp_path / "runs") and args.record == str(tmp_path / "rec")
    cmd = study.train_command(args, study.by_name("A-s0"))
    assert cmd[2] == str(tmp_path / "data" / "sub")  # the child runs in the repository


def test_the_study_evaluates_decoded_images_at_every_scale(study, tmp_path):
    """`posteriors` (the evaluation of a finished run): soft-max rows for every job, images
    decoded once per chunk."""
    from PIL import Image
    from minivgg import evaluate, images, models
    paths = []
    for i, colour in enumerate([(200, 30, 30), (20, 200, 40), (10, 20, 220)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (80, 70), colour).save(paths[-1])
    model = models.vgg("A", 4, 1 / 16, 16, 32, init="glorot", seed=0).eval()
    net = evaluate.EvalNet(model, lambda img: images.to_chw_float32(img, np.zeros(3)))
    jobs = [("dense@40", "dense", "center", 40, False), ("center@48", "center", "center", 48,
                                                         False)]
    out = study.posteriors({"center": net}, [(p, 0) for p in paths], jobs, chunk=2)
    assert sorted(out) == ["center@48", "dense@40"]
    for probs in out.values():
        assert probs.shape == (3, 4) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_a_runs_evaluation_is_timed_beside_its_training(study, tmp_path, monkeypatch):
    """evaluate_run adds its wall time to timing.json (part "evaluation"), so the report's
    CPU-hours count the test evaluations too."""
    from PIL import Image
    from minivgg import models
    paths = []
    for i, colour in enumerate([(200, 30, 30), (20, 200, 40)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (80, 70), colour).save(paths[-1])
    model = models.vgg("A", 4, 1 / 16, 16, 32, init="glorot", seed=0).eval()
    meta = {"epoch": 3, "data_stats": {"mean_rgb": [0.0, 0.0, 0.0]}, "classes": list("abcd")}
    monkeypatch.setattr(study.run_state, "load_model", lambda path: (model, meta))
    monkeypatch.setattr(study, "val_items", lambda args, classes: [(p, 1) for p in paths])
    monkeypatch.setattr(study, "needed_parts",
                        lambda run: [("dense@40", "dense", "center", 40, False)])
    args, run = _args(study, tmp_path), study.by_name("A-s0")
    Path(study.folder(args, run)).mkdir(parents=True)
    study.evaluate_run(args, run)
    timing = json.loads(Path(study.folder(args, run), "timing.json").read_text())
    assert [t["part"] for t in timing] == ["evaluation"] and timing[0]["seconds"] >= 0
    saved = np.load(Path(study.folder(args, run), "posteriors.npz"))
    assert saved["dense@40"].shape == (2, 4) and int(saved["epoch"]) == 3
