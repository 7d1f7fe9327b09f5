"""examples/transfer_study.py: the whole study on a tiny folder (4 classes of noise images,
1 epoch, one seed, net A) so every step is known to run; then its resumption (nothing is
redone), the k-shot subsets, and the report's statistics on records written by hand."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("sklearn")
stats = pytest.importorskip("scipy.stats")


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(REPO / "examples"))
    spec = importlib.util.spec_from_file_location("transfer_study",
                                                  REPO / "examples" / "transfer_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_data(tmp_path):
    """4 classes (2 source, 2 target), 6 train and 3 val images each, 80x96 pixels."""
    from PIL import Image
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for c, wnid in enumerate(["n01", "n02", "n03", "n04"]):
        for split, n in (("train", 6), ("val", 3)):
            (root / split / wnid).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 256, (80, 96, 3)).astype(np.uint8)
                img[..., c % 3] //= 2  # a colour cast per class
                Image.fromarray(img).save(root / split / wnid / f"{i}.png")
    return root


def study_argv(tmp_path, data, *extra):
    return [str(data), "--out", str(tmp_path / "runs"), "--record", str(tmp_path / "rec"),
            "--doc", str(tmp_path / "transfer.md"), "--epochs", "1", "--seeds", "1",
            "--archs", "A", "--shots", "2", "all", "--scales", "64", "-j", "0", *extra]


@pytest.mark.slow
def test_the_study_runs_end_to_end_and_resumes(study, tmp_path, tiny_data, monkeypatch,
                                               capsys):
    assert study.main(study_argv(tmp_path, tiny_data)) == 0
    rec = tmp_path / "rec"
    names = sorted(p.name for p in rec.iterdir())
    assert names == ["feat-src-A-s0", "feat-untrained-A-s0", "scratch-A-k2-s0",
                     "scratch-A-kall-s0", "src-A-s0"]
    src = json.loads((rec / "src-A-s0" / "record.json").read_text())
    assert src["classes"] == ["n01", "n02"] and src["epochs"] == 1
    feat = json.loads((rec / "feat-src-A-s0" / "record.json").read_text())
    assert set(feat["accuracy"]) == {"2", "all"} and feat["dims"] == 512
    preds = np.load(rec / "feat-src-A-s0" / "predictions.npz")
    assert len(preds["labels"]) == 6 and set(preds["labels"]) == {0, 1}
    assert feat["accuracy"]["2"] == pytest.approx(np.mean(preds["k2"] == preds["labels"]))
    k2 = json.loads((rec / "scratch-A-k2-s0" / "record.json").read_text())
    assert k2["epochs"] == 3  # 1 epoch of 12 images = 3 epochs of 4 in SGD steps
    assert (rec / "scratch-A-k2-s0" / "metrics.csv").is_file()
    # the k-shot run learned from 2 images per class and watched the target val images
    train = tmp_path / "runs" / "data" / "target-k2-s0" / "train"
    assert sorted(len(list(d.iterdir())) for d in train.iterdir()) == [2, 2]
    doc = (tmp_path / "transfer.md").read_text()
    assert "5 of\n5 runs recorded" in doc.replace("5 of 5", "5 of\n5")
    assert "| A | features of the source-trained net | " in doc and "(1 seed)" in doc
    assert "Welch" in doc and "VOC-2007 89.7 mAP" in doc

    # Resumed: every run is recorded, so nothing trains or is extracted again.
    def refuse(*a, **k):
        raise AssertionError("a recorded run was redone")
    monkeypatch.setattr(study, "train", refuse)
    monkeypatch.setattr(study.features, "extract", refuse)
    capsys.readouterr()
    assert study.main(study_argv(tmp_path, tiny_data)) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("== report:")


@pytest.mark.parametrize("extra, message", [
    (["--shots", "0"], "--shots: ['0'] are not positive numbers or 'all'"),
    (["--archs", "F"], "--archs: unknown ['F']"),
    (["--scales", "32"], "every --scales Q at least 64"),
])
def test_mistakes_get_one_error_line(study, tmp_path, tiny_data, capsys, extra, message):
    assert study.main(study_argv(tmp_path, tiny_data, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "runs").exists()
    assert study.main([str(tmp_path / "nowhere")]) == 2
    assert "has no train/ folder" in capsys.readouterr().err


def test_shot_subsets_are_per_class_repeatable_and_differ_by_seed(study):
    labels = np.repeat(np.arange(5), 40)
    a = study.shot_indices(labels, "5", seed=0)
    assert len(a) == 25 and all(np.sum(labels[a] == c) == 5 for c in range(5))
    np.testing.assert_array_equal(a, study.shot_indices(labels, "5", seed=0))
    assert not np.array_equal(a, study.shot_indices(labels, "5", seed=1))
    assert set(a) <= set(study.shot_indices(labels, "all", 0))
    assert len(study.shot_indices(labels, "100", 0)) == 200  # at most what a class has


def test_scratch_epochs_match_the_full_runs_sgd_steps(study):
    args = study.parse_args(["x", "--epochs", "12"])
    assert study.scratch_epochs(args, 4700, 4700) == 12
    assert study.scratch_epochs(args, 100, 4700) == 100   # capped at --max-epochs
    assert study.scratch_epochs(args, 2350, 4700) == 24


def write_record(root, name, **rec):
    (root / name).mkdir(parents=True)
    (root / name / "record.json").write_text(json.dumps(rec))


def test_report_gives_seed_intervals_and_welchs_test(study, tmp_path):
    rec = tmp_path / "rec"
    acc = {"A": [70.0, 72.0, 71.0], "D": [80.0, 83.0, 81.0]}
    for arch, vals in acc.items():
        for s, v in enumerate(vals):
            write_record(rec, f"feat-src-{arch}-s{s}", kind="features", arch=arch, seed=s,
                         accuracy={"5": v / 100, "all": v / 100})
            write_record(rec, f"scratch-{arch}-k5-s{s}", kind="scratch", arch=arch, seed=s,
                         shots="5", accuracy={"5": (v - 30) / 100})
    args = study.parse_args(["data", "--record", str(rec), "--doc",
                             str(tmp_path / "t.md"), "--shots", "5", "all"])
    study.write_report(args)
    doc = (tmp_path / "t.md").read_text()
    half = stats.t.ppf(0.975, 2) * np.std(acc["D"], ddof=1) / math.sqrt(3)
    assert f"| D | features of the source-trained net | {np.mean(acc['D']):.1f} ± " \
           f"{half:.1f} (n=3) |" in doc
    p = stats.ttest_ind(acc["D"], acc["A"], equal_var=False).pvalue
    assert p < 0.05
    assert f"**D's features transfer better** (Welch's t-test over seeds; 5 shots: D − A = " \
           f"+10.3 points (p = {p:.3f})" in doc
    assert "| A features vs A scratch | 5 | +30.0 points" in doc
    assert "| A | features of an untrained net | pending | pending |" in doc
    assert "| A features vs A untrained | 5 | pending (2 seeds each needed) | |" in doc


def test_depth_finding_names_where_the_difference_holds(study, tmp_path):
    """A win at one shot count and no significant difference at another is said as such,
    and the source nets' own errors are compared beside it."""
    rec = tmp_path / "rec"
    acc = {"A": ([50.0, 58.0, 44.0], [70.0, 71.0, 72.0]),
           "D": ([52.0, 45.0, 57.0], [60.0, 61.0, 62.0])}
    for arch, (five, every) in acc.items():
        for s in range(3):
            write_record(rec, f"feat-src-{arch}-s{s}", kind="features", arch=arch, seed=s,
                         accuracy={"5": five[s] / 100, "all": every[s] / 100})
            write_record(rec, f"src-{arch}-s{s}", kind="train", arch=arch, seed=s, epochs=12,
                         final_val_top1_err=(0.30 if arch == "A" else 0.40) + 0.01 * s)
    args = study.parse_args(["data", "--record", str(rec), "--doc",
                             str(tmp_path / "t.md"), "--shots", "5", "all"])
    study.write_report(args)
    doc = (tmp_path / "t.md").read_text()
    assert ("**A's features transfer better at all labelled images per class; no significant "
            "difference at 5 labelled images per class**") in doc
    assert "D − A = +10.0 points (p < 0.001). After 12 epochs the deeper net is" in doc
