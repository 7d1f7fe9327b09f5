"""minivgg.metrics (top-k errors, metrics.csv) and minivgg.plots (training curves)."""

import csv
import sys

import numpy as np
import pytest
from PIL import Image

from minivgg import metrics, plots
from minivgg.metrics import METRICS_COLUMNS, PLOTTED_COLUMNS, topk_errors

TRAIN = {"train_loss": 2.25, "train_top1_err": 0.8125, "images_per_s": 123.456}
VAL = {"val_loss": 2.5, "val_top1_err": 0.75, "val_top5_err": 0.25}


def test_topk_errors_counts_each_k_against_a_naive_loop():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(37, 11))
    labels = rng.integers(0, 11, size=37)
    ks = (1, 3, 5, 11)
    expected = {k: sum(label not in np.argsort(-row)[:k] for row, label in zip(scores, labels))
                for k in ks}
    assert topk_errors(scores, labels, ks) == expected


def test_topk_errors_breaks_ties_by_class_index_and_allows_k_above_the_class_count():
    scores = np.zeros((2, 4))  # every class tied: the lowest index ranks first
    assert topk_errors(scores, np.array([0, 3]), ks=(1, 3, 10)) == {1: 1, 3: 1, 10: 0}


def test_topk_errors_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="expected scores"):
        topk_errors(np.zeros((3, 5)), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="expected scores"):
        topk_errors(np.zeros(5), np.zeros(5, dtype=int))


def test_epoch_row_has_every_column_with_fixed_precision():
    row = metrics.epoch_row(3, TRAIN, VAL, 0.001, 61.234)
    assert tuple(row) == METRICS_COLUMNS
    assert row["epoch"] == 3 and row["train_loss"] == "2.250000" and row["lr"] == "0.001"
    assert row["images_per_s"] == "123.46" and row["seconds"] == "61.23"


def test_written_metrics_read_back_and_stop_at_the_resumed_epoch(tmp_path):
    path = str(tmp_path / "metrics.csv")
    rows = [metrics.epoch_row(e, TRAIN, VAL, 0.01, 1.0) for e in (1, 2, 3)]
    metrics.write_metrics(path, rows)
    with open(path, newline="") as f:
        assert tuple(csv.DictReader(f).fieldnames) == METRICS_COLUMNS
    back = metrics.read_metrics(path)
    assert [r["epoch"] for r in back] == ["1", "2", "3"]
    assert back[0]["val_top5_err"] == "0.250000"
    assert [r["epoch"] for r in metrics.read_metrics(path, up_to_epoch=2)] == ["1", "2"]
    assert not (tmp_path / "metrics.csv.tmp").exists()  # the temporary file was renamed


def test_read_metrics_rejects_empty_files_and_missing_columns(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text(",".join(METRICS_COLUMNS) + "\n")
    with pytest.raises(ValueError, match="no rows"):
        metrics.read_metrics(str(empty))
    bad = tmp_path / "bad.csv"
    bad.write_text("epoch,loss\n1,2.0\n")
    with pytest.raises(ValueError, match="missing columns"):
        metrics.read_metrics(str(bad))
    with pytest.raises(OSError):
        metrics.read_metrics(str(tmp_path / "absent.csv"))


def test_metric_columns_turns_rows_into_float_columns_with_nan_for_blanks():
    rows = [{"epoch": 1, "lr": "0.01", "val_loss": "nan"}, {"epoch": "2", "lr": "",
                                                           "val_loss": "1.5"}]
    col = metrics.metric_columns(rows)
    assert col["epoch"] == [1.0, 2.0] and col["lr"][0] == 0.01 and np.isnan(col["lr"][1])
    assert np.isnan(col["val_loss"][0]) and col["val_loss"][1] == 1.5
    assert set(PLOTTED_COLUMNS) <= set(METRICS_COLUMNS)


def test_plot_curves_writes_a_png_of_the_rows(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [metrics.epoch_row(e, TRAIN, VAL, 0.01 / e, 1.0) for e in (1, 2, 3)]
    path = tmp_path / "curves.png"
    plots.plot_curves(rows, str(path), title="a title")
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) > 100


def test_import_pyplot_says_how_to_install_matplotlib_when_it_is_missing(monkeypatch,
                                                                         tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plots.import_pyplot()
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plots.plot_curves([metrics.epoch_row(1, TRAIN, VAL, 0.01, 1.0)],
                          str(tmp_path / "c.png"))
    assert not (tmp_path / "c.png").exists()
