"""CPU cores shared without oversubscription (imm/training/threads.py): the torch thread rule
(explicit value, OMP_NUM_THREADS, the MLP, SLURM_CPUS_PER_TASK, LOCAL_WORLD_SIZE, CPU affinity), a real
training logging its choice, a lone MLP training following the idle cores beside a real busy process (with
the same numbers whatever its thread count), and the local launcher running no more jobs at once than its cap."""

import datetime as dt
import os
import re
import select
import shutil
import subprocess
import sys
import time

import helpers
import pytest
import torch
from omegaconf import OmegaConf

from imm.training.threads import Threads, busy_seconds, cores, parallel_jobs, threads_for, torch_threads

THREAD_VARS = ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK", "SLURM_JOB_ID", "LOCAL_WORLD_SIZE", "SUBMITIT_EXECUTOR")


@pytest.fixture
def bare_env(monkeypatch):
    """No variable the rule reads, as on a plain shell."""
    for name in THREAD_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_an_explicit_value_wins(bare_env):
    bare_env.setenv("OMP_NUM_THREADS", "3")
    bare_env.setenv("SLURM_CPUS_PER_TASK", "5")
    assert torch_threads(7, "dit_s_4") == Threads(7, "train.threads", follow=False)


def test_omp_num_threads_is_the_users_choice(bare_env):
    bare_env.setenv("OMP_NUM_THREADS", "3")
    assert torch_threads(None, "mlp") == Threads(3, "OMP_NUM_THREADS", follow=False)


def test_the_mlp_gets_one_thread_in_a_launched_job_even_with_cores_to_spare(bare_env):
    bare_env.setenv("SLURM_CPUS_PER_TASK", "8")
    assert torch_threads(None, "mlp") == Threads(1, "arch=mlp", follow=False)
    bare_env.delenv("SLURM_CPUS_PER_TASK")
    bare_env.setenv("LOCAL_WORLD_SIZE", "2")  # a DDP group
    assert torch_threads(None, "mlp") == Threads(1, "arch=mlp", follow=False)


def test_a_lone_mlp_training_starts_at_one_thread_and_follows_the_idle_cores(bare_env):
    threads = torch_threads(None, "mlp")
    assert threads.count == 1 and threads.follow == (cores() > 1)
    assert torch_threads(None, "dit_s_4").follow is False  # image nets keep their cores (rules 4 and 5)


def test_a_core_counts_when_three_quarters_of_it_are_idle():
    idle = (0.0, 0.74, 0.75, 1.33, 1.74, 1.8, 2.0, 3.9, 7.0)
    assert [threads_for(i, limit=4) for i in idle] == [1, 1, 1, 1, 1, 2, 2, 4, 4]
    assert threads_for(2.0, limit=1) == 1


def test_a_slurm_task_gets_its_cpus_per_task(bare_env):
    bare_env.setenv("SLURM_CPUS_PER_TASK", "6")
    bare_env.setenv("LOCAL_WORLD_SIZE", "4")  # per task already: not divided
    assert torch_threads(None, "dit_s_4") == Threads(6, "SLURM_CPUS_PER_TASK", follow=False)


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


def test_a_training_and_a_sample_of_it_log_the_thread_count_they_chose(tmp_path):
    env = {k: v for k, v in helpers.one_thread_env().items() if k not in THREAD_VARS}
    run = tmp_path / "run"
    proc = helpers.launch(
        tmp_path, "debug=toy", "train.steps=5", "train.threads=null", "tracking.enabled=false",
        f"hydra.run.dir={run}", env=env, check=True,
    )  # fmt: skip
    assert "torch threads: 1 (arch=mlp" in proc.stderr  # ", the idle cores of N" where N > 1: it starts at 1
    # sample and evaluate take the rule too: the idle cores measured once (at least 1), or OMP_NUM_THREADS
    sample = ["--config-name", "sample", f"ckpt={run}", "n=100", "steps=1", "tracking.enabled=false"]
    proc = helpers.launch(tmp_path, *sample, f"out={tmp_path / 's1'}", env=env, check=True)
    assert re.search(r"torch threads: [1-9]\d* \(arch=mlp", proc.stderr), proc.stderr[-2000:]
    proc = helpers.launch(tmp_path, *sample, f"out={tmp_path / 's2'}", env={**env, "OMP_NUM_THREADS": "1"}, check=True)
    assert "torch threads: 1 (OMP_NUM_THREADS)" in proc.stderr


