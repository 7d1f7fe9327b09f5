"""One rank of a scenario that tests/test_distributed.py starts with mpirun.

    mpirun -n 2 python tests/support/distributed_worker.py SCENARIO

Scenarios:
  average       k SGD steps with gradients averaged over the ranks (uneven slices of a
                global batch of 7), checked against the same steps on the whole batch
                in one process, and the ranks' weights checked to be bitwise equal
  serial        the same with the allreduces started only after backward (no overlap)
  nccl          `average` through NCCLGroup, with tests/support/nccl_standin.py as CuPy
                and NCCL
                (2 GPUs per machine, each rank sees both)
  nccl-own-gpu  the same with each rank seeing only its own GPU (CUDA_VISIBLE_DEVICES=rank,
                as srun --gpus-per-task=1 sets up)
  nccl-same-gpu each rank sees one GPU, the same one: must be refused on every rank
  raise         rank 1 raises while rank 0 waits in an allreduce
  exit          rank 1 prints an error line and exits with status 2 while rank 0 waits
  kill          rank 1 is killed (SIGKILL) while rank 0 waits
Each rank prints "rank R: ..." lines; a check that fails raises (and so ends the job).
"""

import hashlib
import os
import signal
import sys

SUPPORT = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(SUPPORT)), SUPPORT]

if sys.argv[1].startswith("nccl"):
    if sys.argv[1] != "nccl":  # the launcher gives each rank one GPU: its own, or GPU 0
        rank = next(os.environ[v] for v in ("PMI_RANK", "OMPI_COMM_WORLD_RANK")
                    if v in os.environ)
        os.environ["CUDA_VISIBLE_DEVICES"] = rank if sys.argv[1] == "nccl-own-gpu" else "0"
    import nccl_standin
    nccl_standin.install()

import numpy as np  # noqa: E402

from minivgg import backend, distributed, models, optim  # noqa: E402
from minivgg import functional as F  # noqa: E402
from minivgg.tensor import Tensor  # noqa: E402

STEPS, GLOBAL_BATCH = 3, 7


def small_vgg():
    return models.vgg("A", num_classes=5, width=0.125, fc_width=16, input_size=32,
                      init="glorot", dropout=0.0)


def batch(step):
    rng = np.random.default_rng([7, step])
    x = rng.normal(0, 1, (GLOBAL_BATCH, 3, 32, 32)).astype(np.float32)
    return x, rng.integers(0, 5, GLOBAL_BATCH)


def train_step(model, opt, x, y, reducer=None):
    loss = F.cross_entropy(model(Tensor(x)), y)
    opt.zero_grad()
    if reducer is None:
        loss.backward()
        return opt.step()
    reducer.start(len(y))
    loss.backward(on_leaf_done=reducer.grad_ready)
    reducer.finish()
    opt.step()


def digest(model, group):
    """Every rank's SHA-256 of its weights, gathered through the buffer interface."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.data.tobytes())
    mine = np.frombuffer(h.digest(), dtype=np.uint8)
    everyone = np.empty((group.size, mine.size), dtype=np.uint8)
    group.comm.Allgather(mine, everyone)
    return everyone


def average(group, overlap=True):
    backend.manual_seed(100 + group.rank)  # different initial weights on every rank...
    model = small_vgg()
    params = [p.data for p in model.parameters()]
    group.broadcast_(params)               # ...until rank 0's are broadcast
    reference = small_vgg()                # the one-process run, on the whole batch
    reference.load_state_dict(model.state_dict())
    opt, ref_opt = (optim.SGD(m.parameters(), lr=0.05) for m in (model, reference))
    # 2-output-channel buckets: several per step, so the overlap path launches some early
    reducer = group.gradient_reducer(model.parameters(), bucket_bytes=2**13,
                                     overlap=overlap)
    bounds = [GLOBAL_BATCH * r // group.size for r in range(group.size + 1)]
    for step in range(STEPS):
        x, y = batch(step)
        mine = slice(bounds[group.rank], bounds[group.rank + 1])
        train_step(model, opt, x[mine], y[mine], reducer)
        train_step(reference, ref_opt, x, y)
    worst = max(float(np.max(np.abs(p.data - q.data)) / (np.max(np.abs(q.data)) + 1e-12))
                for p, q in zip(model.parameters(), reference.parameters()))
    assert worst < 1e-4, f"rank {group.rank}: weights differ from one process by {worst}"
    digests = digest(model, group)
    assert (digests == digests[0]).all(), f"rank {group.rank}: ranks' weights differ"
    print(f"rank {group.rank}: {len(reducer.buckets)} buckets, {STEPS} steps, relative "
          f"difference to one process {worst:.2e}, weights bitwise equal on all ranks",
          flush=True)
    return model


def main():
    scenario = sys.argv[1]
    group = distributed.init(device="cuda" if scenario.startswith("nccl") else "cpu")
    with group.guard():
        if scenario in ("average", "serial"):
            average(group, overlap=scenario == "average")
        elif scenario in ("nccl", "nccl-own-gpu"):
            average(group)
            expected = group.local_rank if scenario == "nccl" else 0
            assert group.gpu == expected, (scenario, group.gpu, group.local_rank)
            assert not nccl_standin.violations, nccl_standin.violations
            assert nccl_standin.unsynchronised() == 0
            print(f"rank {group.rank}: NCCL stand-in on GPU {group.gpu}, streams in order",
                  flush=True)
        elif scenario in ("raise", "exit", "kill"):
            if group.rank == 1:
                if scenario == "raise":
                    raise ValueError("a corrupt file in rank 1's batch")
                if scenario == "exit":
                    print("error: a made-up mistake", file=sys.stderr, flush=True)
                    sys.exit(2)
                os.kill(os.getpid(), signal.SIGKILL)
            group.sum([1.0])  # rank 0 waits here for a rank that never comes
            print(f"rank {group.rank}: the allreduce returned, it should not", flush=True)
        print(f"rank {group.rank}: threads {os.environ.get('NUMBA_NUM_THREADS')}",
              flush=True)


if __name__ == "__main__":
    main()
