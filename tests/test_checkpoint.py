"""Checkpoints: a pickle-free .npz of model, optimizer and meta, written atomically."""

import errno
import io
import json
import os
import zipfile

import numpy as np
import pytest

from minivgg import checkpoint, models, optim, run_state
from minivgg.checkpoint import CheckpointError


def small_model(seed=0):
    return models.vgg("A", num_classes=4, width=1 / 16, fc_width=8, input_size=32, seed=seed)


def trained_state(seed=0):
    """A model and an SGD whose momentum buffers exist for all but the last parameter."""
    model = small_model(seed)
    opt = optim.SGD(model.parameters(), lr=0.05)
    rng = np.random.default_rng(seed)
    for p in model.parameters()[:-1]:
        p.grad = rng.normal(size=p.shape).astype(p.dtype)
    opt.step()
    return model, opt


def test_round_trip_restores_model_optimizer_and_meta(tmp_path):
    model, opt = trained_state()
    meta = {"config": "A", "epoch": 3, "history": [0.5, 0.25], "rng": {"seed": 7}}
    path = tmp_path / "last.npz"
    checkpoint.save(path, model.state_dict(), opt.state_dict(), meta)

    model_state, opt_state, meta2 = checkpoint.load(path)
    assert list(model_state) == list(model.state_dict())
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(model_state[k], v)
        assert model_state[k].dtype == v.dtype
    for a, b in zip(opt_state["velocities"], opt.state_dict()["velocities"]):
        assert (a is None and b is None) or np.array_equal(a, b)
    assert opt_state["velocities"][-1] is None
    assert opt_state["lr"] == 0.05
    for key, value in meta.items():
        assert meta2[key] == value

    fresh = small_model(seed=9)
    fresh.load_state_dict(model_state)
    fresh_opt = optim.SGD(fresh.parameters())
    fresh_opt.load_state_dict(opt_state)
    for (k, a), b in zip(fresh.state_dict().items(), model.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=k)
    for a, b in zip(fresh_opt.velocities, opt.velocities):
        assert (a is None and b is None) or np.array_equal(a, b)


def test_checkpoint_without_optimizer_loads_none(tmp_path):
    model = small_model()
    checkpoint.save(tmp_path / "m.npz", model.state_dict())
    _, opt_state, meta = checkpoint.load(tmp_path / "m.npz")
    assert opt_state is None and meta["format"] == checkpoint.FORMAT


def test_checkpoint_loads_with_numpy_alone_and_no_pickle(tmp_path):
    model, opt = trained_state()
    path = tmp_path / "c.npz"
    checkpoint.save(path, model.state_dict(), opt.state_dict(), {"epoch": 1})
    with np.load(path, allow_pickle=False) as z:
        assert "model/conv1_1.weight" in z.files
        assert all(z[k].dtype != object for k in z.files)
        meta = json.loads(str(z["meta"]))
    assert meta["epoch"] == 1


def test_failed_write_leaves_old_checkpoint_intact_and_no_temporary_file(tmp_path,
                                                                         monkeypatch):
    path = tmp_path / "last.npz"
    old_model = small_model(seed=1)
    checkpoint.save(path, old_model.state_dict(), meta={"epoch": 1})
    old_bytes = path.read_bytes()

    def failing_savez(file, **arrays):  # write half an archive, then die
        file.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, small_model(seed=2).state_dict(), meta={"epoch": 2})
    assert sorted(os.listdir(tmp_path)) == ["last.npz"]
    assert path.read_bytes() == old_bytes
    monkeypatch.undo()
    assert checkpoint.load(path)[2]["epoch"] == 1


def test_save_creates_missing_folders(tmp_path):
    path = tmp_path / "run" / "checkpoints" / "best.npz"
    checkpoint.save(path, small_model().state_dict())
    assert path.is_file()


# ----------------------------------------------------------------------------------------
# Bad files: a CheckpointError that says what is wrong
# ----------------------------------------------------------------------------------------

@pytest.fixture
def good_file(tmp_path):
    model, opt = trained_state()
    path = tmp_path / "good.npz"
    checkpoint.save(path, model.state_dict(), opt.state_dict(), {"epoch": 1})
    return path