TWO_CORES = set(sorted(os.sched_getaffinity(0))[:2])


def _busy_cores(seconds: float = 2.0) -> float:
    """How many of TWO_CORES other processes kept busy over `seconds` (this one sleeps meanwhile)."""

    before = busy_seconds(TWO_CORES)
    time.sleep(seconds)
    return (busy_seconds(TWO_CORES) - before) / seconds


def _wait_for(proc, text: str, timeout: float) -> list[str]:
    """The lines `proc` printed until one holds `text`; fails with them after `timeout` seconds or its end."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            lines.append(proc.stdout.readline())
            if text in lines[-1]:
                return lines
    raise AssertionError(f"no {text!r} within {timeout} s:\n{''.join(lines[-30:])}")


def test_a_lone_training_takes_the_idle_core_and_gives_it_back_to_a_busy_neighbour(tmp_path):
    """Two cores: alone, the MLP training goes to 2 threads; a one-thread busy process starts on the same cores and
    the training goes back to 1 (a second thread beside it made the default job 3x slower), all within seconds."""
    if len(os.sched_getaffinity(0)) < 2 or not os.path.exists("/proc/stat"):
        pytest.skip("needs two cores and /proc/stat")
    if (busy := _busy_cores()) > 0.2:  # the training would rightly keep one thread
        pytest.skip(f"other processes keep {busy:.1f} of the two cores busy: the test needs them idle")
    env = {k: v for k, v in helpers.one_thread_env().items() if k not in (*THREAD_VARS, "MKL_NUM_THREADS")}
    args = ["debug=toy", "train.threads=null", "train.steps=1000000", "tracking.enabled=false"]
    cmd = [sys.executable, str(helpers.LAUNCH), *args, "train.log_every=100000", "hydra.verbose=[imm.threads]"]

    def pin():
        os.sched_setaffinity(0, TWO_CORES)

    train = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=pin
    )
    busy = None
    try:
        _wait_for(train, "torch threads 1 -> 2", timeout=90)
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=pin)
        _wait_for(train, "torch threads 2 -> 1", timeout=60)
    finally:
        for proc in (busy, train):
            if proc is not None:
                proc.kill()
                proc.wait()


def test_the_training_and_its_evaluation_are_the_same_with_one_or_two_threads(tmp_path):
    """The thread count may change between steps (IdleCores), so it must not change a number: the default MLP
    trained 40 steps with train.threads=1 and =2 gives the same weights, EMA and optimizer state to the last bit,
    and the same evaluation."""
    saved, finals = [], []
    for threads in (1, 2):
        run = tmp_path / f"threads{threads}"
        proc = helpers.launch(
            tmp_path,
            "train.steps=40",
            "train.log_every=20",
            f"train.threads={threads}",
            "eval.every=0",
            "eval.n_samples=2000",
            "data.n_heldout=2000",
            "eval.draws=2",
            "tracking.enabled=false",
            f"hydra.run.dir={run}",
            check=True,
        )
        assert f"torch threads: {threads} (train.threads)" in proc.stderr
        saved.append(torch.load(run / "checkpoints" / "step-00000040.pt", map_location="cpu", weights_only=True))
        out = proc.stderr.splitlines()  # the evaluation's log line and the summary's table of metrics
        finals.append(
            [line.split(" - ", 1)[1] for line in out if "eval @" in line] + [s for s in out if " step" in s[:9]]
        )
    helpers.assert_identical(*[{k: s[k] for k in ("model", "ema", "optimizer")} for s in saved])
    assert finals[0] == finals[1] and len(finals[0]) == 1 + 4, finals[0]


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
