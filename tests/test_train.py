"""The training loop and examples/train_imagenet.py, on tiny synthetic and folder data."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from minivgg import checkpoint
from minivgg.checkpoint import CheckpointError
from minivgg.run_state import load_model
from minivgg.metrics import METRICS_COLUMNS, topk_errors
from minivgg.train import (Run, TrainingDiverged, TrainingError, fit, setup,
                           synthetic_config)

from test_data import make_layout, write_image
from conftest import load_example

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "examples", "train_imagenet.py")

# A net and data small enough for a step to take milliseconds.
TINY = dict(epochs=1, batch_size=10, width=0.125, fc_width=16, synthetic_train=40,
            synthetic_val=20, lr_patience=100)
TINY_FLAGS = ["--width", "0.125", "--fc-width", "16", "-b", "10", "--synthetic-train", "40",
              "--synthetic-val", "20"]


def tiny_config(output, **overrides):
    return synthetic_config(**{**TINY, "output": str(output), **overrides})


def run_fit(output, **overrides):
    lines = []
    rows = fit(tiny_config(output, **overrides), log=lines.append)
    return rows, lines


# --- metrics ------------------------------------------------------------------------------

def test_topk_errors_counts_labels_outside_the_k_best_logits():
    logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    labels = np.array([1, 2, 0])
    assert topk_errors(logits, labels, (1, 2, 5)) == {1: 2, 2: 1, 5: 0}


# --- set-up -------------------------------------------------------------------------------

def test_setup_builds_the_run_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    lines = []
    run = setup(tiny_config(out), log=lines.append)
    try:
        assert isinstance(run, Run) and run.start_epoch == 0 and run.last_good is None
        assert run.model.config == "A" and run.model.num_classes == len(run.classes) == 10
        assert run.optimizer.lr == 0.001 and run.scheduler.optimizer is run.optimizer
        assert len(run.train_loader) == 4 and len(run.val_loader) == 2  # 40 / 20 images, b 10
        assert len(run.stats.mean_rgb) == 3 and run.device == "cpu"
        assert run.paths.last == str(out / "last.npz")
        assert run.paths.metrics_png == str(out / "metrics.png")
        assert run.title == "VGG-A on synthetic data (drawn shapes and textures)"
        assert any("VGG-A width 0.125 fc 16" in line for line in lines)
        assert all(line.startswith("[synthetic] ") for line in lines)
    finally:
        run.close()
    # The folder is made (and its writability proved) before any data is read; nothing
    # is written into it until training starts.
    assert list(out.iterdir()) == []


# --- a whole run --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A finished 1-epoch synthetic run: (output folder, rows, log lines)."""
    out = tmp_path_factory.mktemp("run1")
    rows, lines = run_fit(out)
    return out, rows, lines


