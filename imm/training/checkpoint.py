"""Atomic, resumable checkpoints, and EMA snapshots kept apart from them.

A training state is one file `<run_dir>/checkpoints/step-XXXXXXXX.pt` holding only state_dicts, tensors
and plain Python values (the resolved config as YAML text), so it loads with
`torch.load(weights_only=True)`: a file that would run code when unpickled is refused.
Writes go to a temporary file in the same directory, are fsynced, then renamed over the final name:
a kill at any moment leaves either the previous checkpoint set or the new file, never a partial
file under a checkpoint name (a killed write leaves a `.tmp-*.part` file, which nothing loads and the
next save removes). The newest K + 1 training states are kept.

A snapshot (edm2's network snapshot) is `<run_dir>/snapshots/snapshot-XXXXXXXX.pt`: the EMA's state_dict
under the key `ema` (the same layout as a training state's `ema`) with what sampling needs (step, config,
shape, num_classes, standardizer, mlflow_run_id) and `kind: snapshot`; it is written the same atomic way,
loads with weights_only=True too, and is never pruned. Sample and evaluate take either kind; resuming
training takes training states only. `snapshots/best-<N>step.pt` is a link to the snapshot of the
evaluation with the best primary metric at N sampling steps (`best.json` beside it holds the best values).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path

import torch

from imm.diskspace import DiskFullError, disk_errno, writing
from imm.errors import CheckpointError, ConfigError

CKPT_DIR = "checkpoints"
PATTERN = re.compile(r"^step-(\d{8,})\.pt$")
SNAPSHOT_DIR = "snapshots"
SNAPSHOT_PATTERN = re.compile(r"^snapshot-(\d{8,})\.pt$")
SNAPSHOT = "snapshot"  # the value of a snapshot's `kind` key (a training state has no `kind`)
PARTIAL_PREFIX, PARTIAL_SUFFIX = ".tmp-", ".part"  # a write in progress, or one a kill interrupted
# What sample and evaluate read from either kind of file (weights=online also reads a state's `model`).
SAMPLING_KEYS = ("step", "config", "ema", "shape", "num_classes")
# What every training state holds; resuming also needs the objects the loop's CheckpointIO names.
REQUIRED_KEYS = ("step", "config", "model", "ema")
_UMASK = os.umask(0o022)  # read the process umask (there is no getter) and put it back
os.umask(_UMASK)


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

    def snapshot_dict(self, **values) -> dict:
        """The EMA weights alone (the `ema` object's state_dict, as in a training state) beside plain values."""
        return {"kind": SNAPSHOT, "ema": self.objects["ema"].state_dict(), **values}

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


def snapshot_dir(run_dir) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR


def _numbered(d: Path, pattern: re.Pattern) -> list[tuple[int, Path]]:
    """(step, file) of the files in d whose names match pattern, oldest first (temporary files never match)."""
    if not d.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in d.iterdir() if (m := pattern.match(p.name)))


def list_checkpoints(run_dir) -> list[Path]:
    """Training-state files of a run, oldest first."""
    return [p for _, p in _numbered(ckpt_dir(run_dir), PATTERN)]


def list_snapshots(run_dir) -> list[Path]:
    """Snapshot files of a run, oldest first."""
    return [p for _, p in _numbered(snapshot_dir(run_dir), SNAPSHOT_PATTERN)]


def save(state: dict, run_dir, step: int, keep_last: int = 3) -> Path:
    """Write `state` atomically as the training state of `step`; keep the newest keep_last + 1 states."""
    final = _write_atomic(state, ckpt_dir(run_dir) / f"step-{step:08d}.pt")
    for old in list_checkpoints(run_dir)[: -(keep_last + 1)]:
        old.unlink(missing_ok=True)
    return final


def save_snapshot(snapshot: dict, run_dir, step: int) -> Path:
    """Write `snapshot` (CheckpointIO.snapshot_dict) atomically as the snapshot of `step`; nothing is pruned."""
    return _write_atomic(snapshot, snapshot_path(run_dir, step))


def snapshot_path(run_dir, step: int) -> Path:
    return snapshot_dir(run_dir) / f"snapshot-{step:08d}.pt"


BEST_FILE = "best.json"


def link_best(run_dir, key: str, snapshot: Path) -> Path:
    """Point snapshots/best-<key>.pt (key: "1step", "2step_w1.5") at `snapshot` (a relative symlink, replaced
    atomically), so `ckpt=<run>/snapshots/best-1step.pt` samples the 1-step best."""
    link = snapshot_dir(run_dir) / f"best-{key}.pt"
    tmp = link.with_name(f"{PARTIAL_PREFIX}{link.name}{PARTIAL_SUFFIX}")
    with writing(link, partial=tmp):  # a full disk: the previous link stays
        tmp.unlink(missing_ok=True)
        os.symlink(Path(snapshot).name, tmp)
        os.replace(tmp, link)
    return link


