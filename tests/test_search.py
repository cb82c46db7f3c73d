"""The Bayesian search (`hydra/sweeper=optuna`, `+sweep=search`): Hydra's sweep syntax as optuna distributions,
and real searches on toy data: a real sweeper, one MLflow parent run, one child per trial, the study in an
SQLite file beside the MLflow store, continued by the same command, shared by two sweeper processes."""

import atexit
import subprocess
import sys
import threading
import time

import optuna
import pytest
from helpers import launch, one_thread_env, start
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from imm.errors import ConfigError
from imm.launch.search import corners, job_overrides, search_space
from imm.launch.sweep import MLflowSweepCallback
from imm.metrics import find_metric
from imm.tracking.mlflow_run import ensure_store

# tiny trials: 20 steps of the toy run, the objective its 1-step energy distance over the floor
TINY = ("debug=toy", "train.steps=20", "eval.n_samples=100", "data.n_heldout=100", "tracking.system_metrics=false")
METRIC = "final/energy_ratio_1step"


def test_hydra_sweep_syntax_becomes_optuna_distributions():
    params = {"loss.k": "range(10,17)", "loss.a": "choice(1,2)", "loss.b": "interval(2.0,6.0)", "kernel": "paper,unit"}
    space, fixed = search_space(
        params, ["debug=toy", "optim.lr=tag(log,interval(1e-5,1e-3))", "loss.M=int(interval(2,8))"]
    )
    assert space["loss.k"] == IntDistribution(10, 16)  # Hydra's range leaves out its stop
    assert space["loss.a"] == CategoricalDistribution([1, 2]) and space["kernel"] == CategoricalDistribution(
        ["paper", "unit"]
    )
    assert space["loss.b"] == FloatDistribution(2.0, 6.0)
    assert space["optim.lr"] == FloatDistribution(1e-5, 1e-3, log=True) and space["loss.M"] == IntDistribution(2, 8)
    assert fixed == ["debug=toy"]
    assert search_space(params, ["loss.k=12"])[0].keys() == {"loss.a", "loss.b", "kernel"}  # the command line wins
    assert search_space(params, ["loss.k=12"])[1] == ["loss.k=12"]


def test_the_corners_reach_every_choice_and_both_ends():
    space, fixed = search_space({"loss.k": "range(10,17,3)", "kernel": "choice(paper,inv_stride,unit)"}, ["debug=toy"])
    assert space["loss.k"] == IntDistribution(10, 16, step=3)
    points = corners(space)
    assert points == [
        {"loss.k": 10, "kernel": "paper"},
        {"loss.k": 16, "kernel": "inv_stride"},
        {"loss.k": 10, "kernel": "unit"},
    ]
    assert job_overrides(fixed, {"loss.b": 2.5, "kernel": "unit"}) == ["debug=toy", "loss.b=2.5", "kernel=unit"]


def test_an_empty_range_is_one_sentence():
    with pytest.raises(ConfigError, match=r"loss.k=range\(12,12,1\) is empty; give start < stop."):
        search_space({"loss.k": "range(12,12)"}, [])


