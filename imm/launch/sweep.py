"""One MLflow parent run per Hydra sweep, opened by the launching process before any job starts.

The launching process also creates (or migrates) the tracking store once: jobs starting together
on a fresh SQLite store otherwise race on creating its schema (seen: `sqlite3.OperationalError:
duplicate column name: step`, one job lost). The parent run id and the swept keys
are written to `<sweep dir>/sweep.json` where every job, local or on a cluster node, finds them; jobs
log child runs tagged with it (`mlflow.parentRunId`, `sweep.id`), named after their swept values.
"""

from __future__ import annotations

import atexit
import json
import logging
import shlex
import sys
import time
from pathlib import Path

from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from imm.diskspace import check_free, writing
from imm.errors import ConfigError, error_line, exit_on_user_error
from imm.launch import overrides
from imm.launch.job import swept_run_name
from imm.launch.watcher import JOB_LOG, JobWatcher, SweepProcesses, job_line, sweep_lock
from imm.runs import (
    SWEEP_FILE,
    check_writable,
    command_line,
    failed_since,
    outcome,
    read_status,
    status_line,
    sweep_info,
)
from imm.tracking.mlflow_run import Tracker, client_for, default_uri, ensure_store, note_tag, source_tags, ui_links
from imm.training.threads import parallel_jobs
from imm.validation import validate

log = logging.getLogger("imm.sweep")


def swept_keys(config: DictConfig) -> list[str]:
    """The keys a multirun varies: sweeper params plus comma-separated command-line overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = list((config.hydra.sweeper.get("params") or {}).keys())
    for o in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task)):
        if o.is_sweep_override() and o.get_key_element().lstrip("+~") not in keys:  # a=1,2 but not a=[1,2]
            keys.append(o.get_key_element().lstrip("+~"))
    return keys


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """Each job's overrides, in job-number order, as Hydra's basic sweeper (and our grid sweeper, its subclass)
    expands the sweep ([] for another sweeper, which chooses its jobs as it goes)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.utils import get_class

    if not issubclass(get_class(config.hydra.sweeper._target_), BasicSweeper):
        return []
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    overrides = OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task])
    return BasicSweeper.split_arguments(overrides, None)[0]


def invalid_jobs(config: DictConfig, config_name: str | None, jobs) -> list[tuple[int, str, str]]:
    """(job number, its swept values, the sentence) for each of `jobs` whose config, composed as the job's will
    be, validate() refuses."""
    from hydra import compose

    launcher = config.hydra.launcher
    world_size = (launcher.get("tasks_per_node") or 1) * (launcher.get("nodes") or 1)
    keys, invalid = swept_keys(config), []
    for num, job in enumerate(jobs):
        try:
            cfg = compose(config_name=config_name, overrides=job)
        except HydraException as e:  # a typo in a key or an option: the sweep starts no job
            raise ConfigError(overrides.sentence(e, job) or f"job {num} {' '.join(job)}: {error_line(e)}") from None
        try:
            validate(cfg, world_size)
        except ConfigError as e:
            invalid.append((num, swept_run_name(job, keys), str(e)))
    return invalid


