"""Failure behaviour of the command-line tools: one `error:` line, the right exit status,
nothing lost (issue 15). Training interrupts, SIGTERM and divergence are tested on a real
subprocess; image and weight problems through the scripts' own `main`."""

import os
import selectors
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from minivgg import checkpoint, models, run_state
from conftest import load_example

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def last_error_line(capsys):
    """For training: stderr also holds the progress bars; the one `error:` line ends it."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    return errors[0][errors[0].index("error:"):]


def one_error_line(capsys):
    """The captured stderr, checked to be exactly one line starting with 'error: '."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "allow_pickle" not in err
    return lines[0]


# --- examples/classify.py -------------------------------------------------------------------

@pytest.fixture(scope="module")
def classify():
    return load_example("classify")


def _bad_image(tmp_path, case):
    path = tmp_path / f"{case}.jpg"
    if case == "not an image":
        path.write_text("just text")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "folder":
        path.mkdir()
    elif case in ("truncated", "decompression bomb"):
        rgb = np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(path, quality=90)
        if case == "truncated":
            path.write_bytes(path.read_bytes()[:400])
    return path


@pytest.mark.parametrize("case, why", [("missing", "no such file"),
                                       ("not an image", "not an image format"),
                                       ("empty", "the file is empty"),
                                       ("truncated", "truncated"),
                                       ("folder", "it is a folder"),
                                       ("decompression bomb", "DecompressionBomb")])
def test_classify_reports_a_bad_image_in_one_line_before_loading_weights(
        tmp_path, capsys, monkeypatch, classify, case, why):
    path = _bad_image(tmp_path, case)
    if case == "decompression bomb":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 100x100 > twice the limit
    # The weights do not exist: an error about the image proves it was read first.
    assert classify.main([str(path), "--weights", str(tmp_path / "none.npz")]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: cannot read image {path}: ") and why in line


@pytest.mark.parametrize("top", ["-3", "0"])
def test_classify_rejects_a_top_below_one(tmp_path, capsys, classify, top):
    assert classify.main([str(tmp_path / "x.jpg"), "--weights", "w.npz", "--top", top]) == 2
    assert f"--top must be at least 1, got {top}" in one_error_line(capsys)


@pytest.mark.parametrize("kind", ["garbage", "object array", "huge header"])
def test_classify_reports_a_damaged_weights_file_without_the_pickle_hint(
        tmp_path, capsys, classify, kind):
    image = tmp_path / "ok.png"
    Image.new("RGB", (40, 30), (10, 20, 30)).save(image)
    weights = tmp_path / "w.npz"
    if kind == "garbage":
        weights.write_bytes(b"PK\x03\x04" + bytes(100))
    elif kind == "object array":
        np.savez(weights, w=np.array([{"code": "run me"}], dtype=object))
    else:
        import io
        import zipfile
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buf, {"descr": "<f4", "fortran_order": False, "shape": (10**11,)})
        with zipfile.ZipFile(weights, "w") as z:
            z.writestr("features.0.weight.npy", buf.getvalue() + bytes(8))
    assert classify.main([str(image), "--weights", str(weights), "--config", "A"]) == 2
    assert f"weights file {str(weights)!r}" in one_error_line(capsys)


def test_classify_refuses_to_rank_with_nan_weights(tmp_path, capsys, monkeypatch, classify):
    image = tmp_path / "ok.png"
    Image.new("RGB", (40, 30), (10, 20, 30)).save(image)
    model = models.vgg("A", num_classes=3, width=1 / 16, fc_width=8, input_size=224)
    model.parameters()[4].data[...] = np.nan
    monkeypatch.setattr(classify.pretrained, "load_pretrained", lambda *a: model)
    assert classify.main([str(image), "--weights", "w.npz", "--config", "A"]) == 2
    line = one_error_line(capsys)
    assert "hold NaN or Inf" in line and "refusing" in line
    assert capsys.readouterr().out == ""  # no percentages printed as if all were fine


# --- examples/evaluate_imagenet.py ----------------------------------------------------------