def runs(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    found = client.search_runs([client.get_experiment_by_name("imm").experiment_id])
    parents = [r for r in found if r.data.tags.get("sweep.role") == "parent"]
    children = [r for r in found if r.data.tags.get("sweep.role") == "child"]
    return parents, children


def study_of(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"  # beside mlflow.db
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


@pytest.mark.slow
def test_a_four_trial_search_is_one_parent_run_with_four_children_and_resumes(tmp_path):
    search = ("+sweep=search", "hydra.sweeper.seed=0", *TINY)
    proc = launch(tmp_path, *search, "hydra.sweeper.n_trials=4", check=True)
    out = proc.stdout + proc.stderr  # the launching process logs to stdout (Hydra's hydra_logging), jobs to stderr
    assert out.count("FINISHED at step 20; log multirun/search/") == 4  # one line per job as it ends, with its log
    (parent,), children = runs(tmp_path)
    assert len(children) == 4 and parent.info.status == "FINISHED"
    assert all(
        c.data.tags["mlflow.parentRunId"] == parent.info.run_id and c.info.status == "FINISHED" for c in children
    )
    study = study_of(tmp_path)
    assert study.study_name.endswith(parent.data.tags["sweep.dir"].split("multirun/")[-1])
    trials = {t.number: t for t in study.trials}
    assert sorted(trials) == [0, 1, 2, 3] and all(t.state.name == "COMPLETE" for t in trials.values())
    for child in children:  # trial n is job n: its params are the run's, its value the run's metric
        trial = trials[int(child.data.tags["hydra.job.num"])]
        assert trial.value == child.data.metrics[find_metric(METRIC, child.data.metrics)]  # energy_ratio<n>_1step
        assert int(child.data.params["loss.k"]) == trial.params["loss.k"] and 10 <= trial.params["loss.k"] <= 16
        assert float(child.data.params["loss.b"]) == trial.params["loss.b"] and 2.0 <= trial.params["loss.b"] <= 6.0
        assert child.data.params["kernel.weighting"] == trial.params["kernel"]
        assert child.data.params["kernel.function"] == trial.params["kernel.function"]
    assert parent.data.tags["search.best_value"] == str(study.best_value) == str(min(t.value for t in study.trials))
    assert parent.data.tags["search.best_trial"] == str(study.best_trial.number)

    launch(tmp_path, *search, "hydra.sweeper.n_trials=5", check=True)  # the same command continues the study
    (again,), children = runs(tmp_path)
    assert again.info.run_id == parent.info.run_id and len(children) == 5
    assert sorted(t.number for t in study_of(tmp_path).trials) == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_two_sweeper_processes_share_one_study_and_one_parent_run(tmp_path):
    args = ("+sweep=search", "hydra.sweeper.n_trials=4", *TINY, "train.steps=10")
    procs = [start(tmp_path, *args, env=one_thread_env()) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]
    (parent,), children = runs(tmp_path)
    assert len(children) == 4 and parent.info.status == "FINISHED"  # ended by the process that ended last
    assert sorted(int(c.data.tags["hydra.job.num"]) for c in children) == [0, 1, 2, 3]
    assert sorted(t.number for t in study_of(tmp_path).trials if t.state.name == "COMPLETE") == [0, 1, 2, 3]


# The other sweeper process: takes part in the sweep, holds its lock until told to go, then finishes its job
# (status.json and child run) and leaves, as its on_multirun_end would, all before the lock is free again.
OTHER_SWEEPER = """
import pathlib, sys, time
from mlflow.tracking import MlflowClient
from imm.launch.watcher import SweepProcesses, sweep_lock
from imm import runs as rundir
sweep_dir, uri, child = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
me = SweepProcesses(sweep_dir)
with sweep_lock(sweep_dir):
    (sweep_dir / "locked").touch()
    while not (sweep_dir / "go").exists():
        time.sleep(0.05)
    rundir.write_status(sweep_dir / "0", status="FINISHED", step=10)
    MlflowClient(tracking_uri=uri).set_terminated(child, status="FINISHED")
    me.leave()
"""


def test_the_last_sweeper_process_judges_the_sweep_when_it_ends_the_parent(tmp_path):
    """A sweeper process that ends while the other's last job still runs leaves the parent to it; when the other
    finishes before the first one takes the lock, the first one ends the parent on what it sees then: FINISHED,
    not FAILED on the RUNNING child it saw a moment before (the race CI once met in the test above)."""
    uri, sweep_dir = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "multirun"
    ensure_store(uri)
    (sweep_dir / "0").mkdir(parents=True)  # the other process's job, running: no status yet
    callback = MLflowSweepCallback()
    callback.sweep_dir, callback.started = sweep_dir, time.time()
    config = OmegaConf.create({"tracking": {"experiment": "imm"}, "hydra": {"runtime": {"choices": {}}}})
    callback._open_parent(config, uri, ["loss.k"])
    atexit.unregister(callback._end)  # ended below; at pytest's exit the store is gone
    client = callback.client
    child = client.create_run(
        client.get_run(callback.run_id).info.experiment_id,
        tags={"sweep.id": callback.run_id, "sweep.role": "child"},
    ).info.run_id
    other = subprocess.Popen([sys.executable, "-c", OTHER_SWEEPER, str(sweep_dir), uri, child])
    try:
        deadline = time.time() + 60
        while not (sweep_dir / "locked").exists() and other.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert (sweep_dir / "locked").exists(), "the other sweeper process did not start"
        ending = threading.Thread(target=callback.on_multirun_end, args=(config,))
        ending.start()  # this process's jobs are done; it waits for the sweep's lock
        time.sleep(1.0)  # long enough to look at the jobs and children while the other's child still RUNS
        (sweep_dir / "go").touch()
        assert other.wait(timeout=60) == 0
        ending.join(timeout=60)
    finally:
        other.kill()
    assert client.get_run(child).info.status == "FINISHED"
    parent = client.get_run(callback.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.children"] == "1"
    assert "sweep.failed_jobs" not in parent.data.tags


@pytest.mark.slow
def test_a_space_that_reaches_a_bad_value_fails_before_any_trial(tmp_path):
    proc = launch(tmp_path, "+sweep=search", *TINY, "loss.k=range(20,30)")
    out = proc.stdout + proc.stderr  # the launching process logs to stdout (Hydra's hydra_logging)
    assert proc.returncode == 2 and "Traceback" not in out
    (error,) = [line for line in out.splitlines() if "search space" in line]  # Hydra's format: `[time][HYDRA] msg`
    assert error.endswith(
        "the search space reaches loss.k=29 loss.a=2 loss.b=6.0 kernel=inv_stride kernel.function=rbf,"
        " where loss.k=29 is out of range; loss.k must be in [1, 24] (the paper uses 12 to 15)."
    )
    assert not list(tmp_path.glob("multirun/*/*/0")) and not (tmp_path / "optuna.db").exists()


@pytest.mark.slow
def test_a_failing_trial_is_fail_and_the_search_goes_on(tmp_path):
    proc = launch(tmp_path, "+sweep=search", "hydra.sweeper.n_trials=2", *TINY, "optim.lr=choice(1e30)")
    assert proc.returncode == 1, proc.stderr[-3000:]  # a sweep with a failed job (not a user error) exits 1
    assert "trial 0 " in proc.stdout + proc.stderr and "FAIL (FAILED at step 5)" in proc.stdout + proc.stderr
    assert [t.state.name for t in study_of(tmp_path).trials] == ["FAIL", "FAIL"]  # both ran, both diverged
    (parent,), children = runs(tmp_path)
    assert parent.info.status == "FAILED" and [c.info.status for c in children] == ["FAILED", "FAILED"]
