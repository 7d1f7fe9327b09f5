"""examples/reproduction_parking.py and its use by the study: a run stopped in the middle is
kept in the committed records, and a fresh clone continues it instead of starting again."""

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import load_script
from test_reproduce import _args, _finish

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(REPO / "examples"))
    return load_script("examples/reproduce_tables.py", register=True)


@pytest.fixture(scope="module")
def parking(study):
    import reproduction_parking
    return reproduction_parking


def _run_folder(tmp_path, files):
    folder = tmp_path / "runs" / "E-s2"
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def test_park_and_unpark_copy_the_resumable_state_byte_for_byte(parking, tmp_path):
    files = {"last.npz": b"weights and momentum", "metrics.csv": b"epoch,...\n1,...\n",
             "timing.json": b"[]", "best.npz": b"not needed to resume", "train.log": b"log"}
    run = _run_folder(tmp_path, files)
    record = tmp_path / "record"
    kept = Path(parking.park(str(run), str(record), "E-s2", epochs=1))
    assert kept == record / "parked" / "E-s2"
    info = json.loads((kept / "parked.json").read_text())
    assert info["epochs"] == 1 and info["run"] == "E-s2"
    assert sorted(info["files"]) == ["last.npz", "metrics.csv", "timing.json"]
    assert not (kept / "best.npz").exists() and not (kept / "train.log").exists()
    fresh = tmp_path / "clone" / "runs" / "E-s2"  # a fresh clone: no run folder at all
    assert parking.unpark(str(record), "E-s2", str(fresh))["epochs"] == 1
    for name in info["files"]:
        assert (fresh / name).read_bytes() == files[name]
    assert parking.unpark(str(record), "E-s2", str(fresh)) is None  # it has its own now


def test_a_run_folder_with_its_own_checkpoint_is_never_overwritten(parking, tmp_path):
    record = tmp_path / "record"
    parking.park(str(_run_folder(tmp_path, {"last.pt": b"old"})), str(record), "E-s2", 1)
    newer = tmp_path / "other" / "E-s2"
    newer.mkdir(parents=True)
    (newer / "last.npz").write_bytes(b"newer")
    assert parking.unpark(str(record), "E-s2", str(newer)) is None
    assert (newer / "last.npz").read_bytes() == b"newer" and not (newer / "last.pt").exists()


def test_nothing_is_parked_without_a_checkpoint_and_a_cut_short_copy_is_ignored(parking,
                                                                                tmp_path):
    record = tmp_path / "record"
    run = _run_folder(tmp_path, {"metrics.csv": b"epoch\n", "timing.json": b"[]"})
    assert parking.park(str(run), str(record), "E-s2", 0) is None
    assert not (record / "parked").exists()
    (run / "last.npz").write_bytes(b"state")
    parking.park(str(run), str(record), "E-s2", 0)
    (record / "parked" / "E-s2" / "parked.json").unlink()  # the copy was cut short
    assert not parking.is_parked(str(record), "E-s2")
    assert parking.unpark(str(record), "E-s2", str(tmp_path / "fresh")) is None


def test_parking_again_replaces_the_older_copy_whole(parking, tmp_path):
    record = tmp_path / "record"
    run = _run_folder(tmp_path, {"last.npz": b"epoch 3", "metrics.csv": b"3 rows"})
    parking.park(str(run), str(record), "E-s2", 3)
    (run / "metrics.csv").unlink()
    (run / "last.npz").write_bytes(b"epoch 5")
    parking.park(str(run), str(record), "E-s2", 5)
    kept = record / "parked" / "E-s2"
    assert (kept / "last.npz").read_bytes() == b"epoch 5"
    assert not (kept / "metrics.csv").exists()  # the older parking's file is gone
    parking.discard(str(record), "E-s2")
    assert not (record / "parked").exists()


def test_a_stopped_study_parks_its_run_and_a_fresh_clone_resumes_it(study, tmp_path,
                                                                    monkeypatch, capsys):
    """Stopped at epoch 2 of 3: the run is parked; in a fresh clone (no runs/) the study
    resumes it from the parked last.npz rather than from epoch 1; once recorded, the
    parked copy goes."""
    args = _args(study, tmp_path, "--epochs", "3")
    a = study.by_name("A-s0")
    _finish(study, args, a, 2)
    monkeypatch.setattr(study, "supervise", lambda cmd, log: 130)
    assert study.run_study(args, [a], write_report=lambda *_: None) == 130
    parked = Path(args.record) / "parked" / "A-s0"
    assert (parked / "last.npz").is_file() and "its state is parked in" in capsys.readouterr().out
    shutil.rmtree(args.out)
    seen = []

    def resume(cmd, log):  # the training run, finishing the third epoch
        seen.append(cmd)
        _finish(study, args, a, 3)
        return 0
    monkeypatch.setattr(study, "supervise", resume)
    assert study.train(args, a)
    assert "continues from its parked state (2 epochs" in capsys.readouterr().out
    assert seen[0][seen[0].index("--resume") + 1] == study.last_checkpoint(args, a)
    Path(study.folder(args, a), "timing.json").write_text("[]")
    import numpy as np
    labels = np.arange(20) % 10
    np.savez(Path(study.folder(args, a)) / "posteriors.npz", epoch=np.array(3), labels=labels,
             subset=np.arange(0, 20, 2), **{"dense@72": np.eye(10, dtype=np.float32)[labels]})
    study.save_record(args, a)
    assert study.recorded(args, a) and not (Path(args.record) / "parked").exists()


def test_a_damaged_parked_copy_is_one_clear_error_and_copies_no_checkpoint(parking, tmp_path):
    record = tmp_path / "record"
    parking.park(str(_run_folder(tmp_path, {"last.npz": b"s", "metrics.csv": b"m"})),
                 str(record), "E-s2", 1)
    (record / "parked" / "E-s2" / "metrics.csv").unlink()  # listed in parked.json, gone
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError, match="parked run .*E-s2 cannot be read.*remove that folder"):
        parking.unpark(str(record), "E-s2", str(fresh))
    assert not (fresh / "last.npz").exists()  # the checkpoint comes last: nothing to resume
    (record / "parked" / "E-s2" / "parked.json").write_text("{not json")
    with pytest.raises(OSError, match="cannot be read"):
        parking.unpark(str(record), "E-s2", str(fresh))
