"""What launch.py runs inside Hydra: resolve run directory, tracking URI and run name, then train.

Errors a user can fix (config, data, checkpoint, tracking) are printed as one sentence and the
process exits with status 2, before any data is loaded or any MLflow run is created. So is a write that finds
the disk full, the quota used up or the file system read-only (imm.diskspace), whenever it happens: a training's
sentence names the last complete checkpoint and the command that resumes. A run stopped
by non-finite values (train.max_nonfinite in a row) prints one line and exits with 1 (MLflow run
FAILED); one stopped by SIGINT/SIGTERM prints one line with the command that resumes it and exits with
128 + the signal number (130, 143; MLflow run KILLED), after saving a checkpoint at the step it stopped.
A sweep job does not exit on an error: it records the error's line in its status.json and returns, so the
sweep's other jobs run; the sweep's callback (imm/tracking/sweep.py) reports it and sets the exit status.
Ctrl-C outside a training step is launch.py's one line (exit 130).
"""

from __future__ import annotations

import contextlib
import logging
import sys

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from imm.config import ConfigError
from imm.data import DataError
from imm.diskspace import DiskFullError, quiet_log_files
from imm.tracking.mlflow_run import TrackingError, check_reachable, default_uri, error_line
from imm.training.checkpoint import CheckpointError
from imm.training.rundir import RunDirError, record_error, resume_command
from imm.training.signals import Interrupted, in_submitit_job

log = logging.getLogger("imm")
USER_ERRORS = (ConfigError, DataError, CheckpointError, TrackingError, DiskFullError)
TASKS = ("sample", "evaluate", "encode")  # launch.py --config-name TASK: imm/tasks/TASK.py
NOT_IN_RUN_NAME = ("hydra", "tracking.", "resume", "train.device", "+sweep", "sweep")


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
    return ",".join(o.lstrip("+~") for o in overrides if o.lstrip("+~").partition("=")[0] in keys)


def run(cfg):
    from imm.training.loop import train  # torch-heavy imports after Hydra has parsed the command line

    hc = HydraConfig.get()
    name, tags, command = run_name_and_tags(cfg, hc)
    quiet_log_files()  # launch.log on a full disk: one line, not a traceback per log line
    try:
        if hc.job.config_name in TASKS:  # launch.py --config-name sample|evaluate|encode ...
            from importlib import import_module

            return import_module(f"imm.tasks.{hc.job.config_name}").run(cfg)
        if cfg.dry_run:
            from imm import dry_run

            return dry_run.run(cfg, hc)
        uri = tracking_uri(cfg, hc.runtime.cwd)
        return train(cfg, hc.runtime.output_dir, tracking_uri=uri, run_name=name, extra_tags=tags, command=command)
    except DiskFullError as e:  # a training's own sentence ends with its last checkpoint and the resume command
        if e.after is None and hc.job.config_name not in TASKS:
            from imm.training.diskwatch import stopped

            e = stopped(e, hc.runtime.output_dir, resume_command(sys.argv))
        log.error("%s", e)
        return _failed(hc, name, str(e), 2)
    except USER_ERRORS as e:
        log.error("%s", e)
        return _failed(hc, name, str(e), 2, record=not isinstance(e, RunDirError))  # that directory is another's
    except FloatingPointError as e:  # train.max_nonfinite steps in a row; the MLflow run is FAILED
        log.error("%s", e)
        return _failed(hc, name, str(e), 1)
    except Interrupted as e:  # SIGINT/SIGTERM: checkpoint saved, the MLflow run is KILLED
        from imm.training.checkpoint import resolve

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
    from imm.tracking.sweep import sweep_info

    info = sweep_info(hc.sweep.dir)
    keys = info.get("keys") or list(hc.sweeper.get("params") or {})
    name = run_name or swept_run_name(hc.overrides.task, keys) or from_overrides
    return name, sweep_tags(hc, info), [(info.get("argv") or sys.argv)[0], *hc.overrides.task]


def _failed(hc, name: str, message: str, exit_status: int, record: bool = True) -> None:
    """Exit with `exit_status` (the error's line is logged); a sweep job instead records the error in its
    status.json for the sweep's report (tracking/sweep.py) and returns, so the sweep's other jobs run."""
    if hc.mode.name != "MULTIRUN":
        sys.exit(exit_status)
    if record:
        with contextlib.suppress(DiskFullError):  # status.json on a full disk: the job's log holds the sentence
            record_error(hc.runtime.output_dir, name, message, exit_status)


@contextlib.contextmanager
def exit_on_user_error():
    """For Hydra callbacks in the launching process (before any job): a user error is its sentence on stderr
    and exit status 2."""
    try:
        yield
    except USER_ERRORS as e:
        sys.stderr.write(f"{e}\n")
        sys.exit(2)
