"""Issue 27's cases, each on real processes, real signals and real files: two runs on one
folder, a FIFO among the images, a thin PNG, a resume with another batch size, huge
scales, and the rest. The helpers (a tiny data set, a run in its own process group that
fails on a hang or a leftover process) are those of `test_failure_behaviour`."""

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from minivgg import checkpoint, folder_lock, images, models, pretrained
from conftest import load_example
from test_failure_behaviour import (REPO, STEPS_PER_EPOCH, TINY, last_error_line,  # noqa: F401
                                    one_error_line, small_checkpoint, tiny_data, train_run,
                                    weights)

TRAIN = os.path.join(REPO, "examples", "train_imagenet.py")
ENV = dict(os.environ, PYTHONPATH=REPO)


def copy_data(tiny_data, tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(tiny_data, dst)
    return dst


def start(args, cwd=None):
    return subprocess.Popen([sys.executable, TRAIN] + args, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=ENV, cwd=cwd)


def wait_for(condition, seconds=60):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# --- 1. one run per output folder ---------------------------------------------------------

def test_a_second_run_on_the_same_output_is_refused_naming_the_first(tiny_data, tmp_path):
    run = tmp_path / "race"
    first = start([tiny_data, *TINY, "--epochs", "2", "--seed", "1", "--output", str(run)])
    try:
        wait_for(lambda: (run / folder_lock.OWNER_FILE).exists())
        rc, out, err = train_run(tmp_path, [tiny_data, *TINY, "--epochs", "2", "--seed", "2",
                                            "--output", str(run)])
        assert rc == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert f"--output {run} is in use by another run (pid {first.pid}, started " in err
    finally:
        out, err = first.communicate(timeout=180)
    assert first.returncode == 0, err
    assert weights(run / "last.npz")[1]["config"]["seed"] == 1  # nothing of the second
    assert not (run / folder_lock.OWNER_FILE).exists()


def test_of_two_runs_started_together_exactly_one_trains(tiny_data, tmp_path):
    run = tmp_path / "together"
    procs = [start([tiny_data, *TINY, "--epochs", "1", "-j", "0", "--seed", str(seed),
                    "--output", str(run)]) for seed in (1, 2)]
    errs = [p.communicate(timeout=180)[1] for p in procs]
    results = [(p.pid, p.returncode, err) for p, err in zip(procs, errs)]
    assert sorted(code for _, code, _ in results) == [0, 2], results
    (winner, _, _), = [r for r in results if r[1] == 0]
    (_, _, err), = [r for r in results if r[1] == 2]
    assert f"is in use by another run (pid {winner}, started " in err
    seed = weights(run / "last.npz")[1]["config"]["seed"]
    assert procs[seed - 1].pid == winner


def test_a_killed_run_leaves_no_lock_behind(tiny_data, tmp_path):
    run = tmp_path / "killed"
    first = start([tiny_data, *TINY, "--epochs", "3", "--output", str(run)])
    wait_for(lambda: (run / "last.npz").exists())
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate()
    rc, out, err = train_run(tmp_path, [tiny_data, *TINY, "--epochs", "2", "--resume",
                                        str(run / "last.npz")])
    assert rc == 0, err


def test_a_study_folder_belongs_to_one_study_at_a_time(tmp_path, capsys):
    reproduce = load_example("reproduce_tables")
    out = tmp_path / "study"
    out.mkdir()
    (tmp_path / "data" / "val").mkdir(parents=True)
    with folder_lock.lock_folder(out, "--out"):
        assert reproduce.main([str(tmp_path / "data"), "--out", str(out), "--only",
                               "A-s0"]) == 2
    assert f"--out {out} is in use by another run (pid {os.getpid()}" in one_error_line(capsys)


def test_the_transfer_study_makes_paths_absolute_locks_its_folder_and_passes_on_a_stop(
        tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    study = load_example("transfer_study")
    monkeypatch.chdir(tmp_path)
    args = study.parse_args(["data", "--out", "out", "--record", "rec", "--doc", "t.md"])
    assert (args.data, args.out, args.record, args.doc) == tuple(
        str(tmp_path / name) for name in ("data", "out", "rec", "t.md"))
    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir(parents=True)
    (tmp_path / "out").mkdir()
    with folder_lock.lock_folder(tmp_path / "out", "--out"):
        assert study.main(["data", "--out", "out"]) == 2
    assert "--out " + str(tmp_path / "out") + " is in use" in one_error_line(capsys)

    def stopped(args):  # a training run stopped by SIGTERM, after saving (exit 143)
        raise study.Interrupted(143)
    monkeypatch.setattr(study, "run_study", stopped)
    assert study.main(["data", "--out", "out"]) == 143


# --- 2. a FIFO among the images; workers die with their parent ------------------------------

def test_a_fifo_among_the_images_is_left_out_and_the_run_ends(tiny_data, tmp_path):
    data = copy_data(tiny_data, tmp_path)
    os.mkfifo(data / "train" / "n01" / "pipe.JPEG")
    os.mkfifo(data / "val" / "n02" / "pipe.JPEG")
    rc, out, err = train_run(tmp_path, [str(data), *TINY, "--epochs", "1", "-j", "2",
                                        "--output", str(tmp_path / "run")], timeout=120)
    assert rc == 0, err
    assert "pipe.JPEG (a named pipe (FIFO))" in err and "would block" in err


def test_classify_refuses_a_fifo_at_once(tmp_path):
    fifo = tmp_path / "cat.jpg"
    os.mkfifo(fifo)
    try:  # in a process of its own: a plain open() of a FIFO waits for a writer forever
        proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", "classify.py"),
                               str(fifo), "--weights", str(tmp_path / "none.npz")],
                              capture_output=True, text=True, env=ENV, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("classify.py hung on a FIFO")
    assert proc.returncode == 2
    assert proc.stderr == (f"error: cannot read image {fifo}: it is a named pipe (FIFO), "
                           f"not an image file\n")


def test_weight_and_checkpoint_readers_refuse_a_fifo_without_opening_it(tmp_path):
    fifo = tmp_path / "weights.npz"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="it is a named pipe .FIFO., not a weight file"):
        pretrained.load_pretrained(fifo)
    with pytest.raises(checkpoint.CheckpointError, match="is not a file"):
        checkpoint.load(fifo)


