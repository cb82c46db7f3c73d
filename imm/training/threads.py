"""How the CPU cores are shared: torch threads per training process, and jobs at once on the local launcher.

With torch's default (one thread per core) a training that shares the machine with one other busy
process collapses: the default job fell from 16-18k to 400-2400 samples/s on 2 cores beside a one-thread
neighbour (docs/performance.md "CPU threads", bench/threads.py). So a lone point-net training follows the
idle cores instead: as many threads as cores nobody else uses, measured every few seconds.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import NamedTuple

import torch

from imm.nets import POINT_ARCHS

log = logging.getLogger("imm.threads")

PROC_STAT = "/proc/stat"
WINDOW_S = 2.0  # seconds of CPU accounting behind each decision
# a point net takes at most this many threads: more split a batch of a few hundred rows too thin (a choice,
# measured only on 2 cores)
POINT_NET_MAX = 4
LAUNCHED = {"SLURM_JOB_ID", "SLURM_CPUS_PER_TASK", "SUBMITIT_EXECUTOR"}  # a job of a sweep or a cluster
QUIET_S = 60.0  # a change within this long of the last logged one is logged at debug level


class Threads(NamedTuple):
    count: int  # torch's intra-op threads to start with
    source: str  # where the count comes from, for the log line
    follow: bool  # true: the training follows the idle cores (IdleCores) from that start


def cores() -> int:
    """The cores this process may run on (its CPU affinity, which SLURM and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def torch_threads(requested: int | None, arch: str) -> Threads:
    """The torch CPU (intra-op) thread count of a training process, and where it comes from:

    1. train.threads=N: N;
    2. OMP_NUM_THREADS in the environment (the user's, or torchrun's one per process): that;
    3. a point net (the MLP) inside a sweep's job (SLURM, submitit) or a DDP group: 1, the other cores are for
       the other jobs; alone on Linux: the idle cores of its affinity, followed while it trains (IdleCores), from
       1; where the idle cores cannot be read (no /proc/stat): 1;
    4. inside a SLURM job: SLURM_CPUS_PER_TASK; inside a local submitit job: hydra.launcher.cpus_per_task;
    5. otherwise the cores of the process's CPU affinity divided among the processes of its DDP group
       on this node (LOCAL_WORLD_SIZE, or submitit's tasks per node), at least 1.
    """
    if requested:
        return Threads(requested, "train.threads", False)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return Threads(int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS", False)
    if arch in POINT_ARCHS:
        launched = LAUNCHED & set(os.environ) or _ddp_processes() > 1
        if launched or cores() == 1 or not os.access(PROC_STAT, os.R_OK):
            return Threads(1, f"arch={arch}", False)
        return Threads(1, f"arch={arch}, the idle cores of {cores()}", True)
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return Threads(int(os.environ["SLURM_CPUS_PER_TASK"]), "SLURM_CPUS_PER_TASK", False)
    local_cpus = _local_job_cpus()
    if local_cpus:
        return Threads(local_cpus, "hydra.launcher.cpus_per_task", False)
    per_node = _ddp_processes()
    return Threads(max(1, cores() // per_node), f"{cores()} cores / {per_node} process(es)", False)


def _ddp_processes() -> int:
    """The processes of this process's DDP group on its node."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or _submitit_tasks_per_node())


def threads_for(idle: float, limit: int) -> int:
    """Threads for `idle` cores (cores minus what other processes used): a core counts when at least 3/4 of it
    is idle, between 1 and `limit`. A second thread beside a busy neighbour costs more than it gives (3x slower
    on 2 cores), so a part-used core is left alone."""
    return max(1, min(limit, math.floor(idle + 0.25)))


def busy_seconds(cpus) -> float:
    """The seconds the cpus numbered `cpus` have been busy since boot, all processes together (/proc/stat)."""
    busy, wanted = 0, {f"cpu{i}" for i in cpus}
    with open(PROC_STAT) as f:
        for line in f:
            name, *fields = line.split()
            if name in wanted:  # user nice system idle iowait irq softirq steal ...: idle and iowait are idle
                busy += sum(int(v) for v in fields[:8]) - int(fields[3]) - int(fields[4])
    return busy / os.sysconf("SC_CLK_TCK")


class IdleCores:
    """Sets torch's thread count to the cores of this process's affinity that other processes leave idle.

    Every WINDOW_S seconds (`follow()` is called once per step and returns at once in between) it reads the busy
    time of those cores (/proc/stat) and this process's own CPU time (os.times); their difference is what the
    other processes used. The count changes only between steps, and the training's numbers do not depend on it
    (tests/test_threads.py)."""

    def __init__(self, limit: int = POINT_NET_MAX):
        self.cpus = sorted(os.sched_getaffinity(0))
        self.limit = min(limit, len(self.cpus))
        self.logged_at = -math.inf
        self.last = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        """(wall s, busy s of this process's cpus, this process's CPU s)."""
        own = os.times()
        return time.monotonic(), busy_seconds(self.cpus), own.user + own.system

    def settle(self, seconds: float = 0.5) -> int:
        """For a command with no steps to follow (sample, evaluate): wait `seconds`, take the idle cores measured
        over them and keep that count; returns it."""
        time.sleep(seconds)
        self.follow(now=True)
        return torch.get_num_threads()

    def follow(self, now: bool = False) -> None:
        if not now and time.monotonic() - self.last[0] < WINDOW_S:
            return
        sample = self._sample()
        wall, busy, own = (a - b for a, b in zip(sample, self.last))
        self.last = sample
        others = max(0.0, busy - own) / wall
        before, after = torch.get_num_threads(), threads_for(len(self.cpus) - others, self.limit)
        if after != before:
            torch.set_num_threads(after)
            quiet = sample[0] - self.logged_at < QUIET_S
            log.log(
                logging.DEBUG if quiet else logging.INFO,
                "torch threads %d -> %d: other processes used %.1f of the %d cores",
                before,
                after,
                others,
                len(self.cpus),
            )
            self.logged_at = self.logged_at if quiet else sample[0]


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
