"""`dry_run=true`: the checks a launch makes, what it would do, and nothing else: no training, no MLflow
run, nothing queued, no checkpoint, no run directory left. Real `python launch.py` subprocesses."""

import shutil

import pytest
import torch
from helpers import compose_cfg, launch

from imm import factory
from imm import runs as rundir


def files_under(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.slow
def test_a_dry_run_prints_what_a_launch_would_do_and_leaves_nothing(tmp_path):
    proc = launch(tmp_path, "debug=toy", "arch.width=48", "dry_run=true", check=True)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("dry run: the checks a launch makes passed; nothing was trained")
    fields = dict(line.strip().split(maxsplit=1) for line in lines[1:] if not line.strip().startswith(("world", "run")))
    cfg = compose_cfg("debug=toy", "arch.width=48")
    bundle = factory.dataset(cfg)
    n_params = sum(p.numel() for p in factory.net(cfg, bundle.shape, 0).parameters())  # the real network's count
    assert fields["network"] == f"mlp: {n_params:,} parameters"
    assert fields["data"] == "checkerboard: 2000 samples of shape (2,), unconditional"
    assert "  world size  1" in lines and fields["device"] == "cpu (fp32)"
    expected = tmp_path / "runs" / "toy" / rundir.experiment_hash(["debug=toy", "arch.width=48"])
    assert f"  run dir     {expected} (starts at step 0)" in lines  # where the same command without dry_run lands
    assert fields["MLflow"] == f"sqlite:///{tmp_path}/mlflow.db, experiment 'imm'"
    assert files_under(tmp_path) == []  # no run directory, .hydra/, launch.log, checkpoint or MLflow store


@pytest.mark.slow
def test_a_dry_run_refuses_a_bad_config_in_one_sentence(tmp_path):
    proc = launch(tmp_path, "debug=toy", "train.batch_size=62", "dry_run=true")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (error,) = [line for line in proc.stderr.splitlines() if "[ERROR]" in line]
    assert error.endswith(
        "train.batch_size=62 must be divisible by loss.M x world size = 4 x 1 = 4, so every group of M"
        " particles stays on one process."
    )
    assert files_under(tmp_path) == []


@pytest.mark.slow
def test_a_dry_run_in_an_existing_run_says_what_a_relaunch_does_and_touches_nothing(tmp_path):
    run_dir = tmp_path / "run"
    common = ("debug=toy", "train.steps=20", f"hydra.run.dir={run_dir}")
    launch(tmp_path, *common, check=True)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    finished = launch(tmp_path, *common, "dry_run=true", check=True)
    assert f"  run dir     {run_dir} (FINISHED at step 20 before: a launch would do nothing)" in finished.stdout
    longer = launch(tmp_path, *common, "train.steps=40", "dry_run=true", check=True)
    assert f"(resumes from {run_dir}/checkpoints/step-00000020.pt at step 20)" in longer.stdout
    other = launch(tmp_path, *common, "train.steps=40", "loss.k=13", "dry_run=true")
    assert other.returncode == 2 and "different config (loss.k was '12', now '13')" in other.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # .hydra/, launch.log as they were


@pytest.mark.slow
def test_a_dry_run_of_a_sweep_checks_every_job_and_shows_the_sbatch_script(tmp_path):
    slurm = ("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=8")
    proc = launch(tmp_path, "-m", "loss.k=11,12", "debug=toy", *slurm, "dry_run=true", check=True)
    out = proc.stdout
    assert out.startswith("dry run of 2 job(s) on SlurmLauncher (world size 8, cuda)")
    jobs = [line for line in out.splitlines() if line.startswith("job ")]
    assert [j.split(":")[0] for j in jobs] == ["job 0 loss.k=11", "job 1 loss.k=12"] and all("ok;" in j for j in jobs)
    if shutil.which("srun"):  # submitit renders the script only where SLURM is installed
        for line in (
            "--array=0-1%2",
            "--partition=gpu",
            "--gpus-per-node=8",
            "--ntasks-per-node=8",
            "--signal=USR2@120",
        ):
            assert f"#SBATCH {line}\n" in out, line
    else:
        assert "(not rendered here: " in out
    assert "2 of 2 job(s) passed the checks." in out
    assert files_under(tmp_path) == []  # no sweep directory, .submitit/, MLflow parent run or store


@pytest.mark.slow
def test_a_dry_run_of_a_sweep_names_each_bad_job_and_exits_2(tmp_path):
    proc = launch(tmp_path, "-m", "loss.k=0,12", "loss.a=1,3", "debug=toy", "dry_run=true")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    jobs = [line for line in proc.stdout.splitlines() if line.startswith("job ")]
    assert (
        jobs[0]
        == "job 0 loss.k=0 loss.a=1: loss.k=0 is out of range; loss.k must be in [1, 24] (the paper uses 12 to 15)."
    )
    assert (
        jobs[3] == "job 3 loss.k=12 loss.a=3: loss.a=3.0 is out of range; loss.a must be in {1, 2}"
        " (the time weight's exponent, Eq. 13)."
    )
    assert jobs[2].startswith("job 2 loss.k=12 loss.a=1: ok;")
    assert "1 of 4 job(s) passed the checks." in proc.stdout
    assert files_under(tmp_path) == []


def test_the_meta_network_has_the_real_parameter_count():
    cfg = compose_cfg("experiment=digits")
    with torch.device("meta"):
        meta = factory.net(cfg, (1, 16, 16), 10)
    real = factory.net(cfg, (1, 16, 16), 10)
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in real.parameters())


@pytest.mark.slow
def test_a_dry_run_of_a_sweep_that_ran_says_what_its_relaunch_does(tmp_path):
    """Checking a relaunch (docs/runs.md): the jobs' configs hold Hydra's own node, which resolves only inside a
    job; the dry run compares the rest with each job's checkpoint (it crashed in Hydra's interpolation before)."""
    common = ("-m", "loss.k=11,12", "debug=toy", "train.steps=20", "tracking.enabled=false")
    launch(tmp_path, *common, check=True)
    sweep_dir = next((tmp_path / "multirun" / "toy").iterdir())
    before = {p: p.read_bytes() for p in sweep_dir.rglob("*") if p.is_file()}
    proc = launch(tmp_path, *common, "dry_run=true")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "Warning" not in proc.stderr
    jobs = [line for line in proc.stdout.splitlines() if line.startswith("job ")]
    assert len(jobs) == 2 and all(j.endswith("(FINISHED at step 20 before: a launch would do nothing)") for j in jobs)
    longer = launch(tmp_path, *common, "train.steps=40", "dry_run=true", check=True)
    relative = sweep_dir.relative_to(tmp_path)  # the sweep directory as Hydra names it, from the launch directory
    assert f"(resumes from {relative}/1/checkpoints/step-00000020.pt at step 20)" in longer.stdout
    assert {p: p.read_bytes() for p in sweep_dir.rglob("*") if p.is_file()} == before
