"""Process-group setup: from torchrun's or submitit's environment, or a single process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def detect() -> DistEnv:
    """Rank and world size from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or submitit (SLURM via its
    JobEnvironment); a single process otherwise."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    try:
        import submitit

        job = submitit.JobEnvironment()
        return DistEnv(job.global_rank, job.num_tasks, job.local_rank)
    except RuntimeError:  # not inside a submitit job
        return DistEnv()


def init(env: DistEnv, device: torch.device) -> None:
    """Join the process group (NCCL on GPU, gloo on CPU). MASTER_ADDR/PORT must be set for >1 process."""
    if not env.enabled or dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=env.rank, world_size=env.world_size)


def agree(env: DistEnv, ok: torch.Tensor, stop_signum: int | None) -> tuple[bool, int | None]:
    """Combine every rank's step verdict and stop request: the step is skipped if any rank saw a
    non-finite value, and all ranks stop at the same step if any was signalled. One tiny
    all-reduce per step with several processes; a plain read otherwise."""
    if not env.enabled:
        return bool(ok), stop_signum
    flags = torch.stack([(~ok).float(), torch.tensor(float(stop_signum or 0), device=ok.device)])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad, signum = flags.tolist()
    return bad == 0, (int(signum) or None)


def mean(env: DistEnv, value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over ranks (for logging the global loss)."""
    if not env.enabled:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / env.world_size


def barrier(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()
