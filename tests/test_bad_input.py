"""Bad input, as a new user types it, gets one sentence before any work (issue 15), in five kinds:

1. nonsense values that used to be accepted (every number has its range: imm.ranges.Range),
2. things a user causes that used to end in a traceback (tracking URIs and stores, directories, Ctrl-C),
3. failures that used to come late (after an MLflow run existed, or at the first save),
4. misleading messages (what a file really is),
5. a sweep with one bad job (the others run; one line per failed job; the parent run FAILED).

Each case of the table runs `python launch.py ...` as a user would, in a temp launch directory, and checks the
contract: the exit status, exactly one error line (its sentence), no traceback, and for configuration and data
errors no MLflow run and no checkpoint. Most cases fail in seconds, before any torch work. The fast tests at the
end check the same pieces in-process (tracking URIs, stores, checkpoint files, the status a sweep job records).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import subprocess
import time
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
from helpers import ROOT, one_thread_env
from mlflow.tracking import MlflowClient

from imm import runs as rundir
from imm.tracking.mlflow_run import Tracker, TrackingError, check_store, default_uri
from imm.training import checkpoint

INJECT = ROOT / "tests" / "faults" / "inject.py"
TINY = ("debug=toy", "train.steps=10", "eval.every=0")
STOPPED = "stopped by SIGINT (Ctrl-C) outside a training step; nothing was lost: run the same command to start again."
# a log record (Hydra's and ours: [time][name][LEVEL] - ..., MLflow's: 2026/01/01 12:00:00 INFO ...), not an error
LOG_RECORD = re.compile(
    r"^(\[\d{4}-\d\d-\d\d [\d:,]+\]\[[^\]]+\](\[(INFO|WARNING)\])? |\d{4}/\d\d/\d\d [\d:]+ (INFO|WARNING) )"
)


# -- the contract -----------------------------------------------------------------------------------
def the_error(proc: subprocess.CompletedProcess) -> str:
    """The command's one error line, as its sentence: an ERROR log record or a bare line on stderr (the
    launching process's checks, before logging is set up); no traceback anywhere."""
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line.split("[ERROR] - ", 1)[1] if "[ERROR] - " in line else line for line in lines]
    errors = [e for e, line in zip(errors, lines) if "[ERROR] - " in line or not LOG_RECORD.match(line)]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def runs(cwd) -> list:
    """Every MLflow run in the launch directory's default store ([] when there is no store)."""
    db = Path(cwd) / "mlflow.db"
    if not db.is_file() or not db.read_bytes().startswith(b"SQLite format 3"):
        return []
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    ids = [e.experiment_id for e in client.search_experiments(view_type=3)]  # active and deleted
    return client.search_runs(ids, run_view_type=3) if ids else []


def checkpoints(root) -> list[Path]:
    return [p for p in Path(root).rglob("*.pt") if p.parent.name in (checkpoint.CKPT_DIR, checkpoint.SNAPSHOT_DIR)]