def read_best(run_dir) -> dict:
    """The best values (and steps) a run has recorded in snapshots/best.json; {} when there are none."""
    path = snapshot_dir(run_dir) / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_best(run_dir, best: dict) -> None:
    path = snapshot_dir(run_dir) / BEST_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{PARTIAL_PREFIX}{BEST_FILE}{PARTIAL_SUFFIX}")
    text = json.dumps(best, indent=1, sort_keys=True) + "\n"
    with writing(path, needed=len(text), partial=tmp):  # a full disk: the previous best.json stays
        tmp.write_text(text)
        os.replace(tmp, path)


def _write_atomic(obj: dict, final: Path) -> Path:
    """torch.save `obj` to a temporary file beside `final`, fsync it, rename it over `final`, fsync the folder.
    A full disk, quota or read-only file system is DiskFullError naming `final` and the bytes it needs."""
    d = final.parent
    try:
        d.mkdir(parents=True, exist_ok=True)
        _remove_partial(d)  # left by a write that a kill interrupted (only the main process saves)
        fd, tmp = tempfile.mkstemp(prefix=PARTIAL_PREFIX, suffix=PARTIAL_SUFFIX, dir=d)
    except OSError as e:
        raise _disk_full(e, final, obj) or e
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; a checkpoint is as readable as any file
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(d)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)  # first: the space it took is free again, and the free space is measured
        if isinstance(e, Exception) and (full := _disk_full(e, final, obj)) is not None:
            raise full from None
        raise
    return final


class _Counter:
    """A file that only counts what torch.save writes to it."""

    def __init__(self):
        self.n = 0

    def write(self, b) -> int:
        self.n += len(b)
        return len(b)

    def flush(self) -> None:
        pass


def serialized_size(obj) -> int | None:
    """The exact bytes torch.save writes for `obj` (it serializes once more, writing nothing: for the error of
    a failed save only); None when that fails too."""
    counter = _Counter()
    try:
        torch.save(obj, counter)
    except Exception:  # noqa: BLE001  the size is a detail of the error being raised
        return None
    return counter.n


def stored_bytes(obj) -> int:
    """The bytes of the tensors in `obj` (each storage once): a lower bound of its file's size, free to compute."""
    storages = {}
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            storages[storage.data_ptr(), storage.device] = storage.nbytes()
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return sum(storages.values())


def _disk_full(e: Exception, final: Path, obj) -> DiskFullError | None:
    """`e` as DiskFullError when the save failed for lack of space or quota or on a read-only file system.
    torch's zip writer hides the errno (`unexpected pos ...`): then the free space decides, against the exact
    size the file needs."""
    if not isinstance(e, (OSError, RuntimeError)):
        return None
    needed = serialized_size(obj)
    code = disk_errno(e, final.parent, needed)
    return None if code is None else DiskFullError(final, code, needed=needed)


def _remove_partial(d: Path) -> list[Path]:
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
        if (wanted := next((ln for ln in lines if "GLOBAL" in ln), None)) is None:  # not a pickle that calls code
            raise _unreadable(path, e) from None
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain-tensor checkpoint and unpickling it could run code"
            f" (torch.load with weights_only=True: {wanted.rstrip('.')}); load only checkpoints this project wrote."
        ) from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}.") from None
    except Exception as e:  # noqa: BLE001  truncated zip (RuntimeError), empty (EOFError), garbage (KeyError, ...)
        raise _unreadable(path, e) from None
    missing = [k for k in required if k not in state] if isinstance(state, dict) else list(required)
    if missing and isinstance(state, dict) and state.get("kind") == SNAPSHOT:
        raise CheckpointError(
            f"{path} is an EMA snapshot, which holds the EMA weights only (not {', '.join(missing)}); resuming"
            f" training and weights=online need a training state, a step-XXXXXXXX.pt file from the run's {CKPT_DIR}/."
        )
    if missing:
        raise CheckpointError(
            f"{path} is not a training checkpoint of this project (it lacks"
            f" {', '.join(missing)}); give a step-XXXXXXXX.pt file from a run's checkpoints/."
        )
    return state


