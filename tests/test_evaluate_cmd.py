"""`launch.py --config-name evaluate`: point metrics and FID of real (tiny) checkpoints, logged to their runs.

The FID path runs end to end with `eval.feature_net=toynets:TinyRandomFeatures` (a small fixed-seed conv net
standing in for Inception-v3, which cannot be downloaded here); the missing-weights error is
checked at the command level with an empty TORCH_HOME and downloads disabled.
"""

import json

import pytest
import torch
from conftest import DIGITS
from helpers import compose_cfg, compose_task, launch, one_thread_env
from mlflow.tracking import MlflowClient
from toynets import TinyRandomFeatures

from imm import factory
from imm.config import EvalConfig
from imm.errors import ConfigError
from imm.evaluation.evaluator import Evaluator, count_tag, fid_metric, metric_name, ratio_family
from imm.evaluation.fid import FIDEvaluator
from imm.tasks import evaluate as evaluate_task
from imm.validation import sampling_plan


def evaluate(run, out, *overrides):
    cfg = compose_task("evaluate", f"ckpt={run.ckpt}", f"tracking.uri={run.uri}", f"out={out}", *overrides)
    return evaluate_task.run(cfg, launch_dir=run.root)


def test_metric_names():
    assert [count_tag(n) for n in (50_000, 5000, 64, 1500, 10_000)] == ["50k", "5k", "64", "1500", "10k"]
    assert fid_metric(50_000, 2) == "eval/fid50k_2step"
    assert fid_metric(50_000, 1, 1.5) == "eval/fid50k_1step_w1.5" and fid_metric(100, 8, 1.0) == "eval/fid100_8step"
    assert metric_name(ratio_family("energy", 5000), 1) == "eval/energy_ratio5k_1step"  # a ratio names its n
    assert metric_name(ratio_family("fd", 1438), 2, 1.5, "evaluate") == "evaluate/fd_ratio1438_2step_w1.5"
    # the evaluate command's own prefixes: never the training's eval/, and one per weights, sampler and grid
    assert evaluate_task.metric_prefix("ema", compose_task("evaluate", "ckpt=x").eval) == "evaluate"
    other = compose_task("evaluate", "ckpt=x", "eval.sampler=restart", "eval.grid=edm").eval
    assert evaluate_task.metric_prefix("online", other) == "evaluate_online_restart_edm"


def test_point_evaluation_repeats_the_training_numbers_and_lands_in_its_run(toy, tmp_path, capsys):
    results = evaluate(toy, tmp_path, "eval.steps=[1,2]")
    for k in ("energy", "sw2", "precision", "recall", "energy_ratio200"):  # n = the 200 held-out points
        assert {f"evaluate/{k}_1step", f"evaluate/{k}_2step"} <= set(results)
    assert {"evaluate/energy_floor", "evaluate/recall_floor"} <= set(results)
    client = MlflowClient(tracking_uri=toy.uri)
    # the training's final evaluation (200 samples, seed 1234) at the checkpoint's step 20, left as it was
    (trained,) = client.get_metric_history(toy.run_id, "eval/energy_1step")
    (evaluated,) = client.get_metric_history(toy.run_id, "evaluate/energy_1step")
    assert trained.step == evaluated.step == 20
    assert evaluated.value == pytest.approx(trained.value, rel=1e-9)  # the same code, the same number
    assert results["evaluate/energy_1step"] == pytest.approx(trained.value, rel=1e-9)
    assert [m.step for m in client.get_metric_history(toy.run_id, "evaluate/sw2_2step")] == [20]
    assert [m.step for m in client.get_metric_history(toy.run_id, "eval/energy_ratio200_1step")] == [20]
    table = capsys.readouterr().out
    assert "1 step" in table and "2 steps" in table and "floor" in table and "energy_ratio200" in table
    assert (tmp_path / "results.txt").read_text().splitlines()[1:] == table.strip().splitlines()[1:]
    assert json.loads((tmp_path / "results.json").read_text())["results"] == pytest.approx(results)
    label = "step00000020-ema"
    logged = {a.path for a in client.list_artifacts(toy.run_id, f"evaluations/{label}")}
    assert f"evaluations/{label}/steps.png" in logged and f"evaluate.{label}" in client.get_run(toy.run_id).data.tags

    online = evaluate(toy, tmp_path / "online", "eval.steps=[1]", "weights=online", "eval.n_samples=100")
    assert "evaluate_online/energy_ratio100_1step" in online
    assert all(k.startswith("evaluate_online/") for k in online)


