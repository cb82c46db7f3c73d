"""What a run directory is: where the same command lands, which process holds it, and how it ended.

- Identity. The default run directory is `runs/<experiment>/<hash>` (a sweep's `multirun/<sweep>/<hash>`),
  where <hash> is a short hash of the command-line overrides that change the experiment: keys that may
  change when a run is resumed (RESUMABLE_KEYS: train.steps, logging, evaluation, device, data
  location, tracking, hydra.*) do not enter it. So the same command lands in the same directory and
  resumes there, into the same MLflow run. `fresh=true` claims a new directory `<hash>-2`, `<hash>-3`,
  ...; without it a command lands in the newest of them.
- A lock. The main process of a training holds `<run_dir>/.lock` (pid, host, process start time, SLURM
  job id) and touches it every HEARTBEAT_S seconds. A second process is refused while the holder lives;
  a lock whose process is gone (same host), whose SLURM job is this one (a requeue on another node), or
  whose heartbeat is older than STALE_AFTER_S (another host) is taken over.
- Status. `<run_dir>/status.json` records how the last attempt ended (FINISHED, KILLED, FAILED), at which
  step, what it did when it started (started, resumed, rerun, skipped) and its final metrics, so a
  relaunched command or sweep job skips a finished run and says what it did, in one line per job; a
  sweep job that failed adds its error's sentence (record_error) for the sweep's report.
- Writability. A run directory (and its checkpoints/, snapshots/, figures/) that cannot be written is
  one sentence before Hydra creates it (imm.launch.job.RunDirCheck) or any data is loaded (check_writable), not a
  traceback or a failure at the first save.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import socket
import tempfile
import threading
import time
from pathlib import Path

from imm.diskspace import replacing, writing
from imm.errors import RunDirError

LOCK_FILE, STATUS_FILE = ".lock", "status.json"
HEARTBEAT_S, STALE_AFTER_S = 30.0, 300.0  # another host's lock untouched this long is stale
FRESH_KEY = "fresh"  # fresh=true: a new run directory for the same experiment


# Keys that may differ when a run is resumed (longer training, other logging, another machine): the resume
# check (imm.validation.check_same_run) lets them change, and they do not enter a run directory's hash.
RESUMABLE_KEYS = (
    "resume",
    "fresh",
    "dry_run",
    "train.steps",
    "train.log_every",
    "train.ckpt_every",
    "train.snapshot_every",
    "train.keep_last",
    "train.micro_batch",
    "train.device",
    "train.threads",
    "train.compile",
    "eval.",
    "tracking.",
    "data.num_workers",
    "data.root",
    "data.path",
    "data.download",
    "data.vae",
    "data.source_root",
    "hydra",
)
SWEEP_FILE = "sweep.json"  # a sweep directory's parent run id, swept keys and command (imm.launch.sweep)


# -- identity -----------------------------------------------------------------------------------------
def override_key(override) -> str:
    """The key a command-line override sets: `+loss.k=15` -> loss.k, `~tracking.uri` -> tracking.uri."""
    return str(override).lstrip("+~").partition("=")[0]


def experiment_overrides(overrides) -> list[str]:
    """The command-line overrides that define the experiment, normalised and sorted (order does not matter)."""
    kept = []
    for o in overrides:
        key = override_key(o)
        if key != FRESH_KEY and not key.startswith(RESUMABLE_KEYS):
            kept.append(str(o).lstrip("+"))
    return sorted(kept)


def experiment_hash(overrides) -> str:
    """8 hex digits of sha256 over the experiment's overrides (the same for every order of them)."""
    return hashlib.sha256("\n".join(experiment_overrides(overrides)).encode()).hexdigest()[:8]


def run_dir(base: str, name, overrides, fresh, *, claim: bool = True) -> str:
    """`<base>/<name>/<hash>[-N]`: the newest existing attempt of this experiment, or with `fresh` a new one.

    The resolver `${imm.run_dir:...}` in conf/config.yaml calls it once per launch (cached: the value
    travels with the config to every job of a sweep and to a requeued job). A fresh directory is
    claimed with mkdir, so two fresh launches of one command started together never share one;
    claim=False (a dry run) names the one it would claim.
    """
    first = Path(base) / str(name or "default") / experiment_hash(overrides or [])
    attempts = _attempts(first)
    if not _truthy(fresh):
        return str(attempts[-1] if attempts else first)
    n = len(attempts) + 1 if attempts else 1
    while True:
        candidate = first if n == 1 else first.with_name(f"{first.name}-{n}")
        if not claim:
            return str(candidate)
        try:
            candidate.mkdir(parents=True)
            return str(candidate)
        except FileExistsError:
            n += 1


