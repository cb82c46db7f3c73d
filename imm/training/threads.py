"""How the CPU cores are shared: torch threads per training process, and jobs at once on the local launcher.

With torch's default (one thread per core) a training that shares the machine with one other busy
process collapses: the default job fell from 16-18k to 400-2400 samples/s on 2 cores beside a one-thread
neighbour (docs/performance.md "CPU threads", bench/threads.py).
"""

from __future__ import annotations

import os

from imm.nets import POINT_ARCHS


def cores() -> int:
    """The cores this process may run on (its CPU affinity, which SLURM and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def torch_threads(requested: int | None, arch: str) -> tuple[int, str]:
    """The torch CPU (intra-op) thread count of a training process, and where it comes from:

    1. train.threads=N: N;
    2. OMP_NUM_THREADS in the environment (the user's, or torchrun's one per process): that;
    3. a point net (the MLP): 1; a second thread makes the default job about 1.3x faster alone but 3x slower
       beside one busy process (bench/threads.py), and one thread leaves the other cores to sweeps' jobs;
    4. inside a SLURM job: SLURM_CPUS_PER_TASK; inside a local submitit job: hydra.launcher.cpus_per_task;
    5. otherwise the cores of the process's CPU affinity divided among the processes of its DDP group
       on this node (LOCAL_WORLD_SIZE, or submitit's tasks per node), at least 1.
    """
    if requested:
        return requested, "train.threads"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    if arch in POINT_ARCHS:
        return 1, f"arch={arch}"
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return int(os.environ["SLURM_CPUS_PER_TASK"]), "SLURM_CPUS_PER_TASK"
    local_cpus = _local_job_cpus()
    if local_cpus:
        return local_cpus, "hydra.launcher.cpus_per_task"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or _submitit_tasks_per_node())
    return max(1, cores() // per_node), f"{cores()} cores / {per_node} process(es)"


def _local_job_cpus() -> int | None:
    """cpus_per_task of the local submitit launcher, inside one of its jobs (its executor sets no variable)."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "local":
        return None
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().launcher.get("cpus_per_task") if HydraConfig.initialized() else None


def _submitit_tasks_per_node() -> int:
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return 1
    import submitit

    job = submitit.JobEnvironment()
    return max(1, job.num_tasks // job.num_nodes)


def parallel_jobs(launcher) -> int | None:
    """Jobs a sweep should run at once (hydra.sweeper.max_batch_size, set by the sweep callback when null): on the
    local submitit launcher cores // (cpus_per_task x tasks_per_node), at least 1 (its executor has no
    array_parallelism); None (all at once) on the others: SLURM has array_parallelism."""
    if not str(launcher.get("_target_", "")).endswith("submitit_launcher.LocalLauncher"):
        return None
    return max(1, cores() // ((launcher.get("cpus_per_task") or 1) * (launcher.get("tasks_per_node") or 1)))
