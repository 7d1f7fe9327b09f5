"""Checkpoints: a pickle-free .npz of model, optimizer and meta, written atomically."""

import json
import os
import zipfile

import numpy as np
import pytest

from minivgg import checkpoint, models, optim
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


def test_model_meta_describes_the_network_load_model_rebuilds(tmp_path):
    model = small_model(seed=3)
    meta = checkpoint.model_meta(model)
    assert meta == {"config": "A", "num_classes": 4, "width": 1 / 16, "fc_width": 8,
                    "input_size": 32}
    path = tmp_path / "model.npz"
    checkpoint.save(path, model.state_dict(), meta={"model": meta})
    rebuilt, read_meta = checkpoint.load_model(path)
    assert read_meta["model"] == meta and rebuilt.training is False
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(rebuilt.state_dict()[k], v, err_msg=k)
