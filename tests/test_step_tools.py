"""The measuring tools of issue 26, at a tiny size: benchmarks/profile_step.py,
benchmarks/train_torch_plain.py and benchmarks/wall_time.py run, and what they print or
record parses and adds up."""

import json
import os
import re
import time

import numpy as np
import pytest

from conftest import load_script

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "NUMBA_NUM_THREADS")


@pytest.fixture
def image_folder(tmp_path):
    """root/{train,val}/<wnid>/*.JPEG: 2 classes, 4 train and 2 val images each, 80×96."""
    from PIL import Image
    rng = np.random.default_rng(5)
    for split, count in (("train", 4), ("val", 2)):
        for wnid in ("n00000001", "n00000002"):
            folder = tmp_path / "data" / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.JPEG")
    return tmp_path / "data"


@pytest.fixture
def threads_restored(monkeypatch):
    """profile_step.main sets the thread variables, as a script must before NumPy loads;
    give the rest of the suite its own back."""
    for var in THREAD_VARS:
        if var in os.environ:
            monkeypatch.setenv(var, os.environ[var])
        else:
            monkeypatch.delenv(var, raising=False)


# --- profile_step.py --------------------------------------------------------------------

def table_rows(text, title):
    """{op: ms per step} of the markdown table after the line `title`."""
    block = text.split(title, 1)[1].split("\n\n")[1]
    rows = {}
    for line in block.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = float(cells[2].strip("*"))
    return rows


def test_profile_step_rows_add_up_to_the_instrumented_step(tmp_path, threads_restored):
    from minivgg import functional, nn
    from minivgg.kernels import cpu
    profile_step = load_script("benchmarks/profile_step.py")
    call, relu_kernel = nn.Module.__call__, cpu.relu_forward
    out = tmp_path / "profile.md"
    assert profile_step.main(["--width", "0.0625", "--fc-width", "16", "--size", "32",
                              "--batch", "2", "--steps", "2", "--warmup", "1",
                              "--output", str(out)]) == 0
    text = out.read_text()
    step_ms = float(re.search(r"Instrumented step: ([0-9.]+) ms", text).group(1))
    for title in ("By op kind:", "By op and layer:"):
        rows = table_rows(text, title)
        total = rows.pop("**sum**")
        assert sum(rows.values()) == pytest.approx(total, abs=0.01 * len(rows))
        assert total == pytest.approx(step_ms, abs=0.06)
    kinds = table_rows(text, "By op kind:")
    # NOTE: VGG's pools all follow a ReLU, so they run fused with it (minivgg.fused)
    for op in ("conv fwd", "conv bwd", "relu fwd", "relu bwd", "relu + max-pool fwd",
               "relu + max-pool bwd", "fc fwd", "fc bwd", "softmax-CE loss fwd", "SGD update",
               "autograd bookkeeping, forward", "autograd bookkeeping, backward"):
        assert kinds[op] > 0, op
    layers = table_rows(text, "By op and layer:")
    assert {"conv1_1 fwd", "conv5_2 bwd", "fc6 fwd", "fc8 bwd"} <= set(layers)
    # every wrapper is taken off again
    assert nn.Module.__call__ is call and functional.np is np and cpu.relu_forward is relu_kernel


def test_profile_wraps_each_map_ranges_of_the_kernels_once():
    """Every kernel module's map_ranges (sgd's too, after "runtime" in name order) and the
    device class's are timed, each by one wrapper: a call books one hand-off."""
    from minivgg.kernels.cpu import conv, runtime, sgd
    profile_step = load_script("benchmarks/profile_step.py")
    original, prof = runtime.map_ranges, profile_step.Profile()
    patches = profile_step.instrument(prof)
    try:
        assert sgd.map_ranges is not original
        prof.push(("op", "self"))
        conv.CpuPrimitives.map_ranges(lambda t0, t1: None, 4)
        prof.pop()
    finally:
        patches.undo()
    assert prof.calls[("op", "hand-off")] == 1
    assert runtime.map_ranges is original and sgd.map_ranges is original