@contextlib.contextmanager
def read_only(directory: Path):
    """`directory` made unwritable: chmod for a user, the immutable flag for root (whom chmod does not stop)."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(directory)]).returncode != 0:
        pytest.skip("running as root without chattr +i: no directory can be made unwritable")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


# -- the table: (what the case needs, made under tmp) -> (overrides, substrings of the sentence) -----------
def _points(tmp: Path, rows: int) -> str:
    np.save(tmp / "points.npy", np.random.default_rng(0).normal(size=(rows, 2)))
    return str(tmp / "points.npy")


def _deleted_experiment(tmp: Path) -> list[str]:
    client = MlflowClient(tracking_uri=default_uri(tmp))
    client.delete_experiment(client.create_experiment("gone"))
    return ["tracking.experiment=gone"]


def _deleted_run(tmp: Path) -> list[str]:
    """A run directory whose MLflow run (named in <run dir>/mlflow_run_id) was deleted in the UI."""
    client = MlflowClient(tracking_uri=default_uri(tmp))
    run = client.create_run(client.create_experiment("imm"))
    client.delete_run(run.info.run_id)
    (tmp / "run").mkdir()
    (tmp / "run" / "mlflow_run_id").write_text(run.info.run_id + "\n")
    return [f"hydra.run.dir={tmp / 'run'}"]


def _jpegs(tmp: Path) -> str:
    from PIL import Image

    (tmp / "images").mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    for i in range(4):
        Image.fromarray(pixels).save(tmp / "images" / f"{i}.jpg", quality=90)
    whole = (tmp / "images" / "3.jpg").read_bytes()
    (tmp / "images" / "3.jpg").write_bytes(whole[: len(whole) // 2])  # an interrupted copy
    return str(tmp / "images")


def _file(name: str, content, *overrides: str):
    """A case's setup: write tmp/name (bytes or text), then the overrides with {path} and {tmp} filled in."""

    def setup(tmp: Path) -> list[str]:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return [o.format(path=path, tmp=tmp) for o in overrides]

    return setup


def _cut_checkpoint(tmp: Path) -> list[str]:
    """A real (tiny) torch checkpoint cut short, as an interrupted copy leaves it."""
    torch.save({"step": 1, "w": torch.ones(100)}, tmp / "c.pt")
    (tmp / "c.pt").write_bytes((tmp / "c.pt").read_bytes()[:300])
    return [f"resume={tmp / 'c.pt'}"]


class Payload:
    """Unpickling this runs a shell command (what a malicious "checkpoint" does)."""

    def __reduce__(self):
        return os.system, ("true",)


