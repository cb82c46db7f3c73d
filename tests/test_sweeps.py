"""Sweeps: a local parallel sweep and a SLURM sweep land as one parent run with one child per job in MLflow;
a SLURM job requeued mid-training resumes and finishes as one child. The sweeps are inline (`-m key=a,b`),
so the research presets in sweeps/ can change freely (tests/test_presets.py composes each of their jobs)."""

import re
import subprocess
import time

import helpers
import pytest
from conftest import KERNELS
from helpers import CONF
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

TINY = ["debug=toy"]  # conf/debug/toy.yaml


def test_launcher_presets_compose():
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        slurm = compose(
            "config", overrides=["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=8"], return_hydra_config=True
        )
        local = compose("config", overrides=["hydra/launcher=local"], return_hydra_config=True)
    assert slurm.hydra.launcher.tasks_per_node == 8  # one DDP process per GPU
    assert "SlurmLauncher" in slurm.hydra.launcher._target_ and "LocalLauncher" in local.hydra.launcher._target_
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cpu = compose(
            "config", overrides=["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0"], return_hydra_config=True
        )
    assert cpu.hydra.launcher.tasks_per_node == 1


def runs_of(db):
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("imm")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep.role") == "child"]
    return client, parents, children


def launch(cwd, *overrides, timeout=900):
    return helpers.launch(cwd, *overrides, timeout=timeout, check=True)


@pytest.mark.slow
def test_local_parallel_sweep_lands_as_parent_and_children_on_a_fresh_store(tmp_path):
    proc = launch(tmp_path, "-m", f"kernel={','.join(KERNELS)}", "hydra/launcher=local", "train.steps=30", *TINY)
    out = proc.stdout + proc.stderr
    for k in KERNELS:  # the launching process says when each job starts and ends, and where its log is
        (job,) = re.findall(rf"job (\d+) kernel={k}: started; log (\S+)/launch.log", out)
        assert f"job {job[0]} kernel={k}: started, FINISHED at step 30; log {job[1]}/launch.log" in out
        assert (tmp_path / job[1] / "launch.log").is_file()
    _, parents, children = runs_of(tmp_path / "mlflow.db")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.info.run_name for r in children) == sorted(f"kernel={k}" for k in KERNELS)
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert all(r.info.status == "FINISHED" for r in children)
    assert {r.data.params["kernel.weighting"] for r in children} == set(KERNELS)
    assert all("final/energy_1step" in r.data.metrics for r in children)


def slurm_overrides(tmp_path):
    return [
        "hydra/launcher=slurm",
        "hydra.launcher.partition=debug",
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=1",
        "hydra.launcher.timeout_min=60",
        f"hydra.launcher.submitit_folder={tmp_path}/submitit/%j",
    ]


@pytest.mark.slow
def test_slurm_two_job_sweep(slurm_cluster, tmp_path):
    launch(tmp_path, "-m", "loss.k=11,12", "train.steps=30", *TINY, *slurm_overrides(tmp_path))
    _, parents, children = runs_of(tmp_path / "mlflow.db")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.info.run_name for r in children) == ["loss.k=11", "loss.k=12"]
    assert all(
        r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children
    )


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def squeue_ids():
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    return [i for i in out if i.strip()]


@pytest.mark.slow
def test_slurm_job_requeued_mid_training_resumes_as_one_child(slurm_cluster, tmp_path):
    sweep = helpers.start(
        tmp_path,
        "-m",
        "train.seed=0",
        "train.steps=1500",
        "train.ckpt_every=100",
        *TINY,
        *slurm_overrides(tmp_path),
        f"hydra.sweep.dir={tmp_path}/sweep",
    )
    try:
        ckpts = tmp_path / "sweep" / "0" / "checkpoints"
        wait_for(lambda: ckpts.is_dir() and any(ckpts.glob("step-*.pt")), 300, "the first checkpoint")
        (job,) = wait_for(squeue_ids, 30, "the job in squeue")
        first = sorted(p.name for p in ckpts.glob("step-*.pt"))[-1]
        subprocess.run(["scontrol", "requeue", job], check=True)
        out, _ = sweep.communicate(timeout=900)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, out[-4000:]
    log = (tmp_path / "sweep" / "0" / "launch.log").read_text()
    assert "resumed" in log or f"checkpoint {ckpts}" in log
    _, parents, children = runs_of(tmp_path / "mlflow.db")
    assert len(children) == 1, "a requeued job reopens its own child run"
    child = children[0]
    assert child.info.status == "FINISHED"
    assert any(k.startswith("resumed_from_step_") for k in child.data.tags), (first, child.data.tags)
    assert (ckpts / "step-00001500.pt").exists()


@pytest.mark.slow
def test_slurm_preemption_signal_checkpoints_requeues_and_matches_an_uninterrupted_run(slurm_cluster, tmp_path):
    """USR2 (submitit's preemption signal) mid-training: checkpoint at the next step boundary, requeue
    through submitit, resume; the final weights equal an uninterrupted run's bit for bit (CPU)."""
    import torch

    common = ["train.seed=3", "train.steps=600", "train.ckpt_every=100000", *TINY]
    launch(tmp_path, *common, f"hydra.run.dir={tmp_path}/reference", "tracking.enabled=false")
    sweep = helpers.start(tmp_path, "-m", *common, *slurm_overrides(tmp_path), f"hydra.sweep.dir={tmp_path}/sweep")
    log = tmp_path / "sweep" / "0" / "launch.log"
    try:
        wait_for(lambda: log.is_file() and "step 100/600" in log.read_text(), 300, "training to be under way")
        (job,) = wait_for(squeue_ids, 30, "the job in squeue")
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        out, _ = sweep.communicate(timeout=900)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, out[-4000:]
    text = log.read_text()
    assert "resumed from" in text, "the requeued job resumed from the preemption checkpoint"
    ckpts = sorted((tmp_path / "sweep" / "0" / "checkpoints").glob("step-*.pt"))
    assert ckpts[-1].name == "step-00000600.pt" and len(ckpts) >= 2  # the preemption checkpoint, then the end
    ref = torch.load(tmp_path / "reference" / "checkpoints" / "step-00000600.pt", weights_only=True)
    got = torch.load(ckpts[-1], weights_only=True)
    for part in ("model", "ema"):
        for key, value in ref[part].items():
            assert torch.equal(value, got[part][key]), f"{part}.{key}"
    _, parents, children = runs_of(tmp_path / "mlflow.db")
    assert len(children) == 1 and children[0].info.status == "FINISHED"