def test_missing_checkpoint_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nope.npz")


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.5, 0.99])
def test_truncated_checkpoint_raises_checkpoint_error(good_file, fraction):
    data = good_file.read_bytes()
    good_file.write_bytes(data[:int(len(data) * fraction)])
    with pytest.raises(CheckpointError, match="not an .npz|corrupt or truncated"):
        checkpoint.load(good_file)


def test_corrupt_bytes_inside_checkpoint_raise_checkpoint_error(good_file):
    data = bytearray(good_file.read_bytes())
    with zipfile.ZipFile(good_file) as z:  # flip bytes inside the first array's data
        info = z.infolist()[0]
    start = info.header_offset + 30 + len(info.filename) + 200
    data[start:start + 64] = bytes(64)
    good_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(good_file)


@pytest.mark.parametrize("kind", ["text", "npy", "pickle", "foreign_npz", "bad_meta",
                                  "other_format", "missing_entry"])
def test_foreign_files_raise_checkpoint_error_naming_the_problem(tmp_path, kind):
    path = tmp_path / f"{kind}.npz"
    if kind == "text":
        path.write_text("hello, I am not a checkpoint\n")
        expected = "not an .npz"
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.ones(3))
        expected = "not an .npz"
    elif kind == "pickle":
        import pickle
        path.write_bytes(pickle.dumps({"a": 1}))
        expected = "not an .npz"
    elif kind == "foreign_npz":
        np.savez(path, weights=np.ones(3))
        expected = "no 'meta' entry"
    elif kind == "bad_meta":
        np.savez(path, meta=np.array("{not json"))
        expected = "not JSON"
    elif kind == "other_format":
        np.savez(path, meta=np.array(json.dumps({"format": "someone-else-v9"})))
        expected = "someone-else-v9"
    else:
        meta = {"format": checkpoint.FORMAT, "model_keys": ["fc6.weight"]}
        np.savez(path, meta=np.array(json.dumps(meta)))
        expected = r"does not hold.*fc6\.weight"
    with pytest.raises(CheckpointError, match=expected):
        checkpoint.load(path)


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_meta_may_hold_numpy_scalars_and_arrays(tmp_path):
    meta = {"loss": np.float32(0.25), "epoch": np.int64(4), "mean_rgb": np.array([1.5, 2.0])}
    checkpoint.save(tmp_path / "m.npz", small_model().state_dict(), meta=meta)
    meta2 = checkpoint.load(tmp_path / "m.npz")[2]
    assert (meta2["loss"], meta2["epoch"], meta2["mean_rgb"]) == (0.25, 4, [1.5, 2.0])
    with pytest.raises(TypeError, match="object is not JSON-serialisable"):
        checkpoint.save(tmp_path / "bad.npz", small_model().state_dict(), meta={"x": object()})
    assert not (tmp_path / "bad.npz").exists()


def test_checkpoint_gets_the_same_file_mode_as_a_plainly_opened_file(tmp_path):
    checkpoint.save(tmp_path / "c.npz", small_model().state_dict())
    (tmp_path / "plain.txt").write_text("x")
    assert (tmp_path / "c.npz").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode


# ----------------------------------------------------------------------------------------
# Full disk, stale temporary files, hostile headers
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("had_one", [True, False])
def test_a_full_disk_is_one_line_saying_the_previous_checkpoint_is_intact(tmp_path,
                                                                          monkeypatch, had_one):
    path = tmp_path / "last.npz"
    if had_one:
        checkpoint.save(path, small_model(seed=1).state_dict(), meta={"epoch": 1})
    before = sorted(os.listdir(tmp_path))

    def full_disk(file, **arrays):  # what a write to a full disk raises, without root
        file.write(b"PK\x03\x04 the first bytes fit")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(checkpoint.CheckpointWriteError) as info:
        checkpoint.save(path, small_model(seed=2).state_dict(), meta={"epoch": 2})
    message = str(info.value)
    assert message.startswith(f"no space left on the disk holding {tmp_path} while "
                              f"writing {path}; ")
    assert ((f"the previous checkpoint {path} is intact" in message) if had_one
            else (f"no earlier checkpoint was at {path}" in message))
    assert "\n" not in message and info.value.__cause__ is None
    assert sorted(os.listdir(tmp_path)) == before  # no temporary file left behind
    monkeypatch.undo()
    if had_one:
        assert checkpoint.load(path)[2]["epoch"] == 1