class MLflowSweepCallback(Callback):
    """Hydra callback: on_multirun_start checks every job's config (an invalid job is said at once; a sweep of
    only invalid jobs stops there) and opens the parent run (or, when the same sweep command runs again,
    reopens the one its sweep.json names); while the jobs run, a line per job as it starts and ends
    (imm.launch.watcher.JobWatcher); on_multirun_end of the last sweeper process closes the parent, judged then,
    FAILED with the tag sweep.failed_jobs when a job failed, and says in one line per job not reported yet what
    it did (started, resumed, rerun, skipped) and how it ended (a failed job: its sentence). A failed job does not
    stop the others (imm.launch.job records its error instead of exiting); the sweep then exits with its exit status
    (2 for a user error)."""

    def __init__(self):
        self.client, self.run_id, self.sweep_dir, self.started = None, None, None, 0.0
        self.watcher, self.processes = None, None

    def __getstate__(self) -> dict:  # submitit pickles the launcher with Hydra's callbacks; the thread stays here
        return {**self.__dict__, "watcher": None}

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if config.dry_run:  # the sweeper checks the jobs and launches none (imm/launch/dry_run.py)
            return
        self.sweep_dir, self.started = Path(config.hydra.sweep.dir), time.time()
        with exit_on_user_error():
            self._start(config, kwargs.get("config_name"))

    def _start(self, config: DictConfig, config_name: str | None) -> None:
        jobs = sweep_jobs(config)
        invalid = invalid_jobs(config, config_name, jobs)
        for num, name, why in invalid:
            log.warning("job %d %s will fail: %s", num, name, why)
        if invalid and len(invalid) == len(jobs):
            raise ConfigError(f"all {len(jobs)} jobs of this sweep are invalid (each said above); none was started.")
        check_writable(self.sweep_dir)
        check_free(self.sweep_dir)  # a full disk: one sentence now, not Hydra's traceback at its first file
        self.sweep_dir.mkdir(parents=True, exist_ok=True)  # sweep.json goes there before any job starts
        keys = swept_keys(config)
        if not _in_process(config):  # a line per job as it starts and ends (in-process jobs: Hydra's, and _report's)
            self.watcher = JobWatcher(self.sweep_dir, self.started, keys).start()
        atexit.register(self._report)
        _cap_parallel_jobs(config)
        if not config.tracking.enabled:
            return
        uri = config.tracking.uri or default_uri(config.hydra.runtime.cwd)
        ensure_store(uri)
        with sweep_lock(self.sweep_dir):  # the sweeper processes of one search share one parent
            self._open_parent(config, uri, keys)

    def _open_parent(self, config: DictConfig, uri: str, keys: list[str]) -> None:
        sweep_dir = self.sweep_dir
        self.processes = SweepProcesses(sweep_dir)
        parent = sweep_info(sweep_dir).get("parent_run_id")
        choices = config.hydra.runtime.choices
        tracker = Tracker.open(
            uri,
            config.tracking.experiment,
            run_name=f"sweep {choices.get('sweep') or ','.join(keys)} {sweep_dir.name}",
            params={},
            tags={
                "sweep.dir": str(sweep_dir.resolve()),
                "sweep.keys": ",".join(keys),
                "sweep.role": "parent",
                **source_tags(sys.argv[0]),
                **note_tag(f"`{shlex.join(command_line(sys.argv))}`\n\nA sweep over {', '.join(keys)}."),
            },
            run_id=parent if parent and _exists(uri, parent) else None,
            end_at_exit=False,  # _end ends it, when no other sweeper process of this sweep runs
        )
        tracker.set_tags({"sweep.id": tracker.run_id})
        self.client, self.run_id = tracker.client, tracker.run_id
        info = {"parent_run_id": tracker.run_id, "keys": keys, "argv": sys.argv}  # argv: the jobs' source and command
        with writing(sweep_dir / SWEEP_FILE):
            (sweep_dir / SWEEP_FILE).write_text(json.dumps(info) + "\n")
        # Hydra raises out of the sweep when a job fails, skipping on_multirun_end: never leave RUNNING.
        atexit.register(self._end, False)
        again = "relaunched: reopened" if tracker.run_id == parent else "opened"
        log.info(
            "sweep over %s in %s: %s MLflow parent run %s in %s", ", ".join(keys), sweep_dir, again, tracker.run_id, uri
        )

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.sweep_dir is None:  # a dry run: on_multirun_start started nothing
            return
        if self.watcher is not None:
            self.watcher.stop()  # the last jobs' lines before the sweep's own
        jobs = self._jobs()
        running_elsewhere = self.processes is not None and self.processes.others_alive()  # a search's other sweepers
        failed = self._failed_jobs(jobs, unknown_is_failed=not running_elsewhere)
        if not self._end(True):
            log.info("this sweeper process is done; another one of this sweep still runs and ends the parent run")
        log.info("sweep finished: %d jobs, %d failed", len(jobs), len(failed))
        if self.client is not None and (links := ui_links(self.client.tracking_uri, self.run_id)):
            log.info("in the MLflow UI: the sweep's parent run %s; its jobs' runs, under it, %s", *links)
        if failed:  # the sweep's exit status: 2 when a job failed on a user error, else 1
            sys.exit(max((failed_since(status, self.started) or {}).get("exit_status", 1) for _, status in failed))

    def _children(self):
        return self.client.search_runs(
            [self.client.get_run(self.run_id).info.experiment_id],
            filter_string=f"tags.`sweep.id` = '{self.run_id}' and tags.`sweep.role` = 'child'",
        )

    def _end(self, completed: bool) -> bool:
        """End the parent run, unless another sweeper process of this sweep still runs (the last one ends it, so
        its verdict sees every job, including the other processes' last ones); a sweep that stopped early
        (completed False) ends KILLED if a child was, else FAILED. False: left to another process."""
        if self.client is None:
            return True
        with sweep_lock(self.sweep_dir):
            self.processes.leave()
            if self.processes.others_alive():
                return False
            if self.client.get_run(self.run_id).info.status == "RUNNING":
                statuses = [r.info.status for r in self._children()]
                if completed:
                    status = self._verdict(statuses)
                else:
                    status = "KILLED" if "KILLED" in statuses else "FAILED"
                self.client.set_terminated(self.run_id, status=status)
        return True

    def _verdict(self, statuses: list[str]) -> str:
        """FINISHED when every job's last attempt and every child run FINISHED; tags the parent with its number
        of children and the failed jobs (sweep.failed_jobs)."""
        failed = self._failed_jobs(self._jobs(), unknown_is_failed=True)
        self.client.set_tag(self.run_id, "sweep.children", str(len(statuses)))
        if failed:
            names = ", ".join(f"{num} {status.get('name') or ''}".strip() for num, status in failed)
            self.client.set_tag(self.run_id, "sweep.failed_jobs", names)
        return "FAILED" if failed or any(s != "FINISHED" for s in statuses) else "FINISHED"

    def _failed_jobs(self, jobs, *, unknown_is_failed: bool) -> list[tuple[int, dict]]:
        return [(num, s) for num, s in jobs if _failed(s, self.started, unknown_is_failed=unknown_is_failed)]

    def _jobs(self) -> list[tuple[int, dict]]:
        """(job number, its status.json) for each job directory of the sweep."""
        found = self.sweep_dir.iterdir() if self.sweep_dir.is_dir() else ()
        return sorted((int(p.name), read_status(p)) for p in found if p.name.isdigit() and p.is_dir())

    def _report(self) -> None:
        """One line per job directory the watcher did not see end: what its attempt in this launch did, or that
        it did not run."""
        if self.watcher is not None:
            self.watcher.stop()
        for num, status in self._jobs():
            if self.watcher is not None and str(num) in self.watcher.ended:
                continue
            what = outcome(status, self.started, final=True)
            if what is None:
                what = "did not finish in this launch" + (f" (last: {status_line(status)})" if status else "")
            job_line(num, status.get("name") or "", what, self.sweep_dir / str(num) / JOB_LOG)


