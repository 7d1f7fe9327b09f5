"""The commands of the README's "Use the features" and "Export: ONNX" sections run as
written: each bash line and the Python block, in a folder laid out like a checkout (a tiny
trained checkpoint at runs/imagenette-A/best.npz, a few val images at
../shared/data/imagenette2-224/val, one of them unreadable)."""

import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

pytest.importorskip("onnx")


def section(title):
    """The text of the README section whose heading starts with `title`."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index("\n## " + title)
    end = text.index("\n## ", start + 1)
    return text[start:end]


def blocks(text, language):
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def commands(text):
    """The shell commands of a section's bash blocks, continuation lines joined."""
    out = []
    for block in blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line:
                out.append(line)
    return out


@pytest.fixture
def checkout(tmp_path):
    """tmp/work (the working folder, examples/ linked in) beside tmp/shared/data."""
    from PIL import Image
    from minivgg import checkpoint, models, run_state
    work = tmp_path / "work"
    (work / "runs" / "imagenette-A").mkdir(parents=True)
    os.symlink(os.path.join(REPO, "examples"), work / "examples")
    val = tmp_path / "shared" / "data" / "imagenette2-224" / "val"
    rng = np.random.default_rng(0)
    for c in ("n01440764", "n02102040"):
        (val / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(
                val / c / f"{i}.png")
    (val / "n02102040" / "broken.JPEG").write_bytes(b"not a jpeg")
    model = models.vgg("A", 2, 1 / 16, 16, 64, init="glorot", seed=0)
    meta = {"model": run_state.model_meta(model), "classes": ["n01440764", "n02102040"],
            "data_stats": {"mean_rgb": [124.0, 116.0, 104.0], "pca_eigval": [0, 0, 0],
                           "pca_eigvec": np.eye(3).tolist()},
            "config": {"scale": 72, "crop": 64}}
    checkpoint.save(work / "runs" / "imagenette-A" / "best.npz", model.state_dict(),
                    meta=meta)
    return work


def run(cmd, cwd):
    args = shlex.split(cmd)
    assert args[0] == "python", cmd
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, *args[1:]], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, f"{cmd}\n{out.stdout}\n{out.stderr}"
    return out


def test_use_the_features_section_runs_as_written(checkout):
    text = section("Use the features")
    # The transfer study's commands (hours) are run on a tiny folder in test_transfer_study.
    cmds = [c for c in commands(text) if "transfer_study.py" not in c]
    assert len(commands(text)) == 4
    assert len(cmds) == 2 and all("extract_features.py" in c for c in cmds)
    out = run(cmds[0], checkout)
    assert "skipped 1 unreadable image" in out.stdout and "broken.JPEG" in out.stderr
    saved = np.load(checkout / "runs" / "imagenette-A" / "val-relu7.npz")
    assert saved["features"].shape == (6, 16) and list(saved["labels"]) == [0] * 3 + [1] * 3
    assert list(saved["scales"]) == [64, 96, 128] and bool(saved["flip"])
    np.testing.assert_allclose(np.linalg.norm(saved["features"], axis=1), 1, rtol=1e-5)
    run(cmds[1], checkout)
    pool5 = np.load(checkout / "runs" / "imagenette-A" / "val-pool5.npz")
    assert pool5["features"].shape == (6, 32 * 2 * 2) and int(pool5["resize"]) == 72
    (code,) = blocks(text, "python")
    out = subprocess.run([sys.executable, "-c", code], cwd=checkout, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "(4, 3, 64, 64)"


def test_export_section_runs_as_written(checkout):
    import onnx
    cmds = commands(section("Export: ONNX"))
    assert len(cmds) == 3
    run(cmds[0], checkout)
    info = run(cmds[1], checkout).stdout
    assert "minus the mean [124.0, 116.0, 104.0]" in info and "input (batch, 3, 64, 64)" in info
    run(cmds[2], checkout)
    for name in ("model.onnx", "dense.onnx"):
        onnx.checker.check_model(str(checkout / "runs" / "imagenette-A" / name))


@pytest.mark.parametrize("args, message", [
    (["--layer", "fc9"], "no layer named 'fc9' in VGG-A; valid names: conv1_1"),
    (["--out", "OUT.txt"], "--out must end in .npz"),
    (["--out", "EXISTING"], "exists; it was left as it is (add --overwrite"),
    (["--scales", "0"], "--scales must be positive"),
    (["--resize", "32"], "--resize 32 is smaller than the net's 64-pixel input"),
    (["--weights", "none.npz"], "none.npz: no such file"),
    (["DATA=empty"], "holds no images"),
])
def test_extract_features_mistakes_get_one_error_line(checkout, capsys, args, message):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "extract_features", os.path.join(REPO, "examples", "extract_features.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    (checkout / "empty").mkdir()
    (checkout / "have.npz").write_bytes(b"mine")
    data = str(checkout.parent / "shared" / "data" / "imagenette2-224" / "val")
    argv = {"--weights": str(checkout / "runs" / "imagenette-A" / "best.npz"),
            "--out": str(checkout / "feats.npz")}
    for flag, value in zip(args[::2], args[1::2]):
        argv[flag] = (value.replace("OUT", str(checkout / "feats"))
                      .replace("EXISTING", str(checkout / "have.npz")))
    if args == ["DATA=empty"]:
        data = str(checkout / "empty")
    full = [data] + [x for kv in argv.items() for x in kv]
    assert script.main(full) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert (checkout / "have.npz").read_bytes() == b"mine"
    assert not (checkout / "feats.npz").exists()
