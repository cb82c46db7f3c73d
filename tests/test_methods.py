"""The four methods behind one switch (loss.objective=imm|fm|meanflow|ict): each method's options only on its own
runs (one sentence otherwise), one sweep through launch.py trains all four and evaluates them alike (same metrics,
same NFE), a MeanFlow or iCT run killed with SIGKILL resumes bit for bit, and its micro-batches, alone and under
DDP, train the weights of one batch."""

import re
import signal
import time

import pytest
import torch
from helpers import assert_identical, compose_cfg
from mlflow.tracking import MlflowClient
from test_accumulation import TINY as ACC_TINY
from test_accumulation import assert_same_weights, final_model, torchrun
from test_reliability import Started, launch, ok, run_dirs

from imm import factory
from imm.errors import ConfigError
from imm.training import checkpoint
from imm.validation import validate


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loss=meanflow", "loss.k=15"], "loss.k=15 is an IMM option, unused by loss.objective=meanflow"),
        (["loss=ict", "kernel=unit"], "kernel.weighting=unit is an IMM option, unused by loss.objective=ict"),
        (["loss.meanflow.ratio=0.5"], "loss.meanflow.ratio=0.5 is a meanflow option, unused by loss.objective=imm"),
        (["loss=fm", "loss.ict.s1=640"], "loss.ict.s1=640 is a ict option, unused by loss.objective=fm"),
        (["loss=meanflow", "loss.ict.P_std=1.0"], "loss.ict.P_std=1.0 is a ict option"),
        (["loss=ict", "target=ema"], "target.kind=ema is an IMM option"),
        (["loss=meanflow", "schedule=fm_simple_edm"], "schedule.param=simple_edm is not"),
        (["loss=meanflow", "loss.meanflow.ratio=1.5"], "loss.meanflow.ratio=1.5 is out of range"),
        (["loss=ict", "loss.ict.s0=2000"], "the curriculum needs 1 <= loss.ict.s0 <= loss.ict.s1"),
        (["loss=meanflow", "loss.meanflow.omega=2", "loss.label_dropout=0"], "loss.label_dropout=0 never trains"),
    ],
)
def test_impossible_combinations_get_one_sentence(overrides, message):
    cfg = compose_cfg(*overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    text = str(e.value)
    assert message in text, text
    assert "\n" not in text and text.endswith("."), text


@pytest.mark.parametrize("loss", ["imm", "fm", "meanflow", "ict"])
def test_each_method_validates_with_its_defaults(loss):
    validate(compose_cfg(f"loss={loss}"))
    validate(compose_cfg(f"loss={loss}", "experiment=digits"))


@pytest.mark.slow
def test_the_methods_sweep_trains_and_evaluates_all_four_alike(tmp_path):
    """+sweep=methods through launch.py: four children, each FINISHED with the same evaluation metrics and NFE."""
    proc = ok(launch(tmp_path, "+sweep=methods", "debug=toy", "train.steps=20", "eval.steps=[1,2]"))
    out = proc.stdout + proc.stderr
    for loss in ("imm", "fm", "meanflow", "ict"):
        assert re.search(rf"job \d+ loss={loss}: started, FINISHED at step 20", out), out[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("imm").experiment_id])
    children = {r.data.params["loss.objective"]: r for r in runs if r.data.tags.get("sweep.role") == "child"}
    assert sorted(children) == ["fm", "ict", "imm", "meanflow"]
    keys = [{k for k in r.data.metrics if k.startswith("final/") and "loss" not in k} for r in children.values()]
    assert all(k == keys[0] for k in keys) and "final/energy_1step" in keys[0]
    for r in children.values():
        assert r.info.status == "FINISHED"
        assert r.data.metrics["eval/nfe_1step"] == 1 and r.data.metrics["eval/nfe_2step"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["meanflow", "ict"])
