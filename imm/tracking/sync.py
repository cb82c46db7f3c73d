"""`python launch.py --config-name sync run=DIR [tracking.uri=...]`: a training run's MLflow record completed from
its journal (imm.tracking.journal), after its store was away when the training ended.

Without tracking.uri the records the store has not taken go into the same run, in order (a training that ended
while the store was away left the rest in the journal, its end status included). With another store's URI the
whole record goes there: the run is created once (tagged imm.synced_from with the original run's id, with the
original's experiment, name, tags and start time), and a second sync into it finds it and adds nothing twice.
The run directory's lock is held meanwhile, so a sync never runs beside the training's own writer.
"""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

from imm.errors import TrackingError, error_line
from imm.runs import RunLock, command_line
from imm.tracking.journal import JOURNAL, KIND, Journal, apply, groups, journals, rejected
from imm.tracking.mlflow_run import _create_experiment, check_store, client_for

SYNCED_FROM = "imm.synced_from"  # the tag of a run that `sync` created in another store: the original run's id
log = logging.getLogger("imm.tracking")


def sync_command(script, run_dir) -> str:
    """The command that completes run_dir's MLflow record (`script`: launch.py or the imm command, as the user ran
    it)."""
    return shlex.join(command_line([script, "--config-name", "sync", f"run={Path(run_dir).resolve()}"]))


def sync(run_dir, uri: str | None = None) -> list[str]:
    """Send each journal of run_dir to its store (or to `uri`); one line per journal saying what was done.
    The run directory's lock is held meanwhile (a training running there is refused: its own writer sends)."""
    run_dir = Path(run_dir)
    found = journals(run_dir)
    if not found:
        raise TrackingError(
            f"{run_dir} holds no MLflow journal ({JOURNAL}); give run= the run directory of a training (the folder"
            " with checkpoints/ and mlflow_run_id)."
        )
    lock = RunLock.acquire(run_dir)
    try:
        return [_sync_one(j, uri) for j in found]
    finally:
        lock.release()


def _sync_one(journal: Journal, uri: str | None) -> str:
    head = journal.head()
    if head is None or head.get("op") != "run":
        raise TrackingError(
            f"{journal.path} does not begin with its run's record; it is not a journal of this project."
        )
    target = uri or head["uri"]
    check_store(target)
    try:
        client = client_for(target)
        run_id, start, created = _target_run(client, journal, head, target)
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001  MLflow's, SQLAlchemy's and the OS's errors of a store
        raise TrackingError(f"the MLflow tracking store {target} cannot be used ({error_line(e)}).") from None
    original = run_id == head["run_id"] and target == head["uri"]
    pending = [(r, end) for r, end in journal.records(start) if r["op"] != "run"]
    sent = dropped = 0
    records = [r for r, _ in pending]
    ends = [end for _, end in pending]
    for group in groups(records):
        try:
            apply(client, run_id, group)
        except Exception as e:  # noqa: BLE001
            if not rejected(e):
                raise TrackingError(
                    f"the MLflow store {target} stopped taking records after {sent} of {len(records)} from"
                    f" {journal.path} ({error_line(e)}); run the same command again to send the rest."
                ) from None
            log.warning("MLflow %s not logged: %s", KIND.get(group[0]["op"], group[0]["op"]), error_line(e))
            dropped += len(group)
        sent += len(group)
        if original:
            journal.mark_sent(ends[sent - 1])
    status = client.get_run(run_id).info.status
    what = f"created MLflow run {run_id} in {target} (a copy of {head['run_id']})" if created else None
    what = what or f"MLflow run {run_id} in {target}"
    skipped = f", {dropped} refused by the store" if dropped else ""
    return f"{what}: {len(records)} records of {journal.path} sent{skipped}; the run is {status}"


def _target_run(client, journal: Journal, head: dict, target: str) -> tuple[str, int, bool]:
    """(run id, byte offset to send from, created) in the store `target`: the journal's own run (from where its
    store stopped taking records when `target` is its store), else a copy made by an earlier sync, else a new
    run (tagged imm.synced_from) with the journal's experiment, name, tags and start time."""
    from mlflow.exceptions import MlflowException

    original = head["run_id"]
    try:
        run = client.get_run(original)
    except MlflowException:
        run = None
    if run is not None:
        if run.info.lifecycle_stage == "deleted":
            raise TrackingError(
                f"the MLflow run {original} was deleted in {target}; restore it (mlflow runs restore --run-id"
                f" {original}) and run the same command again."
            )
        return original, journal.sent() if target == head["uri"] else 0, False
    exp = client.get_experiment_by_name(head["experiment"])
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise TrackingError(
            f"the MLflow experiment {head['experiment']!r} in {target} was deleted; restore it (mlflow experiments"
            f" restore --experiment-id {exp.experiment_id}) and run the same command again."
        )
    exp_id = exp.experiment_id if exp else _create_experiment(client, head["experiment"], target)
    copies = client.search_runs([exp_id], filter_string=f"tags.`{SYNCED_FROM}` = '{original}'", max_results=1)
    if copies:
        return copies[0].info.run_id, 0, False
    tags = {**head.get("tags", {}), SYNCED_FROM: original}
    run = client.create_run(exp_id, start_time=head.get("start_time"), tags=tags, run_name=head.get("run_name"))
    return run.info.run_id, 0, True
