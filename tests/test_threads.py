"""CPU cores shared without oversubscription (imm/training/threads.py): the torch thread rule
(explicit value, OMP_NUM_THREADS, the MLP, SLURM_CPUS_PER_TASK, LOCAL_WORLD_SIZE, CPU affinity), a real
training logging its choice, and the local launcher running no more jobs at once than its cap."""

import datetime as dt
import os
import shutil
import subprocess
import sys

import helpers
import pytest
from omegaconf import OmegaConf

from imm.training.threads import cores, parallel_jobs, torch_threads

THREAD_VARS = ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE", "SUBMITIT_EXECUTOR")


@pytest.fixture
def bare_env(monkeypatch):
    """No variable the rule reads, as on a plain shell."""
    for name in THREAD_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_an_explicit_value_wins(bare_env):
    bare_env.setenv("OMP_NUM_THREADS", "3")
    bare_env.setenv("SLURM_CPUS_PER_TASK", "5")
    assert torch_threads(7, "dit_s_4") == (7, "train.threads")


def test_omp_num_threads_is_the_users_choice(bare_env):
    bare_env.setenv("OMP_NUM_THREADS", "3")
    assert torch_threads(None, "mlp") == (3, "OMP_NUM_THREADS")


def test_the_mlp_gets_one_thread_even_with_cores_to_spare(bare_env):
    bare_env.setenv("SLURM_CPUS_PER_TASK", "8")
    assert torch_threads(None, "mlp") == (1, "arch=mlp")


def test_a_slurm_task_gets_its_cpus_per_task(bare_env):
    bare_env.setenv("SLURM_CPUS_PER_TASK", "6")
    bare_env.setenv("LOCAL_WORLD_SIZE", "4")  # per task already: not divided
    assert torch_threads(None, "dit_s_4") == (6, "SLURM_CPUS_PER_TASK")


def test_image_nets_share_the_affinity_among_the_ddp_group_on_the_node(bare_env):
    assert torch_threads(None, "dit_s_4")[0] == cores()
    bare_env.setenv("LOCAL_WORLD_SIZE", "2")
    assert torch_threads(None, "ddpmpp")[0] == max(1, cores() // 2)
    bare_env.setenv("LOCAL_WORLD_SIZE", str(cores() + 1))
    assert torch_threads(None, "ddpmpp")[0] == 1


def test_the_cpu_affinity_counts_not_the_machines_cores():
    """A process pinned to one core (as taskset or SLURM's binding does) gets one thread."""
    code = (
        "import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
        "from imm.training.threads import torch_threads; print(torch_threads(None, 'dit_s_4')[0])"
    )
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"


def test_parallel_jobs_divides_the_cores_by_the_cpus_a_local_job_takes():
    local = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
    assert parallel_jobs(OmegaConf.create({"_target_": local, "cpus_per_task": 1, "tasks_per_node": 1})) == cores()
    assert parallel_jobs(OmegaConf.create({"_target_": local, "cpus_per_task": 1, "tasks_per_node": 2})) == max(
        1, cores() // 2
    )
    assert parallel_jobs(OmegaConf.create({"_target_": local, "cpus_per_task": cores() + 1})) == 1
    slurm = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert parallel_jobs(OmegaConf.create({"_target_": slurm, "cpus_per_task": 8})) is None


def test_a_training_logs_the_thread_count_it_chose(tmp_path):
    env = {k: v for k, v in helpers.one_thread_env().items() if k not in THREAD_VARS}
    proc = helpers.launch(
        tmp_path, "debug=toy", "train.steps=5", "train.threads=null", "tracking.enabled=false", env=env, check=True
    )
    assert "torch threads: 1 (arch=mlp)" in proc.stderr


def _log_span(log_file):
    """(first, last) timestamps of a run's launch.log lines, `[2026-12-02 05:02:58,872][...`."""
    stamps = [
        dt.datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
        for line in log_file.read_text().splitlines()
        if line.startswith("[20")
    ]
    return stamps[0], stamps[-1]


@pytest.mark.slow
def test_a_local_sweep_runs_no_more_jobs_at_once_than_the_cores_allow(tmp_path):
    """Three one-cpu jobs on two cores (taskset): the callback caps the sweep at 2 jobs at once, so the last to
    start starts after the first two have ended."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    if shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs taskset and two cores")
    sweep_dir = tmp_path / "sweep"
    proc = helpers.launch(
        tmp_path,
        "-m",
        "train.seed=1,2,3",
        "hydra/launcher=local",
        f"hydra.sweep.dir={sweep_dir}",
        "debug=toy",
        "train.steps=20",
        "tracking.enabled=false",
        check=True,
        timeout=600,
        prefix=["taskset", "-c", ",".join(map(str, sorted(os.sched_getaffinity(0))[:2]))],
    )
    assert "local launcher: at most 2 job(s) at a time" in proc.stdout + proc.stderr
    logs = [p for p in sweep_dir.rglob("launch.log") if ".submitit" not in p.parts]
    assert len(logs) == 3, logs
    spans = sorted(_log_span(p) for p in logs)
    assert spans[2][0] > max(spans[0][1], spans[1][1]), spans
