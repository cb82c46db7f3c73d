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

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from imm.tracking.jobs import JobWatcher, SweepProcesses, sweep_lock
from imm.tracking.mlflow_run import default_uri, ensure_store, note_tag, source_tags

log = logging.getLogger("imm.sweep")
SWEEP_FILE = "sweep.json"


def sweep_info(sweep_dir) -> dict:
    """{"parent_run_id": ..., "keys": [...], "argv": [...]} written by the launching process ({} if none)."""
    p = Path(sweep_dir) / SWEEP_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def swept_keys(config: DictConfig) -> list[str]:
    """The keys a multirun varies: sweeper params plus comma-separated command-line overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = list((config.hydra.sweeper.get("params") or {}).keys())
    for o in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task)):
        if o.is_sweep_override() and o.get_key_element().lstrip("+~") not in keys:  # a=1,2 but not a=[1,2]
            keys.append(o.get_key_element().lstrip("+~"))
    return keys


class MLflowSweepCallback(Callback):
    """Hydra callback: on_multirun_start opens the parent run (or, when the same sweep command runs
    again, reopens the one its sweep.json names); on_multirun_end closes it and says, in one line per
    job, what each job did (started, resumed, rerun, skipped) and how it ended."""

    def __init__(self):
        self.client, self.run_id, self.sweep_dir, self.started = None, None, None, 0.0
        self.watcher, self.processes = None, None

    def __getstate__(self) -> dict:  # submitit pickles the launcher with Hydra's callbacks; the thread stays here
        return {**self.__dict__, "watcher": None}

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if config.dry_run:  # the sweeper checks the jobs and launches none (imm/dry_run.py)
            return
        self.sweep_dir, self.started = Path(config.hydra.sweep.dir), time.time()
        keys = swept_keys(config)
        self.watcher = JobWatcher(self.sweep_dir, self.started, keys).start()  # a line per job as it starts and ends
        atexit.register(self._report)
        _cap_parallel_jobs(config)
        if not config.tracking.enabled:
            return
        uri = config.tracking.uri or default_uri(config.hydra.runtime.cwd)
        ensure_store(uri)
        with sweep_lock(self.sweep_dir):  # several sweeper processes of one search share one parent (imm/search.py)
            self._open_parent(config, uri, keys)

    def _open_parent(self, config: DictConfig, uri: str, keys: list[str]) -> None:
        from imm.tracking.mlflow_run import Tracker

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
                **note_tag(f"`{shlex.join(['python', *sys.argv])}`\n\nA sweep over {', '.join(keys)}."),
            },
            run_id=parent if parent and _exists(uri, parent) else None,
            end_at_exit=False,  # _end ends it, when no other sweeper process of this sweep runs
        )
        tracker.set_tags({"sweep.id": tracker.run_id})
        self.client, self.run_id = tracker.client, tracker.run_id
        info = {"parent_run_id": tracker.run_id, "keys": keys, "argv": sys.argv}  # argv: the jobs' source and command
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(info) + "\n")
        # Hydra raises out of the sweep when a job fails, skipping on_multirun_end: never leave RUNNING.
        atexit.register(self._end, None)
        again = "relaunched: reopened" if tracker.run_id == parent else "opened"
        log.info(
            "sweep over %s in %s: %s MLflow parent run %s in %s", ", ".join(keys), sweep_dir, again, tracker.run_id, uri
        )

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.watcher is not None:
            self.watcher.stop()  # the last jobs' lines before the sweep's own
        if self.client is None:
            return
        statuses = [r.info.status for r in self._children()]
        self.client.set_tag(self.run_id, "sweep.children", str(len(statuses)))
        failed = sum(s != "FINISHED" for s in statuses)
        if self._end("FAILED" if failed else "FINISHED"):
            log.info("sweep finished: %d child runs, %d not FINISHED", len(statuses), failed)
        else:
            log.info("this sweeper process is done; another one of this sweep still runs and ends the parent run")

    def _children(self):
        return self.client.search_runs(
            [self.client.get_run(self.run_id).info.experiment_id],
            filter_string=f"tags.`sweep.id` = '{self.run_id}' and tags.`sweep.role` = 'child'",
        )

    def _end(self, status: str | None) -> bool:
        """End the parent run, unless another sweeper process of this sweep still runs (the last one ends it);
        status None (the sweep stopped early): KILLED if a child was, else FAILED. False: left to another."""
        if self.client is None:
            return True
        with sweep_lock(self.sweep_dir):
            self.processes.leave()
            if self.processes.others_alive():
                return False
            if self.client.get_run(self.run_id).info.status == "RUNNING":
                if status is None:
                    status = "KILLED" if any(r.info.status == "KILLED" for r in self._children()) else "FAILED"
                self.client.set_terminated(self.run_id, status=status)
        return True

    def _report(self) -> None:
        """One line per job directory the watcher did not see end: what its attempt in this launch did, or that
        it did not run."""
        from imm.training.rundir import describe, read_status

        self.watcher.stop()
        found = self.sweep_dir.iterdir() if self.sweep_dir.is_dir() else ()
        for job in sorted((p for p in found if p.name.isdigit() and p.is_dir()), key=lambda p: int(p.name)):
            if job.name in self.watcher.ended:
                continue
            status = read_status(job)
            if not status or status.get("time", 0) < self.started:
                what = "did not finish in this launch" + (f" (last: {describe(status)})" if status else "")
            else:
                what = describe(status)
            log.info("job %s %s: %s", job.name, status.get("name") or "", what)


def _cap_parallel_jobs(config: DictConfig) -> None:
    """On the local launcher, run at most parallel_jobs() jobs at once (hydra.sweeper.max_batch_size, when it
    is null): a launcher preset cannot set a sweeper key, but Hydra builds the sweeper from this config right
    after on_multirun_start."""
    from imm.training.threads import parallel_jobs

    sweeper = config.hydra.sweeper
    if "max_batch_size" not in sweeper or sweeper.max_batch_size is not None:
        return
    if (n := parallel_jobs(config.hydra.launcher)) is not None:
        with open_dict(config), read_write(config):
            sweeper.max_batch_size = n
        log.info("local launcher: at most %d job(s) at a time (hydra.sweeper.max_batch_size=%d)", n, n)


def _exists(uri: str, run_id: str) -> bool:
    """The parent run named in sweep.json is in this store (a sweep relaunched against another store: a new one)."""
    from imm.tracking.mlflow_run import client_for

    try:
        client_for(uri).get_run(run_id)
    except Exception:  # noqa: BLE001  mlflow raises MlflowException for a missing run
        return False
    return True
