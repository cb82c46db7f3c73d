"""Short CPU trainings through the real loop: objectives, MLflow records, resume."""

import math

import pytest
import torch
from helpers import compose_cfg, launch
from mlflow.tracking import MlflowClient

from imm import factory
from imm.config import EvalConfig
from imm.evaluation.evaluator import Evaluator
from imm.factory import loss_T
from imm.training.loop import _emas, ema_decay_at, train
from imm.validation import sampling_plan

SMALL = (
    "train.steps=400",
    "train.batch_size=256",
    "arch.width=64",
    "arch.depth=2",
    "eval.every=0",
    "eval.n_samples=1000",
    "eval.steps=[1,8]",
    "train.log_every=50",
    "train.ckpt_every=200",
    "data.n_train=20000",
    "data.n_heldout=1000",
    "optim.warmup_steps=20",
)


def test_ema_decay_is_the_stated_one_after_its_window(caplog):
    """power = inv_gamma = 1: the mean of the weights so far, then ema.decay from step 1/(1 - decay) on."""
    net = torch.nn.Linear(2, 2)
    with caplog.at_level("INFO", logger="imm.train"):
        ema, _ = _emas(compose_cfg("ema.decay=0.99", "train.steps=400"), net)
    assert "evaluation EMA: decay 0.99 from step 100 of 400" in caplog.text
    used = []
    for _ in range(300):
        ema.update()
        used.append(ema.get_current_decay())
    assert used[1:] == pytest.approx([ema_decay_at(j, 0.99, 1.0, 1.0) for j in range(1, 300)], abs=1e-7)
    assert used[98] < 0.99 and used[99:] == [pytest.approx(0.99)] * 201  # step 100 on
    assert used[9] == pytest.approx(0.9)  # before: 1 - 1/(j + 1), the running mean
    # ema-pytorch's own warm-up (power 2/3) would leave the paper's 0.9999 at 0.99982 after 400K steps
    assert ema_decay_at(400_000 - 1, 0.9999, 2 / 3, 1.0) == pytest.approx(0.999816, abs=1e-6)
    caplog.clear()
    with caplog.at_level("INFO", logger="imm.train"):
        _emas(compose_cfg("experiment=cifar10_paper"), net)
        _emas(compose_cfg("ema.decay=0.999", "train.steps=500"), net)
    assert "decay 0.9999 from step 10000 of 400000" in caplog.text
    assert (
        "ema.decay=0.999 is reached at step 1000 (ema.power=1, ema.inv_gamma=1), after train.steps=500" in caplog.text
    )


def initial_energy(cfg, N):
    """N-step energy distance of the freshly initialised network (same seed as train())."""
    bundle = factory.dataset(cfg)
    torch.manual_seed(cfg.train.seed)
    net = factory.net(cfg, bundle.shape, 0)
    plan = sampling_plan(EvalConfig(), {"steps": [N]}, schedule=cfg.schedule.name, T=loss_T(cfg), eps=cfg.loss.eps)
    ev = Evaluator(bundle, factory.parameterization(cfg), plan, n_samples=cfg.eval.n_samples)
    return ev(net)[0][f"eval/energy_{N}step"]


# Each objective is checked where it is meant to work: IMM at 1 step; flow matching at 8 Euler steps.
# FM's 1-step sample is E[x | x_T], a collapsed blob that is further from the data than an untrained
# net's near-Gaussian output: the failure IMM exists to fix, asserted below as the contrast.
@pytest.mark.parametrize("loss,N", [("imm", 1), ("fm", 8)])
def test_short_training_improves_samples(tmp_path, loss, N):
    cfg = compose_cfg(f"loss={loss}", *SMALL)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    before = initial_energy(cfg, N)
    summary = train(cfg, tmp_path / "run", tracking_uri=uri, run_name=f"test-{loss}")
    assert math.isfinite(summary["final/loss"])
    assert summary[f"final/energy_{N}step"] < 0.7 * before, (before, summary)
    if loss == "fm":
        assert summary["final/energy_1step"] > 3 * summary["final/energy_8step"], summary

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("imm").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == f"test-{loss}"
    assert run.data.params["loss.objective"] == ("fm" if loss == "fm" else "imm")
    assert run.data.params["kernel.weighting"] == "paper" and run.data.params["train.batch_size"] == "256"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(50, 401, 50))
    for key in (
        "eval/energy_1step",
        "eval/energy_floor",
        "eval/recall_8step",
        "final/energy_1step",
        "best/energy_1step",
        "model/parameters",
        "eval/energy_sd_1step",
        "train/ema_decay",
    ):  # sd over the 8 draws
        assert key in run.data.metrics, key
    assert not any(k.startswith("best/energy_sd") for k in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoints.txt", "figures"} <= artifacts
    figures = [a.path for a in client.list_artifacts(run.info.run_id, "figures")]
    assert any(p.endswith("steps.png") for p in figures)
    assert run.data.tags["mlflow.source.git.commit"] and run.data.tags["device"] == "cpu"


@pytest.mark.slow
def test_relaunch_resumes_the_same_run_and_mlflow_run(tmp_path):
    run_dir = tmp_path / "run"
    common = [*SMALL, "eval.steps=[1]", f"hydra.run.dir={run_dir}", "train.ckpt_every=100"]
    launch(tmp_path, *common, "train.steps=200", check=True)
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts[-1] == "step-00000200.pt"
    out = launch(tmp_path, *common, "train.steps=300", check=True)  # the same command with more steps resumes
    assert "resumed" in out.stderr.lower() or "step-00000200" in out.stderr

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("imm").experiment_id])
    assert len(runs) == 1, "a resumed run continues its own MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(50, 301, 50))
    assert "resumed_from_step_200" in run.data.tags
    assert (run_dir / "checkpoints" / "step-00000300.pt").exists()
    # the best of step 200 (before the resume) still counts (snapshots/best.json)
    ratios = [m.value for m in client.get_metric_history(run.info.run_id, "eval/energy_ratio1k_1step")]
    assert len(ratios) == 2 and run.data.metrics["best/energy_ratio1k_1step"] == min(ratios)
    linked = (run_dir / "snapshots" / "best-1step.pt").resolve().name
    assert linked == f"snapshot-{(200, 300)[ratios.index(min(ratios))]:08d}.pt"

    # resume=PATH continues from an explicit checkpoint into a new run directory
    other = tmp_path / "other"
    launch(
        tmp_path,
        *common,
        f"hydra.run.dir={other}",
        "train.steps=400",
        f"resume={run_dir / 'checkpoints' / 'step-00000300.pt'}",
        check=True,
    )
    assert (other / "checkpoints" / "step-00000400.pt").exists()


@pytest.mark.slow
def test_resume_refuses_a_different_experiment(tmp_path):
    run_dir = tmp_path / "run"
    launch(tmp_path, *SMALL, "eval.steps=[1]", f"hydra.run.dir={run_dir}", "train.steps=100", check=True)
    proc = launch(tmp_path, *SMALL, "eval.steps=[1]", f"hydra.run.dir={run_dir}", "train.steps=200", "loss.k=13")
    assert proc.returncode == 2
    assert "different config (loss.k was '12', now '13')" in proc.stderr