def test_profile_timers_count_nested_time_once():
    prof = load_script("benchmarks/profile_step.py").Profile()
    start = time.perf_counter()
    prof.push(("outer", "self"))
    time.sleep(0.01)
    prof.push(("inner", "self"))
    time.sleep(0.02)
    prof.pop()
    prof.pop()
    elapsed = time.perf_counter() - start
    inner, outer = prof.seconds[("inner", "self")], prof.seconds[("outer", "self")]
    assert inner >= 0.02 and outer >= 0.01
    assert inner + outer == pytest.approx(elapsed, abs=1e-3)


# --- ops_vs_torch.py ---------------------------------------------------------------------

def test_ops_vs_torch_times_every_op_of_both_libraries(tmp_path, torch, threads_restored):
    script = load_script("benchmarks/ops_vs_torch.py")
    out = tmp_path / "ops.md"
    assert script.main(["--repeats", "1", "--output", str(out)]) == 0
    table = [line.strip("|").split("|") for line in out.read_text().splitlines()
             if line.startswith("| ") and not line.startswith("| op |")]
    rows = {cells[0].strip(): float(cells[1]) for cells in table}
    assert {"relu + max-pool fwd (5 pools; minivgg fused)", "fc bwd (3 layers: gx, gW, gb)",
            "SGD update (all parameters)"} <= set(rows)
    assert all(ms >= 0 for ms in rows.values())


# --- bench_layers.py ----------------------------------------------------------------------

def test_bench_layers_times_each_library_in_its_own_worker(torch, capsys, monkeypatch,
                                                           threads_restored):
    """The CPU path end to end at a tiny size: one round = one minivgg worker and one
    PyTorch worker (fresh processes), and the table has a row per (layer, pass)."""
    script = load_script("benchmarks/bench_layers.py")
    workers = []

    def run_worker(cmd, what):
        workers.append(cmd[cmd.index("--worker") + 1])
        return real(cmd, what)
    real = script.common.run_worker
    monkeypatch.setattr(script.common, "run_worker", run_worker)
    script.main(["--net", "small", "--only", "conv2_1,pool1,fc8", "--algo", "im2col,auto",
                 "--repeats", "1", "--warmup", "0", "--rounds", "1", "--batch", "2",
                 "--threads", "1"])
    assert workers == ["minivgg", "torch"]
    table = capsys.readouterr().out.split("\n| layer |", 1)[1]
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in table.splitlines()[2:] if line.startswith("| ")]
    assert [(r[0], r[3]) for r in rows] == [(n, p) for n in ("pool1", "conv2_1", "fc8")
                                            for p in ("fwd", "fwd+bwd")]
    assert all(len(r) == 13 for r in rows)  # 4 + auto runs + 2x3 algorithm cells + 2 torch
    conv = [r for r in rows if r[0] == "conv2_1"]
    assert all(r[4] != "-" and float(r[7]) > 0 and float(r[11]) > 0 and float(r[12]) > 0
               for r in conv)
    assert all(r[6] == "-" and r[12] == "-" and float(r[5]) >= 0 for r in rows
               if r[0] != "conv2_1")  # one algorithm only off the conv rows


# --- train_torch_plain.py ---------------------------------------------------------------

def test_plain_torch_net_is_the_twin_of_minivgg_vgg_a(torch):
    plain = load_script("benchmarks/train_torch_plain.py")
    twin = load_script("benchmarks/train_torch_twin.py")
    net = plain.vgg_a(0.25, 512, 10, 64, 0.5)
    reference = twin.torch_vgg(torch, "A", 10, 0.25, 512, 64, init="glorot")
    assert [tuple(p.shape) for p in net.parameters()] == [
        tuple(p.shape) for p in reference.parameters()]
    assert [type(m).__name__ for m in net] == [type(m).__name__ for m in reference]


