"""The run protocol around one training attempt in a run directory, so that the loop is only the loop.

`with Attempt(run_dir, env, ...) as attempt:` holds the directory's lock (a second process is refused) and
reads how the last attempt ended (`attempt.last`; `attempt.finished()`: nothing to do at train.steps). Once
the loop is about to run, `attempt.begin(step, resumed=..., rescue=...)` says what this attempt does (started,
resumed, rerun); from then on, however the block is left, the summary is printed, the MLflow run ends FINISHED
(the block ended), KILLED (a signal, Ctrl-C, submitit's requeue) or FAILED (any other exception), distributed
training shuts down and status.json records the outcome. An exception that ends the loop first calls `rescue`
(a checkpoint of the last completed step), unless it is a stop that saved already (a signal), a save that found
the disk full, or non-finite values (whose last good checkpoint is the one to resume from). The MLflow record is
waited for (tracking.flush_timeout seconds) before the summary, which says when the store did not take all of
it and prints the `sync` command that completes it. A block left before `begin` (a user error while the data
load, say) only releases the lock: the last attempt's status stays as it was. Other ranks hold no lock and write
nothing.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from imm import runs
from imm.diskspace import DiskFullError, skipped
from imm.errors import error_line
from imm.tracking.mlflow_run import Tracker, ui_links
from imm.tracking.sync import sync_command
from imm.training import checkpoint, diskwatch, distributed
from imm.training.progress import log_file, stretched_lr, summary_text
from imm.training.signals import Interrupted, in_submitit_job
from imm.validation import check_same_run

log = logging.getLogger("imm.train")


class Attempt:
    def __init__(self, run_dir: Path, env, cfg, *, run_name: str, tracking_uri: str | None):
        self.run_dir, self.env, self.steps = Path(run_dir), env, cfg.train.steps
        self.run_name, self.tracking_uri = run_name, tracking_uri
        self.started_at = time.time()
        self.lock, self.last = None, {}
        self.tracker = Tracker.disabled()  # the loop opens the MLflow run once its tags are known
        self.action, self.start_step, self.step, self.closing, self.rescue = None, 0, 0, (), None
        self.summary: dict = {}
        # what training on past train.steps does to the learning rate: the summary says it under `train on`
        self.lr_note = stretched_lr(cfg, self.steps, self.steps, 2 * self.steps)

    def __enter__(self) -> "Attempt":
        if self.env.is_main:
            self.lock = runs.RunLock.acquire(self.run_dir)
        self.last = runs.read_status(self.run_dir)
        return self

    def finished(self) -> bool:
        """The last attempt FINISHED at train.steps or beyond: a relaunch has nothing to do."""
        return runs.finished(self.last, self.steps)

    def skip(self, cfg) -> dict:
        """Say that the run is done and record the relaunch as skipped; the last attempt's summary. Another
        experiment in this directory is refused, not skipped."""
        if (newest := checkpoint.resolve(None, self.run_dir)) is not None:
            check_same_run(cfg, checkpoint.load(newest)["config"], newest)
        log.info(
            "%s: already FINISHED at step %d; nothing to do (raise train.steps to train on, or fresh=true for a"
            " new run)",
            self.run_dir,
            self.last["step"],
        )
        if self.env.is_main:
            runs.write_status(self.run_dir, **{**self.last, "action": "skipped"})
        return self.last.get("summary", {})

    def begin(self, step: int, *, resumed: bool, closing=(), rescue=None) -> None:
        """The loop starts at `step`: from here on, leaving the block records how the attempt ended, after
        calling each of `closing` (the loop's signal handlers and progress bar); an exception first calls
        `rescue(step)` with the last completed step (it writes that step's checkpoint)."""
        self.action, self.start_step, self.step = runs.action(self.last, resumed=resumed), step, step
        self.closing, self.rescue = closing, rescue
        if self.action == "rerun":
            log.info(
                "the last attempt in %s FAILED at step %s; running again from step %d",
                self.run_dir,
                self.last["step"],
                step,
            )

    def __exit__(self, kind, error, traceback) -> None:
        stopped = None
        if isinstance(error, DiskFullError) and error.after is None:  # a save found no space: what is kept, and
            stopped = diskwatch.stopped(error, self.run_dir, self.resume_hint("FAILED"))  # how to resume
        try:
            if self.action is not None and kind is not None and _rescued(kind) and self.rescue is not None:
                self._rescue()
            if self.action is not None:
                self._end(_status(kind), note=stopped and f"**Stopped at step {self.step}:** {stopped}")
        finally:
            if self.lock is not None:
                self.lock.release()
        if stopped is not None:
            raise stopped from None

    def resume_hint(self, status: str) -> str:
        """The command that continues this run (to twice its steps when it FINISHED); a sweep job's: its sweep's."""
        if in_submitit_job() or _in_multirun():  # sys.argv is the whole sweep's command
            return "run the sweep command again" + (" with a larger train.steps" if status == "FINISHED" else "")
        return runs.resume_command(sys.argv, steps=2 * self.steps if status == "FINISHED" else None)

    def _rescue(self) -> None:
        try:
            self.rescue(self.step)
        except Exception as e:  # noqa: BLE001  the error that ended the loop is the one to see
            log.warning("no checkpoint of step %d, the last completed step: %s", self.step, error_line(e))

    def _end(self, status: str, note: str | None = None) -> None:
        for close in self.closing:
            close()
        complete = self.tracker.flush()  # the record so far is in the store, or waits in the journal
        sync = None if complete else sync_command(sys.argv[0], self.run_dir)
        if self.env.is_main:  # before the MLflow run ends, so that its launch.log artifact holds the summary
            log.info(
                "%s",
                summary_text(
                    status=status,
                    start_step=self.start_step,
                    step=self.step,
                    steps=self.steps,
                    seconds=time.time() - self.started_at,
                    summary=self.summary,
                    run_dir=self.run_dir,
                    uri=self.tracking_uri if self.tracker.enabled else None,
                    run_id=self.tracker.run_id,
                    resume=self.resume_hint(status),
                    lr_note=self.lr_note,
                    links=ui_links(self.tracking_uri, self.tracker.run_id) if self.tracker.enabled else None,
                    incomplete=sync and (self.tracker.writer.waiting, self.tracker.journal, sync),
                ),
            )
        if not self.tracker.end(status, log_file=log_file(self.run_dir), note=note, wait=complete) and complete:
            log.warning(  # the store went away during these last seconds
                "the MLflow store %s did not take the end of the run's record; it waits in %s, and %s sends it",
                self.tracking_uri,
                self.tracker.journal,
                sync_command(sys.argv[0], self.run_dir),
            )
        distributed.shutdown(self.env)
        if self.env.is_main:
            with skipped(f"{runs.STATUS_FILE} keeps the last attempt's outcome", self.run_dir / runs.STATUS_FILE):
                runs.write_status(
                    self.run_dir,
                    status=status,
                    step=self.step,
                    action=self.action,
                    from_step=self.start_step,
                    name=self.run_name,
                    summary=self.summary,
                )


def _in_multirun() -> bool:
    """A job of a sweep that Hydra's basic launcher runs in this process."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _rescued(kind) -> bool:
    """Whether an exception of type `kind` that ends the loop is followed by a checkpoint of the last completed
    step: not a stop that saved already (a signal; submitit's requeue exits after its checkpoint), a save that
    found the disk full, or non-finite values (the state that went non-finite is not one to resume from)."""
    return not issubclass(kind, (Interrupted, SystemExit, DiskFullError, FloatingPointError))


def _status(kind) -> str:
    """How an attempt that left its block with the exception type `kind` (None: none) ended."""
    if kind is None:
        return "FINISHED"
    # SystemExit: submitit exits after requeueing
    return "KILLED" if issubclass(kind, (Interrupted, KeyboardInterrupt, SystemExit)) else "FAILED"