WORKERS_THEN_WAIT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from minivgg.workers import WorkerPool
    def stuck(job, state):
        time.sleep(1000)  # like a worker blocked in open() on a FIFO: it polls nothing
    pool = WorkerPool(2, stuck)
    pool.submit(0)
    pool.submit(1)
    print(" ".join(map(str, pool.pids)), flush=True)
    time.sleep(1000)
""")


def test_workers_stuck_in_a_call_die_with_their_parent_under_sigkill(tmp_path):
    script = tmp_path / "pool.py"
    script.write_text(WORKERS_THEN_WAIT.format(repo=REPO))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2
    time.sleep(0.5)  # the workers are inside `stuck`
    parent.kill()
    parent.wait()

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    try:
        wait_for(lambda: not any(alive(p) for p in pids), seconds=2)
    finally:
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# --- 3. thin images: the rescale budget -----------------------------------------------------

def thin_png(path, width, height=1):
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(path)
    return path


PEAK_RSS = textwrap.dedent("""
    import resource, subprocess, sys
    code = subprocess.call(sys.argv[1:])
    print("peak-rss-kib", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
          file=sys.stderr)
    sys.exit(code)
""")


def test_a_thin_png_in_the_training_data_is_skipped_without_a_memory_spike(tiny_data,
                                                                          tmp_path):
    data = copy_data(tiny_data, tmp_path)
    thin = thin_png(data / "train" / "n01" / "thin.png", 50000)
    assert os.path.getsize(thin) < 1000
    args = [str(data), *TINY, "--epochs", "1", "-j", "0", "--output", str(tmp_path / "run")]
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, sys.executable, TRAIN] + args,
                          capture_output=True, text=True, env=ENV, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert f"{thin} (1x50000) rescaled to smallest side 40 would be 40x2000000" in proc.stderr
    peak_mib = int(proc.stderr.split("peak-rss-kib")[1].split()[0]) / 1024
    assert peak_mib < 1500, proc.stderr  # 5.3 GB before the budget


def test_classify_refuses_a_thin_png_in_one_line(tmp_path, capsys):
    classify = load_example("classify")
    thin = thin_png(tmp_path / "thin.png", 1, 10000)
    assert classify.main([str(thin), "--weights", str(tmp_path / "none.npz")]) == 2
    line = one_error_line(capsys)
    assert f"image {thin} (10000x1) resized to shorter side 256 would be" in line
    assert f"over minivgg's budget of {images.MAX_PIXELS:,} pixels" in line


def test_every_rescale_checks_the_budget_before_allocating():
    img = np.zeros((1, 50000, 3), np.uint8)
    with pytest.raises(images.ImageTooLarge, match="x.png .1x50000. rescaled to smallest "
                                                   "side 72 would be 72x3600000"):
        images.rescale_smallest_side(img, 72, "x.png")
    from minivgg.data import DataStats, EvalTransform, TrainTransform
    stats = DataStats([0, 0, 0], [0, 0, 0], np.eye(3).tolist())
    for transform in (TrainTransform(72, 64, stats), EvalTransform(72, 64, stats)):
        with pytest.raises(OSError, match="y.png"):
            transform(img, np.random.default_rng(0), "y.png")


# --- 5. a mid-epoch resume with another batch size, seed or data ----------------------------

@pytest.fixture(scope="module")
def mid_epoch(tiny_data, tmp_path_factory):
    """A checkpoint taken at batch 2 of epoch 2 with -b 16."""
    tmp = tmp_path_factory.mktemp("mid")
    rc, out, err = train_run(tmp, [tiny_data, *TINY, "--epochs", "2", "--output",
                                   str(tmp / "run")], plan={STEPS_PER_EPOCH + 2: ["SIGINT"]})
    assert rc == 130, err
    return str(tmp / "run" / "last.npz")


@pytest.mark.parametrize("change, message", [
    (["-b", "8"], "-b 8 differs from the run's -b 16"),
    (["--seed", "3"], "--seed 3 differs from the run's --seed 0"),
])
def test_a_mid_epoch_resume_refuses_another_batching(tiny_data, tmp_path, mid_epoch, change,
                                                      message):
    rc, out, err = train_run(tmp_path, [tiny_data, *TINY, "--epochs", "2", "--resume",
                                        mid_epoch] + change)
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], err
    assert "part-way" in lines[0] or "--seed" in change


def test_a_mid_epoch_resume_refuses_changed_training_images(tiny_data, tmp_path, mid_epoch):
    data = copy_data(tiny_data, tmp_path)
    os.remove(data / "train" / "n01" / "0.JPEG")
    run = tmp_path / "copy"
    run.mkdir()
    shutil.copy(mid_epoch, run / "last.npz")
    rc, out, err = train_run(tmp_path, [str(data), *TINY, "--epochs", "2", "--resume",
                                        str(run / "last.npz")])
    assert rc == 2, err
    assert "the training images changed (80 images then, 79 now)" in err


# --- 6. huge scales, 10. a negative seed: one line before any data is read ------------------

@pytest.mark.parametrize("flags, message", [
    (["--scale", "100000"], "--scale 100000: an image rescaled to smallest side 100000"),
    (["--scale-jitter", "64", "100000"], "--scale-jitter SMAX 100000"),
    (["--test-scale", "50000"], "--test-scale 50000"),
    (["--seed", "-1"], "--seed must be an integer in 0..4294967295, got -1"),
])
def test_impossible_sizes_and_seeds_are_one_line_and_leave_no_folder(tiny_data, tmp_path,
                                                                     flags, message):
    out = tmp_path / "never"
    rc, _, err = train_run(tmp_path, [tiny_data, "-a", "A", "--crop", "32", "--output",
                                      str(out)] + flags, timeout=60)
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_a_run_that_fails_to_start_removes_the_folder_it_made(tmp_path, capsys):
    train_imagenet = load_example("train_imagenet")
    out = tmp_path / "made"
    assert train_imagenet.main([str(tmp_path / "no-data"), "--output", str(out)]) == 2
    assert "does not exist" in last_error_line(capsys)
    assert not out.exists()


def test_evaluate_refuses_a_huge_test_scale_in_one_line(small_checkpoint, tmp_path, capsys):
    evaluate = load_example("evaluate_imagenet")
    assert evaluate.cli([small_checkpoint[0], "--data", str(tmp_path), "--scales",
                         "100000"]) == 2
    assert "--scales 100000: an image rescaled to smallest side 100000" in \
        one_error_line(capsys)


def test_visualize_names_a_thin_image_and_refuses_a_huge_scale(small_checkpoint, tmp_path,
                                                                capsys):
    visualize = load_example("visualize")
    thin = thin_png(tmp_path / "thin.png", 30000)
    assert visualize.main(["features", str(thin), "--weights", small_checkpoint[0]]) == 2
    assert f"{thin} (1x30000) rescaled to smallest side" in one_error_line(capsys)
    assert visualize.main(["features", str(thin), "--weights", small_checkpoint[0],
                           "--scale", "100000"]) == 2
    assert "--scale 100000: an image rescaled to smallest side 100000" in \
        one_error_line(capsys)


# --- 7. weights of an untrained net classify like its .pth ------------------------------------

def test_weights_saved_from_a_fresh_vgg_classify_with_finite_scores(tmp_path, capsys):
    classify = load_example("classify")
    model = models.vgg("A", num_classes=3, width=1 / 16, fc_width=8)
    path = tmp_path / "fresh.safetensors"
    pretrained.save_pretrained(model, path)
    img = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 50, 3), np.uint8)).save(img)
    assert classify.main([str(img), "--weights", str(path)]) == 0, capsys.readouterr().err
    assert pretrained.load_pretrained(path).pretrained_meta["mean_rgb"] is not None


# --- 9, 15. convert: never replaces, names the user's path -----------------------------------

def test_convert_keeps_an_existing_output_and_names_the_users_path(tmp_path, capsys):
    from minivgg.pretrained import cli
    weights_in = tmp_path / "in.npz"
    pretrained.save_pretrained(models.vgg("A", num_classes=3, width=1 / 16, fc_width=8),
                               weights_in)
    out = tmp_path / "out.npz"
    out.write_bytes(b"precious")
    assert cli.main(["convert", str(weights_in), str(out)]) == 2
    assert "exists; it was left as it is" in one_error_line(capsys)
    assert out.read_bytes() == b"precious"
    assert cli.main(["convert", str(weights_in), str(out), "--overwrite"]) == 0
    missing = tmp_path / "no" / "such" / "out.npz"
    assert cli.main(["convert", str(weights_in), str(missing)]) == 2
    line = one_error_line(capsys)
    assert f"cannot write {missing}" in line and ".tmp-" not in line
    with pytest.raises(FileExistsError, match="left as it is"):
        pretrained.save_pretrained(models.vgg("A", num_classes=3, width=1 / 16, fc_width=8),
                                   out)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_write_into_a_read_only_folder_names_the_users_path(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(checkpoint.WriteError) as info:
            checkpoint.atomic_write(folder / "x.npz", lambda f: f.write(b"x"))
    finally:
        folder.chmod(0o755)
    assert str(folder / "x.npz") in str(info.value) and ".tmp-" not in str(info.value)


# --- 13. the stop message never capitalises a path --------------------------------------------

def test_the_stop_message_keeps_a_relative_path_as_typed(tiny_data, tmp_path):
    script = tmp_path / "driver.py"
    from test_failure_behaviour import DRIVER
    script.write_text(DRIVER.format(repo=REPO, plan={STEPS_PER_EPOCH + 2: ["SIGTERM"]}))
    proc = subprocess.run([sys.executable, str(script), tiny_data, *TINY, "--epochs", "2",
                           "--output", "runs/sig1"], capture_output=True, text=True,
                          env=ENV, cwd=tmp_path, timeout=180, start_new_session=True)
    assert proc.returncode == 143, proc.stderr
    assert "The best epoch so far is in runs/sig1/best.npz" in proc.stderr
    assert "Runs/" not in proc.stderr


# --- 14. a full disk while metrics.png is written --------------------------------------------

def test_a_full_disk_while_drawing_the_curves_names_the_file_and_the_checkpoints(
        tiny_data, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    train_imagenet = load_example("train_imagenet")

    def savefig(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(Figure, "savefig", savefig)
    run = tmp_path / "run"
    assert train_imagenet.main([tiny_data, *TINY, "--epochs", "1", "-j", "0", "--output",
                                str(run)]) == 1
    line = last_error_line(capsys)
    assert line.startswith(f"error: no space left on the disk holding {run} while writing "
                           f"{run / 'metrics.png'}")
    assert f"the checkpoints {run / 'last.npz'} and {run / 'best.npz'} are intact" in line
    assert not any(name.startswith(".tmp-") for name in os.listdir(run))


# --- 17. --cache is a speed option only -------------------------------------------------------

def test_cache_gives_the_same_run_as_reading_the_files(tiny_data, tmp_path):
    runs = {}
    for name, extra in (("files", []), ("cache", ["--cache"])):
        rc, out, err = train_run(tmp_path, [tiny_data, *TINY, "--epochs", "1", "-j", "0",
                                            "--output", str(tmp_path / name)] + extra)
        assert rc == 0, err
        runs[name] = weights(tmp_path / name / "last.npz")
    assert runs["files"][1]["data_stats"] == runs["cache"][1]["data_stats"]
    for key, value in runs["files"][0].items():
        np.testing.assert_array_equal(value, runs["cache"][0][key], err_msg=key)


def test_the_owner_note_says_who_holds_a_folder(tmp_path):
    with folder_lock.lock_folder(tmp_path, "--output"):
        note = json.loads((tmp_path / folder_lock.OWNER_FILE).read_text())
        assert note["pid"] == os.getpid()
        with pytest.raises(folder_lock.FolderBusy, match=f"pid {os.getpid()}, started "):
            folder_lock.lock_folder(tmp_path, "--output")
    assert not (tmp_path / folder_lock.OWNER_FILE).exists()
    folder_lock.lock_folder(tmp_path).release()  # free again

