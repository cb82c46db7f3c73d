"""One Hydra job, from the composed config to its exit status: its MLflow run's name, tags and tracking URI,
and what each way of ending means.

Errors a user can fix (any UserError: config, data, checkpoint, tracking, run directory) are printed as one
sentence and the process exits with status 2, before any data is loaded or any MLflow run is created. So is a
write that finds the disk full, the quota used up or the file system read-only (imm.diskspace), whenever it
happens: a training's sentence names the last complete checkpoint and the command that resumes. A run
stopped by non-finite values (train.max_nonfinite in a row) prints one line and exits with 1 (MLflow run
FAILED); one stopped by SIGINT/SIGTERM prints one line with the command that resumes it and exits with
128 + the signal number (130, 143; MLflow run KILLED), after saving a checkpoint at the step it stopped.
A sweep job does not exit on an error: it records the error's line in its status.json and returns, so the
sweep's other jobs run; the sweep's callback (imm/launch/sweep.py) reports it and sets the exit status.
Ctrl-C outside a training step is launch.py's one line (exit 130).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from imm.diskspace import DiskFullError, check_free, quiet_log_files
from imm.errors import USER_EXIT_STATUS, RunDirError, UserError, error_line, exit_on_user_error
from imm.runs import (
    LOCK_FILE,
    RESUMABLE_KEYS,
    check_not_held,
    check_writable,
    override_key,
    record_error,
    resume_command,
    sweep_info,
)
from imm.tracking.mlflow_run import TrackingError, check_reachable, default_uri
from imm.training.checkpoint import resolve
from imm.training.signals import Interrupted, in_submitit_job

log = logging.getLogger("imm")
# keys that do not change the experiment (RESUMABLE_KEYS: train.steps, evaluation, tracking, ...) stay out of its
# name, so a run extended or evaluated differently keeps the name it was created with
NOT_IN_RUN_NAME = (*RESUMABLE_KEYS, "+sweep", "sweep")
HYDRA_SUBDIR = ".hydra"  # conf/config.yaml's hydra.output_subdir
_BEFORE: dict[Path, DirBefore] = {}  # run directory -> what it held when this process's launch began (RunDirCheck)


def run_name_from_overrides(overrides, experiment: str | None) -> str:
    """`kernel=inv_stride,loss.k=15` from the command-line overrides (launcher and tracking keys left out)."""
    keep = [o.lstrip("+~") for o in overrides if not o.lstrip("+~").startswith(NOT_IN_RUN_NAME)]
    return ",".join(keep) or (experiment or "default")


def tracking_uri(cfg, launch_dir) -> str:
    """tracking.uri, defaulting to sqlite:///<launch dir>/mlflow.db; optionally falling back to it."""
    uri = cfg.tracking.uri or default_uri(launch_dir)
    if cfg.tracking.fallback_local and uri != default_uri(launch_dir):
        try:
            check_reachable(uri)
        except TrackingError:
            log.warning(
                "the MLflow tracking server at %s is not reachable; falling back to the local store %s"
                " (tracking.fallback_local=true)",
                uri,
                default_uri(launch_dir),
            )
            uri = default_uri(launch_dir)
    return uri


def sweep_tags(hc, info: dict) -> dict[str, str]:
    """A sweep job's child-run tags: its parent run (opened by the launching process) and job number."""
    tags = {"hydra.job.num": str(hc.job.num), "sweep.role": "child", "sweep.dir": str(hc.sweep.dir)}
    if info.get("parent_run_id"):
        tags.update({"mlflow.parentRunId": info["parent_run_id"], "sweep.id": info["parent_run_id"]})
    return tags


def swept_run_name(overrides, keys) -> str:
    """`kernel=inv_stride,loss.k=15`: a sweep job's values of the swept keys only."""
    return ",".join(o.lstrip("+~") for o in overrides if override_key(o) in keys)


class Launch(NamedTuple):
    """What a command needs to know of its launch: the Hydra run, the MLflow run's name and tags, the command
    that reproduces it (a sweep job's: the job alone, as a single run)."""

    hc: object
    name: str
    tags: dict
    command: list


def run(cfg, command):
    """Run `command(cfg, launch)` as one Hydra job: a user error is its one sentence and exit status 2 (a sweep
    job records it and returns, so the sweep's other jobs run), non-finite training exits 1, a signal exits
    128 + its number after the checkpoint, and a bug keeps its traceback (a sweep job's goes to its log)."""
    hc = HydraConfig.get()
    try:
        return _run(cfg, command, hc)
    except BaseException:
        if (found := _BEFORE.pop(Path(hc.runtime.output_dir).resolve(), None)) is not None:
            found.put_back()  # a launch that did no work leaves the directory as it found it
        raise


def _run(cfg, command, hc):
    name, tags, argv = run_name_and_tags(cfg, hc)
    quiet_log_files()  # launch.log on a full disk: one line, not a traceback per log line
    try:
        return command(cfg, Launch(hc, name, tags, argv))
    except UserError as e:
        log.error("%s", e)
        return _failed(hc, name, str(e), USER_EXIT_STATUS, record=not isinstance(e, RunDirError))  # another's
    except FloatingPointError as e:  # train.max_nonfinite steps in a row; the MLflow run is FAILED
        log.error("%s", e)
        return _failed(hc, name, str(e), 1)
    except Interrupted as e:  # SIGINT/SIGTERM: checkpoint saved, the MLflow run is KILLED
        latest = resolve(None, hc.runtime.output_dir)
        if in_submitit_job():  # a requeued job resumes by itself
            log.error("training %s; checkpoint %s.", e, latest)
            raise
        log.error("training %s; checkpoint %s; resume with: %s", e, latest, resume_command(sys.argv))
        sys.exit(128 + e.signum)  # the shell's convention for a process ended by that signal
    except Exception as e:
        if hc.mode.name != "MULTIRUN":
            raise  # a bug: its traceback
        log.exception("this sweep job failed")  # the traceback goes to the job's log; the other jobs run on
        return _failed(hc, name, error_line(e), 1)


