"""A training run's MLflow record as a journal in its run directory, so a store that goes away loses nothing.

Every record the run logs (params, metrics, tags, artifacts, its dataset, status changes, its end) is one JSON
line of `<run dir>/mlflow_journal.jsonl`, appended whole (one write) before it is sent; `mlflow_journal.jsonl.sent`
holds how many bytes of it the store has taken. The first line names the run: its id, store, experiment,
name, creation tags and start time. Each record carries what makes sending it again harmless (a metric its key,
step, value and the time it was logged, which the store treats as one point; a tag or param its value; the end its
status and time), so a replay after a crash or an outage adds nothing twice.

`apply` sends records to a run (consecutive metrics merged into batches), `rejected` tells a record the store
refuses for what it is (dropped, said) from a store that cannot take it now (kept, sent again later), and `sync`
is imm.tracking.sync's (`python launch.py --config-name sync run=DIR`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from imm.diskspace import replacing

JOURNAL = "mlflow_journal.jsonl"  # a run directory's journal; an earlier MLflow run's: mlflow_journal-<id>.jsonl
METRICS_PER_BATCH, PARAMS_PER_BATCH, TAGS_PER_BATCH = 1000, 100, 100  # MLflow's log_batch limits
KIND = {"metrics": "metrics", "params": "params", "tags": "tags", "note": "tags", "artifact": "artifacts"}
KIND.update(text="artifacts", dataset="dataset", status="status", end="end status")
log = logging.getLogger("imm.tracking")


def now_ms() -> int:
    return int(time.time() * 1000)


class Journal:
    """The append-only file of one MLflow run's records and the count of its bytes the store has taken."""

    def __init__(self, path):
        self.path = Path(path)
        self.sent_path = self.path.with_name(self.path.name + ".sent")
        self._fd: int | None = None

    def exists(self) -> bool:
        return self.path.is_file()

    def head(self) -> dict | None:
        """The first record (op "run": the run's id, store, experiment, name, tags, start time), None if none."""
        return next((record for record, _ in self.records()), None)

    def records(self, start: int = 0) -> Iterator[tuple[dict, int]]:
        """(record, byte offset after it) for each whole record from byte `start` on; a line that is not one
        (cut off by a crash) is skipped."""
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return
        with f:
            f.seek(start)
            offset = start
            for line in f:
                offset += len(line)
                if not line.endswith(b"\n"):
                    return
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and "op" in record:
                    yield record, offset

    def sent(self) -> int:
        """Bytes of the journal the store has taken (0: none)."""
        try:
            return int(self.sent_path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def mark_sent(self, offset: int) -> None:
        with replacing(self.sent_path) as tmp:  # a reader never sees half a number
            tmp.write_text(f"{offset}\n")

    def unsent(self) -> int:
        """Records the store has not taken."""
        return sum(1 for _ in self.records(self.sent()))

    def append(self, record: dict) -> int:
        """Write `record` as one whole line (one write; a failed or partial write is cut away again); the byte
        offset after it. An OSError (a full disk) leaves the journal as it was."""
        line = (json.dumps(record, default=str) + "\n").encode()
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            _cut_torn_tail(self._fd, self.path)
        end = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            if os.write(self._fd, line) != len(line):
                raise OSError(28, "No space left on device")  # a short write: ENOSPC
        except OSError:
            try:
                os.ftruncate(self._fd, end)
            except OSError:
                pass
            raise
        return end + len(line)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def rotate(self, run_id: str) -> Path:
        """Move this journal (and its count) aside as mlflow_journal-<its run id>.jsonl, for a new MLflow run
        of the same run directory (tracking.uri changed); `sync` still sends it."""
        self.close()
        old = self.path.with_name(f"{self.path.stem}-{run_id}{self.path.suffix}")
        os.replace(self.path, old)
        if self.sent_path.exists():
            os.replace(self.sent_path, old.with_name(old.name + ".sent"))
        return old


def _cut_torn_tail(fd: int, path: Path) -> None:
    """A journal whose last line was cut off (the process died in the middle of a write) ends after its last
    whole record again, so the next record starts a line of its own."""
    size = os.lseek(fd, 0, os.SEEK_END)
    if size == 0:
        return
    with open(path, "rb") as f:
        pos = size
        while pos > 0:
            step = min(4096, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            if (i := chunk.rfind(b"\n")) >= 0:
                pos = pos - step + i + 1
                break
            pos -= step
    if pos != size:
        os.ftruncate(fd, pos)


def journals(run_dir) -> list[Journal]:
    """The journals of a run directory: earlier MLflow runs' first, then the current one."""
    run_dir = Path(run_dir)
    older = sorted(run_dir.glob("mlflow_journal-*.jsonl"), key=lambda p: p.stat().st_mtime)
    return [Journal(p) for p in [*older, run_dir / JOURNAL] if p.is_file()]


# -- records to MLflow ------------------------------------------------------------------------------------
def groups(records: list) -> Iterator[list]:
    """`records` in order as lists sent by one apply: a run of consecutive metrics records (up to MLflow's
    batch size) together, any other record alone."""
    i = 0
    while i < len(records):
        j, n = i + 1, len(records[i]["metrics"]) if records[i]["op"] == "metrics" else 0
        if records[i]["op"] == "metrics":
            while j < len(records) and records[j]["op"] == "metrics" and n + len(records[j]["metrics"]) <= 1000:
                n += len(records[j]["metrics"])
                j += 1
        yield records[i:j]
        i = j


def apply(client, run_id: str, group: list) -> None:
    """Send one group (see `groups`) to the run; raises what MLflow raises."""
    from mlflow.entities import Metric, Param, RunTag

    first = group[0]
    op = first["op"]
    if op == "metrics":
        batch = [Metric(k, float(v), r["time"], r["step"]) for r in group for k, v in r["metrics"].items()]
        for i in range(0, len(batch), METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=batch[i : i + METRICS_PER_BATCH])
    elif op == "params":
        items = [Param(k, str(v)) for k, v in first["params"].items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            client.log_batch(run_id, params=items[i : i + PARAMS_PER_BATCH])
    elif op == "tags":
        items = [RunTag(k, str(v)) for k, v in first["tags"].items()]
        for i in range(0, len(items), TAGS_PER_BATCH):
            client.log_batch(run_id, tags=items[i : i + TAGS_PER_BATCH])
    elif op == "artifact":
        client.log_artifact(run_id, first["path"], first.get("artifact_path"))
    elif op == "text":
        client.log_text(run_id, first["text"], first["file"])
    elif op == "dataset":
        _log_dataset(client, run_id, first)
    elif op == "note":  # above the run's description, once
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

        old = client.get_run(run_id).data.tags.get(MLFLOW_RUN_NOTE)
        if not (old or "").startswith(first["note"]):
            client.set_tag(run_id, MLFLOW_RUN_NOTE, f"{first['note']}\n\n{old}" if old else first["note"])
    elif op == "status":
        client.update_run(run_id, status=first["status"])
    elif op == "end":
        client.set_terminated(run_id, status=first["status"], end_time=first.get("time"))
    # "run" (the journal's head) names the run; it was created when it was written


def _log_dataset(client, run_id: str, r: dict) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = Dataset(r["name"], r["digest"], r["source_type"], r["source"], r["schema"], r["profile"])
    client.log_inputs(run_id, [DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, r["context"])])])


STORE_ERRORS = ("sqlalchemy", "sqlite3", "urllib3", "requests", "http", "socket", "ssl", "pymysql", "psycopg")


def rejected(e: BaseException) -> bool:
    """The store refused the record itself (MLflow's 4xx: a value it does not take, a run that was deleted; a
    local artifact file that is gone), or the record cannot be sent at all (an error of this code's): sending it
    again cannot help. The store cannot take it now (sent again later) when it does not answer, times out, answers
    with a 5xx or its database is locked or full: MLflow's other errors, the OS's, the network's and the
    database drivers'."""
    if isinstance(e, FileNotFoundError):
        return True
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        status = e.get_http_status_code()
        return 400 <= status < 500 and status not in (408, 429)
    return not isinstance(e, OSError) and not type(e).__module__.startswith(STORE_ERRORS)
