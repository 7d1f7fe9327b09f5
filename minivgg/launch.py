"""Where this process sits in a multi-process job, and what follows from that alone: its
rank and the ranks on its machine (read from the launcher's environment), its share of the
cores, and its dropout seeds. `minivgg.distributed` builds the process group on top.
"""

import os
from dataclasses import dataclass

import numpy as np

from minivgg import backend


# ----------------------------------------------------------------------------------------
# Who am I? The launcher's environment
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Launch:
    """This process's place in the job, as the launcher describes it."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0   # rank among the processes on this machine
    local_size: int = 1   # processes on this machine
    launcher: str = "none"


# (launcher, rank, world size, local rank, local size): the variables each one sets.
# NOTE: Slurm's SLURM_NTASKS is also set inside an `sbatch` script that runs python
# without srun; SLURM_STEP_NUM_TASKS exists only inside an srun step.
_LAUNCH_VARIABLES = (
    ("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
     "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("MPICH", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("Slurm", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", None),
)


def detect_launch(environ=None):
    """The `Launch` described by the environment; one process when no launcher is seen."""
    env = os.environ if environ is None else environ
    for name, rank, size, local_rank, local_size in _LAUNCH_VARIABLES:
        if rank in env and size in env:
            if local_size is None:  # Slurm: "2(x3),1" tasks per node, this is node NODEID
                local = _slurm_tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""),
                                             int(env.get("SLURM_NODEID", 0)))
            else:
                local = int(env.get(local_size, 1))
            return Launch(int(env[rank]), int(env[size]), int(env.get(local_rank, 0)),
                          local or 1, name)
    return Launch()


def _slurm_tasks_on_node(spec, node):
    """Tasks on node `node` from Slurm's compressed list, e.g. "4(x2),3" -> 4, 4, 3."""
    counts = []
    for part in filter(None, spec.split(",")):
        tasks, _, repeat = part.partition("(x")
        counts += [int(tasks)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts[node] if node < len(counts) else None


# ----------------------------------------------------------------------------------------
# Threads: cores / ranks on the node, set before the kernels start their pool
# ----------------------------------------------------------------------------------------

def default_threads(local_size):
    """Kernel threads for one of `local_size` ranks on this machine.

    The cores this process may run on, divided by the ranks sharing the machine; when the
    launcher already pinned the rank to fewer cores than the machine has (`srun -c 4`,
    `mpirun --bind-to`), those cores are its own and are used as they are.
    """
    machine = os.cpu_count() or 1
    mine = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else machine
    if mine < machine:
        return mine
    return max(1, machine // local_size)


def set_threads(n):
    """Use `n` threads in the CPU kernels and in NumPy's BLAS (the fc layers).

    NOTE: call it before the first training step: the kernels' pool
    (`minivgg.kernels.cpu.runtime`) reads NUMBA_NUM_THREADS when it starts. Left alone,
    two ranks on 2 cores would each start 2 kernel threads and 2 spin-waiting BLAS
    threads: 8 busy threads on 2 cores (benchmarks/README.md measures what spinning
    pools that wait for each other cost).
    """
    os.environ["NUMBA_NUM_THREADS"] = str(int(n))
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # part of the mpi extra; without it BLAS keeps its own count
        return
    threadpool_limits(int(n), user_api="blas")


def threads_from_environment():
    """NUMBA_NUM_THREADS or OMP_NUM_THREADS when set to a positive count, else None."""
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(var, "").isdigit() and int(os.environ[var]) > 0:
            return int(os.environ[var])
    return None


def rank_seed(seed, epoch, rank, step=None):
    """A seed for rank `rank`'s random stream in `epoch` (dropout), or in one `step` of
    it: different on every rank, and the same whenever a run reaches that point, resumed
    or not (also resumed part-way through the epoch, when seeded per step)."""
    key = [seed, epoch, rank] + ([] if step is None else [step])
    return int(np.random.SeedSequence(key).generate_state(1)[0])


def seed_dropout(group, seed, epoch, step):
    """With several ranks, seed this rank's host RNG (dropout) for training step `step`
    of `epoch`: ranks draw differently, and a run resumed at any batch draws what the
    uninterrupted run drew (a checkpoint holds rank 0's generator only). One process
    keeps its single stream, which the checkpoint holds."""
    if group.size > 1:
        backend.manual_seed(rank_seed(seed, epoch, group.rank, step))
