"""Reliability: nothing is lost under faults, and bad input gets a clear answer.

Every test runs `python launch.py ...` in a subprocess on CPU, as a user would, with the launch
directory in tmp_path (so the default MLflow store `sqlite:///<tmp>/mlflow.db` lands there) and a
tiny model so that each run takes seconds. Faults are real: SIGKILL/SIGTERM/SIGINT sent to the
process, a checkpoint write cut off halfway by SIGKILL, NaN/inf injected into the loss or the
gradients (tests/faults/inject.py runs launch.py's own main with the fault patched in), a crafted
pickle that would run a shell command, a tracking server port with nothing listening, a run directory on a
small tmpfs that fills up (tests/helpers/tmpfs.py).
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
from helpers import LAUNCH, ROOT, one_thread_env
from helpers.tmpfs import remount, tmpfs
from mlflow.tracking import MlflowClient

from imm import runs as rundir
from imm.training import checkpoint

pytestmark = pytest.mark.slow

INJECT = ROOT / "tests" / "faults" / "inject.py"
# A run of a few seconds on one thread: the 2-D checkerboard, a 1-block MLP of width 32 (conf/debug/toy.yaml).
TINY = ("debug=toy", "train.log_every=100", "optim.warmup_steps=10")


# -- helpers -------------------------------------------------------------------------------------
def _command(overrides, fault):
    return [sys.executable, str(INJECT if fault else LAUNCH), *overrides]


def _env(fault):
    return one_thread_env({"IMM_FAULT": fault} if fault else None)


def launch(cwd, *overrides, fault=None, timeout=400) -> subprocess.CompletedProcess:
    """`python launch.py overrides...` in cwd (through tests/faults/inject.py when a fault is given)."""
    return helpers.launch(cwd, *overrides, env=_env(fault), timeout=timeout, script=INJECT if fault else LAUNCH)


class Started:
    """A launch.py process running in the background; its output goes to files (a pipe could fill up)."""

    def __init__(self, cwd, *overrides, fault=None, name="proc"):
        self.out, self.err = Path(cwd) / f"{name}.stdout", Path(cwd) / f"{name}.stderr"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(_command(overrides, fault), cwd=cwd, env=_env(fault), stdout=out, stderr=err)

    def wait_for(self, predicate, timeout=300.0, what="the condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"the process exited ({self.proc.returncode}) before {what}:\n{self.stderr}")
            time.sleep(0.02)
        self.proc.kill()
        self.proc.wait()
        raise AssertionError(f"timed out waiting for {what}:\n{self.stderr}")

    def wait(self, timeout=300.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # never leave a training process behind
            self.proc.wait()
            raise AssertionError(f"the process did not exit within {timeout} s:\n{self.stderr[-3000:]}") from None

    @property
    def stderr(self) -> str:
        return self.err.read_text()


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"launch.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def one_error_line(stderr: str) -> str:
    """The run's error: exactly one ERROR log line, no traceback; returns its message."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1, stderr
    return errors[0].split("[ERROR] - ", 1)[1]


def assert_one_sentence(msg: str) -> None:
    assert "\n" not in msg and msg.endswith("."), msg


def mlflow_runs(cwd) -> list:
    """Every run in the launch directory's default store ([] when the store was never created)."""
    db = Path(cwd) / "mlflow.db"
    if not db.exists():
        return []
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments) if experiments else []


def only_run(cwd):
    runs = mlflow_runs(cwd)
    assert len(runs) == 1, [(r.info.run_name, r.info.status) for r in runs]
    return runs[0]


def metric_history(cwd, run, key) -> list[tuple[int, float]]:
    client = MlflowClient(tracking_uri=f"sqlite:///{Path(cwd) / 'mlflow.db'}")
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def run_dirs(cwd) -> list[Path]:
    """The training run directories under <cwd>/runs (runs/<experiment>/<hash>[-N])."""
    return sorted(p for p in (Path(cwd) / "runs").glob("*/*") if p.is_dir())