def test_plain_torch_script_trains_and_prints_every_epoch(image_folder, capsys, torch):
    plain = load_script("benchmarks/train_torch_plain.py")
    assert plain.main(["--data", str(image_folder), "--epochs", "2", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "8 train and 4 val images decoded" in out
    epochs = re.findall(r"epoch (\d)/2: train loss ([0-9.]+) \| val top-1 ([0-9.]+)%", out)
    assert [e[0] for e in epochs] == ["1", "2"]
    best = float(re.search(r"best val top-1 ([0-9.]+)% \(epoch \d\); wall time [0-9.]+s",
                           out).group(1))
    assert best == max(float(e[2]) for e in epochs)


def test_plain_torch_batches_are_crops_and_flips_of_the_decoded_arrays():
    plain = load_script("benchmarks/train_torch_plain.py")
    image = np.arange(6 * 7 * 3, dtype=np.uint8).reshape(6, 7, 3)
    batch = plain.train_batch([image], np.zeros(40, dtype=int), 4, np.random.default_rng(0))
    windows = [image[t:t + 4, s:s + 4] for t in range(3) for s in range(4)]
    flipped = [w[:, ::-1] for w in windows]
    for crop in batch:
        assert any((crop == w).all() for w in windows + flipped)
    assert 0 < sum(any((crop == w).all() for w in flipped) for crop in batch) < 40


# --- wall_time.py -----------------------------------------------------------------------

def test_wall_time_runs_both_and_appends_a_row_per_pair(image_folder, tmp_path):
    wall_time = load_script("benchmarks/wall_time.py")
    results = tmp_path / "wall_time.md"
    argv = [str(image_folder), "--epochs", "1", "--runs-dir", str(tmp_path / "runs"),
            "--results", str(results)]
    assert wall_time.main(argv) == 0
    time.sleep(1.1)  # the next pair's folder is named by the second
    assert wall_time.main(argv) == 0
    text = results.read_text()
    assert text.count("# Wall time") == 1
    rows = [line for line in text.splitlines() if line.startswith("| 20")]
    assert len(rows) == 2
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        seconds_m, seconds_t = float(cells[4]), float(cells[5])
        # the seconds are rounded to 0.1 s in the row, the ratio is taken before that
        assert float(cells[8].strip("*")) == pytest.approx(seconds_m / seconds_t, rel=0.05)
        assert cells[6].endswith("%") and cells[7].endswith("%")
        assert "python examples/train_imagenet.py" in cells[10] and "--cache" in cells[10]
        assert "python benchmarks/train_torch_plain.py" in cells[10]


def test_wall_time_resume_runs_only_the_missing_side_and_records_once(tmp_path):
    wall_time = load_script("benchmarks/wall_time.py")
    results, calls = tmp_path / "wall_time.md", []

    def fake(name, argv, folder):
        calls.append(name)
        if name == "torch" and len(calls) == 2:
            raise KeyboardInterrupt  # stopped half-way through the pair
        return {"seconds": 2.0 if name == "minivgg" else 4.0, "load": 0.1, "top1": 0.5,
                "command": wall_time.shown(argv), "started": "2026-12-04 18:00"}

    argv = ["data", "--epochs", "3", "--runs-dir", str(tmp_path / "runs"),
            "--results", str(results)]
    with pytest.raises(KeyboardInterrupt):
        wall_time.main(argv, run=fake)
    (folder,) = (tmp_path / "runs").iterdir()
    assert not results.exists() and (folder / "minivgg.json").exists()
    resume = ["--resume", str(folder), "--results", str(results)]
    assert wall_time.main(resume, run=fake) == 0
    assert calls == ["minivgg", "torch", "torch"]
    assert wall_time.main(resume, run=fake) == 0  # done: nothing run, nothing appended
    assert calls == ["minivgg", "torch", "torch"]
    rows = [line for line in results.read_text().splitlines() if line.startswith("| 2026")]
    assert len(rows) == 1 and "| 3 |" in rows[0] and "**0.50**" in rows[0]
    assert json.loads((folder / "pair.json").read_text())["epochs"] == 3
