"""benchmarks/gpu_check.sh, the first thing to run on a GPU machine, run here: where CuPy
sees no GPU it reports the versions it can and why there is no GPU, skips every stage that
needs one with a message, and exits 0 (benchmarks/gpu_notes.md)."""

import os
import subprocess
import sys

import pytest

from conftest import REPO
from minivgg import backend


@pytest.mark.skipif(backend.cuda_available(), reason="a GPU is here: the script would run")
def test_gpu_check_without_a_gpu_reports_why_and_skips_cleanly(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_STAGE_TIMEOUT="120")
    done = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "skipped: no GPU visible to CuPy" in done.stdout
    env_log = (out / "env.log").read_text()
    assert "minivgg.cuda_available()                     False  (why not: " in env_log
    assert "cuDNN (PyTorch's)" in env_log and "CuPy" in env_log
    assert sorted(p.name for p in out.iterdir()) == ["env.log"]  # no other stage ran


@pytest.mark.skipif(backend.cuda_available(), reason="a GPU is here")
def test_gpu_check_repeat_exits_3_without_a_gpu():
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"),
                           "repeat"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3 and "skipped: no GPU" in done.stdout, done.stdout
