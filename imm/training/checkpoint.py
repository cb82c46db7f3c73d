"""Atomic, resumable checkpoints.

A checkpoint is one file `<run_dir>/checkpoints/step-XXXXXXXX.pt` holding only state_dicts, tensors
and plain Python values (the resolved config as YAML text), so it loads with
`torch.load(weights_only=True)`: a file that would run code when unpickled is refused.
Writes go to a temporary file in the same directory, are fsynced, then renamed over the final name:
a kill at any moment leaves either the previous checkpoint set or the new file, never a partial
file under a checkpoint name. The newest K + 1 files are kept.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path

import torch

CKPT_DIR = "checkpoints"
PATTERN = re.compile(r"^step-(\d{8,})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which file and why."""


def ckpt_dir(run_dir) -> Path:
    return Path(run_dir) / CKPT_DIR


def list_checkpoints(run_dir) -> list[Path]:
    """Checkpoint files of a run, oldest first (temporary files never match the pattern)."""
    d = ckpt_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def save(state: dict, run_dir, step: int, keep_last: int = 3) -> Path:
    """Write `state` atomically as the checkpoint of `step`; keep the newest keep_last + 1 files."""
    d = ckpt_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"step-{step:08d}.pt"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(d)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for old in list_checkpoints(run_dir)[: -(keep_last + 1)]:
        old.unlink(missing_ok=True)
    return final


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path, map_location="cpu") -> dict:
    """Load a checkpoint with weights_only=True; one clear error for unsafe or broken files."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain-tensor checkpoint and loading it would need"
            f" to run code (weights_only=True rejected it: {str(e).splitlines()[0]})") from None
    except (EOFError, RuntimeError, OSError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None


def resolve(resume, run_dir) -> Path | None:
    """The checkpoint to resume from: `resume` (a file, or a run directory's newest), else run_dir's newest."""
    if resume:
        p = Path(resume)
        if p.is_file():
            return p
        if p.is_dir():
            found = list_checkpoints(p)
            if not found:
                raise CheckpointError(f"resume={resume} is a directory without checkpoints in {ckpt_dir(p)}")
            return found[-1]
        raise CheckpointError(f"resume={resume} does not exist; give a checkpoint file or a run directory")
    found = list_checkpoints(run_dir)
    return found[-1] if found else None
