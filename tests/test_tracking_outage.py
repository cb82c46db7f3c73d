"""A tracking server that goes away never stops a training and loses nothing (issue 29), with a real `mlflow
server` killed and started again on the same port and store, and real trainings through launch.py
(tests/faults/inject.py pauses a training at a known step, so the server goes away at a known point).

MLflow's own retry budget is shortened through its environment variables (one retry, a 1 s backoff, a 5 s
timeout), so every outage here is far longer than it: without the journal and the background writer each of
these trainings would die in MlflowException with its run left RUNNING.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import ROOT, launch, one_thread_env
from mlflow.tracking import MlflowClient

from imm import runs as rundir
from imm.tracking.journal import JOURNAL, Journal
from imm.tracking.sync import SYNCED_FROM
from imm.training import checkpoint

pytestmark = pytest.mark.slow

INJECT = ROOT / "tests" / "faults" / "inject.py"
SHORT_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}
# 300 toy steps, a metric line every 10 steps, a checkpoint every 100, one evaluation at the end
RUN = ("debug=toy", "train.steps=300", "train.log_every=10", "train.ckpt_every=100", "tracking.system_metrics_every=1")
NOT_COMPARED = ("system/", "train/samples_per_s")  # sampled by the clock, not by the training


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on 127.0.0.1:port with a SQLite store in `root`; stop() kills it (its process group: the
    server and its web worker), start() brings it back on the same port and store."""

    def __init__(self, root: Path, port: int | None = None):
        self.root, self.port = Path(root), port or free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri, self.proc = f"http://127.0.0.1:{self.port}", None

    def start(self, timeout: float = 180.0) -> "Server":
        log = open(self.root / "server.log", "a")
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root}/store.db"]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        self.proc = subprocess.Popen(command, cwd=self.root, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).read()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise AssertionError(f"mlflow server exited:\n{(self.root / 'server.log').read_text()[-3000:]}")
                time.sleep(0.5)
        self.stop()
        raise AssertionError(f"mlflow server did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)
        self.proc = None

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri)


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path / "server").start()
    yield s
    s.stop()


