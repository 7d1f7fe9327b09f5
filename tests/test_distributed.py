"""Data parallelism (minivgg.distributed): launch detection, threads, buckets, the backward
hook, and real multi-process runs under mpirun (skipped without mpi4py and an mpiexec).

The multi-process tests start `mpiexec -n 2` on tests/support/distributed_worker.py, whose every
check raises on failure, so a failing check ends the job with the rank's message, and on
examples/train_imagenet.py, also through small drivers that send Ctrl-C, SIGTERM or
SIGUSR1 at an exact batch.
"""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from minivgg import distributed, launch, models
from minivgg.tensor import Tensor

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
WORKER = os.path.join(TESTS, "support", "distributed_worker.py")


# ----------------------------------------------------------------------------------------
# Launch detection and threads (no MPI needed)
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("environ, expected", [
    ({}, launch.Launch()),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8",
      "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"},
     launch.Launch(3, 8, 1, 2, "Open MPI")),
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"},
     launch.Launch(1, 2, 1, 2, "MPICH")),
    ({"SLURM_PROCID": "6", "SLURM_STEP_NUM_TASKS": "7", "SLURM_LOCALID": "2",
      "SLURM_STEP_TASKS_PER_NODE": "4(x1),3", "SLURM_NODEID": "1"},
     launch.Launch(6, 7, 2, 3, "Slurm")),
    # an sbatch script running python without srun is one process, whatever --ntasks says
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, launch.Launch()),
])
def test_detect_launch_reads_each_launchers_environment(environ, expected):
    assert launch.detect_launch(environ) == expected


def test_slurm_tasks_per_node_list_is_expanded():
    assert [launch._slurm_tasks_on_node("4(x2),3", n) for n in range(3)] == [4, 4, 3]


def test_default_threads_divides_the_machines_cores_by_its_ranks(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert [launch.default_threads(n) for n in (1, 2, 4, 32)] == [16, 8, 4, 1]


def test_default_threads_keeps_the_cores_a_launcher_pinned_the_rank_to(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6}, raising=False)
    assert launch.default_threads(4) == 3