def test_point_energy_is_the_mean_over_draws_and_the_first_draw_is_unchanged(toy):
    from imm import metrics
    from imm.core import sampling
    from imm.tasks.common import restore

    r = restore(toy.ckpt)
    bundle = r.bundle(need_data=True)
    plan = sampling_plan(EvalConfig(), {"steps": [1, 2]}, schedule=r.param.schedule, T=r.T, eps=r.eps)
    one, three = (Evaluator(bundle, r.param, plan, n_samples=300, draws=d) for d in (1, 3))
    res1, res3 = one(r.net)[0], three(r.net)[0]
    for N in (1, 2):  # the other metrics, the floor and the figure's draw do not depend on `draws`
        for k in ("sw2", "precision", "recall"):
            assert res3[f"eval/{k}_{N}step"] == res1[f"eval/{k}_{N}step"]
        energies = [res1[f"eval/energy_{N}step"]]
        for noise in three.more_noise:  # the further draws, decoded independently of the Evaluator
            x = sampling.sample(r.net, r.param, noise, three.grids[N], sampler="pushforward")
            energies.append(metrics.energy_distance(x.float(), bundle.heldout))
        assert len(set(energies)) == 3  # independent draws
        assert res3[f"eval/energy_{N}step"] == pytest.approx(sum(energies) / 3, rel=1e-9)
        assert res3[f"eval/energy_sd_{N}step"] == pytest.approx(torch.tensor(energies).std().item(), rel=1e-6)
        assert f"eval/energy_sd_{N}step" not in res1
        assert res3[f"eval/energy_ratio300_{N}step"] == pytest.approx(
            res3[f"eval/energy_{N}step"] / res3["eval/energy_floor"]
        )
    assert res3["eval/energy_floor"] == res1["eval/energy_floor"]
    with pytest.raises(ValueError, match="draws must be a positive integer"):
        Evaluator(bundle, r.param, plan, n_samples=300, draws=0)


def test_point_evaluation_refuses_guidance_and_zero_draws(toy, tmp_path):
    with pytest.raises(ConfigError, match="needs a class-conditional model"):
        evaluate(toy, tmp_path, "eval.guidance=[1.0,1.5]")
    with pytest.raises(ConfigError, match=r"^eval.draws=0 is out of range; eval.draws must be >= 1\.$"):
        evaluate(toy, tmp_path, "eval.draws=0")


def test_tiny_random_features_fid_is_zero_for_the_same_set_and_grows_with_a_shift():
    bundle = factory.dataset(compose_cfg("experiment=digits"))
    ev = FIDEvaluator(feature_net=TinyRandomFeatures(), device="cpu")
    ev.prepare_reference(bundle.train.data, "digits")
    same = ev.fid(bundle.train.data)
    shifted = [ev.fid((bundle.train.data + s).clamp(-1, 1)) for s in (0.1, 0.3, 0.6)]
    assert abs(same) < 1e-3 * shifted[0] and shifted == sorted(shifted)


