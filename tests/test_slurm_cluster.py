"""Smoke tests for the single-node SLURM test cluster (tests/slurm/cluster.sh).

They need root (or password-less sudo) to start the cluster, or an already
running cluster; otherwise they are skipped with the reason printed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import slurm_fixture  # tests/ is on sys.path (rootdir-relative, no __init__.py)
from slurm_fixture import SlurmCluster

# the session fixture; harmless if tests/conftest.py imports it as well (one start/stop)
slurm_cluster = slurm_fixture.slurm_cluster

pytestmark = pytest.mark.slow

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def job_state(job_id: str) -> str:
    """JobState from `scontrol show job` (works without accounting/sacct)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    for field in out.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    raise AssertionError(f"no JobState in: {out.stdout}")


def wait_for_state(job_id: str, states: set[str], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state in states:
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {state!r} after {timeout}s, expected one of {sorted(states)}")


def wait_done(job, timeout: float = 180) -> None:
    """submitit's job.result() blocks forever if the job dies without a result file
    (no sacct here), so poll with a deadline and report the job logs on failure."""
    deadline = time.monotonic() + timeout
    while not job.done():
        if time.monotonic() > deadline:
            state = job_state(job.job_id)
            raise AssertionError(
                f"submitit job {job.job_id} not done after {timeout}s (scontrol: {state})\n"
                f"stdout:\n{job.stdout()}\nstderr:\n{job.stderr()}"
            )
        time.sleep(1)


def test_sbatch_wrap(slurm_cluster: SlurmCluster, tmp_path: Path):
    out_file = tmp_path / "out.txt"
    res = slurm_cluster.run(
        "sbatch",
        "--parsable",
        "-p",
        slurm_cluster.partition,
        "-o",
        str(tmp_path / "slurm-%j.out"),
        "--wrap",
        f"echo hello $SLURM_JOB_ID > {out_file}",
    )
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip().split(";")[0]
    assert wait_for_state(job_id, FINAL_STATES) == "COMPLETED"
    assert out_file.read_text().strip() == f"hello {job_id}"


def test_submitit_executor(slurm_cluster: SlurmCluster, tmp_path: Path):
    submitit = pytest.importorskip("submitit")

    # Defined locally so cloudpickle ships it by value: this test module (tests/ has no
    # __init__.py and is only importable through pytest's sys.path tweak) is not
    # importable inside the job, so a module-level function would fail to unpickle
    # with "ModuleNotFoundError: No module named 'test_slurm_cluster'".
    def _payload(x: int) -> dict:
        import os
        import sys

        return {"value": x * 2, "python": sys.executable, "job_id": os.environ.get("SLURM_JOB_ID")}

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(slurm_partition=slurm_cluster.partition, timeout_min=5, cpus_per_task=1, mem_gb=1)
    job = executor.submit(_payload, 21)
    wait_done(job)
    result = job.result()
    assert result["value"] == 42
    assert result["job_id"] == job.job_id
    assert result["python"] == sys.executable


HYDRA_APP = """
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig


@hydra.main(version_base=None, config_path=None, config_name="config")
def main(cfg: DictConfig) -> int:
    out = Path(cfg.out_dir) / f"job_{cfg.x}.txt"
    out.write_text(f"{cfg.x} {os.environ.get('SLURM_JOB_ID')}")
    return cfg.x


if __name__ == "__main__":
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="config", node={"x": 0, "out_dir": "."})
    main()
"""


def test_hydra_submitit_multirun(slurm_cluster: SlurmCluster, tmp_path: Path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(HYDRA_APP))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cmd = [
        sys.executable,
        str(app),
        "--multirun",
        "hydra/launcher=submitit_slurm",
        f"hydra.launcher.partition={slurm_cluster.partition}",
        "hydra.launcher.timeout_min=5",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=1",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        f"out_dir={out_dir}",
        "x=1,2",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    files = sorted(p.name for p in out_dir.iterdir())
    assert files == ["job_1.txt", "job_2.txt"], res.stdout + res.stderr
    job_ids = {(out_dir / f).read_text().split()[1] for f in files}
    assert len(job_ids) == 2 and "None" not in job_ids


def test_scontrol_requeue_reruns_submitit_job(slurm_cluster: SlurmCluster, tmp_path: Path):
    """`scontrol requeue` of a running submitit job kills it and runs it again (same job id).

    This is what submitit itself does on USR2 (preemption/timeout). A requeued job waits
    cred_expire+1 s (AuthInfo=cred_expire=10 in cluster.sh) before it is eligible again.
    """
    submitit = pytest.importorskip("submitit")
    marker = tmp_path / "runs.txt"

    def _work(marker: str) -> int:
        import os
        import time

        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        with open(marker, "a") as f:
            f.write(f"{restarts}\n")
        if restarts == 0:
            time.sleep(300)  # first run: wait to be requeued
        return restarts

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(slurm_partition=slurm_cluster.partition, timeout_min=10, cpus_per_task=1, mem_gb=1)
    job = executor.submit(_work, str(marker))

    deadline = time.monotonic() + 60
    while not (marker.exists() and marker.read_text()):
        assert time.monotonic() < deadline, f"job never started: {job_state(job.job_id)}"
        time.sleep(0.2)
    res = slurm_cluster.run("scontrol", "requeue", job.job_id)
    assert res.returncode == 0, res.stderr
    wait_done(job, timeout=120)
    assert job.result() == 1
    assert marker.read_text().split() == ["0", "1"]
