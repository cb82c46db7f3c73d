"""Run-directory identity, lock and status (imm/runs.py) on real files and processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest
from helpers import CONF, compose_cfg
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from imm import runs as rundir
from imm.runs import RESUMABLE_KEYS


def test_the_experiment_hash_ignores_order_plus_signs_and_keys_that_may_change_on_resume():
    h = rundir.experiment_hash(["loss.k=15", "kernel=inv_stride"])
    assert h == rundir.experiment_hash(["kernel=inv_stride", "+loss.k=15"])
    assert len(h) == 8 and int(h, 16) >= 0
    resumable = ["train.steps=9", "eval.every=5", "train.device=cpu", "tracking.uri=x", "hydra.run.dir=d", "fresh=true"]
    assert rundir.experiment_hash(["loss.k=15", "kernel=inv_stride", *resumable]) == h
    assert rundir.experiment_hash(["hydra/launcher=local", "loss.k=15", "kernel=inv_stride"]) == h
    assert rundir.experiment_hash(["loss.k=12", "kernel=inv_stride"]) != h
    assert rundir.experiment_hash(["kernel=inv_stride"]) != h
    assert "fresh" in RESUMABLE_KEYS and "train.steps" in RESUMABLE_KEYS


def test_the_newest_attempt_is_reused_and_fresh_claims_the_next(tmp_path):
    base = str(tmp_path / "runs")
    first = tmp_path / "runs" / "toy" / rundir.experiment_hash([])
    assert rundir.run_dir(base, "toy", [], False) == str(first) and not first.exists()  # Hydra creates it
    assert rundir.run_dir(base, "toy", [], "true") == str(first) and first.is_dir()  # claimed by mkdir
    second = rundir.run_dir(base, "toy", [], True)
    assert second == f"{first}-2"
    assert rundir.run_dir(base, "toy", [], False) == second  # the same command lands in the newest
    (tmp_path / "runs" / "toy" / f"{first.name}-x").mkdir()  # not an attempt of this experiment
    assert rundir.run_dir(base, "toy", [], "false") == second


def test_fresh_claims_made_together_never_share_a_directory(tmp_path):
    base, claimed = str(tmp_path / "runs"), []
    threads = [threading.Thread(target=lambda: claimed.append(rundir.run_dir(base, "toy", [], True))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(claimed)) == 8


def test_the_config_resolves_the_run_directory_from_the_experiment_and_its_overrides(tmp_path, monkeypatch):
    """Through Hydra's own resolution of hydra.run.dir (compose with return_hydra_config)."""

    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", overrides=["loss.k=15", "train.steps=7"], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        try:
            assert cfg.hydra.run.dir == f"runs/toy/{rundir.experiment_hash(['loss.k=15'])}"
        finally:
            HydraConfig.instance().cfg = None
    assert compose_cfg("fresh=true").fresh is True


def test_a_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = rundir._process_start(other.pid)
        lock = tmp_path / rundir.LOCK_FILE
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "start": start, "slurm_job": None}))
        with pytest.raises(rundir.RunDirError, match=rf"in use by process {other.pid} on "):
            rundir.RunLock.acquire(tmp_path)
        # the same pid with another start time is a reused pid, not the holder
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "start": "1", "slurm_job": None}))
        rundir.RunLock.acquire(tmp_path).release()
    finally:
        other.kill()
        other.wait()
    lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "start": start, "slurm_job": None}))
    held = rundir.RunLock.acquire(tmp_path)  # its process is gone
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    held.release()
    assert not lock.exists()


def test_a_requeued_slurm_job_takes_over_its_own_lock_from_another_node(tmp_path, monkeypatch):
    lock = tmp_path / rundir.LOCK_FILE
    lock.write_text(json.dumps({"pid": 1, "host": "node-a", "start": None, "slurm_job": "123"}))
    monkeypatch.setenv("SLURM_JOB_ID", "124")
    with pytest.raises(rundir.RunDirError, match="in use by process 1 on node-a;"):
        rundir.RunLock.acquire(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    rundir.RunLock.acquire(tmp_path).release()


def test_status_says_what_an_attempt_did(tmp_path):
    assert rundir.read_status(tmp_path) == {} and rundir.action({}, resumed=False) == "started"
    rundir.write_status(tmp_path, status="KILLED", step=50, action="started", from_step=0, name="a", summary={})
    last = rundir.read_status(tmp_path)
    assert not rundir.finished(last, 100) and rundir.action(last, resumed=True) == "resumed"
    assert rundir.status_line(last) == "started, KILLED at step 50"
    rundir.write_status(tmp_path, status="FAILED", step=70, action="resumed", from_step=50, name="a", summary={})
    last = rundir.read_status(tmp_path)
    assert (
        rundir.action(last, resumed=True) == "rerun"
        and rundir.status_line(last) == "resumed from step 50, FAILED at step 70"
    )
    rundir.write_status(tmp_path, status="FINISHED", step=100, action="rerun", from_step=70, name="a", summary={})
    last = rundir.read_status(tmp_path)
    assert rundir.finished(last, 100) and not rundir.finished(last, 101)


def test_the_resume_command_drops_fresh_and_resume():
    argv = ["launch.py", "loss.k=15", "fresh=true", "resume=/x/ckpt.pt", "hydra.run.dir=/r", "note=a b"]
    assert rundir.resume_command(argv) == "python launch.py loss.k=15 hydra.run.dir=/r 'note=a b'"