def checkpoint_names(run_dir) -> list[str]:
    d = checkpoint.ckpt_dir(run_dir)
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def tensors(obj, path=""):
    """(path, tensor) for every tensor in a nested state."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{path}[{i}]")


# -- 1. exact resume after kill -9 ---------------------------------------------------------------
def test_kill_9_then_relaunch_resumes_bit_exactly(tmp_path):
    """SIGKILL at a random step after the first checkpoint, relaunch the same command: the final
    model, EMA, EMA target, optimizer, data position and RNG equal an uninterrupted run's bit for bit.
    Dropout (global RNG) and an EMA target are on, so every piece of saved state matters, and evaluations
    run mid-training (every 200 steps), so they must leave the training state alone."""
    common = [
        *TINY,
        "train.steps=800",
        "train.ckpt_every=100",
        "train.log_every=100",
        "arch.dropout=0.1",
        "target=ema",
        "eval.every=200",
    ]
    # the same command in two launch directories: one uninterrupted, one killed and relaunched
    ref_cwd, cut_cwd = tmp_path / "ref", tmp_path / "cut"
    ref_cwd.mkdir(), cut_cwd.mkdir()
    ok(launch(ref_cwd, *common))
    (ref,) = run_dirs(ref_cwd)

    run = Started(cut_cwd, *common)
    cut = cut_cwd / ref.relative_to(ref_cwd)  # runs/toy/<hash>: named after the experiment, not the launch
    run.wait_for(lambda: checkpoint.list_checkpoints(cut), what="the first checkpoint")
    time.sleep(random.uniform(0.0, 1.0))  # a random step after it
    assert run.proc.poll() is None, "the run finished before it could be killed"
    run.proc.send_signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    last = checkpoint.list_checkpoints(cut)[-1]
    killed_at = checkpoint.load(last)["step"]
    assert 100 <= killed_at < 800, killed_at

    out = ok(launch(cut_cwd, *common))  # the same command: it lands in the same directory and resumes
    assert f"resumed from {last} at step {killed_at}" in out.stderr
    assert run_dirs(cut_cwd) == [cut]

    final_ref = checkpoint.load(ref / "checkpoints" / "step-00000800.pt")
    final_cut = checkpoint.load(cut / "checkpoints" / "step-00000800.pt")
    # Only the MLflow run differs: the two trainings are two MLflow runs.
    assert final_ref["mlflow_run_id"] != final_cut["mlflow_run_id"]
    helpers.assert_identical(final_ref, final_cut, skip={"mlflow_run_id"})
    for key in ("model", "ema", "target_ema", "optimizer", "rng"):
        assert any(True for _ in tensors(final_ref[key])), key  # each compared part holds tensors

    resumed = only_run(cut_cwd)  # the killed run was continued, not started again
    assert resumed.info.status == "FINISHED" and f"resumed_from_step_{killed_at}" in resumed.data.tags
    assert resumed.data.tags["run_dir"] == str(cut.resolve())


# -- 2. atomic checkpoints -----------------------------------------------------------------------
def test_kill_during_a_checkpoint_write_leaves_the_last_good_checkpoint(tmp_path):
    """The second checkpoint write is cut off halfway by SIGKILL: what is on disk is the first
    checkpoint (loads) and a temporary file that matches no checkpoint name; a relaunch resumes from
    the first checkpoint, never the partial file, and removes the partial file."""
    run_dir = tmp_path / "run"
    common = [*TINY, "train.steps=300", "train.ckpt_every=100", "train.log_every=100", f"hydra.run.dir={run_dir}"]
    proc = launch(tmp_path, *common, fault="kill_in_save:2")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]

    names = checkpoint_names(run_dir)
    partial = [n for n in names if not checkpoint.PATTERN.match(n)]
    assert [n for n in names if checkpoint.PATTERN.match(n)] == ["step-00000100.pt"], names
    assert len(partial) == 1 and partial[0].startswith(".tmp-") and partial[0].endswith(".part"), names
    partial_file = checkpoint.ckpt_dir(run_dir) / partial[0]
    assert partial_file.stat().st_size > 0  # the fault really wrote part of the step-200 checkpoint
    with pytest.raises(checkpoint.CheckpointError, match="it is a damaged or truncated PyTorch file"):
        checkpoint.load(partial_file)
    good = checkpoint.ckpt_dir(run_dir) / "step-00000100.pt"
    assert checkpoint.resolve(None, run_dir) == good
    assert checkpoint.load(good)["step"] == 100

    out = ok(launch(tmp_path, *common))
    assert f"resumed from {good} at step 100" in out.stderr
    assert checkpoint_names(run_dir) == ["step-00000100.pt", "step-00000200.pt", "step-00000300.pt"]
    run = only_run(tmp_path)  # the relaunch continued the MLflow run the killed process created
    assert run.info.status == "FINISHED" and "resumed_from_step_100" in run.data.tags


# -- 3. non-finite values ------------------------------------------------------------------------
def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    """A NaN loss at steps 30 and 31 and an inf gradient at step 60 (fewer than train.max_nonfinite
    in a row): those steps are skipped, each reported at its step, counted in train/skipped_steps,
    and the run finishes with finite weights."""
    run_dir = tmp_path / "run"
    proc = ok(
        launch(
            tmp_path,
            *TINY,
            "train.steps=100",
            "train.ckpt_every=50",
            "train.log_every=50",
            f"hydra.run.dir={run_dir}",
            fault="nan_loss:30-31;nan_grad:60",
        )
    )
    warnings = [line.split(" - ", 1)[1] for line in proc.stderr.splitlines() if "non-finite" in line]
    assert warnings == [
        "step 30: non-finite loss, step skipped (1 in a row)",
        "step 31: non-finite loss, step skipped (2 in a row)",
        "step 60: non-finite gradient norm, step skipped (1 in a row)",
    ], proc.stderr
    run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    history = metric_history(tmp_path, run, "train/skipped_steps")
    assert {(31, 1.0), (32, 2.0), (50, 2.0), (61, 3.0), (100, 3.0)} <= set(history), history
    assert history[-1] == (100, 3.0) and run.data.metrics["train/skipped_steps"] == 3.0
    final = checkpoint.load(run_dir / "checkpoints" / "step-00000100.pt")
    assert all(torch.isfinite(t).all() for _, t in tensors(final["model"]) if t.is_floating_point())


def test_non_finite_steps_in_a_row_stop_the_run_failed_with_the_last_good_checkpoint(tmp_path):
    """An inf gradient from step 130 on with train.max_nonfinite=3: the run stops at step 132 with
    one line naming the step and the parameter, exit status 1, the MLflow run FAILED, the skipped
    steps counted, and the step-100 checkpoint intact (loads, every tensor finite)."""
    run_dir = tmp_path / "run"
    proc = launch(
        tmp_path,
        *TINY,
        "train.steps=400",
        "train.ckpt_every=100",
        "train.log_every=100",
        "train.max_nonfinite=3",
        f"hydra.run.dir={run_dir}",
        fault="nan_grad:130-",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    msg = one_error_line(proc.stderr)
    good = run_dir / "checkpoints" / "step-00000100.pt"
    assert msg == (
        f"step 132: the gradient norm went non-finite 3 steps in a row (train.max_nonfinite=3);"
        f" non-finite terms: the gradient of out.weight; the last good checkpoint is {good};"
        " lower optim.lr or check the data."
    ), msg
    assert checkpoint_names(run_dir) == ["step-00000100.pt"]
    state = checkpoint.load(good)
    assert state["step"] == 100
    floats = [(p, t) for p, t in tensors(state) if t.is_floating_point()]
    assert floats and all(torch.isfinite(t).all() for _, t in floats), [p for p, t in floats if not t.isfinite().all()]
    run = only_run(tmp_path)
    assert run.info.status == "FAILED"
    assert run.data.metrics["train/skipped_steps"] == 3.0


def test_an_absurd_learning_rate_is_caught_and_the_run_fails_cleanly(tmp_path):
    """optim.lr=1e12 without clipping: real divergence. The non-finite loss is detected at the step it
    happens, max_nonfinite (5) steps in a row stop the run with one line naming the step and the loss
    terms that went non-finite; exit status 1; MLflow run FAILED with 5 skipped steps."""
    run_dir = tmp_path / "run"
    proc = launch(
        tmp_path,
        *TINY,
        "optim.lr=1e12",
        "optim.grad_clip=null",
        "optim.warmup_steps=0",
        "train.steps=200",
        "train.ckpt_every=100",
        f"hydra.run.dir={run_dir}",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    msg = one_error_line(proc.stderr)
    m = re.fullmatch(
        r"step (\d+): the (loss|gradient norm) went non-finite 5 steps in a row \(train.max_nonfinite=5\);"
        r" non-finite terms: (.+); the last good checkpoint is none yet; lower optim.lr or check the"
        r" data\.",
        msg,
    )
    assert m, msg
    stop_step, terms = int(m[1]), m[3].split(", ")
    diag_terms = {"t", "t_minus_s", "t_minus_r", "r_equals_s", "w", "log_w_tilde", "mmd", "K_tt", "K_rr", "K_tr"}
    assert set(terms) <= diag_terms or terms[0].startswith("the gradient of "), terms
    skipped = [int(s) for s in re.findall(r"step (\d+): non-finite", proc.stderr)]
    assert skipped == list(range(stop_step - 4, stop_step + 1)), skipped  # detected at each step, in a row
    run = only_run(tmp_path)
    assert run.info.status == "FAILED" and run.data.metrics["train/skipped_steps"] == 5.0
    assert checkpoint_names(run_dir) == []


# -- 4. bad configuration ------------------------------------------------------------------------
# Hydra's composition errors, as one sentence each (imm/launch/overrides.py): exit 2, nothing created.
COMPOSITION_ERRORS = {
    "unknown group option": (
        ["kernel=nope"],
        "kernel=nope is not an option of kernel (conf/kernel/ has no nope.yaml); the options are inv_stride, paper,"
        " unit.",
    ),
    "unknown key": (["loss.kk=3"], "loss.kk=3 is not a key of loss; the nearest is loss.k: use loss.k=3."),
    "wrong type": (
        ["loss.M=four"],
        "loss.M=four is not an integer; loss.M must be a finite number (imm.core checks the rest).",
    ),
}


@pytest.mark.parametrize("case", COMPOSITION_ERRORS)
def test_config_that_does_not_compose_fails_before_anything_runs(tmp_path, case):
    overrides, sentence = COMPOSITION_ERRORS[case]
    run_dir = tmp_path / "run"
    proc = launch(tmp_path, *TINY, *overrides, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == sentence, proc.stderr  # the one line, before Hydra prints anything of its own
    assert not run_dir.exists() and not (tmp_path / "mlflow.db").exists()


# validate()'s one-sentence errors. Every case also points data.path at a file that does not exist:
# had any data been loaded first, the error would be about that file instead.
MISSING_DATA = ("data=points", "data.path=/nonexistent/points.npy")
INVALID = {
    "batch not divisible by M": (
        ["train.batch_size=66"],
        "train.batch_size=66 must be divisible by loss.M x world size = 4 x 1 = 4, so every"
        " group of M particles stays on one process.",
    ),
    "micro-batch not dividing the share": (
        ["train.micro_batch=24"],
        "train.micro_batch=24 must divide each process's share of the batch (train.batch_size / world size ="
        " 512 / 1 = 512) and be a multiple of loss.M=4, so no group of M particles is split; use a divisor of the"
        " share that M divides, or null for no accumulation.",
    ),
    "micro-batch splitting a group of M": (
        ["train.micro_batch=2"],
        "train.micro_batch=2 must divide each process's share of the batch (train.batch_size / world size ="
        " 512 / 1 = 512) and be a multiple of loss.M=4, so no group of M particles is split; use a divisor of the"
        " share that M divides, or null for no accumulation.",
    ),
    "euler_fm with cosine": (
        ["schedule=cosine", "schedule.param=euler_fm"],
        "schedule.param=euler_fm needs schedule.name=fm (OT-FM), not 'cosine'; use simple_edm or"
        " identity with the cosine schedule.",
    ),
    "guidance with unconditional data": (
        ["eval.guidance=2"],
        "eval.guidance=2.0 needs class-conditional data, but data.name='points' is unconditional; use eval.guidance=1.",
    ),
    "a sampling grid the eval options cannot give": (
        ["eval.grid=eta", "eval.steps=[1,4]"],
        "eval.steps: no 4-step grid: the eta grid needs N - 1 = 3 explicit eta points for N=4 steps (only N=2 has"
        " a default, eta=1.4).",
    ),
    "image architecture on 2-D data": (
        ["arch=dit_s_4"],
        "arch.name='dit_s_4' does not fit 2-D/point data data.name='points'; use arch=mlp.",
    ),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_config_exits_2_with_one_sentence_before_data_or_mlflow(tmp_path, case):
    overrides, expected = INVALID[case]
    run_dir = tmp_path / "run"
    proc = launch(tmp_path, *MISSING_DATA, *overrides, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert one_error_line(proc.stderr) == expected
    assert mlflow_runs(tmp_path) == [] and not (tmp_path / "mlflow.db").exists()
    assert checkpoint_names(run_dir) == []


# -- 5. bad data ---------------------------------------------------------------------------------
def _bad_data(tmp: Path, case: str):
    """(overrides, substrings of the error) for one kind of bad data, its files created under tmp."""
    if case == "missing data.path":
        return ["data=points"], ["data.path is missing; data=points needs data.path=/path/to/file.npy"]
    if case == ".npy with NaNs":
        x = np.random.default_rng(0).normal(size=(100, 2))
        x[[7, 20], 1] = np.nan
        np.save(tmp / "nan.npy", x)
        return ["data=points", f"data.path={tmp / 'nan.npy'}"], [
            f"Points file '{tmp / 'nan.npy'}' has 2 non-finite values",
            "the first at row",
        ]
    if case == ".npy of the wrong rank":
        np.save(tmp / "cube.npy", np.zeros((100, 2, 2)))
        return ["data=points", f"data.path={tmp / 'cube.npy'}"], [
            f"Points file '{tmp / 'cube.npy'}' holds an array of shape (100, 2, 2); an [N, D] array"
        ]
    if case == "image folder without images":
        (tmp / "empty" / "sub").mkdir(parents=True)
        (tmp / "empty" / "notes.txt").write_text("no images here")
        return ["data=folder", "arch=dit_s_4", f"data.root={tmp / 'empty'}"], [
            f"No images found under '{tmp / 'empty'}'"
        ]
    if case == "corrupt image":
        from PIL import Image

        (tmp / "images").mkdir()
        Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp / "images" / "good.png")
        (tmp / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
        return ["data=folder", "arch=dit_s_4", f"data.root={tmp / 'images'}"], [
            f"Image '{tmp / 'images' / 'broken.png'}' cannot be read",
            "delete or replace it",
        ]
    if case == "CIFAR-10 offline without files":
        (tmp / "datasets").mkdir()
        root = tmp / "datasets"
        return ["data=cifar10", "arch=dit_s_4", f"data.root={root}"], [
            f"CIFAR-10 was not found (or is corrupt) in {root}",
            f"put the folder {root / 'cifar-10-batches-py'}/",
            f"or the archive {root / 'cifar-10-python.tar.gz'} in place",
            "data.download=true",
        ]
    raise KeyError(case)


BAD_DATA = [
    "missing data.path",
    ".npy with NaNs",
    ".npy of the wrong rank",
    "image folder without images",
    "corrupt image",
    "CIFAR-10 offline without files",
]


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_exits_2_with_one_sentence_and_no_mlflow_run(tmp_path, case):
    overrides, needles = _bad_data(tmp_path, case)
    run_dir = tmp_path / "run"
    proc = launch(tmp_path, *overrides, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    msg = one_error_line(proc.stderr)
    assert_one_sentence(msg)
    for needle in needles:
        assert needle in msg, msg
    assert mlflow_runs(tmp_path) == [] and not (tmp_path / "mlflow.db").exists()
    assert checkpoint_names(run_dir) == []


# -- 6. untrusted files --------------------------------------------------------------------------
class Payload:
    """Unpickling this runs a shell command (what a malicious 'checkpoint' does)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"step": 100, "model": Payload(f"touch {marker}")}, evil)
    run_dir = tmp_path / "run"

    proc = launch(tmp_path, *TINY, f"resume={evil}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    msg = one_error_line(proc.stderr)
    assert msg.startswith(
        f"refusing to load {evil}: it is not a plain-tensor checkpoint and unpickling it could"
        " run code (torch.load with weights_only=True: "
    ), msg
    assert "posix.system" in msg and msg.endswith("load only checkpoints this project wrote."), msg
    assert not marker.exists()
    assert mlflow_runs(tmp_path) == [] and checkpoint_names(run_dir) == []

    # the same file as the newest checkpoint of a run directory: relaunching there refuses it too
    planted = checkpoint.ckpt_dir(run_dir) / "step-00000999.pt"
    planted.parent.mkdir(parents=True)
    planted.write_bytes(evil.read_bytes())
    proc = launch(tmp_path, *TINY, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2 and one_error_line(proc.stderr).startswith(f"refusing to load {planted}: ")
    assert not marker.exists() and mlflow_runs(tmp_path) == []

    # a plain-tensor file that is no training checkpoint: a clear error, not a KeyError
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "weights.pt")
    proc = launch(tmp_path, *TINY, f"resume={tmp_path / 'weights.pt'}", f"hydra.run.dir={tmp_path / 'run2'}")
    assert proc.returncode == 2
    msg = one_error_line(proc.stderr)
    assert msg.startswith(f"{tmp_path / 'weights.pt'} is not a training checkpoint of this project (it lacks step,")
    assert_one_sentence(msg)

    # the payload is live: loading it the unsafe way does run the command
    subprocess.run(
        [sys.executable, "-c", f"import torch; torch.load({str(evil)!r}, weights_only=False)"],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
    )
    assert marker.exists()


# -- 7. MLflow truth -----------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_training_checkpoints_at_that_step_and_ends_killed(tmp_path, signum):
    run_dir = tmp_path / "run"
    common = [*TINY, "train.ckpt_every=100", "train.log_every=100", f"hydra.run.dir={run_dir}"]
    run = Started(tmp_path, *common, "train.steps=100000")
    run.wait_for(lambda: checkpoint.list_checkpoints(run_dir), what="the first checkpoint")
    time.sleep(random.uniform(0.0, 0.5))
    run.proc.send_signal(signum)
    assert run.wait() == 128 + signum, run.stderr[-3000:]  # 143 (SIGTERM), 130 (SIGINT)

    msg = one_error_line(run.stderr)
    name = signal.Signals(signum).name
    m = re.fullmatch(rf"training stopped by {name}; checkpoint (\S+); resume with: python (\S+) (.*)", msg)
    assert m, msg
    assert m[2] == str(LAUNCH) and shlex.split(m[3]) == [*common, "train.steps=100000"]  # the command as given
    saved = Path(m[1])
    assert saved == checkpoint.list_checkpoints(run_dir)[-1]  # the newest checkpoint ...
    stop_step = checkpoint.load(saved)["step"]
    assert saved.name == f"step-{stop_step:08d}.pt" and 100 <= stop_step < 100000
    # ... is the step the run stopped at: nothing was logged after it
    run_info = only_run(tmp_path)
    assert run_info.info.status == "KILLED"
    assert max(s for s, _ in metric_history(tmp_path, run_info, "train/loss")) <= stop_step

    if signum == signal.SIGTERM:  # a relaunch continues from the stop step and finishes the same MLflow run
        before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != rundir.LOCK_FILE}
        short = launch(tmp_path, *common, f"train.steps={stop_step - 1}")  # fewer steps than it has: a typo
        assert short.returncode == 2
        assert one_error_line(short.stderr).startswith(f"train.steps={stop_step - 1} is below step {stop_step}, ")
        # the refused launch left the run as it was: its .hydra/ config and launch.log are the last real launch's
        assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != rundir.LOCK_FILE} == before
        assert only_run(tmp_path).info.status == "KILLED"  # refused before the MLflow run reopens
        out = ok(launch(tmp_path, *common, f"train.steps={stop_step + 20}"))
        assert f"resumed from {saved} at step {stop_step}" in out.stderr
        run_info = only_run(tmp_path)
        assert run_info.info.status == "FINISHED" and f"resumed_from_step_{stop_step}" in run_info.data.tags