def test_evaluate_refuses_a_checkpoint_with_nan_weights(tmp_path, capsys):
    evaluate_imagenet = load_example("evaluate_imagenet")
    model = models.vgg("A", num_classes=2, width=1 / 16, fc_width=8, input_size=32)
    state = model.state_dict()
    state["fc8.weight"][0, 0] = np.inf
    meta = {"model": {"config": "A", "num_classes": 2, "width": 1 / 16, "fc_width": 8,
                      "input_size": 32}, "classes": ["a", "b"],
            "data_stats": {"mean_rgb": [0, 0, 0], "pca_eigval": [0, 0, 0],
                           "pca_eigvec": np.eye(3).tolist()}}
    path = tmp_path / "diverged.npz"
    checkpoint.save(path, state, meta=meta)
    assert evaluate_imagenet.cli([str(path), "--data", str(tmp_path)]) == 2
    line = one_error_line(capsys)
    assert str(path) in line and "fc8.weight hold NaN or Inf" in line
    assert capsys.readouterr().out == ""


# --- training: interrupts, preemption, earlier runs, divergence, bad flags ------------------
#
# Real runs of examples/train_imagenet.py at the tiny size of the issue on a generated
# 2-class folder. `DRIVER` wraps the script so that a signal is sent to the whole process
# group (as a terminal's Ctrl-C, or a scheduler) during a chosen training step: the stop
# point is exact, so a resume can be compared bit for bit with an uninterrupted run.

TINY = ["-a", "A", "--width", "0.125", "--fc-width", "64", "--scale", "40", "--crop", "32",
        "-b", "16", "--init", "glorot", "--lr", "0.001"]
STEPS_PER_EPOCH = 5  # 80 training images, batch 16

DRIVER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    sys.path.insert(0, os.path.join({repo!r}, "examples"))
    from minivgg import train
    import train_imagenet
    plan = {plan!r}  # training step (1-based, counted over the run) -> signals to send
    count = [0]
    real_step = train.train_step
    def train_step(*args):
        count[0] += 1
        for name in plan.get(count[0], []):
            os.killpg(0, getattr(signal, name))  # to the whole group, workers included
        return real_step(*args)
    train.train_step = train_step
    sys.exit(train_imagenet.main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("val", 8)):
        for name, colour in (("n01", (200, 60, 60)), ("n02", (60, 60, 200))):
            os.makedirs(root / split / name)
            for i in range(n):
                img = np.clip(rng.normal(colour, 40, (44, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / name / f"{i}.JPEG")
    return str(root)


def train_run(tmp_path, args, plan=None, timeout=180):
    """Run the training script (through DRIVER when `plan` is given) in a new process
    group -> (return code, stdout, stderr); fails on a hang and on leftover processes."""
    script = os.path.join(REPO, "examples", "train_imagenet.py")
    if plan is not None:
        script = tmp_path / f"driver_{abs(hash(repr(plan)))}.py"
        script.write_text(DRIVER.format(repo=REPO, plan=plan))
    proc = subprocess.Popen([sys.executable, str(script)] + args, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=REPO))
    out, err = _communicate(proc, timeout)
    assert _wait_group_gone(proc.pid) == [], f"processes left behind\n{err}"
    return proc.returncode, out, err


def _communicate(proc, timeout):
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"hung for {timeout}s\nstdout:\n{out}\nstderr:\n{err}")


def _group_members(pgid):
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry))
    return members


def _wait_group_gone(pgid, seconds=5):
    if not os.path.isdir("/proc"):
        return []
    deadline = time.monotonic() + seconds
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _group_members(pgid)


def weights(path):
    state, _, meta = checkpoint.load(path)
    return state, meta


