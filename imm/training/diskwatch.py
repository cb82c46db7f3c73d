"""The run directory's free space against what the run's saves need (imm.diskspace says why a write failed).

- Before training (SpaceWatch.check_room): the next checkpoint, the save a resume starts from, must fit; its
  size is the newest checkpoint's in the run directory or, before the first, its tensors' bytes (a lower
  bound). Else the run stops at once, not after train.ckpt_every steps of work that could not be saved.
- While training (SpaceWatch.check): free space below what the next two saves need (the newest files' sizes,
  known after the first save of each kind) is one warning line, at most every WARN_EVERY_S, also set as the
  MLflow tag `disk.low_space`.
- A save that failed (stopped): its sentence ends with the last complete checkpoint and the resume command.
"""

from __future__ import annotations

import errno
import logging
import time
from pathlib import Path

from imm.diskspace import WARN_EVERY_S, DiskFullError, free_bytes, human, mount_point
from imm.training import checkpoint

log = logging.getLogger("imm.train")
TAG = "disk.low_space"
CHECK_EVERY_S = 60.0  # between saves, free space is looked at this often (another process may fill the disk)
CHECKPOINT, SNAPSHOT = "checkpoint", "snapshot"


def next_saves(step: int, steps: int, ckpt_every: int, snapshot_every: int, n: int = 2) -> list[tuple[int, str]]:
    """(step, kind) of the next n saves after `step`, in the loop's order: at a step, the snapshot first; both
    at the last step (a snapshot there only with snapshot_every, as the loop writes it)."""
    saves, s = [], step
    while len(saves) < n and s < steps:
        candidates = [(s // ckpt_every + 1) * ckpt_every, steps]
        if snapshot_every:
            candidates.append((s // snapshot_every + 1) * snapshot_every)
        s = min(candidates)
        if snapshot_every and (s % snapshot_every == 0 or s == steps):
            saves.append((s, SNAPSHOT))
        if s % ckpt_every == 0 or s == steps:
            saves.append((s, CHECKPOINT))
    return saves[:n]


def _path(run_dir, step: int, kind: str) -> Path:
    if kind == SNAPSHOT:
        return checkpoint.snapshot_path(run_dir, step)
    return checkpoint.ckpt_dir(run_dir) / f"step-{step:08d}.pt"


def _newest_size(files: list[Path]) -> int | None:
    for p in reversed(files):
        try:
            return p.stat().st_size
        except OSError:  # pruned meanwhile
            continue
    return None


def stopped(e: DiskFullError, run_dir, resume: str) -> DiskFullError:
    """`e`, ending with what a training stopped by it keeps (the last complete checkpoint, or none yet) and
    `resume`, the command that continues it once there is space (or what to do instead, for a sweep job)."""
    ckpts = checkpoint.list_checkpoints(run_dir)
    if ckpts:
        step = int(checkpoint.PATTERN.match(ckpts[-1].name).group(1))
        kept = f"the last complete checkpoint is step {step} ({ckpts[-1]})"
    else:
        kept = "no checkpoint exists yet (the run starts again at step 0)"
    then = f"then resume with: {resume}" if resume.startswith("python ") else f"then {resume}"
    return e.then(f"{kept}; {e.fix()}, {then}")


class SpaceWatch:
    """Free space in a training's run directory against the sizes of its next saves."""

    def __init__(self, run_dir, train_cfg, estimates: dict[str, int], clock=time.monotonic):
        self.run_dir, self.cfg, self.estimates, self.clock = Path(run_dir), train_cfg, estimates, clock
        self.sizes = {CHECKPOINT: None, SNAPSHOT: None}
        self._refresh()
        self.checked, self.warned = -CHECK_EVERY_S, -WARN_EVERY_S

    def _refresh(self) -> None:
        self.sizes = {
            CHECKPOINT: _newest_size(checkpoint.list_checkpoints(self.run_dir)) or self.sizes[CHECKPOINT],
            SNAPSHOT: _newest_size(checkpoint.list_snapshots(self.run_dir)) or self.sizes[SNAPSHOT],
        }

    def _next(self, step: int, n: int) -> list[tuple[int, str]]:
        c = self.cfg
        return next_saves(step, c.steps, c.ckpt_every, c.snapshot_every, n)

    def check_room(self, step: int, resume: str) -> None:
        """Before training from `step`: DiskFullError (with the resume command) when the next checkpoint cannot
        fit (the snapshots before it are the warning's: they can be written, the work after them not kept)."""
        if step >= self.cfg.steps:
            return
        at = min((step // self.cfg.ckpt_every + 1) * self.cfg.ckpt_every, self.cfg.steps)
        needed = self.sizes[CHECKPOINT] or self.estimates.get(CHECKPOINT)
        free = free_bytes(self.run_dir)
        if needed is not None and free is not None and free < needed:
            path = _path(self.run_dir, at, CHECKPOINT)
            raise stopped(DiskFullError(path, errno.ENOSPC, needed=needed), self.run_dir, resume)

    def check(self, step: int, tracker) -> None:
        """After `step`: at a save step (or CHECK_EVERY_S after the last look), warn when free space is below
        what the next two saves need; at most one line (and MLflow tag) every WARN_EVERY_S."""
        c, now = self.cfg, self.clock()
        saved = step % c.ckpt_every == 0 or (c.snapshot_every and step % c.snapshot_every == 0)
        if not saved and now - self.checked < CHECK_EVERY_S:
            return
        self.checked = now
        if saved:
            self._refresh()
        saves = self._next(step, 2)
        sizes = [self.sizes[kind] for _, kind in saves]
        free = free_bytes(self.run_dir)
        if not saves or None in sizes or free is None or free >= sum(sizes) or now - self.warned < WARN_EVERY_S:
            return
        self.warned = now
        which = ", ".join(f"{kind} at step {at}" for at, kind in saves)
        line = (
            f"low disk space: {human(free)} is free on {mount_point(self.run_dir)}, and the next two saves"
            f" ({which}) need {human(sum(sizes))}; free some space there, or the run stops at the first save that"
            " does not fit (the same command then resumes it)"
        )
        log.warning("%s", line)
        tracker.set_tags({TAG: f"step {step}: {line}"})


def estimates(state: checkpoint.CheckpointIO, device) -> dict[str, int]:
    """Lower bounds of a training state's and a snapshot's file sizes (their tensors' bytes), before the first
    of each is written."""
    return {
        CHECKPOINT: checkpoint.stored_bytes(state.state_dict(device)),
        SNAPSHOT: checkpoint.stored_bytes(state.snapshot_dict()),
    }