class Training:
    """A launch.py training in the background (through tests/faults/inject.py), its stderr in a file."""

    def __init__(self, cwd, *overrides, fault: str, env: dict):
        self.err = Path(cwd) / "train.stderr"
        with open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(INJECT), *overrides],
                cwd=cwd,
                env=one_thread_env({"IMM_FAULT": fault, **env}),
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    @property
    def stderr(self) -> str:
        return self.err.read_text()

    def wait_for(self, predicate, what: str, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the training exited ({self.proc.returncode}) before {what}:\n{self.stderr[-4000:]}"
                )
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"timed out waiting for {what}:\n{self.stderr[-4000:]}")
            time.sleep(0.1)

    def wait(self, timeout: float = 300.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the training did not end within {timeout:.0f} s:\n{self.stderr[-4000:]}") from None


def histories(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...] in step order} of every metric the training computes (not system/*)."""
    run = client.get_run(run_id)
    keys = [k for k in run.data.metrics if not k.startswith(NOT_COMPARED)]
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def assert_same_history(found: dict, reference: dict) -> None:
    """The same metrics, each with the same (step, value) points, none twice. best_step/* is compared as a set:
    the end's summary logs the last step's best_step point again (same step and value), which the store keeps
    as one point or two depending on whether both fell in the same millisecond."""
    assert found.keys() == reference.keys()
    for key in reference:
        if key.startswith("best_step/"):
            assert set(found[key]) == set(reference[key]), key
        else:
            assert found[key] == reference[key], key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same training uninterrupted, into a SQLite store: its metric history."""
    root = tmp_path_factory.mktemp("reference")
    proc = launch(root, *RUN, f"hydra.run.dir={root / 'run'}", env=one_thread_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("imm").experiment_id])
    found = histories(client, run.info.run_id)
    assert len(found["train/loss"]) == 30 and "final/loss" in found
    return found


def test_a_server_away_longer_than_mlflows_retries_costs_nothing(tmp_path, server, reference):
    """Killed at step 100, the training goes on (steps 100 to 200 while nothing listens), the server comes back
    on the same port and store, the writer sends what waited: exit 0, the run FINISHED, and its metric history
    equals the uninterrupted run's point for point, none twice."""
    run_dir = tmp_path / "run"
    go1, go2 = tmp_path / "go1", tmp_path / "go2"
    training = Training(
        tmp_path,
        *RUN,
        f"tracking.uri={server.uri}",
        f"hydra.run.dir={run_dir}",
        fault=f"pause_at:100:{go1};pause_at:200:{go2}",
        env=SHORT_RETRIES,
    )
    training.wait_for(lambda: Path(f"{go1}.waiting").exists(), "step 100")
    server.stop()
    go1.touch()  # steps 100 to 200 with nothing listening
    training.wait_for(lambda: Path(f"{go2}.waiting").exists(), "step 200")
    training.wait_for(lambda: "does not take the run's records" in training.stderr, "the writer's line")
    journal = Journal(run_dir / JOURNAL)
    assert journal.unsent() > 0
    server.start()
    go2.touch()
    assert training.wait() == 0, training.stderr[-4000:]

    said = [line.split(" - ", 1)[1] for line in training.stderr.splitlines() if "[imm.tracking]" in line]
    assert said[0].startswith(f"the MLflow store {server.uri} does not take the run's records (")
    assert f"training goes on, and they wait in {journal.path} until it does" in said[0]
    assert any(line.startswith(f"the MLflow store {server.uri} takes records again after ") for line in said), said
    assert "Traceback" not in training.stderr and "INCOMPLETE" not in training.stderr
    assert journal.unsent() == 0 and rundir.read_status(run_dir)["status"] == "FINISHED"

    client = server.client()
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FINISHED" and run.data.tags["run_dir"] == str(run_dir.resolve())
    assert_same_history(histories(client, run.info.run_id), reference)
    assert "launch.log" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_a_server_that_never_returns_ends_the_training_normally_and_sync_completes_the_record(
    tmp_path, server, reference
):
    """Killed at step 100 for good: the training finishes (exit 0, checkpoints complete), its summary says the
    MLflow record is incomplete and prints the sync command. `sync` into a fresh store creates the run there
    with the whole history; once the server is back, `sync` completes the original run (FINISHED)."""
    run_dir = tmp_path / "run"
    go = tmp_path / "go"
    training = Training(
        tmp_path,
        *RUN,
        f"tracking.uri={server.uri}",
        "tracking.flush_timeout=3",
        f"hydra.run.dir={run_dir}",
        fault=f"pause_at:100:{go}",
        env=SHORT_RETRIES,
    )
    training.wait_for(lambda: Path(f"{go}.waiting").exists(), "step 100")
    server.stop()
    go.touch()
    assert training.wait() == 0, training.stderr[-4000:]
    assert "Traceback" not in training.stderr
    assert checkpoint.list_checkpoints(run_dir)[-1].name == "step-00000300.pt"
    status = rundir.read_status(run_dir)
    assert status["status"] == "FINISHED" and status["step"] == 300
    journal = Journal(run_dir / JOURNAL)
    sync = f"python {ROOT / 'launch.py'} --config-name sync run={run_dir.resolve()}"
    (line,) = [line for line in training.stderr.splitlines() if line.strip().startswith("MLflow record")]
    assert "INCOMPLETE: the store did not take " in line and f"which wait in {journal.path}" in line, line
    assert line.endswith(f"complete the run with: {sync} (add tracking.uri=... to copy it into another store)")
    waiting = journal.unsent()
    assert waiting > 20  # the metrics of steps 110 to 300, the evaluation, launch.log, the end
    ends = [r for r, _ in journal.records() if r["op"] == "end"]
    assert [e["status"] for e in ends] == ["FINISHED"]

    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    out = launch(tmp_path, "--config-name", "sync", f"run={run_dir}", f"tracking.uri={fresh}", env=one_thread_env())
    assert out.returncode == 0, out.stderr[-3000:]
    original = (run_dir / "mlflow_run_id").read_text().strip()
    (said,) = synced(out)
    assert said.startswith("created MLflow run ") and f"(a copy of {original})" in said
    client = MlflowClient(tracking_uri=fresh)
    (copy,) = client.search_runs([client.get_experiment_by_name("imm").experiment_id])
    assert copy.info.status == "FINISHED" and copy.data.tags[SYNCED_FROM] == original
    assert_same_history(histories(client, copy.info.run_id), reference)
    assert journal.unsent() == waiting  # a copy elsewhere: the original store still lacks them

    server.start()
    out = launch(tmp_path, "--config-name", "sync", f"run={run_dir}", env=one_thread_env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert synced(out) == [
        f"MLflow run {original} in {server.uri}: {waiting} records of {journal.path} sent; the run is FINISHED"
    ]
    assert journal.unsent() == 0
    assert_same_history(histories(server.client(), original), reference)
    again = launch(tmp_path, "--config-name", "sync", f"run={run_dir}", env=one_thread_env())
    assert again.returncode == 0
    assert synced(again) == [
        f"MLflow run {original} in {server.uri}: 0 records of {journal.path} sent; the run is FINISHED"
    ]


def test_a_crash_while_the_server_is_away_resumes_into_the_same_run_while_it_is_still_away(tmp_path, server, reference):
    """The server goes away at step 50 and the training crashes at step 120: a checkpoint of step 120, the end
    (FAILED) waits in the journal. The same command, while the server is still away, resumes into the same MLflow
    run (its records journaled), and ends normally; once the server is back, `sync` leaves the run FINISHED with
    the uninterrupted run's history (the second attempt logs model/parameters at its first step too)."""
    run_dir = tmp_path / "run"
    go = tmp_path / "go"
    common = [*RUN, f"tracking.uri={server.uri}", "tracking.flush_timeout=2", f"hydra.run.dir={run_dir}"]
    training = Training(tmp_path, *common, fault=f"pause_at:50:{go};raise_at:120", env=SHORT_RETRIES)
    training.wait_for(lambda: Path(f"{go}.waiting").exists(), "step 50")
    server.stop()
    go.touch()
    assert training.wait() == 1, training.stderr[-4000:]
    assert "RuntimeError: injected fault in training step 120" in training.stderr
    saved = run_dir / "checkpoints" / "step-00000120.pt"
    assert saved.is_file() and rundir.read_status(run_dir)["status"] == "FAILED"
    journal = Journal(run_dir / JOURNAL)
    assert [r["status"] for r, _ in journal.records(journal.sent()) if r["op"] == "end"] == ["FAILED"]

    again = launch(tmp_path, *common, env=one_thread_env(SHORT_RETRIES))
    assert again.returncode == 0, again.stderr[-4000:]
    original = (run_dir / "mlflow_run_id").read_text().strip()
    assert f"resumed from {saved} at step 120" in again.stderr
    assert (
        f"the MLflow store {server.uri} does not answer; this run goes on into its MLflow run {original}, whose"
        f" records wait in {journal.path} until the store takes them"
    ) in again.stderr
    assert "INCOMPLETE" in again.stderr and rundir.read_status(run_dir)["status"] == "FINISHED"
    assert [r["status"] for r, _ in journal.records(journal.sent()) if r["op"] in ("end", "status")] == [
        "FAILED",
        "RUNNING",
        "FINISHED",
    ]

    server.start()
    out = launch(tmp_path, "--config-name", "sync", f"run={run_dir}", env=one_thread_env())
    assert out.returncode == 0, out.stderr[-3000:]
    (said,) = synced(out)
    assert said.startswith(f"MLflow run {original} in {server.uri}: ") and said.endswith("the run is FINISHED")
    client = server.client()
    (run,) = client.search_runs([client.get_experiment_by_name("imm").experiment_id])
    assert run.info.run_id == original and "resumed_from_step_120" in run.data.tags
    found = histories(client, original)
    assert found.pop("model/parameters") == [(0, reference["model/parameters"][0][1])] * 1 + [
        (120, reference["model/parameters"][0][1])
    ]
    assert_same_history(found, {k: v for k, v in reference.items() if k != "model/parameters"})


def test_an_exception_in_the_loop_checkpoints_the_last_completed_step_and_the_same_command_resumes_exactly(
    tmp_path,
):
    """A RuntimeError inside step 57 (after the forward pass, dropout on): a checkpoint of step 57 is written
    before the run ends FAILED (MLflow and status.json; never RUNNING), the error keeps its traceback (exit 1),
    and the same command resumes from step 57 and ends with the state of an uninterrupted run, bit for bit."""
    common = ["debug=toy", "train.steps=150", "train.ckpt_every=100", "arch.dropout=0.1"]
    run_dir, ref_dir = tmp_path / "run", tmp_path / "ref" / "run"
    proc = launch(
        tmp_path, *common, f"hydra.run.dir={run_dir}", env=one_thread_env({"IMM_FAULT": "raise_at:57"}), script=INJECT
    )
    assert proc.returncode == 1 and "RuntimeError: injected fault in training step 57" in proc.stderr
    saved = run_dir / "checkpoints" / "step-00000057.pt"
    assert f"checkpoint {saved} (the last completed step before the error)" in proc.stderr
    assert checkpoint.list_checkpoints(run_dir) == [saved]
    assert rundir.read_status(run_dir)["status"] == "FAILED" and rundir.read_status(run_dir)["step"] == 57
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("imm").experiment_id])
    assert run.info.status == "FAILED"

    out = launch(tmp_path, *common, f"hydra.run.dir={run_dir}", env=one_thread_env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {saved} at step 57" in out.stderr
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    (tmp_path / "ref").mkdir()
    ref = launch(tmp_path / "ref", *common, f"hydra.run.dir={ref_dir}", env=one_thread_env())
    assert ref.returncode == 0, ref.stderr[-3000:]
    final, uninterrupted = (checkpoint.load(d / "checkpoints" / "step-00000150.pt") for d in (run_dir, ref_dir))
    for key in ("model", "ema", "optimizer", "data", "rng"):
        assert json.dumps(_plain(final[key])) == json.dumps(_plain(uninterrupted[key])), key


def synced(proc) -> list[str]:
    """sync's own lines on stdout (MLflow adds its "View run" links there when a run ends on a server)."""
    return [line for line in proc.stdout.splitlines() if line.startswith(("MLflow run ", "created MLflow run "))]


def _plain(obj):
    """A nested state with every tensor as its list of values (exact: float64 digits), for comparison."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.double().tolist() if obj.is_floating_point() else obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