def assert_same_weights(a, b):
    assert list(a) == list(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def metric_rows(folder):
    """metrics.csv without its timing columns."""
    import csv
    with open(os.path.join(folder, "metrics.csv"), newline="") as f:
        return [{k: v for k, v in row.items() if k not in ("images_per_s", "seconds")}
                for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    """Two epochs without any signal: the reference a resumed run must equal."""
    out_dir = tmp_path_factory.mktemp("reference")
    rc, out, err = train_run(out_dir, [tiny_data, *TINY, "--epochs", "2", "--output",
                                       str(out_dir / "run")])
    assert rc == 0, err
    return str(out_dir / "run")


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_stop_signal_mid_epoch_saves_a_checkpoint_that_resumes_bit_identically(
        tiny_data, tmp_path, uninterrupted, sig, code):
    run = str(tmp_path / "run")
    step = STEPS_PER_EPOCH + 2  # the second step of epoch 2
    rc, out, err = train_run(tmp_path, [tiny_data, *TINY, "--epochs", "2", "--output", run],
                             plan={step: [sig]})
    assert rc == code, err
    last = os.path.join(run, "last.npz")
    assert f"{sig} received" in err
    assert f"{last} holds epoch 2 up to batch 2 of {STEPS_PER_EPOCH}" in err
    assert "--resume" in err and "Traceback" not in err and "BrokenPipe" not in err
    assert weights(last)[1]["batch"] == 2
    rc, out, err = train_run(tmp_path, [tiny_data, *TINY, "--epochs", "2", "--resume", last])
    assert rc == 0, err
    assert_same_weights(weights(last)[0], weights(os.path.join(uninterrupted, "last.npz"))[0])
    assert metric_rows(run) == metric_rows(uninterrupted)


def test_ctrl_c_in_the_first_epoch_does_not_claim_a_finished_epoch(tiny_data, tmp_path):
    run = str(tmp_path / "run")
    rc, out, err = train_run(tmp_path, [tiny_data, *TINY, "--epochs", "2", "--output", run],
                             plan={2: ["SIGINT"]})
    assert rc == 130, err
    assert "last finished epoch" not in err and "no epoch has finished yet" in err.lower()
    assert weights(os.path.join(run, "last.npz"))[1]["epoch"] == 0


def test_a_second_ctrl_c_exits_at_once_and_the_earlier_checkpoint_survives(tiny_data,
                                                                         tmp_path):
    run = str(tmp_path / "run")
    rc, out, err = train_run(tmp_path, [tiny_data, *TINY, "--epochs", "3", "--output", run],
                             plan={STEPS_PER_EPOCH + 2: ["SIGINT", "SIGINT"]})
    assert rc == -signal.SIGINT, err  # ended by the signal itself, at once
    state, meta = weights(os.path.join(run, "last.npz"))
    assert (meta["epoch"], meta.get("batch", 0)) == (1, 0)  # epoch 1's, intact
    rc, out, err = train_run(tmp_path, [tiny_data, *TINY, "--epochs", "2", "--resume",
                                        os.path.join(run, "last.npz")])
    assert rc == 0, err


def test_sigusr1_saves_a_checkpoint_and_training_goes_on(tiny_data, tmp_path):
    run = str(tmp_path / "run")
    rc, out, err = train_run(tmp_path, [tiny_data, *TINY, "--epochs", "1", "--output", run],
                             plan={3: ["SIGUSR1"]})
    assert rc == 0, err
    assert f"saved {os.path.join(run, 'last.npz')} (epoch 1 up to batch 3" in out
    assert weights(os.path.join(run, "last.npz"))[1]["epoch"] == 1


def test_ctrl_c_from_outside_at_any_moment_stops_within_seconds(tiny_data, tmp_path):
    run = str(tmp_path / "run")
    script = os.path.join(REPO, "examples", "train_imagenet.py")
    proc = subprocess.Popen([sys.executable, script, tiny_data, *TINY, "--epochs", "100",
                             "--output", run], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 120
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:  # until the first epoch has finished, at most 2 minutes
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                _communicate(proc, 0.1)  # fails the test, killing the group
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
            if "epoch 1/100" in line:
                break
    os.killpg(proc.pid, signal.SIGINT)
    start = time.monotonic()
    out, err = _communicate(proc, 30)
    assert time.monotonic() - start < 10 and proc.returncode == 130, err
    assert _wait_group_gone(proc.pid) == [] and "Traceback" not in err
    assert "--resume" in err and checkpoint.load(os.path.join(run, "last.npz"))


def test_a_new_run_never_overwrites_an_earlier_one(tiny_data, tmp_path, uninterrupted):
    import shutil
    run = str(tmp_path / "run")
    shutil.copytree(uninterrupted, run)
    before = {n: open(os.path.join(run, n), "rb").read() for n in os.listdir(run)}
    rc, out, err = train_run(tmp_path, [tiny_data, *TINY, "--lr", "0.01", "--output", run])
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert f"--resume {os.path.join(run, 'last.npz')}" in err and "--overwrite" in err
    assert {n: open(os.path.join(run, n), "rb").read() for n in os.listdir(run)} == before
    rc, out, err = train_run(tmp_path, [tiny_data, *TINY, "--epochs", "1", "--output", run,
                                        "--overwrite"])
    assert rc == 0, err
    assert weights(os.path.join(run, "last.npz"))[1]["epoch"] == 1
    assert len(metric_rows(run)) == 1


@pytest.mark.parametrize("kind", ["file", "inside a file"])
def test_an_unwritable_output_is_an_error_before_any_data_is_read(tmp_path, capsys, kind):
    train_imagenet = load_example("train_imagenet")
    (tmp_path / "file").write_text("x")
    output = tmp_path / "file" if kind == "file" else tmp_path / "file" / "run"
    # The data folder does not exist: an error about --output shows it came first.
    assert train_imagenet.main([str(tmp_path / "no-data"), "--output", str(output)]) == 2
    assert "--output" in one_error_line(capsys)


@pytest.mark.parametrize("flag, value", [("--lr", "0"), ("--lr", "-0.1"), ("--lr", "nan"),
                                         ("--momentum", "-0.5"), ("--momentum", "1.5"),
                                         ("--wd", "-0.001"), ("--dropout", "1"),
                                         ("-j", "-1"), ("--width", "0"), ("--fc-width", "0"),
                                         ("-p", "0"), ("--epochs", "0")])
def test_bad_training_flags_are_one_error_line_with_exit_status_2(tmp_path, capsys, flag,
                                                                   value):
    train_imagenet = load_example("train_imagenet")
    assert train_imagenet.main([flag, value, "--output", str(tmp_path / "run")]) == 2
    line = one_error_line(capsys)
    assert flag in line and value in line
    assert not os.path.exists(tmp_path / "run")  # checked before anything was written


def test_a_huge_learning_rate_stops_before_any_checkpoint_of_nan_weights(tiny_data,
                                                                          tmp_path, capsys):
    train_imagenet = load_example("train_imagenet")
    run = tmp_path / "run"
    args = [tiny_data, *TINY, "--lr", "1e9", "-j", "0", "--output", str(run)]
    assert train_imagenet.main(args) == 1
    line = last_error_line(capsys)
    assert "loss became" in line and "no checkpoint had been written yet" in line
    assert not (run / "last.npz").exists() and not (run / "best.npz").exists()


def test_a_nan_validation_loss_stops_the_run_and_last_good_is_finite_and_resumable(
        tiny_data, tmp_path, capsys, monkeypatch):
    from minivgg import train
    train_imagenet = load_example("train_imagenet")
    run = tmp_path / "run"
    real_validate, calls = train.validate, []

    def validate(*args, **kwargs):  # epoch 2's validation loss is NaN
        result = real_validate(*args, **kwargs)
        calls.append(1)
        return dict(result, val_loss=float("nan")) if len(calls) == 2 else result

    monkeypatch.setattr(train, "validate", validate)
    args = [tiny_data, *TINY, "--epochs", "3", "-j", "0", "--output", str(run)]
    assert train_imagenet.main(args) == 1
    line = last_error_line(capsys)
    assert "the validation loss became nan at epoch 2" in line
    assert f"the last good checkpoint is {run / 'last.npz'} (epoch 1)" in line
    state, opt_state, meta = checkpoint.load(run / "last.npz")
    assert meta["epoch"] == 1 and checkpoint.nonfinite(state) == []
    run_state.check_resumable(run / "last.npz", state, opt_state, meta)
    monkeypatch.undo()
    assert train_imagenet.main([tiny_data, *TINY, "--epochs", "2", "-j", "0", "--resume",
                                str(run / "last.npz")]) == 0


def test_a_full_disk_during_a_run_is_one_line_and_the_last_checkpoint_survives(
        tiny_data, tmp_path, capsys, monkeypatch):
    import errno
    train_imagenet = load_example("train_imagenet")
    run = tmp_path / "run"
    real_savez, calls = np.savez, []

    def savez(file, **arrays):  # epoch 1 writes last.npz and best.npz; then the disk is full
        calls.append(1)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_savez(file, **arrays)

    monkeypatch.setattr(np, "savez", savez)
    args = [tiny_data, *TINY, "--epochs", "2", "-j", "0", "--output", str(run)]
    assert train_imagenet.main(args) == 1
    line = last_error_line(capsys)
    last = run / "last.npz"
    assert line == (f"error: no space left on the disk holding {run} while writing {last}; "
                    f"the previous checkpoint {last} is intact")
    monkeypatch.undo()
    assert checkpoint.load(last)[2]["epoch"] == 1
    assert sorted(os.listdir(run)) == ["best.npz", "last.npz", "metrics.csv", "metrics.png"]


def test_a_damaged_checkpoint_is_refused_before_any_training(tiny_data, tmp_path, capsys,
                                                              uninterrupted):
    train_imagenet = load_example("train_imagenet")
    state, opt_state, meta = checkpoint.load(os.path.join(uninterrupted, "last.npz"))
    del meta["scheduler"]
    opt_state["velocities"][0] = np.zeros(3, np.float32)
    damaged = tmp_path / "damaged" / "last.npz"
    checkpoint.save(damaged, state, opt_state, meta)
    assert train_imagenet.main([tiny_data, *TINY, "--epochs", "3", "--resume",
                                str(damaged)]) == 2
    line = one_error_line(capsys)
    assert "cannot be resumed: no 'scheduler' entry; momentum buffer 0" in line
    assert capsys.readouterr().out == ""  # nothing was read or trained


def test_a_run_removes_the_temporary_files_of_a_killed_write(tiny_data, tmp_path, capsys):
    train_imagenet = load_example("train_imagenet")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".tmp-abcd_123.npz").write_bytes(b"half a checkpoint from a SIGKILL")
    assert train_imagenet.main([tiny_data, *TINY, "--epochs", "1", "-j", "0", "--output",
                                str(run)]) == 0
    assert f"removed {run / '.tmp-abcd_123.npz'}" in capsys.readouterr().out
    assert sorted(os.listdir(run)) == ["best.npz", "last.npz", "metrics.csv", "metrics.png"]


# --- the same class of mistake in the other tools -------------------------------------------

@pytest.fixture
def small_checkpoint(tmp_path):
    """A tiny training checkpoint and an image, for the evaluation and drawing tools."""
    model = models.vgg("A", num_classes=2, width=1 / 16, fc_width=8, input_size=32)
    meta = {"model": run_state.model_meta(model), "classes": ["a", "b"],
            "data_stats": {"mean_rgb": [0, 0, 0], "pca_eigval": [0, 0, 0],
                           "pca_eigvec": np.eye(3).tolist()}}
    checkpoint.save(tmp_path / "ckpt.npz", model.state_dict(), meta=meta)
    Image.new("RGB", (48, 40), (90, 120, 30)).save(tmp_path / "img.png")
    return str(tmp_path / "ckpt.npz"), str(tmp_path / "img.png"), model, meta


@pytest.mark.parametrize("args, message", [
    (["features", "IMG", "--scale", "0"], "--scale must be at least 1, got 0"),
    (["scoremap", "IMG", "--scale", "-5"], "--scale must be at least 1, got -5"),
    (["features", "IMG", "--max-channels", "-2"], "--max-channels must be at least 1"),
    (["features", "missing.png", "--weights", "none.npz"],  # the image is read first
     "cannot read image missing.png: no such file"),
    (["filters", "--weights", "missing.npz"], "missing.npz"),
])
def test_visualize_reports_bad_flags_and_files_in_one_line(small_checkpoint, capsys, args,
                                                           message):
    visualize = load_example("visualize")
    ckpt, img, _, _ = small_checkpoint
    args = [img if a == "IMG" else a for a in args]
    if "--weights" not in args:
        args += ["--weights", ckpt]
    assert visualize.main(args) == 2
    assert message in one_error_line(capsys)


def test_visualize_refuses_nan_weights_and_damaged_files_without_the_pickle_hint(
        small_checkpoint, tmp_path, capsys):
    visualize = load_example("visualize")
    ckpt, img, model, meta = small_checkpoint
    state = model.state_dict()
    state["conv1_1.weight"][0] = np.nan
    checkpoint.save(tmp_path / "nan.npz", state, meta=meta)
    assert visualize.main(["filters", "--weights", str(tmp_path / "nan.npz")]) == 2
    assert "hold NaN or Inf; refusing to draw them" in one_error_line(capsys)
    np.savez(tmp_path / "objects.npz", w=np.array([{"code": 1}], dtype=object))
    assert visualize.main(["filters", "--weights", str(tmp_path / "objects.npz")]) == 2
    assert "Python objects" in one_error_line(capsys)


@pytest.mark.parametrize("args, message", [
    (["-p", "-1"], "-p/--print-freq must be 0 (no progress) or more, got -1"),
    (["-b", "1"], "--batch-size must be at least 2"),
    (["--scales", "0"], "test scales must be positive"),
    (["--device", "tpu"], "tpu"),
])
def test_evaluate_reports_bad_flags_in_one_line(small_checkpoint, tmp_path, capsys, args,
                                                message):
    evaluate_imagenet = load_example("evaluate_imagenet")
    ckpt = small_checkpoint[0]
    assert evaluate_imagenet.cli([ckpt, "--data", str(tmp_path), *args]) == 2
    assert message in one_error_line(capsys)


@pytest.mark.parametrize("case, message", [
    ("missing input", "no such file"),
    ("not .npz", "the output must end in .npz"),
    ("missing folder", "No such file or directory"),
    ("bad config", "unknown VGG configuration 'Z'"),
])
def test_pretrained_convert_reports_mistakes_in_one_line(small_checkpoint, tmp_path, capsys,
                                                         case, message):
    from minivgg.pretrained import cli as pretrained_cli
    ckpt = small_checkpoint[0]
    args = {"missing input": ["convert", str(tmp_path / "none.pth"), str(tmp_path / "o.npz")],
            "not .npz": ["convert", ckpt, str(tmp_path / "o.txt")],
            "missing folder": ["convert", ckpt, str(tmp_path / "no" / "o.npz")],
            "bad config": ["convert", ckpt, str(tmp_path / "o.npz"), "--config", "Z"]}[case]
    assert pretrained_cli.main(args) == 2
    assert message in one_error_line(capsys)
    assert not any(name.endswith(".tmp.npz") for name in os.listdir(tmp_path))


def test_visualize_features_defaults_to_a_layer_every_config_has(small_checkpoint, capsys,
                                                                 tmp_path):
    """VGG-A's first block has one conv (Table 1): its default layer is conv1_1, not the
    conv1_2 of B-E, which A does not have."""
    visualize = load_example("visualize")
    ckpt, img, _, _ = small_checkpoint  # a VGG-A checkpoint
    out = tmp_path / "maps.png"
    assert visualize.main(["features", img, "--weights", ckpt, "--out", str(out)]) == 0
    assert "conv1_1: output" in capsys.readouterr().out and out.exists()
    assert visualize.main(["features", img, "--config", "B", "--scale", "32", "--out",
                           str(out)]) == 0
    assert "conv1_2: output" in capsys.readouterr().out