# case: (setup(tmp) -> more overrides, or None; overrides (a tiny MLP run: TINY); exit status; substrings of the
# error sentence)
CASES = {
    # 1. nonsense that used to be accepted (a FINISHED run without a checkpoint, a constant network, ...)
    "keep_last negative": (
        None,
        [*TINY, "train.keep_last=-3"],
        2,
        ["train.keep_last=-3 is out of range; train.keep_last must be >= 0."],
    ),
    "eval.every negative": (
        None,
        [*TINY, "eval.every=-1"],
        2,
        ["eval.every=-1 is out of range; eval.every must be >= 0 (0: only at the end)."],
    ),
    "width zero": (None, [*TINY, "arch.width=0"], 2, ["arch.width=0 is out of range; arch.width must be >= 1."]),
    "depth negative": (None, [*TINY, "arch.depth=-1"], 2, ["arch.depth=-1 is out of range"]),
    "appended key": (None, [*TINY, "+loss.kk=3"], 2, ["loss.kk=3 is not a key of loss", "use loss.k=3."]),
    "betas of one value": (
        None,
        [*TINY, "optim.betas=[0.9]"],
        2,
        ["optim.betas=[0.9] holds 1 value; optim.betas must be a list of exactly 2 values, each in [0, 1)."],
    ),
    # 2. what used to end in a traceback
    "threads negative": (None, [*TINY, "train.threads=-1"], 2, ["train.threads=-1 is out of range"]),
    "tracking uri without a scheme": (None, [*TINY, "tracking.uri=foo"], 2, ["tracking.uri=foo is a folder"]),
    "tracking uri a plain path": (
        lambda tmp: [f"tracking.uri={tmp / 'mlruns'}"],
        [*TINY],
        2,
        ["mlruns is a folder (MLflow's file store)", "tracking.uri=sqlite:////"],
    ),
    "tracking uri sqlite with two slashes": (
        None,
        [*TINY, "tracking.uri=sqlite://relative.db"],
        2,
        ["tracking.uri=sqlite://relative.db names no SQLite file"],
    ),
    "tracking uri database without its driver": (
        None,
        [*TINY, "tracking.uri=mssql+pyodbc://user@localhost/db"],
        2,
        ["the MLflow tracking store mssql+pyodbc://user@localhost/db cannot be used ("],
    ),
    "tracking store that is no database": (
        _file("mlflow.db", b"not a database" * 50),
        [*TINY],
        2,
        ["mlflow.db (tracking.uri=sqlite:///", "is not a SQLite database"],
    ),
    "experiment deleted in the UI": (
        _deleted_experiment,
        [*TINY],
        2,
        ["the MLflow experiment 'gone' in sqlite:///", "was deleted", "mlflow experiments restore"],
    ),
    "run deleted in the UI": (
        _deleted_run,
        [*TINY],
        2,
        ["this run logs to was deleted in sqlite:///", "fresh=true"],
    ),
    "run directory under a file": (
        _file("afile", "x", "hydra.run.dir={tmp}/afile/run"),
        [*TINY],
        2,
        ["the run directory", "afile/run cannot be written (", "afile is a file, not a folder)", "hydra.run.dir="],
    ),
    # 3. what used to fail late: at the first evaluation, at the first save, in a DataLoader worker
    "held-out set too small for k-NN": (None, [*TINY, "data.n_heldout=4"], 2, ["data.n_heldout=4 is out of range"]),
    "evaluation samples too few for k-NN": (
        None,
        [*TINY, "eval.n_samples=5"],
        2,
        ["eval.n_samples=5 is too few for point data", "use eval.n_samples >= 6."],
    ),
    "points file too small for both splits": (
        lambda tmp: ["data=points", f"data.path={_points(tmp, 10)}"],
        [*TINY],
        2,
        ["has shape (10, 2); at least 12 rows"],
    ),
    "checkpoints folder unwritable": (
        _file("run/checkpoints", "x", "hydra.run.dir={tmp}/run"),
        [*TINY],
        2,
        ["the run directory", "run/checkpoints is a file, not a folder"],
    ),
    "truncated jpeg in an image folder": (
        lambda tmp: [f"data.root={_jpegs(tmp)}"],
        ["data=folder", "arch=dit_s_4", "data.resolution=8", "data.num_workers=1", "train.steps=2"],
        2,
        ["3.jpg' cannot be read (image file is truncated", "delete or replace it."],
    ),
    # 4. misleading messages
    "csv given as .npy": (
        _file("p.npy", "1,2\n3,4\n" * 20, "data=points", "data.path={path}"),
        [*TINY],
        2,
        ["p.npy' is a text file (CSV or similar), not a .npy array", "numpy.loadtxt("],
    ),
    "truncated checkpoint": (_cut_checkpoint, [*TINY], 2, ["c.pt: it is a damaged or truncated PyTorch file"]),
    "text file as checkpoint": (
        _file("c.pt", "hello", "resume={path}"),
        [*TINY],
        2,
        ["c.pt: it is not a PyTorch file (it begins b'hello')"],
    ),
}


def _code_in_a_pickle(tmp: Path) -> Path:
    torch.save({"a": Payload()}, tmp / "c.pt")
    return tmp / "c.pt"


def _text_file(tmp: Path) -> Path:
    (tmp / "c.pt").write_text("hello")
    return tmp / "c.pt"