def _attempts(first: Path) -> list[Path]:
    """first, first-2, first-3, ... that exist, oldest first."""
    found = [(1, first)] if first.is_dir() else []
    if first.parent.is_dir():
        for p in first.parent.glob(f"{first.name}-*"):
            suffix = p.name[len(first.name) + 1 :]
            if p.is_dir() and suffix.isdigit():
                found.append((int(suffix), p))
    return [p for _, p in sorted(found)]


def _truthy(value) -> bool:
    return str(value).lower() in ("true", "1", "yes")


def resume_command(argv, steps: int | None = None) -> str:
    """The command that resumes this run: the one given, without fresh= (which would start yet another
    run) or resume= (the run directory now holds its own checkpoints); with `steps`, one that trains on
    to train.steps=steps."""
    drop = (FRESH_KEY, "resume") + (("train.steps",) if steps is not None else ())
    keep = [a for a in argv[1:] if override_key(a) not in drop]
    return shlex.join([*command_line(argv[:1]), *keep, *([f"train.steps={steps}"] if steps is not None else [])])


def command_line(argv) -> list[str]:
    """The command a user types for `argv`: `python launch.py ...` for a script, `imm ...` for the console
    script (argv[0] is its full path in the virtualenv)."""
    if str(argv[0]).endswith(".py"):
        return ["python", *map(str, argv)]
    return [Path(argv[0]).name, *map(str, argv[1:])]


# -- writability ---------------------------------------------------------------------------------------
def unwritable(directory) -> str | None:
    """Why no file can be written in `directory` (one that does not exist yet: created in its nearest existing
    parent), or None when one can. A temporary file is written and removed; no folder is created."""
    d = Path(directory)
    existing = next(p for p in (d, *d.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        return f"{e.strerror or e}: {existing}"
    return None


def check_writable(directory, *subdirs: str) -> None:
    """`directory` and its `subdirs` can be written, else RunDirError: before any work, not at the first save."""
    for d in (Path(directory), *(Path(directory) / sub for sub in subdirs)):
        if why := unwritable(d):
            raise RunDirError(
                f"the run directory {directory} cannot be written ({why}); fix its permissions, or launch from a"
                " folder you can write, or choose another one with hydra.run.dir=... (a sweep: hydra.sweep.dir=...)."
            )


# -- the lock ------------------------------------------------------------------------------------------
def _process_start(pid: int) -> str | None:
    """The kernel's start time of pid (field 22 of /proc/<pid>/stat), so a reused pid is not the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    now = _process_start(pid)
    return start is None or now is None or now == start


def this_process() -> dict:
    """pid, host, kernel start time and SLURM job id of this process: who holds a run directory or takes part
    in a sweep."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "start": _process_start(os.getpid()),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
    }


def alive_here(info: dict) -> bool:
    """The process `info` (this_process() of some process) is running on this host."""
    return info.get("host") == socket.gethostname() and _alive(int(info.get("pid", 0)), info.get("start"))


class RunLock:
    """The main process's hold on a run directory (see the module docstring)."""

    def __init__(self, path: Path, info: dict):
        self.path, self.info = path, info
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="imm-run-lock", daemon=True)
        self._thread.start()
        atexit.register(self.release)

    @classmethod
    def acquire(cls, directory) -> "RunLock":
        """Hold `directory` or raise RunDirError naming the live holder."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / LOCK_FILE
        info = this_process()
        for _ in range(3):  # another process may take over or release it in between
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                check_not_held(directory)
                path.unlink(missing_ok=True)  # stale (or unreadable): take it over
                continue
            with writing(path, partial=path), os.fdopen(fd, "w") as f:  # a full disk: no half-written lock left
                json.dump(info, f)
            return cls(path, info)
        raise RunDirError(f"run directory {directory}: could not take its lock {path}; try again.")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if _read_json(self.path) == self.info:  # never remove a lock another process took over
            self.path.unlink(missing_ok=True)


def check_not_held(directory) -> None:
    """RunDirError naming the live process that holds `directory`, if one does (a launch says so before it
    writes anything there)."""
    path = Path(directory) / LOCK_FILE
    holder = _read_json(path) if path.exists() else None
    if holder is not None and not _stale(holder, path, this_process()):
        raise RunDirError(
            f"run directory {directory} is in use by process {holder.get('pid')} on {holder.get('host')}; wait"
            " for it to end or stop it, or start a new run of this experiment with fresh=true."
        )


def _stale(holder: dict, path: Path, me: dict) -> bool:
    if holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"]:
        return True  # this SLURM job, requeued (perhaps on another node)
    if holder.get("host") == me["host"]:
        if holder.get("pid") == me["pid"]:
            return True  # this process, after an earlier training in it stopped on an error
        return not _alive(int(holder.get("pid", 0)), holder.get("start"))
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return True
    return age > STALE_AFTER_S


@contextlib.contextmanager
def file_lock(path):
    """Hold an exclusive lock on the file `path` (created if missing) for the block: one process at a time."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# -- status ------------------------------------------------------------------------------------------