def test_kill_9_then_relaunch_resumes_bit_exactly(tmp_path, loss):
    """As tests/test_reliability.py does for IMM: dropout on (the shared masks replay the RNG), iCT's curriculum
    moving every 50 steps (K = 400), evaluations mid-training; the relaunched run equals an uninterrupted one."""
    common = ["debug=toy", f"loss={loss}", "train.steps=400", "train.ckpt_every=50", "arch.dropout=0.1"]
    common += ["eval.every=200", "train.log_every=100", "optim.warmup_steps=10"]
    ref_cwd, cut_cwd = tmp_path / "ref", tmp_path / "cut"
    ref_cwd.mkdir(), cut_cwd.mkdir()
    ok(launch(ref_cwd, *common))
    (ref,) = run_dirs(ref_cwd)
    run = Started(cut_cwd, *common)
    cut = cut_cwd / ref.relative_to(ref_cwd)
    run.wait_for(lambda: checkpoint.list_checkpoints(cut), what="the first checkpoint")
    time.sleep(0.3)
    assert run.proc.poll() is None, "the run finished before it could be killed"
    run.proc.send_signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    killed_at = checkpoint.load(checkpoint.list_checkpoints(cut)[-1])["step"]
    assert 50 <= killed_at < 400, killed_at
    out = ok(launch(cut_cwd, *common))
    assert f"at step {killed_at}" in out.stderr
    a = checkpoint.load(ref / "checkpoints" / "step-00000400.pt")
    b = checkpoint.load(cut / "checkpoints" / "step-00000400.pt")
    assert_identical(a, b, skip={"mlflow_run_id"})
    assert any(isinstance(v, torch.Tensor) for v in a["model"].values())


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["meanflow", "ict"])
def test_micro_batches_alone_and_under_ddp_train_the_weights_of_one_batch(tmp_path, loss):
    """Through the loop: a batch of 64 in one step, in micro-batches of 16, and as 2 gloo processes x 32 in
    micro-batches of 8 (DDP all-reduces once, after the last) train the same weights (float summation order only)."""
    args = [*ACC_TINY, f"loss={loss}"]
    for name, extra in (("one", []), ("micro", ["train.micro_batch=16"])):
        ok(launch(tmp_path, *args, *extra, f"hydra.run.dir={tmp_path / name}"))
    ddp = torchrun(tmp_path, *args, "train.micro_batch=8", f"hydra.run.dir={tmp_path / 'ddp'}")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = final_model(tmp_path / "one")
    assert_same_weights(one, final_model(tmp_path / "micro"))
    assert_same_weights(one, final_model(tmp_path / "ddp"))


def test_the_cifar10_presets_hold_the_papers_values():
    """docs/presets.md, row by row where a value is a config key."""
    mf = compose_cfg("experiment=cifar10_meanflow")
    m = mf.loss.meanflow
    assert (mf.loss.objective, m.P_mean, m.P_std, m.ratio, m.norm_p, m.norm_eps) == (
        "meanflow",
        -2,
        2,
        0.75,
        0.75,
        1e-3,
    )
    assert (mf.optim.name, mf.optim.lr, mf.optim.weight_decay, mf.optim.warmup_steps) == ("adamw", 6e-4, 0, 9800)
    assert (mf.train.batch_size, mf.train.steps, mf.ema.decay, mf.arch.dropout) == (1024, 800_000, 0.9999, 0.2)
    assert (mf.arch.name, mf.schedule.param, mf.data.use_labels, mf.data.augment_p) == (
        "ddpmpp",
        "euler_fm",
        False,
        0.12,
    )
    ict = compose_cfg("experiment=cifar10_ict")
    i = ict.loss.ict
    assert (ict.loss.objective, i.s0, i.s1, i.rho, i.P_mean, i.P_std, i.huber) == ("ict", 10, 1280, 7, -1.1, 2, None)
    par = factory.parameterization(ict)
    assert par.sigma_of(ict.loss.eps).item() == pytest.approx(0.002, rel=1e-12)
    assert par.sigma_of(ict.loss.T).item() == pytest.approx(80.0, rel=1e-12)
    assert (ict.optim.name, ict.optim.lr, ict.train.batch_size, ict.train.steps) == ("radam", 1e-4, 1024, 400_000)
    assert (ict.ema.decay, ict.arch.dropout, ict.data.use_labels, ict.target.kind) == (0.99993, 0.3, False, "online")
    assert ict.eval.sampler == "restart" and 0.5 * ict.eval.two_step_eta == pytest.approx(0.821)
    for cfg in (mf, ict):
        validate(cfg)