def test_a_signal_or_an_exception_right_after_the_mlflow_run_is_created_never_leaves_it_running(tmp_path):
    """The window between creating the MLflow run and the first step: SIGTERM there is honoured at the
    first step boundary (checkpoint at step 1, KILLED); an exception there ends the run FAILED."""
    run_dir = tmp_path / "term"
    proc = launch(tmp_path, *TINY, "train.steps=500", f"hydra.run.dir={run_dir}", fault="signal_after_open:SIGTERM")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert one_error_line(proc.stderr).startswith("training stopped by SIGTERM; checkpoint ")
    assert checkpoint_names(run_dir) == ["step-00000001.pt"]
    assert only_run(tmp_path).info.status == "KILLED"

    other = tmp_path / "other"
    other.mkdir()
    proc = launch(other, *TINY, "train.steps=500", f"hydra.run.dir={other / 'run'}", fault="raise_after_open")
    assert proc.returncode != 0 and "injected fault right after the MLflow run was created" in proc.stderr
    assert only_run(other).info.status == "FAILED"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_tracking_server_that_is_down_fails_fast_or_falls_back_to_the_local_store(tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    run_dir = tmp_path / "run"
    started = time.monotonic()
    proc = launch(tmp_path, *TINY, f"tracking.uri={uri}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    msg = one_error_line(proc.stderr)
    assert msg.startswith(f"the MLflow tracking server at {uri} is not reachable (") and msg.endswith(
        "start it, fix tracking.uri, or set tracking.fallback_local=true to log to a local SQLite store."
    ), msg
    assert time.monotonic() - started < 120  # not MLflow's minutes of retries
    assert checkpoint_names(run_dir) == [] and not (tmp_path / "mlflow.db").exists()

    fallback = tmp_path / "fallback"
    proc = ok(
        launch(
            tmp_path,
            *TINY,
            "train.steps=20",
            f"tracking.uri={uri}",
            "tracking.fallback_local=true",
            f"hydra.run.dir={fallback}",
        )
    )
    assert (
        f"the MLflow tracking server at {uri} is not reachable; falling back to the local store"
        f" sqlite:///{tmp_path / 'mlflow.db'} (tracking.fallback_local=true)"
    ) in proc.stderr
    run = only_run(tmp_path)
    assert run.info.status == "FINISHED" and run.data.tags["run_dir"] == str(fallback.resolve())


# -- 8. disk and paths ---------------------------------------------------------------------------
def test_fresh_runs_and_sweeps_started_together_get_their_own_directories(tmp_path):
    """fresh=true claims a new directory of the experiment with mkdir: two launches of one command
    started together never share one (runs/toy/<hash> and <hash>-2), and a later launch of the same
    command without fresh=true continues the newest."""
    quick = [*TINY, "train.steps=20", "train.log_every=10"]
    runs = [Started(tmp_path, *quick, "fresh=true", name=f"run{i}") for i in range(2)]
    for r in runs:
        assert r.wait() == 0, r.stderr[-3000:]
    first = tmp_path / "runs" / "toy" / rundir.experiment_hash(quick)
    dirs = run_dirs(tmp_path)
    assert dirs == [first, first.with_name(first.name + "-2")], dirs
    for d in dirs:
        assert checkpoint_names(d) == ["step-00000020.pt"] and (d / ".hydra" / "config.yaml").is_file()
    finished = mlflow_runs(tmp_path)
    assert sorted(r.data.tags["run_dir"] for r in finished) == [str(d.resolve()) for d in dirs]
    assert all(r.info.status == "FINISHED" for r in finished)
    out = ok(launch(tmp_path, *quick, "train.steps=30"))  # train.steps does not change the experiment
    assert f"resumed from {dirs[1] / 'checkpoints' / 'step-00000020.pt'} at step 20" in out.stderr

    sweeps = [Started(tmp_path, "-m", "train.seed=1,2", *quick, "fresh=true", name=f"sweep{i}") for i in range(2)]
    for s in sweeps:
        assert s.wait() == 0, s.stderr[-3000:]
    sweep_dirs = sorted(p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir())
    assert len(sweep_dirs) == 2, sweep_dirs
    for d in sweep_dirs:
        for job in ("0", "1"):
            assert checkpoint_names(d / job) == ["step-00000020.pt"], (d, job)


def test_sweep_jobs_in_their_own_processes_share_the_launchers_sweep_directory(tmp_path):
    """With submitit (here its local executor) every job runs in a process of its own, as a requeued
    job does: each resolves the sweep directory from the config the launching process pickled, so all
    jobs land in the one directory multirun/<experiment>/<hash of the sweep's overrides>."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    overrides = ["hydra/launcher=local", "train.seed=1,2", *TINY, "train.steps=20"]
    sweep = Started(tmp_path, "-m", *overrides)
    assert sweep.wait(timeout=600) == 0, sweep.stderr[-3000:]
    (sweep_dir,) = [p for p in (tmp_path / "multirun").glob("*/*") if p.is_dir()]
    assert sweep_dir == tmp_path / "multirun" / "toy" / rundir.experiment_hash(overrides)
    for job in ("0", "1"):
        assert checkpoint_names(sweep_dir / job) == ["step-00000020.pt"], job


def test_a_finished_run_directory_is_never_overwritten_by_another_experiment(tmp_path):
    """(Extends tests/test_train.py's refusal test.) Relaunching a finished run with a different
    experiment is refused before anything is written: its checkpoints are byte for byte the same and
    its MLflow run stays FINISHED."""
    run_dir = tmp_path / "run"
    common = [*TINY, "train.steps=40", "train.ckpt_every=20", f"hydra.run.dir={run_dir}"]
    ok(launch(tmp_path, *common))

    def digest():
        return {
            n: hashlib.sha256((checkpoint.ckpt_dir(run_dir) / n).read_bytes()).hexdigest()
            for n in checkpoint_names(run_dir)
        }

    before = digest()
    assert list(before) == ["step-00000020.pt", "step-00000040.pt"]
    proc = launch(tmp_path, *common, "loss.k=13")
    assert proc.returncode == 2
    msg = one_error_line(proc.stderr)
    assert re.search(r"belongs to a run with a different config \(loss.k was '12(\.0)?', now '13(\.0)?'\)", msg), msg
    assert digest() == before
    run = only_run(tmp_path)
    assert run.info.status == "FINISHED" and math.isfinite(run.data.metrics["final/loss"])


# -- 9. the same command resumes; one process per run directory; a sweep relaunches ----------------
def test_ctrl_c_then_the_same_command_resumes_into_the_same_mlflow_run(tmp_path):
    """No hydra.run.dir: Ctrl-C (SIGINT) prints the command that resumes; running it lands in the same
    run directory and continues the same MLflow run, which ends FINISHED: one run, not two."""
    common = [*TINY, "train.ckpt_every=100", "train.steps=3000"]
    run = Started(tmp_path, *common)
    run.wait_for(lambda: any(checkpoint.list_checkpoints(d) for d in run_dirs(tmp_path)), what="the first checkpoint")
    run.proc.send_signal(signal.SIGINT)
    assert run.wait() == 130, run.stderr[-3000:]
    m = re.fullmatch(
        r"training stopped by SIGINT; checkpoint (\S+); resume with: python (\S+) (.*)", one_error_line(run.stderr)
    )
    assert m, run.stderr[-2000:]
    stop_step = checkpoint.load(m[1])["step"]
    killed = only_run(tmp_path)
    assert killed.info.status == "KILLED"

    out = ok(launch(tmp_path, *shlex.split(m[3])))  # the printed command, as a user would paste it
    assert f"resumed from {m[1]} at step {stop_step}" in out.stderr
    (run_dir,) = run_dirs(tmp_path)
    assert checkpoint.list_checkpoints(run_dir)[-1].name == "step-00003000.pt"
    finished = only_run(tmp_path)
    assert finished.info.run_id == killed.info.run_id and finished.info.status == "FINISHED"
    assert not (run_dir / rundir.LOCK_FILE).exists()

    # the same command once more: nothing to do, said in one line, the run untouched
    out = ok(launch(tmp_path, *common))
    assert f"{run_dir}: already FINISHED at step 3000; nothing to do" in out.stderr
    assert only_run(tmp_path).info.status == "FINISHED"


def test_a_second_process_on_a_held_run_directory_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    common = [*TINY, "train.ckpt_every=100", "train.steps=100000"]
    holder = Started(tmp_path, *common)
    holder.wait_for(lambda: any(checkpoint.list_checkpoints(d) for d in run_dirs(tmp_path)), what="a checkpoint")
    (run_dir,) = run_dirs(tmp_path)
    hydra_files = {p: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
    log_size = (run_dir / "launch.log").stat().st_size
    second = launch(tmp_path, *common[:-1], "train.steps=7")  # the same run, asking for other steps
    assert second.returncode == 2
    # refused before Hydra wrote anything: the live run's recorded config and log are its own
    assert {p: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == hydra_files
    assert b"train.steps=7" not in (run_dir / "launch.log").read_bytes()[log_size:]
    assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1, second.stderr
    msg = second.stderr.strip()
    assert msg == (
        f"run directory {run_dir} is in use by process {holder.proc.pid} on {socket.gethostname()}; wait for it to"
        " end or stop it, or start a new run of this experiment with fresh=true."
    )
    assert holder.proc.poll() is None and len(mlflow_runs(tmp_path)) == 1  # the holder trains on, one MLflow run

    holder.proc.send_signal(signal.SIGKILL)  # its lock stays behind, naming a dead process
    holder.wait()
    assert (run_dir / rundir.LOCK_FILE).exists()
    killed_at = checkpoint.load(checkpoint.list_checkpoints(run_dir)[-1])["step"]
    out = ok(launch(tmp_path, *TINY, "train.ckpt_every=100", f"train.steps={killed_at + 20}"))
    assert f"at step {killed_at}" in out.stderr and not (run_dir / rundir.LOCK_FILE).exists()

    # a lock from another host (a shared file system): live while its heartbeat is fresh, stale after
    lock = run_dir / rundir.LOCK_FILE
    lock.write_text('{"pid": 4242, "host": "node-elsewhere", "start": null, "slurm_job": "77"}')
    proc = launch(tmp_path, *TINY, "train.ckpt_every=100", f"train.steps={killed_at + 40}")
    assert proc.returncode == 2 and "in use by process 4242 on node-elsewhere;" in proc.stderr.strip().splitlines()[0]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    old = time.time() - rundir.STALE_AFTER_S - 60
    os.utime(lock, (old, old))
    ok(launch(tmp_path, *TINY, "train.ckpt_every=100", f"train.steps={killed_at + 40}"))
    assert checkpoint.list_checkpoints(run_dir)[-1].name == f"step-{killed_at + 40:08d}.pt"


def test_a_sweep_interrupted_after_one_of_three_jobs_relaunches_only_the_other_two(tmp_path):
    """Ctrl-C during the second of three jobs; the same sweep command again reuses the sweep directory
    and the MLflow parent run, skips the FINISHED job, resumes the interrupted one from its checkpoint
    and starts the third, saying so in one line per job; the parent ends FINISHED with three children."""
    overrides = [*TINY, "train.steps=400", "train.ckpt_every=100", "train.seed=1,2,3"]
    sweep_dir = tmp_path / "multirun" / "toy" / rundir.experiment_hash(overrides)
    first = Started(tmp_path, "-m", *overrides, name="first")
    first.wait_for(lambda: checkpoint.list_checkpoints(sweep_dir / "1"), what="job 1's first checkpoint")
    first.proc.send_signal(signal.SIGINT)
    assert first.wait() == 130, first.stderr[-3000:]
    done = {n: checkpoint_names(sweep_dir / n) for n in ("0", "1")}
    assert done["0"][-1] == "step-00000400.pt" and not (sweep_dir / "2").exists()
    stopped_at = checkpoint.load(checkpoint.list_checkpoints(sweep_dir / "1")[-1])["step"]
    job0_bytes = (sweep_dir / "0" / "checkpoints" / "step-00000400.pt").read_bytes()
    parents = [r for r in mlflow_runs(tmp_path) if r.data.tags.get("sweep.role") == "parent"]
    assert [p.info.status for p in parents] == ["KILLED"]

    again = Started(tmp_path, "-m", *overrides, name="again")
    assert again.wait() == 0, again.stderr[-3000:]
    # the launching process logs through Hydra's logger (stdout), and through the jobs' logging (stderr) while
    # they run in it; one line per job as it ends, with its log
    said = again.out.read_text().splitlines() + again.err.read_text().splitlines()
    ended = sorted(
        m[1] for ln in said if (m := re.search(r"\] (?:- )?(job \d .*; log .*)", ln)) and ": started; " not in ln
    )
    logs = [sweep_dir.relative_to(tmp_path) / n / "launch.log" for n in "012"]
    assert ended == [
        f"job 0 train.seed=1: skipped (FINISHED at step 400 before); log {logs[0]}",
        f"job 1 train.seed=2: resumed from step {stopped_at}, FINISHED at step 400; log {logs[1]}",
        f"job 2 train.seed=3: started, FINISHED at step 400; log {logs[2]}",
    ], again.stderr[-3000:]
    assert (sweep_dir / "0" / "checkpoints" / "step-00000400.pt").read_bytes() == job0_bytes  # not run again
    runs = mlflow_runs(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep.role") == "child"]
    assert parent.info.run_id == parents[0].info.run_id and parent.info.status == "FINISHED"
    assert parent.data.tags["sweep.children"] == "3"
    assert sorted(c.data.tags["sweep.id"] for c in children) == [parent.info.run_id] * 3
    assert all(c.info.status == "FINISHED" for c in children)


# -- 10. the disk fills up (issue 31) ------------------------------------------------------------------------
def test_a_full_disk_stops_at_the_save_with_one_sentence_and_the_same_command_resumes_once_there_is_space(tmp_path):
    """The run directory on a real tmpfs, the MLflow store beside the launch. The toy's training state is 1.19 MB
    and its snapshot 299 kB. 1.7 MB: snapshot and checkpoint at step 100 fit, the warning comes (the next two
    saves need 1.49 MB), and the snapshot at step 200 does not fit. Grown to 2.9 MB: the same command resumes,
    the snapshot fits, the checkpoint at step 200 does not. Again without space: refused before training.
    Grown to 8 MB: the same command finishes the same MLflow run. The step-100 checkpoint is never touched."""
    with tmpfs(tmp_path / "small", "1700k") as small:
        run_dir = small / "r"
        common = [
            *TINY,
            "train.steps=300",
            "train.ckpt_every=100",
            "train.snapshot_every=100",
            f"hydra.run.dir={run_dir}",
        ]
        resume = re.escape(f"python {LAUNCH} {shlex.join(common)}")
        first = run_dir / "checkpoints" / "step-00000100.pt"
        kept = rf"the last complete checkpoint is step 100 \({re.escape(str(first))}\); free some space there, then"

        proc = launch(tmp_path, *common)
        assert proc.returncode == 2, proc.stderr[-3000:]
        msg = one_error_line(proc.stderr)
        snapshot = re.escape(str(checkpoint.snapshot_path(run_dir, 200)))
        assert re.fullmatch(
            rf"no space left on device for {snapshot} \(it needs 299 kB, \d+ kB is free on {re.escape(str(small))}\);"
            rf" {kept} resume with: {resume}",
            msg,
        ), msg
        (warning,) = [line.split(" - ", 1)[1] for line in proc.stderr.splitlines() if "low disk space" in line]
        assert re.fullmatch(
            rf"low disk space: \d+ kB is free on {re.escape(str(small))}, and the next two saves \(snapshot at step"
            r" 200, checkpoint at step 200\) need 1.49 MB; free some space there, or the run stops at the first save"
            r" that does not fit \(the same command then resumes it\)",
            warning,
        ), warning
        run = only_run(tmp_path)
        assert run.info.status == "FAILED" and run.data.tags["mlflow.note.content"].startswith(
            f"**Stopped at step 200:** {msg}\n\n"
        )
        assert run.data.tags["disk.low_space"] == f"step 100: {warning}"
        saved = first.read_bytes()
        assert checkpoint_names(run_dir) == [first.name] and not list((run_dir / "snapshots").glob(".tmp-*"))

        remount(small, "2900k")
        proc = launch(tmp_path, *common)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert f"resumed from {first} at step 100" in proc.stderr
        msg = one_error_line(proc.stderr)
        second = re.escape(str(run_dir / "checkpoints" / "step-00000200.pt"))
        assert re.fullmatch(
            rf"no space left on device for {second} \(it needs 1.19 MB, \S+ [kM]B is free on {re.escape(str(small))}\);"
            rf" {kept} resume with: {resume}",
            msg,
        ), msg
        assert checkpoint_names(run_dir) == [first.name] and first.read_bytes() == saved
        assert checkpoint.load(first)["step"] == 100
        ended = only_run(tmp_path).info
        assert ended.run_id == run.info.run_id and ended.status == "FAILED"

        proc = launch(tmp_path, *common)  # nothing freed: refused before any step, the MLflow run left alone
        assert proc.returncode == 2, proc.stderr[-3000:]
        msg = one_error_line(proc.stderr)
        assert re.fullmatch(
            rf"no space left on device for {second} \(it needs 1.19 MB, .*; {kept} resume with: {resume}", msg
        )
        again = only_run(tmp_path).info  # not reopened: the same status and end time
        assert (again.status, again.end_time) == ("FAILED", ended.end_time)

        remount(small, "8m")
        proc = ok(launch(tmp_path, *common))
        assert f"resumed from {first} at step 100" in proc.stderr and "low disk space" not in proc.stderr
        assert checkpoint_names(run_dir) == ["step-00000100.pt", "step-00000200.pt", "step-00000300.pt"]
        assert first.read_bytes() == saved
        finished = only_run(tmp_path)
        assert finished.info.run_id == run.info.run_id and finished.info.status == "FINISHED"
        assert "resumed_from_step_100" in finished.data.tags