def read_status(directory) -> dict:
    """{"status", "step", "action", "from_step", "name", "summary", "time"} of the last attempt ({} if none)."""
    return _read_json(Path(directory) / STATUS_FILE) or {}


def write_status(directory, **values) -> None:
    """Replace status.json atomically (a reader never sees half a file)."""
    _replace_status(directory, {**values, "time": time.time()})


def record_error(directory, name: str, message: str, exit_status: int) -> None:
    """Why an attempt (of the run `name`) failed, its one sentence and exit status, added to status.json beside
    the outcome the training loop wrote, or, when it failed before training, beside the last attempt's outcome,
    which stays as it was (a relaunch still reads it). A sweep's report reads it (status_line, failed_since)."""
    error = {"message": message, "exit_status": exit_status, "time": time.time()}
    _replace_status(directory, {"name": name, **read_status(directory), "error": error})


def _replace_status(directory, status: dict) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(status, indent=1, default=float) + "\n"
    with replacing(directory / STATUS_FILE, needed=len(text)) as tmp:  # a full disk: the previous one stays
        tmp.write_text(text)


def finished(status: dict, steps: int) -> bool:
    """The last attempt FINISHED at `steps` or beyond: a relaunch has nothing to do."""
    return status.get("status") == "FINISHED" and int(status.get("step", 0)) >= steps


def action(status: dict, *, resumed: bool) -> str:
    """What this attempt does: `rerun` after a FAILED one, `resumed` from a checkpoint, else `started`."""
    if status.get("status") == "FAILED":
        return "rerun"
    return "resumed" if resumed else "started"


def status_line(status: dict) -> str:
    """One line for what an attempt did and how it ended, e.g. `resumed from step 200, FINISHED at step 400`,
    with the recorded error's sentence when it failed (`started, FAILED at step 132: ...`)."""
    action, end = status.get("action", "started"), f"{status.get('status')} at step {status.get('step')}"
    if action == "skipped":
        return f"skipped (FINISHED at step {status.get('step')} before)"
    error = status.get("error")
    why = f": {error['message']}" if error and error["time"] >= status.get("time", 0) else ""
    if action == "started":
        return f"started, {end}{why}"
    return f"{action} from step {status.get('from_step', 0)}, {end}{why}"


def outcome(status: dict, since: float, *, final: bool = False) -> str | None:
    """How the attempt that started at `since` or later ended, in one line (status_line), or `FAILED before
    training: <its sentence>`; None while none has ended since. A FAILED attempt whose sentence is not recorded
    yet (imm.launch.job records it right after the loop writes the status) counts only when `final` (the
    sweep's end)."""
    error = failed_since(status, since)
    if status.get("time", 0) >= since:
        return None if status.get("status") == "FAILED" and error is None and not final else status_line(status)
    return f"FAILED before training: {error['message']}" if error else None


def failed_since(status: dict, since: float) -> dict | None:
    """The error recorded by an attempt that started at `since` or later (record_error), or None."""
    error = status.get("error")
    return error if error and error["time"] >= since else None


# -- a sweep directory ---------------------------------------------------------------------------------
def sweep_info(sweep_dir) -> dict:
    """{"parent_run_id": ..., "keys": [...], "argv": [...]} written by the launching process ({} if none)."""
    return _read_json(Path(sweep_dir) / SWEEP_FILE) or {}