# the sample command given a file that is no checkpoint, or one that would run code: said without "resume"
SAMPLE_CASES = {
    "text file": (_text_file, ["it is not a PyTorch file"]),
    "code in a pickle": (_code_in_a_pickle, ["unpickling it could run code", "load only checkpoints this project"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_one_sentence_before_any_work(tmp_path, case):
    setup, overrides, status, needles = CASES[case]
    extra = setup(tmp_path) if setup else []
    runs_before = len(runs(tmp_path))  # a case's own store may hold a (deleted) run
    files_before = _files(tmp_path)
    proc = helpers.launch(tmp_path, *overrides, *extra, timeout=300)
    assert proc.returncode == status, proc.stderr[-3000:]
    msg = the_error(proc)
    assert msg.endswith("."), msg
    for needle in needles:
        assert needle in msg, msg
    assert len(runs(tmp_path)) == runs_before  # no MLflow run was created
    assert checkpoints(tmp_path) == []
    # a launch that did no work leaves no run directory: no .hydra/, no launch.log, no folders of its own
    assert _files(tmp_path) - files_before <= {"mlflow.db", ".mlflow.db.lock"}, _files(tmp_path) - files_before


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.slow
def test_a_launch_directory_that_cannot_be_written_is_one_sentence(tmp_path):
    """The default run directory (runs/...) and MLflow store lie in the launch directory: Hydra would create the
    run directory first and fail with a traceback; the check before it says which directory."""
    cwd = tmp_path / "launch"
    cwd.mkdir()
    with read_only(cwd):
        proc = helpers.launch(cwd, *TINY, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    msg = the_error(proc)
    assert msg.startswith("the run directory runs/toy/") and "cannot be written (" in msg, msg
    assert not (cwd / "runs").exists() and not (cwd / "mlflow.db").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", SAMPLE_CASES)
def test_the_sample_command_says_what_the_file_is_not_how_to_resume(tmp_path, case):
    make, needles = SAMPLE_CASES[case]
    ckpt = make(tmp_path)
    proc = helpers.launch(tmp_path, "--config-name", "sample", f"ckpt={ckpt}", timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    msg = the_error(proc)
    assert "resume" not in msg and all(n in msg for n in needles), msg
    assert _files(tmp_path) == {ckpt.name}  # the failed command left no output directory


@pytest.mark.slow
def test_help_says_each_keys_range(tmp_path):
    proc = helpers.launch(tmp_path, "--help", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    allowed = proc.stdout.split("== Allowed values ==")[1]
    for line in (
        ("train.keep_last", ">= 0"),
        ("loss.k", "in [1, 24] (the paper uses 12 to 15)"),
        ("optim.betas", "exactly 2"),
    ):
        assert any(ln.split()[:1] == [line[0]] and line[1] in ln for ln in allowed.splitlines()), line


# -- Ctrl-C during start-up ------------------------------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_while_torch_loads_is_one_line_and_exit_130(tmp_path):
    """SIGINT (a real signal, sent by tests/faults/inject.py as torch is imported) while the libraries load."""
    proc = helpers.launch(
        tmp_path, *TINY, env=one_thread_env({"IMM_FAULT": "sigint_in_import:torch"}), script=INJECT, timeout=300
    )
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert proc.stderr.strip() == STOPPED and "Traceback" not in proc.stdout
    assert runs(tmp_path) == [] and checkpoints(tmp_path) == [] and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_ctrl_c_while_the_data_load_is_one_line_and_leaves_no_lock(tmp_path):
    """SIGINT (a real signal, sent by tests/faults/inject.py) while the training data load, after the run
    directory's lock was taken: one line, exit 130, no MLflow run, the lock released; the same command then runs."""
    run_dir = tmp_path / "run"
    proc = helpers.launch(
        tmp_path,
        *TINY,
        f"hydra.run.dir={run_dir}",
        env=one_thread_env({"IMM_FAULT": "signal_in_data:SIGINT"}),
        script=INJECT,
        timeout=300,
    )
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert the_error(proc) == STOPPED
    assert runs(tmp_path) == [] and checkpoints(tmp_path) == [] and not (run_dir / rundir.LOCK_FILE).exists()
    assert not run_dir.exists()  # the launch did no work: it leaves no directory
    ok = helpers.launch(tmp_path, *TINY, f"hydra.run.dir={run_dir}", timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]


# -- 5. a sweep with one bad job ---------------------------------------------------------------------------
def _sweep(tmp_path, *launcher: str) -> tuple[subprocess.CompletedProcess, list, Path]:
    proc = helpers.launch(tmp_path, "-m", *launcher, *TINY, "loss.k=0,12,15", timeout=900)
    (sweep_dir,) = [p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir()]
    return proc, runs(tmp_path), sweep_dir


K0 = "loss.k=0 is out of range; loss.k must be in [1, 24] (the paper uses 12 to 15)."


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=local"]], ids=["basic", "local"])
def test_one_invalid_job_does_not_stop_the_others(tmp_path, launcher):
    """-m loss.k=0,12,15: job 0 is said invalid before any job starts, fails at once with its sentence, jobs 1
    and 2 run to FINISHED; one line per job at the end (the failed one: its overrides and its sentence); the
    parent run ends FAILED with a tag naming the failed job; the sweep exits with status 2."""
    if launcher:
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc, found, sweep_dir = _sweep(tmp_path, *launcher)
    assert proc.returncode == 2, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert "Traceback" not in said and "UncompletedJobError" not in said
    assert f"job 0 loss.k=0 will fail: {K0}" in proc.stdout  # before any job started
    # one line per job as it ends (a launcher's jobs in other processes also get a line as they start), with its log
    ended = [ln.split("] ", 1)[1] for ln in proc.stdout.splitlines() if re.search(r"\] job \d+ \S*: ", ln)]
    lines = sorted(ln.rsplit("; log ", 1)[0] for ln in ended if not re.search(r": started; log ", ln))
    assert lines == [
        f"job 0 loss.k=0: FAILED before training: {K0.removesuffix('.')}",
        "job 1 loss.k=12: started, FINISHED at step 10",
        "job 2 loss.k=15: started, FINISHED at step 10",
    ], proc.stdout[-3000:]
    (parent,) = [r for r in found if r.data.tags.get("sweep.role") == "parent"]
    children = sorted((r.info.run_name, r.info.status) for r in found if r.data.tags.get("sweep.role") == "child")
    assert parent.info.status == "FAILED" and parent.data.tags["sweep.failed_jobs"] == "0 loss.k=0"
    assert children == [("loss.k=12", "FINISHED"), ("loss.k=15", "FINISHED")]  # job 0: no MLflow run
    assert checkpoints(sweep_dir / "0") == [] and checkpoints(sweep_dir / "2")


@pytest.mark.slow
def test_a_sweep_of_only_invalid_jobs_stops_before_anything_is_created(tmp_path):
    proc = helpers.launch(tmp_path, "-m", *TINY, "loss.k=0,30", timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert the_error(proc) == "all 2 jobs of this sweep are invalid (each said above); none was started."
    assert "job 1 loss.k=30 will fail: loss.k=30 is out of range" in proc.stdout
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "multirun").exists()


# -- the same pieces in-process (fast) ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "uri,needle",
    [
        ("foo", "tracking.uri=foo is a folder (MLflow's file store)"),
        ("file:///tmp/mlruns", "is a folder (MLflow's file store)"),
        ("sqlite://relative.db", "names no SQLite file"),
        ("sqlite:///", "names no SQLite file"),
        ("http://[::1", "the MLflow tracking server at http://[::1 is not reachable"),
        ("mssql+pyodbc://user@localhost/db", "cannot be used (ModuleNotFoundError: No module named 'pyodbc')"),
    ],
)
def test_a_tracking_uri_mlflow_cannot_use_is_one_sentence(uri, needle):
    with pytest.raises(TrackingError) as e:
        check_store(uri)
    assert needle in str(e.value) and "\n" not in str(e.value) and str(e.value).endswith("."), str(e.value)


def test_a_sqlite_store_is_checked_without_being_created(tmp_path):
    fresh = tmp_path / "new" / "mlflow.db"
    check_store(f"sqlite:///{fresh}")
    assert not fresh.exists()  # a configuration error later creates no store
    (tmp_path / "afile").write_text("x")
    with pytest.raises(TrackingError, match=r"cannot be written: .*afile is a file, not a folder;"):
        check_store(f"sqlite:///{tmp_path / 'afile' / 'mlflow.db'}")
    (tmp_path / "junk.db").write_bytes(b"junk" * 10)
    with pytest.raises(TrackingError, match=r"junk\.db \(tracking.uri=sqlite:///.*\) is not a SQLite database"):
        check_store(f"sqlite:///{tmp_path / 'junk.db'}")


def test_a_run_missing_from_the_store_gets_a_new_one_and_a_deleted_one_is_refused(tmp_path, caplog):
    """tracking.uri may change when a run resumes: its run is then not in the new store (a new run there, said
    in a warning); a run deleted in the UI is refused with the way back."""
    uri = default_uri(tmp_path)
    tracker = Tracker.open(uri, "imm", run_name="a", params={}, tags={}, run_id="0123456789abcdef")
    assert tracker.run_id != "0123456789abcdef" and "is not in" in caplog.text
    tracker.end()
    tracker.client.delete_run(tracker.run_id)
    with pytest.raises(TrackingError, match=rf"run {tracker.run_id} this run logs to was deleted in"):
        Tracker.open(uri, "imm", run_name="a", params={}, tags={}, run_id=tracker.run_id)


def test_checkpoint_files_are_said_for_what_they_are(tmp_path):
    torch.save({"step": 1, "w": torch.ones(100)}, tmp_path / "whole.pt")
    torch.save({"a": Payload()}, tmp_path / "evil.pt")
    files = {
        "pickle.pt": pickle.dumps([1, 2]),
        "cut.pt": (tmp_path / "whole.pt").read_bytes()[:300],
        "text.pt": b"hello",
        "empty.pt": b"",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    np.save(tmp_path / "array.npy", np.zeros(3))
    expected = {
        "evil.pt": "refusing to load {}: it is not a plain-tensor checkpoint and unpickling it could run code",
        "cut.pt": "cannot read checkpoint {}: it is a damaged or truncated PyTorch file",
        "pickle.pt": "cannot read checkpoint {}: it is a Python pickle that torch.load cannot read as a checkpoint",
        "text.pt": "cannot read checkpoint {}: it is not a PyTorch file (it begins b'hello')",
        "empty.pt": "cannot read checkpoint {}: it is empty",
        "array.npy": "cannot read checkpoint {}: it is a NumPy .npy file, not a checkpoint",
    }
    for name, start in expected.items():
        with pytest.raises(checkpoint.CheckpointError) as e:
            checkpoint.load(tmp_path / name)
        msg = str(e.value)
        assert msg.startswith(start.format(tmp_path / name)) and "\n" not in msg, msg
        assert ("could run code" in msg) == (name == "evil.pt"), msg  # a damaged file is not called dangerous


def test_a_failed_sweep_job_records_why_beside_the_last_outcome(tmp_path):
    """record_error keeps the outcome a relaunch reads (a FINISHED run stays skipped) and adds the sentence the
    sweep's report prints."""
    rundir.write_status(tmp_path, status="FINISHED", step=40, action="started", from_step=0, name="k=1", summary={})
    finished_at = rundir.read_status(tmp_path)["time"]
    since = time.time()
    rundir.record_error(tmp_path, "k=1", "data.root=/gone does not exist.", 2)
    status = rundir.read_status(tmp_path)
    assert rundir.finished(status, 40) and status["time"] == finished_at
    assert rundir.failed_since(status, since) == {
        "message": "data.root=/gone does not exist.",
        "exit_status": 2,
        "time": status["error"]["time"],
    }
    assert rundir.failed_since(status, time.time() + 1) is None
    rundir.write_status(tmp_path, status="FAILED", step=7, action="rerun", from_step=0, name="k=1", summary={})
    rundir.record_error(tmp_path, "k=1", "step 7: the loss went non-finite.", 1)
    assert (
        rundir.status_line(rundir.read_status(tmp_path))
        == "rerun from step 0, FAILED at step 7: step 7: the loss went non-finite."
    )