def test_a_run_writes_checkpoints_metrics_and_a_plot(one_epoch):
    out, rows, lines = one_epoch
    assert {"last.npz", "best.npz", "metrics.csv", "metrics.png"} <= set(os.listdir(out))
    with open(out / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == METRICS_COLUMNS
        (row,) = list(reader)
    assert row["epoch"] == "1" and float(row["lr"]) == 0.001
    assert 0 <= float(row["val_top1_err"]) <= 1 and float(row["images_per_s"]) > 0
    assert all(line.startswith("[synthetic] ") for line in lines)


def test_checkpoint_meta_holds_what_evaluation_and_resume_need(one_epoch):
    out = one_epoch[0]
    _, opt_state, meta = checkpoint.load(out / "last.npz")
    assert meta["model"] == {"config": "A", "num_classes": 10, "width": 0.125,
                             "fc_width": 16, "input_size": 32}
    assert meta["classes"][0] == "disc" and len(meta["classes"]) == 10
    stats = meta["data_stats"]
    assert len(stats["mean_rgb"]) == 3 and 20 < stats["mean_rgb"][0] < 235  # 0-255 scale
    assert np.shape(stats["pca_eigvec"]) == (3, 3) and len(stats["pca_eigval"]) == 3
    assert meta["epoch"] == 1 and meta["synthetic"] is True
    assert {"host", "loader_seed"} <= set(meta["rng"]) and "decreases" in meta["scheduler"]
    assert 0 <= meta["best_val_top1_err"] <= 1
    assert all(v is not None for v in opt_state["velocities"])


def test_load_model_rebuilds_the_trained_network(one_epoch):
    out = one_epoch[0]
    model, meta = load_model(out / "best.npz")
    state, _, _ = checkpoint.load(out / "best.npz")
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    assert model.training is False and meta["model"]["config"] == "A"


def test_load_model_gives_clear_errors_for_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing.npz")
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path / "corrupt.npz")
    np.savez(tmp_path / "foreign.npz", weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a minivgg checkpoint"):
        load_model(tmp_path / "foreign.npz")
    checkpoint.save(tmp_path / "nomodel.npz", {"w": np.zeros(2)}, meta={})
    with pytest.raises(CheckpointError, match="does not describe a model"):
        load_model(tmp_path / "nomodel.npz")


def test_two_epochs_equal_one_epoch_plus_a_resumed_one_bit_for_bit(tmp_path, one_epoch):
    straight = tmp_path / "straight"
    run_fit(straight, epochs=2)
    resumed = tmp_path / "resumed"
    os.makedirs(resumed)
    for name in ("last.npz", "metrics.csv"):  # a copy of the 1-epoch run, then resume it
        (resumed / name).write_bytes((one_epoch[0] / name).read_bytes())
    rows, lines = run_fit(resumed, epochs=2, resume=str(resumed / "last.npz"))
    assert any("resumed" in line for line in lines)
    a_model, a_opt, a_meta = checkpoint.load(straight / "last.npz")
    b_model, b_opt, b_meta = checkpoint.load(resumed / "last.npz")
    for k in a_model:
        np.testing.assert_array_equal(a_model[k], b_model[k], err_msg=k)
    for va, vb in zip(a_opt["velocities"], b_opt["velocities"]):
        np.testing.assert_array_equal(va, vb)
    assert a_meta["rng"] == b_meta["rng"] and a_meta["scheduler"] == b_meta["scheduler"]
    assert [r["epoch"] for r in rows] == ["1", 2]
    with open(resumed / "metrics.csv") as f:
        assert len(f.read().strip().splitlines()) == 3  # header + 2 epochs


def test_a_learning_rate_given_at_resume_wins_over_the_stored_one(tmp_path, one_epoch):
    rows, _ = run_fit(tmp_path, epochs=2, lr=0.003, resume=str(one_epoch[0] / "last.npz"))
    assert float(rows[-1]["lr"]) == 0.003
    _, opt, _ = checkpoint.load(tmp_path / "last.npz")
    assert opt["lr"] == 0.003


def test_stop_at_plateau_ends_the_run_after_the_third_cut_and_a_resume_adds_nothing(tmp_path):
    """lr 1e-12 leaves the weights as they are, so the val error never improves after the
    first epoch: patience 0 cuts after epochs 2, 3 and 4, and epoch 5's plateau ends it."""
    rows, lines = run_fit(tmp_path, epochs=20, lr=1e-12, lr_patience=0, stop_at_plateau=True)
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-12] * 2 + [1e-13, 1e-14, 1e-15])
    assert any("the run ends at epoch 5" in line for line in lines), lines
    again, _ = run_fit(tmp_path, epochs=20, lr_patience=0, stop_at_plateau=True,
                       resume=str(tmp_path / "last.npz"))
    assert len(again) == 5  # nothing trained: the stored schedule has ended
    more, _ = run_fit(tmp_path, epochs=6, resume=str(tmp_path / "last.npz"))
    assert len(more) == 6  # without --stop-at-plateau a resume trains on to --epochs


def test_a_patience_given_at_resume_wins_over_the_stored_one(tmp_path, one_epoch):
    run = setup(tiny_config(tmp_path, epochs=2, lr_patience=5,
                            resume=str(one_epoch[0] / "last.npz")), log=lambda _: None)
    try:
        assert run.scheduler.patience == 5  # the first run's was 100 (TINY)
    finally:
        run.close()


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning",
                            "ignore:invalid value:RuntimeWarning")
def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, one_epoch):
    (tmp_path / "last.npz").write_bytes((one_epoch[0] / "last.npz").read_bytes())
    before = (tmp_path / "last.npz").read_bytes()
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf|-inf) at epoch 2") as e:
        run_fit(tmp_path, epochs=3, lr=1e12, resume=str(tmp_path / "last.npz"))
    assert "last good checkpoint is" in str(e.value)
    assert (tmp_path / "last.npz").read_bytes() == before
    assert checkpoint.load(tmp_path / "last.npz")[2]["epoch"] == 1


