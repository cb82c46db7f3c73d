"""Atomic, resumable checkpoints.

A checkpoint is one file `<run_dir>/checkpoints/step-XXXXXXXX.pt` holding only state_dicts, tensors
and plain Python values (the resolved config as YAML text), so it loads with
`torch.load(weights_only=True)`: a file that would run code when unpickled is refused.
Writes go to a temporary file in the same directory, are fsynced, then renamed over the final name:
a kill at any moment leaves either the previous checkpoint set or the new file, never a partial
file under a checkpoint name (a killed write leaves a `.tmp-*.part` file, which nothing loads and the
next save removes). The newest K + 1 files are kept.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path

import torch

CKPT_DIR = "checkpoints"
PATTERN = re.compile(r"^step-(\d{8,})\.pt$")
PARTIAL_PREFIX, PARTIAL_SUFFIX = ".tmp-", ".part"  # a write in progress, or one a kill interrupted
# What every consumer of a checkpoint reads (sample and evaluate too); resuming also needs the
# objects the loop's CheckpointIO names.
REQUIRED_KEYS = ("step", "config", "model", "ema")
_UMASK = os.umask(0o022)  # read the process umask (there is no getter) and put it back
os.umask(_UMASK)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which file and why."""


class CheckpointIO:
    """The training state, named once: objects with state_dict()/load_state_dict() (None for one a run
    does not use, e.g. no EMA target), saved under their names beside plain values (step, rng, config)."""

    def __init__(self, **objects):
        self.objects = objects

    @property
    def required(self) -> tuple[str, ...]:
        """The keys a checkpoint must hold to resume into these objects."""
        return (*REQUIRED_KEYS, *(name for name in self.objects if name not in REQUIRED_KEYS), "rng")

    def state_dict(self, device: torch.device, **values) -> dict:
        state = {name: None if obj is None else obj.state_dict() for name, obj in self.objects.items()}
        return {**state, "rng": rng_state(device), **values}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        """Load every object; the global RNG last (call after any seeding, it continues the saved stream)."""
        for name, obj in self.objects.items():
            if obj is not None:
                obj.load_state_dict(state[name])
        torch.set_rng_state(state["rng"]["cpu"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)


def rng_state(device: torch.device) -> dict:
    """The global RNG streams (dropout): the CPU one, and the device's on CUDA."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


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
    remove_partial(run_dir)  # left by a write that a kill interrupted (only the main process saves)
    fd, tmp = tempfile.mkstemp(prefix=PARTIAL_PREFIX, suffix=PARTIAL_SUFFIX, dir=d)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; a checkpoint is as readable as any file
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


def remove_partial(run_dir) -> list[Path]:
    """Delete temporary files of checkpoint writes that never finished; returns what was removed."""
    d = ckpt_dir(run_dir)
    found = [p for p in d.glob(f"{PARTIAL_PREFIX}*{PARTIAL_SUFFIX}") if p.is_file()] if d.is_dir() else []
    for p in found:
        p.unlink(missing_ok=True)
    return found


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path, map_location="cpu", required=REQUIRED_KEYS) -> dict:
    """Load a checkpoint with weights_only=True; one clear error (CheckpointError, one sentence) for
    a file that would run code, a corrupt or truncated file, or one that is not a training checkpoint."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning would only add noise to the error
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph; keep the line that names what the file wanted to run
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        what = next((ln for ln in lines if "GLOBAL" in ln or ln.startswith("Unsupported")), "refused").rstrip(".")
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain-tensor checkpoint and unpickling it could run code"
            f" (torch.load with weights_only=True: {what}); only resume from checkpoints this project wrote."
        ) from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}.") from None
    except Exception as e:  # noqa: BLE001  truncated zip (RuntimeError), empty (EOFError), garbage (KeyError, ...)
        detail = str(e).split(". ")[0].strip() or "the file is empty or truncated"
        raise CheckpointError(
            f"cannot read checkpoint {path}, it is corrupt or not a checkpoint"
            f" ({type(e).__name__}: {detail.rstrip('.')})."
        ) from None
    missing = [k for k in required if k not in state] if isinstance(state, dict) else list(required)
    if missing:
        raise CheckpointError(
            f"{path} is not a training checkpoint of this project (it lacks"
            f" {', '.join(missing)}); give a step-XXXXXXXX.pt file from a run's checkpoints/."
        )
    return state


def resolve(path, run_dir=None, *, key: str = "resume") -> Path | None:
    """The checkpoint the option `key`=`path` names: a checkpoint file, the newest checkpoint of a run
    directory or of a run's checkpoints/ folder; without `path`, run_dir's newest (None: there is none).
    Training resumes through it (resume=), sample and evaluate read their ckpt= through it."""
    if path:
        p = Path(str(path)).expanduser()
        if p.is_file():
            return p
        if p.is_dir():
            found = list_checkpoints(p) or (list_checkpoints(p.parent) if p.name == CKPT_DIR else [])
            if not found:
                raise CheckpointError(f"{key}={path} is a directory without checkpoints in {ckpt_dir(p)}.")
            return found[-1]
        raise CheckpointError(f"{key}={path} does not exist; give a checkpoint file or a run directory.")
    found = list_checkpoints(run_dir) if run_dir is not None else []
    return found[-1] if found else None