@pytest.mark.slow
def test_fid_command_end_to_end_logs_into_the_checkpoint_run(digits, tmp_path):
    cache = tmp_path / "fid_cache"
    proc = launch(
        digits.root,
        "--config-name",
        "evaluate",
        f"ckpt={digits.ckpt}",
        "eval.feature_net=toynets:TinyRandomFeatures",
        "eval.n_samples=40",
        "eval.batch_size=16",
        "eval.steps=[1,2]",
        "eval.guidance=[1,1.5]",
        f"eval.fid_cache={cache}",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fid40 w=1.5" in proc.stdout and "2 steps" in proc.stdout
    assert len(list(cache.glob("digits-*-toynets-TinyRandomFeatures.pt"))) == 1
    run = MlflowClient(tracking_uri=digits.uri).get_run(digits.run_id)
    names = {f"evaluate/fid40_{n}step{w}" for n in (1, 2) for w in ("", "_w1.5")}
    names |= {f"evaluate/{m}_{n}step{w}" for m in ("fd_ratio40", "accuracy") for n in (1, 2) for w in ("", "_w1.5")}
    assert names <= set(run.data.metrics)
    assert all(run.data.metrics[k] > 0 for k in names if "accuracy" not in k)  # 4 training steps: far from the data
    assert len(list(cache.glob("digits-*-classifier.pt"))) == 1  # the classifier metric's network, cached beside
    client = MlflowClient(tracking_uri=digits.uri)
    assert [m.step for m in client.get_metric_history(digits.run_id, "evaluate/fid40_2step_w1.5")] == [4]


def test_fid_reference_statistics_come_from_the_cache_the_second_time(digits, tmp_path, caplog):
    common = (
        "eval.feature_net=toynets:TinyRandomFeatures",
        "eval.n_samples=16",
        "eval.steps=[1]",
        f"eval.fid_cache={tmp_path}/c",
        "eval.classifier=false",
        "tracking.enabled=false",
    )
    with caplog.at_level("INFO", logger="imm.evaluate"):
        first = evaluate(digits, tmp_path / "a", *common)
        second = evaluate(digits, tmp_path / "b", *common)
    sources = [r.getMessage() for r in caplog.records if "reference statistics" in r.getMessage()]
    assert sources[0].startswith("FID reference statistics: computed") and "cache" in sources[1].split()[3]
    assert set(first) == {"evaluate/fid16_1step_w1.5", "evaluate/nfe_1step_w1.5"}  # the run's eval.guidance (1.5)
    assert second == pytest.approx(first)  # same seed, same noise, same statistics


def test_training_evaluator_adds_fid_when_eval_fid_is_true(digits, tmp_path):
    cfg = compose_cfg(*DIGITS, "eval.fid=true", "eval.steps=[1,2]", "eval.classifier=false")
    bundle = factory.dataset(cfg)
    torch.manual_seed(0)
    net = factory.net(cfg, bundle.shape, bundle.num_classes)
    ev = Evaluator.from_config(
        cfg,
        bundle,
        factory.parameterization(cfg),
        fid_n_samples=24,
        feature_net="toynets:TinyRandomFeatures",
        fid_cache=tmp_path,
    )
    results, figs, samples = ev(net)
    assert (
        set(results)
        == {
            "eval/fid24_1step_w1.5",
            "eval/fid24_2step_w1.5",
            "eval/nfe_1step_w1.5",
            "eval/nfe_2step_w1.5",
        }
        and "figures/steps.png" in figs
    )
    assert samples[1].shape == (8, 1, 16, 16)  # the figure's fixed noise (eval.n_samples=8)
    off = Evaluator.from_config(compose_cfg(*DIGITS, "eval.classifier=false"), bundle, factory.parameterization(cfg))
    assert off.fid_evaluator is None and off(net)[0] == {"eval/nfe_1step_w1.5": 2}  # no FID; the NFE
    missing = compose_cfg(*DIGITS, "eval.fid=true", f"eval.inception_weights={tmp_path}/none.pth")
    with pytest.raises(ConfigError, match="Inception-v3 weights for FID not found"):  # before training starts
        Evaluator.from_config(missing, bundle, factory.parameterization(cfg))


@pytest.mark.slow
def test_missing_inception_weights_exit_2_with_the_message(digits, tmp_path):
    client = MlflowClient(tracking_uri=digits.uri)
    before = client.get_run(digits.run_id).data
    torch_home = tmp_path / "torch_home"  # an empty torch.hub cache, and downloading disabled
    proc = launch(
        tmp_path,
        "--config-name",
        "evaluate",
        f"ckpt={digits.ckpt}",
        f"tracking.uri={digits.uri}",
        "eval.allow_download=false",
        "eval.n_samples=16",
        env=one_thread_env({"TORCH_HOME": str(torch_home), "XDG_CACHE_HOME": str(tmp_path / "xdg")}),
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Inception-v3 weights for FID not found" in out and "downloading is disabled" in out
    assert "eval.inception_weights" in out and str(torch_home) in out and "Traceback" not in out
    assert sum("Inception-v3" in line for line in out.splitlines()) == 1  # one sentence on one line
    assert "eval.inception_weights=/path/to/weights-inception-2015-12-05-6726825d.pth." in out
    after = client.get_run(digits.run_id).data
    assert (after.metrics, after.tags) == (before.metrics, before.tags)  # nothing evaluated, nothing logged


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("tiny_random", "is inception or module:Class"),
        ("no_such_module:Net", "module no_such_module cannot be imported"),
        ("toynets:NoSuchNet", "toynets has no nn.Module class NoSuchNet"),
        ("toynets:torch", "toynets has no nn.Module class torch"),  # a module, not a class
    ],
)
def test_a_feature_net_that_cannot_be_had_is_one_sentence_before_any_work(digits, tmp_path, value, said):
    with pytest.raises(ConfigError, match=said):
        evaluate(digits, tmp_path, f"eval.feature_net={value}", "eval.n_samples=16")
    assert not (tmp_path / "results.json").exists()


def test_missing_inception_weights_file(digits, tmp_path):
    with pytest.raises(ConfigError, match="points to a file that does not exist"):
        evaluate(digits, tmp_path, f"eval.inception_weights={tmp_path}/inception.pth", "eval.n_samples=16")