def test_stale_temporary_files_of_killed_writes_are_removed_and_nothing_else(tmp_path):
    stale = [".tmp-abcd1234.npz", ".tmp-x_y_z_9_.npz"]
    kept = ["last.npz", "best.npz", ".tmp-short.npz", "notes.tmp-abcd1234.npz",
            ".tmp-abcd1234.npz.bak", "metrics.csv"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".tmp-folder12.npz").mkdir()  # a folder of that name is not ours
    removed = checkpoint.remove_stale_temporaries(tmp_path)
    assert sorted(os.path.basename(p) for p in removed) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(kept + [".tmp-folder12.npz"])
    assert checkpoint.remove_stale_temporaries(tmp_path / "not-there") == []


def test_the_names_save_uses_for_temporary_files_are_the_ones_removed(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append(os.path.basename(src))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    checkpoint.save(tmp_path / "c.npz", small_model().state_dict())
    assert checkpoint._TEMP_NAME.fullmatch(seen[0])


def _write_npz(path, members):
    """An .npz whose members are raw bytes: {name: header dict + data bytes}."""
    with zipfile.ZipFile(path, "w") as z:
        for name, (header, payload) in members.items():
            buf = io.BytesIO()
            np.lib.format.write_array_header_1_0(buf, header)
            z.writestr(name + ".npy", buf.getvalue() + payload)


def test_a_header_claiming_10_to_the_11_elements_is_a_clear_error_not_a_memory_error(
        tmp_path):
    path = tmp_path / "bomb.npz"
    meta = np.array(json.dumps({"format": checkpoint.FORMAT, "model_keys": ["w"]}))
    meta_buf = io.BytesIO()
    np.save(meta_buf, meta)
    _write_npz(path, {"model/w": ({"descr": "<f4", "fortran_order": False,
                                   "shape": (10**11,)}, bytes(16))})
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("meta.npy", meta_buf.getvalue())
    with pytest.raises(CheckpointError, match=r"member 'model/w' claims shape \(100000000000,\)"
                                              r" of float32 \(400,000,000,000 bytes\) but "
                                              r"holds 16 bytes"):
        checkpoint.load(path)


def test_an_object_array_is_refused_without_suggesting_allow_pickle(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, meta=np.array([{"a": 1}], dtype=object))  # np.savez pickles it
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path)
    assert "Python objects" in str(info.value) and "allow_pickle" not in str(info.value)


# ----------------------------------------------------------------------------------------
# Damaged training metadata: caught when the file is opened, in one line
# ----------------------------------------------------------------------------------------

def training_checkpoint(tmp_path, damage=None):
    """A checkpoint holding everything train.py stores, optionally damaged -> its path."""
    from minivgg.data import DataStats
    model, opt = trained_state()
    sched = optim.ReduceLROnPlateau(opt, mode="min")
    meta = {"model": {"config": "A", "num_classes": 4, "width": 1 / 16, "fc_width": 8,
                      "input_size": 32},
            "classes": ["a", "b", "c", "d"], "epoch": 2, "best_val_top1_err": 0.5,
            "scheduler": sched.state_dict(),
            "rng": {"host": np.random.default_rng(1).bit_generator.state, "loader_seed": 0},
            "data_stats": DataStats([1.0] * 3, [1.0] * 3, np.eye(3).tolist()).to_dict()}
    state, opt_state = model.state_dict(), opt.state_dict()
    if damage:
        damage(meta, state, opt_state)
    path = tmp_path / "last.npz"
    checkpoint.save(path, state, opt_state, meta)
    return path


def _open_for_resume(path):
    state, opt_state, meta = checkpoint.load(path)
    run_state.check_resumable(path, state, opt_state, meta, small_model())


def test_an_intact_training_checkpoint_is_resumable(tmp_path):
    _open_for_resume(training_checkpoint(tmp_path))


def _first(state):
    return next(iter(state))


