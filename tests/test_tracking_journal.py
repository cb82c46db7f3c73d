"""The MLflow journal and its background writer (imm.tracking.journal, imm.tracking.writer) in one process: a store
that refuses to answer for a while loses nothing and gets nothing twice, the caller never waits on it, and
`sync` copies a journal into another store. The same with a real `mlflow server` and real trainings:
tests/test_tracking_outage.py."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.tracking import MlflowClient

from imm.tracking import writer as writer_mod
from imm.tracking.journal import JOURNAL, Journal, groups
from imm.tracking.mlflow_run import Tracker
from imm.tracking.sync import SYNCED_FROM, sync
from imm.tracking.writer import Writer


class FlakyStore:
    """A client that does not answer while `down` is set (MLflow's error for a failed request) and refuses
    metrics named `bad` (a 400); what it took, in order."""

    def __init__(self):
        self.down = threading.Event()
        self.calls = 0
        self.metrics: list[tuple[str, int, float, int]] = []
        self.tags: dict = {}
        self.ended = None

    def _answer(self):
        self.calls += 1
        if self.down.is_set():
            raise MlflowException("API request to http://store/api failed: Max retries exceeded (Connection refused)")

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self._answer()
        if any(m.key == "bad" for m in metrics):
            raise MlflowException("no such value", error_code=INVALID_PARAMETER_VALUE)
        self.metrics += [(m.key, m.step, m.value, m.timestamp) for m in metrics]
        self.tags.update({t.key: t.value for t in tags})

    def set_terminated(self, run_id, status, end_time=None):
        self._answer()
        self.ended = (status, end_time)


def metrics_record(step, **values):
    return {"op": "metrics", "step": step, "time": 1000 + step, "metrics": values}


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(writer_mod, "SENT_EVERY_S", 0.05)


def test_a_store_away_for_a_while_gets_every_record_once_in_order_and_the_caller_never_waits(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="imm.tracking")
    store, journal = FlakyStore(), Journal(tmp_path / JOURNAL)
    writer = Writer(store, "run", journal, "sqlite:///store.db", retry_every=0.05)
    writer.submit(metrics_record(0, loss=1.0))
    assert writer.flush(10) and store.metrics == [("loss", 0, 1.0, 1000)]

    store.down.set()
    started = time.perf_counter()
    for step in range(1, 51):
        writer.submit(metrics_record(step, loss=1.0 / (step + 1)))
    assert time.perf_counter() - started < 0.5  # 50 records queued while the store does not answer
    assert not writer.flush(0.3) and writer.down and writer.waiting > 0
    lines = [r.getMessage() for r in caplog.records if r.name == "imm.tracking" and r.levelno >= logging.WARNING]
    assert len(lines) == 1 and lines[0].startswith("the MLflow store sqlite:///store.db does not take the run's")
    assert str(journal.path) in lines[0] and "training goes on" in lines[0]
    assert [r["step"] for r, _ in journal.records()] == list(range(51))  # all of it journaled meanwhile

    store.down.clear()
    writer.submit({"op": "end", "status": "FINISHED", "time": 5})
    assert writer.close(10)
    assert [(k, s) for k, s, _, _ in store.metrics] == [("loss", s) for s in range(51)]  # in order, each once
    assert store.ended == ("FINISHED", 5)
    assert journal.sent() == journal.path.stat().st_size  # the store took the whole journal
    assert any("takes records again" in r.getMessage() for r in caplog.records)


def test_a_record_the_store_refuses_is_dropped_with_one_line_and_the_rest_goes_on(tmp_path, caplog):
    store = FlakyStore()
    writer = Writer(store, "run", Journal(tmp_path / JOURNAL), "sqlite:///store.db", retry_every=0.05)
    writer.submit(metrics_record(1, bad=1.0))
    writer.submit({"op": "tags", "tags": {"a": "b"}})
    assert writer.close(10)
    assert store.tags == {"a": "b"} and store.metrics == []
    (line,) = [r.getMessage() for r in caplog.records if r.name == "imm.tracking"]
    assert line.startswith("MLflow metrics not logged: the store refused them (MlflowException: no such value")


def test_what_an_earlier_writer_left_is_sent_first_by_the_next(tmp_path):
    store, journal = FlakyStore(), Journal(tmp_path / JOURNAL)
    store.down.set()
    first = Writer(store, "run", journal, "sqlite:///store.db", retry_every=0.05)
    for step in range(3):
        first.submit(metrics_record(step, loss=float(step)))
    first.submit({"op": "end", "status": "FAILED", "time": 7})
    assert not first.close(0.2)  # the store is away: the journal keeps it all
    assert journal.unsent() == 4 and store.metrics == []

    store.down.clear()  # the same command again: the next attempt's writer sends the rest before its own records
    second = Writer(store, "run", journal, "sqlite:///store.db", retry_every=0.05)
    second.submit(metrics_record(3, loss=3.0))
    assert second.close(10)
    assert [s for _, s, _, _ in store.metrics] == [0, 1, 2, 3] and journal.unsent() == 0


def test_a_journal_cut_off_mid_record_continues_on_a_line_of_its_own(tmp_path):
    journal = Journal(tmp_path / JOURNAL)
    journal.append(metrics_record(1, loss=1.0))
    journal.close()
    with open(journal.path, "ab") as f:
        f.write(b'{"op": "metrics", "st')  # the process died in the middle of a write
    assert [r["step"] for r, _ in journal.records()] == [1]
    journal.append(metrics_record(2, loss=2.0))
    assert [r["step"] for r, _ in journal.records()] == [1, 2]
    assert all(json.loads(line) for line in journal.path.read_text().splitlines())


def test_consecutive_metrics_go_together_up_to_mlflows_batch_size():
    records = [metrics_record(i, **{f"m{j}": 1.0 for j in range(300)}) for i in range(5)]
    records.insert(2, {"op": "tags", "tags": {"a": "b"}})
    assert [len(g) for g in groups(records)] == [2, 1, 3]
    records = [metrics_record(i, **{f"m{j}": 1.0 for j in range(400)}) for i in range(3)]
    assert [len(g) for g in groups(records)] == [2, 1]  # 800 metrics, then 400: at most 1000 at once


def test_sync_copies_a_journal_into_another_store_once(tmp_path):
    """A run logged with a journal (SQLite here), then `sync` into a fresh store: the copy has the same params,
    tags, metric history, dataset, artifacts and status; a second sync finds the copy and adds nothing."""
    source = f"sqlite:///{tmp_path / 'a.db'}"
    run_dir = tmp_path / "run"
    (run_dir / "figures").mkdir(parents=True)
    figure = run_dir / "figures" / "f.png"
    figure.write_bytes(b"png")
    tracker = Tracker.open(
        source, "imm", run_name="r", params={"x": "1"}, tags={"run_dir": str(run_dir)}, journal=run_dir / JOURNAL
    )
    for step in range(5):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
    tracker.log_artifact(figure, "figures")
    tracker.log_dataset(name="d", digest="abc", source="nowhere", shape=(2,), rows=10, num_classes=0)
    tracker.log_text("a: 1\n", "config.yaml")
    assert tracker.end("FINISHED", note="**done**")

    target = f"sqlite:///{tmp_path / 'b.db'}"
    (line,) = sync(run_dir, target)
    assert line.startswith("created MLflow run ") and line.endswith("; the run is FINISHED"), line
    a, b = MlflowClient(source), MlflowClient(target)
    (copy,) = b.search_runs([b.get_experiment_by_name("imm").experiment_id])
    orig = a.get_run(tracker.run_id)
    assert copy.data.tags[SYNCED_FROM] == tracker.run_id and copy.info.run_name == "r"
    assert copy.data.params == orig.data.params == {"x": "1"}
    assert copy.data.tags["mlflow.note.content"] == orig.data.tags["mlflow.note.content"] == "**done**"
    assert copy.info.start_time == orig.info.start_time and copy.info.end_time == orig.info.end_time

    def history(client, run_id):
        return [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, "train/loss")]

    assert history(b, copy.info.run_id) == history(a, tracker.run_id) and len(history(a, tracker.run_id)) == 5
    assert {f.path for f in b.list_artifacts(copy.info.run_id)} == {"figures", "config.yaml"}
    assert copy.inputs.dataset_inputs[0].dataset.digest == "abc"

    (again,) = sync(run_dir, target)  # found, not created again; nothing added twice
    assert again.startswith(f"MLflow run {copy.info.run_id} in {target}: ")
    assert len(b.search_runs([b.get_experiment_by_name("imm").experiment_id])) == 1
    assert history(b, copy.info.run_id) == history(a, tracker.run_id)
    (same,) = sync(run_dir)  # into its own store: nothing was left to send
    assert same.startswith(f"MLflow run {tracker.run_id} in {source}: 0 records")
