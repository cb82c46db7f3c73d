"""What the launching process of a sweep knows about its jobs and its fellow sweeper processes.

- JobWatcher: one line per job as it starts and as it ends, with where its log is. The jobs run in other
  processes (submitit) or on other nodes (SLURM), so the launching process reads the sweep directory
  every few seconds: a job has started when its launch.log appears, it has ended when its status.json
  is written (imm/runs.py).
- SweepProcesses: the launching processes taking part in one sweep directory (several sweeper processes
  on one Optuna study run the same command), so that the last one to leave ends the MLflow parent run.
  Liveness is known on this host only: start the sweeper processes of one sweep on one machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from pathlib import Path

import yaml

from imm import runs
from imm.diskspace import writing

log = logging.getLogger("imm.sweep")
JOB_LOG = "launch.log"  # Hydra's job log: <hydra.job.name>.log in the job directory


def job_line(num, values: str, what: str, log_file) -> None:
    """`job N <swept values>: <what>; log <path>` (what's closing full stop dropped before the log's path)."""
    log.info("job %s %s: %s; log %s", num, values, what.removesuffix("."), log_file)


class JobWatcher:
    """Prints `job N <swept values>: started; log <path>` and `job N ...: <how it ended>; log <path>`."""

    def __init__(self, sweep_dir, since: float, keys, every: float = 2.0):
        self.sweep_dir, self.since, self.keys, self.every = Path(sweep_dir), since, set(keys), every
        self.started: set[str] = set()
        self.ended: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imm-job-watcher", daemon=True)

    def start(self) -> "JobWatcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        """A last look (a job that ended since the previous one), then no more lines."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.poll()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.poll()

    def poll(self) -> None:
        if not self.sweep_dir.is_dir():
            return
        for job in sorted((p for p in self.sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
            log_file = job / JOB_LOG
            if job.name not in self.started and _newer(log_file, self.since):
                self.started.add(job.name)
                job_line(job.name, self._values(job), "started", log_file)
            if job.name not in self.ended and (ended := runs.outcome(runs.read_status(job), self.since)):
                self.ended.add(job.name)
                job_line(job.name, self._values(job), ended, log_file)

    def _values(self, job: Path) -> str:
        """The job's values of the swept keys, from the overrides Hydra saved in its directory."""
        try:
            overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
        except (OSError, yaml.YAMLError):
            return ""
        return " ".join(o for o in overrides if runs.override_key(o) in self.keys)


def _newer(path: Path, since: float) -> bool:
    try:
        return path.stat().st_mtime >= since
    except OSError:
        return False


class SweepProcesses:
    """This process's entry among the launching processes of a sweep directory (`.sweepers/`)."""

    def __init__(self, sweep_dir):
        self.dir = Path(sweep_dir) / ".sweepers"
        self.dir.mkdir(parents=True, exist_ok=True)
        me = runs.this_process()
        self.entry = self.dir / f"{me['host']}-{me['pid']}.json"
        with writing(self.entry):  # a full disk: DiskFullError, one sentence
            self.entry.write_text(json.dumps(me) + "\n")

    def others_alive(self) -> bool:
        """Another launching process of this sweep still runs on this host."""
        for entry in self.dir.glob("*.json"):
            if entry != self.entry:
                with contextlib.suppress(OSError, ValueError):
                    if runs.alive_here(json.loads(entry.read_text())):
                        return True
        return False

    def leave(self) -> None:
        self.entry.unlink(missing_ok=True)


def sweep_lock(sweep_dir):
    """One launching process at a time opens, reopens or ends the sweep's MLflow parent run."""
    return runs.file_lock(Path(sweep_dir) / ".sweep.lock")