DAMAGES = {
    "no scheduler": (lambda m, s, o: m.pop("scheduler"), "no 'scheduler' entry"),
    "garbled scheduler": (lambda m, s, o: m["scheduler"].update(best="low"),
                          r"scheduler state lacks or garbles \['best'\]"),
    "no RNG state": (lambda m, s, o: m.pop("rng"), "no 'rng' entry"),
    "bad RNG state": (lambda m, s, o: m["rng"].update(host={"bit_generator": "nope"}),
                      "RNG state is damaged"),
    "wrong weight shape": (lambda m, s, o: s.update({_first(s): np.zeros((3, 3, 3, 3),
                                                                         np.float32)}),
                           r"weights do not fit the network \(conv1_1\.weight: file "
                           r"\(3, 3, 3, 3\)"),
    "NaN weight": (lambda m, s, o: s[_first(s)].flat.__setitem__(0, np.nan),
                   "weights conv1_1.weight hold NaN or Inf"),
    "short momentum buffer": (lambda m, s, o: o["velocities"].__setitem__(0, np.zeros(5)),
                              r"momentum buffer 0 \(conv1_1\.weight\) is float64 \(5,\)"),
    "NaN momentum buffer": (lambda m, s, o: o["velocities"][1].fill(np.inf),
                            r"momentum buffer 1 \(conv1_1\.bias\) holds NaN or Inf"),
    "missing momentum buffers": (lambda m, s, o: o["velocities"].pop(),
                                 "momentum buffers for"),
    "negative lr": (lambda m, s, o: o.update(lr=-1.0), "optimizer lr -1.0"),
    "epoch not a count": (lambda m, s, o: m.update(epoch="two"), "epoch 'two'"),
    "classes": (lambda m, s, o: m["classes"].pop(), "3 class names for 4 outputs"),
}


@pytest.mark.parametrize("name", DAMAGES)
def test_damaged_training_metadata_is_one_clear_line_when_the_file_is_opened(tmp_path, name):
    damage, expected = DAMAGES[name]
    path = training_checkpoint(tmp_path, damage)
    with pytest.raises(CheckpointError, match=expected) as info:
        _open_for_resume(path)
    assert str(info.value).startswith(f"checkpoint {str(path)!r} cannot be resumed: ")
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------
# The run folder
# ----------------------------------------------------------------------------------------

def test_a_new_run_into_a_folder_holding_a_run_is_refused_naming_resume_and_overwrite(
        tmp_path):
    run = tmp_path / "run"
    run_state.prepare_run_folder(run)  # a new, empty folder is fine
    (run / "last.npz").write_bytes(b"earlier run")
    (run / "metrics.csv").write_text("epoch\n1\n")
    with pytest.raises(CheckpointError) as info:
        run_state.prepare_run_folder(run)
    message = str(info.value)
    assert f"--resume {run / 'last.npz'}" in message and "--overwrite" in message
    assert (run / "last.npz").read_bytes() == b"earlier run"  # nothing touched
    run_state.prepare_run_folder(run, resume=str(run / "last.npz"))  # its own resume: fine
    assert (run / "last.npz").exists()
    with pytest.raises(CheckpointError, match="already holds a run"):  # another run's resume
        run_state.prepare_run_folder(run, resume=str(tmp_path / "other" / "last.npz"))
    run_state.prepare_run_folder(run, overwrite=True)  # allowed, nothing deleted yet
    assert sorted(os.listdir(run)) == ["last.npz", "metrics.csv"]
    run_state.remove_run_files(run)
    assert os.listdir(run) == []


def test_an_unwritable_output_is_found_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        run_state.prepare_run_folder(tmp_path / "file")
    with pytest.raises(CheckpointError, match="not a folder minivgg can write"):
        run_state.prepare_run_folder(tmp_path / "file" / "run")

    def read_only(*args, **kwargs):  # a read-only folder, as root cannot make one with chmod
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", read_only)
    with pytest.raises(CheckpointError, match="Read-only file system"):
        run_state.prepare_run_folder(tmp_path / "ro")


def test_preparing_a_run_folder_removes_its_stale_temporary_files(tmp_path):
    (tmp_path / ".tmp-k1ll3d__.npz").write_bytes(b"half a checkpoint")
    removed = run_state.prepare_run_folder(tmp_path)
    assert [os.path.basename(p) for p in removed] == [".tmp-k1ll3d__.npz"]


def test_model_meta_describes_the_network_load_model_rebuilds(tmp_path):
    model = small_model(seed=3)
    meta = run_state.model_meta(model)
    assert meta == {"config": "A", "num_classes": 4, "width": 1 / 16, "fc_width": 8,
                    "input_size": 32}
    path = tmp_path / "model.npz"
    checkpoint.save(path, model.state_dict(), meta={"model": meta})
    rebuilt, read_meta = run_state.load_model(path)
    assert read_meta["model"] == meta and rebuilt.training is False
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(rebuilt.state_dict()[k], v, err_msg=k)