def _in_process(config: DictConfig) -> bool:
    """Hydra's basic launcher runs the jobs one after another in this process: a watcher thread's lines would
    land in the running job's log, and Hydra already says which job starts."""
    return str(config.hydra.launcher.get("_target_", "")).endswith(".BasicLauncher")


def _failed(status: dict, since: float, *, unknown_is_failed: bool) -> bool:
    """The job failed: its last attempt did not FINISH (before this launch, which started at `since`, or in it)
    or an attempt failed since. A job without a status ended before writing one, or, while another sweeper
    process of this sweep runs, may still be running there (unknown_is_failed=False)."""
    if failed_since(status, since):
        return True
    return status.get("status") != "FINISHED" if status.get("status") else unknown_is_failed


def _cap_parallel_jobs(config: DictConfig) -> None:
    """On the local launcher, run at most parallel_jobs() jobs at once (hydra.sweeper.max_batch_size, when it
    is null): a launcher preset cannot set a sweeper key, but Hydra builds the sweeper from this config right
    after on_multirun_start."""
    sweeper = config.hydra.sweeper
    if "max_batch_size" not in sweeper or sweeper.max_batch_size is not None:
        return
    if (n := parallel_jobs(config.hydra.launcher)) is not None:
        with open_dict(config), read_write(config):
            sweeper.max_batch_size = n
        log.info("local launcher: at most %d job(s) at a time (hydra.sweeper.max_batch_size=%d)", n, n)


def _exists(uri: str, run_id: str) -> bool:
    """The parent run named in sweep.json is in this store and not deleted (a sweep relaunched against another
    store, or whose parent was deleted in the UI: a new one)."""
    try:
        return client_for(uri).get_run(run_id).info.lifecycle_stage != "deleted"
    except Exception:  # noqa: BLE001  mlflow raises MlflowException for a missing run
        return False