def _unreadable(path: Path, e: Exception) -> CheckpointError:
    """A file torch.load cannot read, said as what it is (from its first bytes) and torch's reason."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        what = "it is empty"
    elif head.startswith(b"\x93NUMPY"):
        what = "it is a NumPy .npy file, not a checkpoint"
    elif head.startswith(b"PK\x03\x04"):  # torch's zip format
        what = "it is a damaged or truncated PyTorch file (an interrupted copy?)"
    elif head.startswith(b"\x80"):
        what = "it is a Python pickle that torch.load cannot read as a checkpoint (damaged, or not from torch.save)"
    else:
        what = f"it is not a PyTorch file (it begins {head!r})"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]  # torch's unpickler: the "Unsupported" line
    detail = next((ln for ln in lines if ln.startswith("Unsupported")), lines[0] if lines else "")
    detail = detail.split(". ")[0].rstrip(".")
    return CheckpointError(
        f"cannot read checkpoint {path}: {what} ({type(e).__name__}{': ' + detail if detail else ''}); give a"
        f" step-XXXXXXXX.pt (or snapshot-XXXXXXXX.pt) file this project wrote."
    )


def resolve(path, run_dir=None, *, key: str = "resume", snapshots: bool = False) -> Path | None:
    """The file the option `key`=`path` names: a file, the newest of a run directory, or the newest of a
    run's checkpoints/ (or snapshots/) folder; without `path`, run_dir's newest (None: there is none).
    snapshots=False (training's resume=): training states only, a snapshot file is refused.
    snapshots=True (sample's and evaluate's ckpt=): a snapshot or a state, a run directory meaning the one of
    the higher step (on a tie the snapshot, the smaller file)."""
    if not path:
        return _newest(run_dir, snapshots) if run_dir is not None else None
    p = Path(str(path)).expanduser()
    if p.is_file():
        if not snapshots and SNAPSHOT_PATTERN.match(p.name):
            raise CheckpointError(
                f"{key}={path} is an EMA snapshot (EMA weights only), which cannot resume training; give a"
                f" training state (a step-XXXXXXXX.pt file in the run's {CKPT_DIR}/) or the run directory."
            )
        return p
    if not p.is_dir():
        raise CheckpointError(f"{key}={path} does not exist; give a checkpoint file or a run directory.")
    found = _newest(p, snapshots)
    if found is None and p.name == CKPT_DIR:
        found = _newest(p.parent, snapshots=False)
    if found is None and p.name == SNAPSHOT_DIR and snapshots:
        found = next(reversed(list_snapshots(p.parent)), None)
    if found is not None:
        return found
    if snapshots:
        raise CheckpointError(
            f"{key}={path} is a directory without training states in {ckpt_dir(p)} or snapshots in {snapshot_dir(p)}."
        )
    only_snapshots = list_snapshots(p) or (list_snapshots(p.parent) if p.name == SNAPSHOT_DIR else [])
    why = " (its snapshots hold EMA weights only and cannot resume training)" if only_snapshots else ""
    raise CheckpointError(f"{key}={path} is a directory without training states in {ckpt_dir(p)}{why}.")


def _newest(run_dir, snapshots: bool) -> Path | None:
    """run_dir's newest training state or, with `snapshots`, snapshot: the higher step, on a tie the snapshot."""
    found = [(step, 0, p) for step, p in _numbered(ckpt_dir(run_dir), PATTERN)]
    if snapshots:
        found += [(step, 1, p) for step, p in _numbered(snapshot_dir(run_dir), SNAPSHOT_PATTERN)]
    return max(found)[2] if found else None


# -- init=: the weights a training starts from -----------------------------------------------------------------
def init_weights(path, key: str = "init") -> tuple[dict, Path, str]:
    """(weights, file, what) of the option `key`=`path`: a run directory (its newest snapshot or training state,
    e.g. one `--config-name import` wrote), one of this project's checkpoint files (their EMA weights), or a
    released official IMM checkpoint (read with imm.official: nothing in it runs). CheckpointError otherwise."""
    file = resolve(path, key=key, snapshots=True)
    try:
        state = load(file, required=("ema",))
    except CheckpointError as ours:
        from imm.official import convert, reader

        try:
            found = convert.convert(reader.read(file))
        except CheckpointError:
            raise ours from None
        return found.weights, file, f"the official {found.network_class} in {file}"
    prefix = "ema_model."
    weights = {k[len(prefix) :]: v for k, v in state["ema"].items() if k.startswith(prefix)}
    if not weights:
        raise CheckpointError(f"{key}={path}: {file} holds no EMA weights (no ema_model.* keys).")
    return weights, file, f"the EMA weights of {file} (step {state.get('step', '?')})"


def first_difference(ours: dict, theirs: dict) -> str | None:
    """The first tensor in which two state_dicts differ in name or shape, said in words (None: they fit)."""
    for name, value in ours.items():
        if name not in theirs:
            return f"it has no {name} {list(value.shape)}"
        if tuple(theirs[name].shape) != tuple(value.shape):
            return f"its {name} is {list(theirs[name].shape)} where this network's is {list(value.shape)}"
    extra = next((name for name in theirs if name not in ours), None)
    return None if extra is None else f"its {extra} {list(theirs[extra].shape)} has no place in this network"


def init_for(init, ours: dict, arch: str) -> tuple[dict, str]:
    """(weights in `ours`' order and dtypes, what they are) of init=`init` for a network whose state_dict is `ours`
    (arch `arch`); weights that do not fit are ConfigError, one sentence naming the first tensor that differs."""
    weights, _file, what = init_weights(init)
    if (why := first_difference(ours, weights)) is not None:
        raise ConfigError(
            f"init={init} does not fit the network this config builds (arch={arch}): {why}; compose the"
            " architecture the weights were trained with (an imported run's is in its .hydra/config.yaml)."
        )
    return {k: weights[k].to(v.dtype) for k, v in ours.items()}, what
