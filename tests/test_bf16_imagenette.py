"""benchmarks/bf16_imagenette.py: the report and its verdict, from made-up metrics (the
trainings themselves are the README's small recipe, which examples' tests cover)."""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytest.importorskip("scipy")


@pytest.fixture
def script():
    spec = importlib.util.spec_from_file_location("bf16_imagenette",
                                                  REPO / "benchmarks" / "bf16_imagenette.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bf16_imagenette"] = module
    spec.loader.exec_module(module)
    return module


def write_metrics(folder, errs):
    folder.mkdir(parents=True)
    rows = ["epoch,train_loss,train_top1_err,val_loss,val_top1_err,val_top5_err,lr,"
            "images_per_s,seconds"]
    rows += [f"{i + 1},1,0.5,1,{e},0,0.01,100,10" for i, e in enumerate(errs)]
    (folder / "metrics.csv").write_text("\n".join(rows) + "\n")


@pytest.mark.parametrize("bf16_errs, within", [((0.45, 0.40), True), ((0.70, 0.71), False)])
def test_report_says_whether_bf16_is_within_seed_noise(script, tmp_path, bf16_errs, within):
    runs = tmp_path / "runs"
    for seed, (fp32, bf16) in enumerate(zip((0.42, 0.46), bf16_errs)):
        write_metrics(runs / f"fp32-s{seed}", [0.9, fp32, fp32 + 0.01])
        write_metrics(runs / f"bf16-s{seed}", [0.9, bf16, bf16 + 0.01])
    report = tmp_path / "r.md"
    assert script.main(["--report-only", "--epochs", "3", "--runs-dir", str(runs),
                        "--report", str(report)]) == 0
    text = report.read_text()
    assert "| fp32 | 0 | 42.00 | 43.00 | 30 |" in text
    assert ("**Within seed noise**" in text) == within
    assert ("**Outside seed noise**" in text) == (not within)


def test_report_waits_for_two_seeds_of_each(script, tmp_path):
    runs = tmp_path / "runs"
    write_metrics(runs / "fp32-s0", [0.5, 0.4])
    write_metrics(runs / "bf16-s0", [0.5])  # not finished: 1 of 2 epochs
    report = tmp_path / "r.md"
    script.main(["--report-only", "--epochs", "2", "--runs-dir", str(runs),
                 "--report", str(report)])
    text = report.read_text()
    assert "Pending" in text and "| bf16 |" not in text


def test_a_folder_without_train_is_refused(script, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        script.main([str(tmp_path)])
    assert e.value.code == 2 and "has no train/ folder" in capsys.readouterr().err