def test_resume_of_another_architecture_is_a_clear_error(tmp_path, one_epoch):
    with pytest.raises(TrainingError, match="different network: config 'A' \\(asked: 'B'\\)"):
        run_fit(tmp_path, arch="B", epochs=2, resume=str(one_epoch[0] / "last.npz"))
    with pytest.raises(TrainingError, match="width 0.125 \\(asked: 0.25\\)"):
        run_fit(tmp_path, width=0.25, epochs=2, resume=str(one_epoch[0] / "last.npz"))


def test_evaluate_reports_the_checkpoint_error_without_training(one_epoch, tmp_path):
    rows, lines = run_fit(tmp_path, evaluate=True, resume=str(one_epoch[0] / "best.npz"))
    _, _, meta = checkpoint.load(one_epoch[0] / "best.npz")
    assert rows[0]["val_top1_err"] == pytest.approx(meta["val_top1_err"])
    assert any("evaluation of" in line for line in lines)
    assert "last.npz" not in os.listdir(tmp_path)


def test_folder_data_with_corrupt_and_odd_mode_files_trains_and_counts_skips(tmp_path):
    root = tmp_path / "data"
    make_layout(str(root), ("n01", "n02"), 3)
    for i, mode in enumerate(["L", "CMYK", "P", "RGBA"]):
        ext = "png" if mode in ("P", "RGBA") else "JPEG"
        write_image(str(root / "train" / "n02" / f"odd{i}.{ext}"), mode, size=(40, 36))
    (root / "train" / "n01" / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 broken")
    lines = []
    cfg = tiny_config(tmp_path / "out", data=str(root), scale=36, crop=32, batch_size=4)
    fit(cfg, log=lines.append)
    summary = [line for line in lines if line.startswith("epoch 1/1")][0]
    assert "1 unreadable images skipped" in summary
    assert not any("[synthetic]" in line for line in lines)


# --- the script ---------------------------------------------------------------------------

def test_script_trains_the_synthetic_default_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, SCRIPT, "--epochs", "1", "--output", str(out)]
                          + TINY_FLAGS, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines and all(line.startswith("[synthetic] ") for line in lines)
    assert any("epoch 1/1" in line and "top-5 err" in line for line in lines)
    assert os.path.isfile(out / "best.npz") and os.path.isfile(out / "metrics.csv")


def test_script_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: data directory") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "no images"),
    ("classes", "train and val class sets differ"),
    ("crop", "crop 64 is larger than the smallest scale S=56"),
    ("resume-missing", "checkpoint .* does not exist"),
    ("resume-corrupt", "corrupt|not an .npz"),
    ("cuda", "device 'cuda' was asked for"),
    ("patience", "--lr-patience must be 0 or more, got -1"),
])
def test_script_reports_bad_input_as_error_lines(tmp_path, capsys, case, message):
    root = tmp_path / "data"
    flags = TINY_FLAGS + ["--epochs", "1", "--output", str(tmp_path / "out")]
    if case == "empty":
        os.makedirs(root / "train" / "n01")
        os.makedirs(root / "val" / "n01")
    elif case == "classes":
        make_layout(str(root), ("n01", "n02"), 1, ("train",))
        make_layout(str(root), ("n01", "n03"), 1, ("val",))
    argv = {"missing": [str(root)], "empty": [str(root)], "classes": [str(root)],
            "crop": ["--scale-jitter", "56", "80", "--crop", "64"],
            "resume-missing": ["--resume", str(tmp_path / "none.npz")],
            "resume-corrupt": ["--resume", str(tmp_path / "bad.npz")],
            "cuda": ["--device", "cuda"], "patience": ["--lr-patience", "-1"]}[case]
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    if case == "cuda":
        from minivgg import backend
        if backend.cuda_available():
            pytest.skip("a GPU is present")
    assert load_example("train_imagenet").main(argv + flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert __import__("re").search(message, err), err


def test_init_from_a_warm_starts_a_deeper_net_and_checks_shapes(tmp_path, one_epoch):
    a_ckpt = str(one_epoch[0] / "best.npz")
    _, lines = run_fit(tmp_path / "b", arch="B", init_from=a_ckpt)
    assert any("warm start from" in line and "conv3_2" in line and "fc8" in line
               for line in lines)
    with pytest.raises(TrainingError, match="--init-from .*fc6.weight"):
        run_fit(tmp_path / "c", arch="B", init_from=a_ckpt, fc_width=32)