def _run_python(code, env=None):
    env = dict(os.environ, PYTHONPATH=REPO, **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_single_process_never_imports_mpi4py():
    out = _run_python("""
        import sys
        from minivgg import distributed
        group = distributed.init()
        print(type(group).__name__, group.size, "mpi4py" in sys.modules)
    """)
    assert out.stdout.split() == ["SingleProcess", "1", "False"], out.stderr


def test_a_launch_without_mpi4py_says_how_to_install_it():
    out = _run_python("""
        import sys
        sys.modules["mpi4py"] = None  # as on a machine without the mpi extra
        from minivgg import distributed
        try:
            distributed.init()
        except distributed.DistributedError as e:
            print(e)
    """, env={"PMI_RANK": "0", "PMI_SIZE": "2"})
    assert "rank 0 of 2" in out.stdout and "pip install 'minivgg[mpi]'" in out.stdout, out


# ----------------------------------------------------------------------------------------
# Buckets and the backward hook
# ----------------------------------------------------------------------------------------

def test_vgg16_gradients_fill_three_buckets_in_backward_order():
    params = list(models.VGG("D").parameters())
    plan = distributed.plan_buckets([p.size for p in params], 4)
    assert [i for bucket in plan for i in bucket] == list(reversed(range(len(params))))
    mb = [sum(params[i].size for i in bucket) * 4 / 1e6 for bucket in plan]
    assert len(plan) == 3 and mb[1] > 400  # fc8+fc7, fc6 alone (411 MB), every conv
    assert abs(sum(mb) - 553.4) < 0.1


def test_backward_hook_sees_each_leaf_once_after_its_gradient_is_final():
    w1 = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    w2 = Tensor(np.array([3.0, -1.0]), requires_grad=True)
    x = Tensor(np.array([0.5, 0.25]))
    seen = []
    # w1 is used twice: its gradient is final only after the second use's backward
    y = ((x * w1) * w2 + w1).sum()
    y.backward(on_leaf_done=lambda leaf: seen.append((leaf, leaf.grad.copy())))
    assert sorted(id(leaf) for leaf, _ in seen) == sorted([id(w1), id(w2)])
    for leaf, grad in seen:
        np.testing.assert_array_equal(grad, leaf.grad)  # nothing was added afterwards
    np.testing.assert_allclose(w1.grad, x.data * w2.data + 1)


def test_sharded_loaders_cut_every_global_batch_into_equal_step_counts():
    from minivgg.data import DataStats, EvalTransform
    from minivgg.loader import Loader
    from minivgg.synthetic import SyntheticImages
    data = SyntheticImages(37, 36, 0, "train")
    stats = DataStats(np.zeros(3), np.ones(3), np.eye(3))
    whole = Loader(data, EvalTransform(36, 32, stats), 8, seed=5)
    shards = [Loader(data, EvalTransform(36, 32, stats), 8, seed=5, shard=(r, 3))
              for r in range(3)]
    for epoch in (0, 1):
        cuts = [s.batch_indices(epoch) for s in shards]
        assert all(len(c) == len(whole) == 5 for c in cuts)
        for k, batch in enumerate(whole.batch_indices(epoch)):  # contiguous, +-1 image
            np.testing.assert_array_equal(np.concatenate([c[k] for c in cuts]), batch)
            assert max(len(c[k]) for c in cuts) - min(len(c[k]) for c in cuts) <= 1
    # the last batch holds 37 - 32 = 5 images: slices of 1, 2, 2; an empty one still comes
    short = Loader(SyntheticImages(9, 36, 0, "train"), EvalTransform(36, 32, stats), 8,
                   shard=(0, 3))
    sizes = [len(y) for _, y in short.epoch(0)]
    assert sizes == [2, 0] and next(short.epoch(0))[0].shape == (2, 3, 32, 32)


def test_rank_seeds_differ_between_ranks_and_repeat_for_a_resume():
    seeds = {launch.rank_seed(0, epoch, rank) for epoch in range(3) for rank in range(4)}
    assert len(seeds) == 12
    assert launch.rank_seed(0, 2, 1) == launch.rank_seed(0, 2, 1)


# ----------------------------------------------------------------------------------------
# Two ranks under mpirun
# ----------------------------------------------------------------------------------------

def _mpiexec():
    """The mpiexec beside this Python (the mpich wheel's, in a venv), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.access(here, os.X_OK) else shutil.which("mpiexec")


def run_mpi(*args, n=2, timeout=240):
    """`mpiexec -n n python args...` -> CompletedProcess (stdout and stderr together)."""
    pytest.importorskip("mpi4py")
    if _mpiexec() is None:
        pytest.skip("no mpiexec found (pip install 'minivgg[mpi]')")
    env = dict(os.environ, PYTHONPATH=REPO,
               # a system Open MPI refuses root and more ranks than cores without these
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1")
    return subprocess.run([_mpiexec(), "-n", str(n), sys.executable, *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("scenario", ["average", "serial", "nccl", "nccl-own-gpu"])
def test_two_ranks_take_the_same_steps_as_one_process_with_identical_weights(scenario):
    out = run_mpi(WORKER, scenario)
    assert out.returncode == 0, out.stdout
    threads = launch.threads_from_environment() or launch.default_threads(2)
    for rank in (0, 1):
        assert f"rank {rank}: " in out.stdout and "bitwise equal" in out.stdout
        assert f"rank {rank}: threads {threads}" in out.stdout  # cores / 2 ranks
    if scenario == "nccl":
        assert "rank 1: NCCL stand-in on GPU 1, streams in order" in out.stdout
    if scenario == "nccl-own-gpu":  # each rank sees one GPU, its own: GPU 0 of 1 for both
        assert "rank 1: NCCL stand-in on GPU 0, streams in order" in out.stdout


def test_two_ranks_that_would_share_one_gpu_are_refused_on_every_rank():
    out = run_mpi(WORKER, "nccl-same-gpu", timeout=120)  # a hang would time out here
    assert out.returncode != 0
    assert "local ranks 0, 1 on" in out.stdout and "would share a GPU" in out.stdout, \
        out.stdout
    assert "PCI bus ids 0000:18:00.0, 0000:18:00.0" in out.stdout


@pytest.mark.parametrize("scenario, message", [
    ("raise", "error: rank 1 of 2 ("),
    ("exit", "error: rank 1 of 2 ("),
    ("kill", "Killed"),
])
def test_a_failing_rank_ends_the_whole_job_with_its_rank_named(scenario, message):
    out = run_mpi(WORKER, scenario, timeout=120)  # a hang would time out here
    assert out.returncode != 0
    assert message in out.stdout, out.stdout
    assert "the allreduce returned" not in out.stdout
    if scenario == "raise":
        assert "ValueError: a corrupt file in rank 1's batch" in out.stdout


# ----------------------------------------------------------------------------------------
# benchmarks/scaling_model.py: the arithmetic behind benchmarks/scaling_model.md
# ----------------------------------------------------------------------------------------

def test_scaling_model_overlap_never_loses_and_infinite_bandwidth_is_perfect():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import scaling_model as sm
    flops, f_fwd, buckets, _ = sm.vgg16_facts()
    assert abs(sum(b for b, _ in buckets) - 553.43e6) < 1e5 and buckets[-1][1] == 1.0
    t_img = flops / 100e12
    for ranks in (4, 8, 64):
        for link in sm.LINKS.values():
            step, compute = sm.step_time(32, t_img, ranks, link, f_fwd, buckets)
            serial, _ = sm.step_time(32, t_img, ranks, link, f_fwd, buckets, overlap=False)
            assert compute <= step <= serial
        step, compute = sm.step_time(32, t_img, ranks, (float("inf"), 0.0), f_fwd, buckets)
        assert step == pytest.approx(compute)
    # the ring formula: 2(N-1)/N of the bytes over the link, plus 2(N-1) latencies
    one = [(1e9, 1.0)]
    step, compute = sm.step_time(1, 0.0, 4, (1e9, 1e-3), 0.0, one, overlap=False)
    assert step == pytest.approx(1.5 + 6e-3)


# ----------------------------------------------------------------------------------------
# examples/train_imagenet.py under mpirun
# ----------------------------------------------------------------------------------------

TRAIN = os.path.join(REPO, "examples", "train_imagenet.py")
# 49 images in batches of 16: the last batch has 1 image, so rank 1's slice of it is empty
TINY = ["--synthetic-train", "49", "--synthetic-val", "21", "-b", "16", "-j", "0",
        "--width", "0.125", "--fc-width", "16", "--dropout", "0", "--seed", "3"]


def train_run(out, epochs, ranks=1, resume=None):
    args = [TRAIN, *TINY, "--epochs", str(epochs), "--output", str(out)]
    if resume:
        args += ["--resume", str(resume)]
    if ranks > 1:
        result = run_mpi(*args, n=ranks)
    else:
        result = subprocess.run([sys.executable, *args], env=dict(os.environ, PYTHONPATH=REPO),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                timeout=240)
    assert result.returncode == 0, result.stdout
    return result.stdout


def weights(folder):
    from minivgg import checkpoint
    return checkpoint.load(os.path.join(folder, "last.npz"))[0]


def assert_same_training(folder, reference):
    a, b = weights(folder), weights(reference)
    assert a.keys() == b.keys()
    for k in a:  # float32 sums in another order: rounding only
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Folders of the tiny synthetic run: 1 and 2 ranks for one epoch, 1 rank for two."""
    pytest.importorskip("mpi4py")
    root = tmp_path_factory.mktemp("distributed-runs")
    out = {"1x1": train_run(root / "1x1", 1), "2x1": train_run(root / "2x1", 1, ranks=2),
           "1x2": train_run(root / "1x2", 2)}
    return root, out


def test_two_ranks_train_like_one_process_into_one_output_folder(runs):
    root, out = runs
    assert_same_training(root / "2x1", root / "1x1")
    assert out["2x1"].count("epoch 1/1: train loss") == 1  # rank 0 alone prints
    assert "2 processes over MPI" in out["2x1"]
    written = sorted(os.listdir(root / "2x1"))
    assert [f for f in written if f != "metrics.png"] == ["best.npz", "last.npz",
                                                          "metrics.csv"]
    # the summed metrics are those of the whole batch, as one process computes them
    line = [ln for ln in out["1x1"].splitlines() if "epoch 1/1: train loss" in ln][0]
    assert line.split("|")[1] in out["2x1"]  # "val loss ... top-1 err ... top-5 err ..."


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_ranks_continues_the_same_run(runs, first, then,
                                                                   tmp_path):
    root, _ = runs
    folder = tmp_path / f"{first}to{then}"
    shutil.copytree(root / f"{first}x1", folder)
    train_run(folder, 2, ranks=then, resume=folder / "last.npz")
    assert_same_training(folder, root / "1x2")


def test_a_training_error_under_mpirun_ends_every_rank_with_its_message(tmp_path):
    out = run_mpi(TRAIN, "--resume", str(tmp_path / "missing.npz"), timeout=120)
    assert out.returncode == 2, out.stdout
    assert "missing.npz' does not exist" in out.stdout
    assert "ending all 2 ranks" in out.stdout and "Traceback" not in out.stdout


def test_gpus_asked_without_cupy_end_every_rank_with_one_line_each():
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here")
    except ImportError:
        pass
    out = run_mpi(TRAIN, "--device", "cuda", timeout=120)
    assert out.returncode == 2, out.stdout
    assert "needs CuPy with NCCL and a GPU (pip install 'minivgg[cuda,mpi]')" in out.stdout
    assert "Traceback" not in out.stdout


# ----------------------------------------------------------------------------------------
# Ctrl-C and preemption of a 2-rank job: every rank stops after the same batch
# ----------------------------------------------------------------------------------------

# Each rank runs the training script through this wrapper. At training step STEP it writes
# its pid and its loader workers' pids to PIDS/<pid>, and rank 0 writes PIDS/ready and
# holds the step until a stop signal has reached it (StopSignals then gives SIGINT its
# default action back): the test sends the signal once it sees the file, so the stop
# point is exact whatever the machine's load. Rank 1 meanwhile waits in the step's sum.
SIGNAL_DRIVER = textwrap.dedent("""
    import os, signal, sys, time
    sys.path[:0] = [{repo!r}, os.path.join({repo!r}, "examples")]
    from minivgg import train
    import train_imagenet
    real_step, count = train.train_step, [0]
    def train_step(run, *args):
        count[0] += 1
        if count[0] == {step}:
            with open(os.path.join({pids!r}, str(os.getpid())), "w") as f:
                f.write(" ".join(map(str, [os.getpid()] + run.train_loader.worker_pids)))
            if run.group.rank == 0:
                open(os.path.join({pids!r}, "ready"), "w").close()
                deadline = time.monotonic() + 60
                while (signal.getsignal(signal.SIGINT) is not signal.SIG_DFL
                       and time.monotonic() < deadline):
                    time.sleep(0.01)
        return real_step(run, *args)
    train.train_step = train_step
    sys.exit(train_imagenet.main(sys.argv[1:]))
""")
STOP_STEP = 2  # of the 4 batches of TINY's 49 images


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def interrupted_run(tmp_path, send):
    """A 2-rank, 1-epoch run (a loader worker per rank) stopped by `send(launcher)` at
    STOP_STEP -> (exit status, output, pids of every rank and worker)."""
    pytest.importorskip("mpi4py")
    if _mpiexec() is None or not os.path.isdir("/proc"):
        pytest.skip("needs mpiexec and /proc")
    pids = tmp_path / "pids"
    pids.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(SIGNAL_DRIVER.format(repo=REPO, step=STOP_STEP, pids=str(pids)))
    args = [*TINY, "-j", "1", "--epochs", "1", "--output", str(tmp_path / "run")]
    proc = subprocess.Popen([_mpiexec(), "-n", "2", sys.executable, str(driver), *args],
                            env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (pids / "ready").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "the run never reached the step"
            time.sleep(0.05)
        send(proc.pid)
        out, _ = proc.communicate(timeout=60)  # a rank left waiting would hang here
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    started = [int(p) for f in pids.iterdir() if f.name != "ready"
               for p in f.read_text().split()]
    return proc.returncode, out, started


@pytest.mark.parametrize("send, name, resume_ranks", [
    (lambda pid: os.killpg(pid, signal.SIGINT), "SIGINT", 1),  # Ctrl-C in the terminal
    (lambda pid: os.kill(pid, signal.SIGTERM), "SIGTERM", 2),  # Slurm preempting mpirun
])
def test_a_signal_stops_every_rank_after_the_same_batch_with_a_resumable_checkpoint(
        runs, tmp_path, send, name, resume_ranks):
    code, out, started = interrupted_run(tmp_path, send)
    assert code != 0 and "Traceback" not in out, out
    assert len(started) == 4, started  # two ranks, each with its loader worker
    deadline = time.monotonic() + 5
    while any(map(_alive, started)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in started if _alive(p)], "processes left behind\n" + out
    # one message, from rank 0, naming the exact point; no rank aborted the job
    assert out.count(f"stopped by {name}: ") == 1, out
    assert f"holds epoch 1 up to batch {STOP_STEP} of 4" in out, out
    assert "ending all 2 ranks" not in out, out
    folder = tmp_path / "run"
    from minivgg import checkpoint
    state, _, meta = checkpoint.load(folder / "last.npz")
    assert meta["epoch"] == 0 and meta["batch"] == STOP_STEP
    assert not checkpoint.nonfinite(state)
    # the resume, on another number of ranks or the same, ends where the whole run does
    train_run(folder, 1, ranks=resume_ranks, resume=folder / "last.npz")
    assert_same_training(folder, runs[0] / "1x1")


SAVE_DRIVER = textwrap.dedent("""
    import os, signal, sys
    sys.path[:0] = [{repo!r}, os.path.join({repo!r}, "examples")]
    from minivgg import train
    import train_imagenet
    real_step, count = train.train_step, [0]
    def train_step(run, *args):
        count[0] += 1
        if count[0] == {step} and run.group.rank == 1:  # rank 1 alone gets it
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_step(run, *args)
    train.train_step = train_step
    sys.exit(train_imagenet.main(sys.argv[1:]))
""")


def test_sigusr1_to_one_rank_makes_rank_0_save_after_that_batch_and_go_on(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(SAVE_DRIVER.format(repo=REPO, step=STOP_STEP))
    last = tmp_path / "run" / "last.npz"
    out = run_mpi(str(driver), *TINY, "--epochs", "1", "--output", str(last.parent),
                  timeout=120)
    assert out.returncode == 0, out.stdout
    saved = f"saved {last} (epoch 1 up to batch {STOP_STEP} of 4); training goes on"
    assert out.stdout.count(saved) == 1, out.stdout
    assert "epoch 1/1: train loss" in out.stdout