def run_name_and_tags(cfg, hc) -> tuple[str, dict[str, str], list[str]]:
    """The MLflow run's name (tracking.run_name, else from the overrides; a sweep job's: its swept values), a
    sweep job's tags (its parent run, job number) and the command that reproduces the run (a sweep job's: the
    job alone, as a single run)."""
    from_overrides = run_name_from_overrides(hc.overrides.task, hc.runtime.choices.get("experiment"))
    run_name = OmegaConf.select(cfg, "tracking.run_name")  # encode's config has no tracking
    if hc.mode.name != "MULTIRUN":
        return run_name or from_overrides, {}, sys.argv
    info = sweep_info(hc.sweep.dir)
    keys = info.get("keys") or list(hc.sweeper.get("params") or {})
    name = run_name or swept_run_name(hc.overrides.task, keys) or from_overrides
    return name, sweep_tags(hc, info), [(info.get("argv") or sys.argv)[0], *hc.overrides.task]


def _failed(hc, name: str, message: str, exit_status: int, record: bool = True) -> None:
    """Exit with `exit_status` (the error's line is logged); a sweep job instead records the error in its
    status.json for the sweep's report (imm/launch/sweep.py) and returns, so the sweep's other jobs run."""
    if hc.mode.name != "MULTIRUN":
        sys.exit(exit_status)
    if record:
        with contextlib.suppress(DiskFullError):  # status.json on a full disk: the job's log holds the sentence
            record_error(hc.runtime.output_dir, name, message, exit_status)


class RunDirCheck(Callback):
    """Hydra callback: a run directory that cannot be written, or that a live process holds, is one sentence and
    exit status 2 before Hydra writes anything there (Hydra's own mkdir would end in a traceback; its config
    files would overwrite the live run's). What the directory held is noted, so that a launch that then does
    no work leaves it as it was (DirBefore)."""

    def on_run_start(self, config, **kwargs) -> None:
        run_dir = Path(config.hydra.run.dir)  # as configured (relative to the launch directory): the messages' path
        with exit_on_user_error():
            check_writable(run_dir)
            check_free(run_dir)  # Hydra writes its config files there next, with no check of its own
            check_not_held(run_dir.resolve())
        _BEFORE[run_dir.resolve()] = DirBefore(run_dir, config.hydra.runtime.cwd)


class DirBefore:
    """A run directory as a launch found it, before Hydra wrote its config files (.hydra/) and its log there.
    `put_back` after a launch that did no work (refused, failed or interrupted before it wrote anything of its
    own): a directory the launch made goes, with the empty folders above it up to the launch directory; one
    that existed gets back its .hydra/ files and its log as they were."""

    def __init__(self, run_dir, launch_dir):
        self.run_dir, self.launch_dir = Path(run_dir).resolve(), Path(launch_dir).resolve()
        self.existed = self.run_dir.is_dir()
        self.work = self._work()
        self.hydra_files = {p.name: p.read_bytes() for p in self._hydra_dir().glob("*") if p.is_file()}
        self.log_sizes = {p.name: p.stat().st_size for p in self.run_dir.glob("*.log")}

    def _hydra_dir(self) -> Path:
        return self.run_dir / HYDRA_SUBDIR

    def _work(self) -> dict:
        """Every file and folder in the directory but Hydra's own and the lock: (size, mtime) of each file."""
        if not self.run_dir.is_dir():
            return {}
        found = {}
        for p in self.run_dir.rglob("*"):
            rel = p.relative_to(self.run_dir)
            if rel.parts[0] == HYDRA_SUBDIR or rel.name == LOCK_FILE or (len(rel.parts) == 1 and p.suffix == ".log"):
                continue
            found[str(rel)] = None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
        return found

    def put_back(self) -> None:
        now = self._work()
        if any(now.get(k, "gone") != v for k, v in self.work.items()) or any(
            v is not None for k, v in now.items() if k not in self.work
        ):
            return  # the launch wrote files of its own: they and Hydra's stay, as a record of what ran
        if not self.existed:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            remove_empty(self.run_dir.parent, self.launch_dir)
            return
        for folder in sorted((k for k in now if k not in self.work), key=len, reverse=True):
            (self.run_dir / folder).rmdir()  # empty folders the launch made
        hydra_dir = self._hydra_dir()
        for p in hydra_dir.glob("*"):
            if p.name not in self.hydra_files:
                p.unlink()
        for name, content in self.hydra_files.items():
            (hydra_dir / name).write_bytes(content)
        if not self.hydra_files:
            with contextlib.suppress(OSError):
                hydra_dir.rmdir()
        for p in self.run_dir.glob("*.log"):
            if p.name in self.log_sizes:
                os.truncate(p, self.log_sizes[p.name])
            else:
                p.unlink()


def remove_empty(path: Path, launch_dir: Path) -> None:
    """Remove `path` and its parents up to `launch_dir` while they are empty folders."""
    path, stop = Path(path).resolve(), Path(launch_dir).resolve()
    while path != stop and stop in path.parents:
        try:
            path.rmdir()  # only an empty directory
        except OSError:
            return
        path = path.parent
