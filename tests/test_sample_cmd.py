"""`launch.py --config-name sample`: samples from real (tiny) training checkpoints, files, MLflow entries.

The checkpoints come from very short real trainings (imm.training.loop.train) into a real SQLite
MLflow store; the sample configs are composed by Hydra from conf/sample.yaml.
"""

import datetime
import json
import re

import numpy as np
import pytest
import torch
from conftest import TOY
from helpers import compose_cfg, compose_task, launch
from mlflow.tracking import MlflowClient

from imm import factory
from imm.core import sampling
from imm.data.points import Standardizer
from imm.errors import ConfigError
from imm.tasks import sample as sample_task
from imm.tracking.mlflow_run import TrackingError
from imm.training import checkpoint

UNIFORM_4 = [0.994, 0.7455, 0.497, 0.2485, 0.0]  # spec section 4
EDM_8 = [0.994, 0.98486, 0.95674, 0.86056, 0.56413, 0.14731, 0.01001, 8e-05, 0.0]


def sample(run, out, *overrides):
    cfg = compose_task("sample", f"ckpt={run.ckpt}", f"tracking.uri={run.uri}", f"out={out}", *overrides)
    return sample_task.run(cfg, launch_dir=run.root)


@pytest.fixture
def net_calls(monkeypatch):
    """Records (batch size, noise_t, noise_s, labels) of every call of the networks the commands build."""
    calls, build = [], factory.net

    def hook(module, args, kwargs):
        x, noise_t, noise_s = args[:3]
        labels = args[3] if len(args) > 3 else kwargs.get("labels")
        calls.append((x.shape[0], noise_t.clone(), noise_s.clone(), None if labels is None else labels.clone()))

    def counting_net(*a, **k):
        net = build(*a, **k)
        net.register_forward_pre_hook(hook, with_kwargs=True)
        return net

    monkeypatch.setattr(factory, "net", counting_net)
    return calls


# -- the command through launch.py ----------------------------------------------------------------
@pytest.mark.slow
def test_sample_command_writes_files_and_logs_into_the_training_run(toy, tmp_path):
    proc = launch(toy.root, "--config-name", "sample", f"ckpt={toy.run_dir}", "steps=2", "n=300", "seed=5")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (out,) = (toy.root / "runs" / "samples").glob("*/*")  # the Hydra run directory, under the launch directory
    assert {"samples.npy", "samples.png", "steps.png", "sample.json", ".hydra"} <= {p.name for p in out.iterdir()}
    record = json.loads((out / "sample.json").read_text())
    assert (
        record["ckpt"] == str(toy.run_dir / "snapshots" / "snapshot-00000020.pt")
        and record["step"] == 20
        and record["weights"] == "ema"
    )
    assert record["grid"] == pytest.approx([0.994, 1.4 / 2.4, 0.0])  # 2 steps: the paper's eta = 1.4
    points = np.load(out / "samples.npy")
    assert points.shape == (300, 2) and np.isfinite(points).all()

    client = MlflowClient(tracking_uri=toy.uri)
    run = client.get_run(toy.run_id)  # the checkpoint's own run, found through the default sqlite URI
    assert run.info.status == "FINISHED"  # sampling does not reopen the training run
    label = record["label"]
    assert label == "step00000020-ema-2step-pushforward-eta1.4-n300-seed5"
    logged = {a.path for a in client.list_artifacts(toy.run_id, f"samples/{label}")}
    assert {f"samples/{label}/{f}" for f in ("samples.npy", "samples.png", "steps.png", "sample.json")} <= logged
    assert json.loads(run.data.tags[f"samples.{label}"])["grid"] == pytest.approx(record["grid"])
    assert [m.step for m in client.get_metric_history(toy.run_id, "sample/seconds_2step")] == [20]


@pytest.mark.slow
def test_sample_and_evaluate_agree_on_n_say_the_draws_account_for_the_time_and_link_the_run(toy, tmp_path):
    """By default sample's steps.png and evaluate read ED/floor at one n (the held-out size) and label the noise
    draws behind it; the times sample logs cover the time it took; both print the run's page in the MLflow UI."""
    sampled = launch(toy.root, "--config-name", "sample", f"ckpt={toy.run_dir}", f"out={tmp_path / 's'}")
    evaluated = launch(toy.root, "--config-name", "evaluate", f"ckpt={toy.run_dir}", f"out={tmp_path / 'e'}")
    assert sampled.returncode == 0 and evaluated.returncode == 0, sampled.stderr[-2000:] + evaluated.stderr[-2000:]
    record = json.loads((tmp_path / "s" / "sample.json").read_text())
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert record["n"] == results["n_samples"] == 200  # debug=toy's data.n_heldout
    assert list(record["steps_figure"]["1"]) == ["ED/floor (n=200, 1 draw)", "recall"]
    assert "evaluate/energy_ratio200_1step" in results["results"]  # the mean of eval.draws=8 draws at n = 200

    lines = [line for line in sampled.stderr.splitlines() if "[imm.sample]" in line]
    start = next(line for line in lines if "] - sampling " in line)
    total = float(re.search(r"; ([\d.]+) s in all$", lines[-1])[1])
    elapsed = (_stamp(lines[-1]) - _stamp(start)).total_seconds()
    assert elapsed <= total + 0.05, (elapsed, total, lines)

    experiment = MlflowClient(tracking_uri=toy.uri).get_run(toy.run_id).info.experiment_id
    page = f"in the MLflow UI: http://127.0.0.1:5000/#/experiments/{experiment}/runs/{toy.run_id}"
    assert page in sampled.stderr and page in evaluated.stderr


def _stamp(line: str) -> datetime.datetime:
    return datetime.datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")  # [2026-12-08 00:57:09,501][imm...


@pytest.mark.slow
def test_user_errors_exit_2_with_one_sentence(toy, tmp_path):
    proc = launch(tmp_path, "--config-name", "sample", f"ckpt={toy.ckpt}", "guidance=1.5", f"tracking.uri={toy.uri}")
    assert proc.returncode == 2
    out = proc.stdout + proc.stderr
    assert "guidance=1.5 needs a class-conditional model" in out and "Traceback" not in out
    proc = launch(tmp_path, "--config-name", "sample")
    assert proc.returncode == 2 and "ckpt is missing" in proc.stdout + proc.stderr
    assert "e.g. ckpt=runs/toy/e3b0c442." in proc.stderr  # a run directory as runs are named (runs/<experiment>/<hash>)


# -- what gets sampled ---------------------------------------------------------------------------
def test_samples_are_the_ema_network_decoded_from_the_seed_in_data_units(toy, tmp_path):
    sample(toy, tmp_path / "a", "steps=1", "n=500", "seed=3", "compare_steps=[]")
    got = np.load(tmp_path / "a" / "samples.npy")

    # the same thing by hand: the EMA weights, sigma_d * N(0, I) from the seed, one step T -> eps, unscaled
    state = checkpoint.load(toy.ckpt)
    cfg = compose_cfg(*TOY)
    net = factory.net(cfg, (2,), 0)
    net.load_state_dict({k[len("ema_model.") :]: v for k, v in state["ema"].items() if k.startswith("ema_model.")})
    param = factory.parameterization(cfg)
    noise = param.sigma_data * torch.randn(500, 2, generator=torch.Generator().manual_seed(3))
    x = sampling.sample(net.eval(), param, noise, torch.tensor([0.994, 0.0], dtype=torch.float64))
    expected = Standardizer.from_state_dict(state["standardizer"]).unscale(x.float()).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(got).max() > 1.5  # data units (the checkerboard spans [-4, 4]), not the model's std 0.5

    sample(toy, tmp_path / "b", "steps=1", "n=500", "seed=3", "compare_steps=[]")
    np.testing.assert_array_equal(np.load(tmp_path / "b" / "samples.npy"), got)  # deterministic given the seed
    sample(toy, tmp_path / "c", "steps=1", "n=500", "seed=4", "compare_steps=[]")
    assert not np.allclose(np.load(tmp_path / "c" / "samples.npy"), got)
    sample(toy, tmp_path / "d", "steps=1", "n=500", "seed=3", "compare_steps=[]", "weights=online")
    assert not np.allclose(np.load(tmp_path / "d" / "samples.npy"), got)  # the online weights differ


@pytest.mark.parametrize(
    "overrides,grid",
    [
        (["steps=4"], UNIFORM_4),
        (["steps=8", "grid=edm"], EDM_8),
        (["steps=2"], [0.994, 0.58333, 0.0]),  # the paper's 2-step eta(t_1) = 1.4
        (["steps=2", "two_step_eta=null"], [0.994, 0.497, 0.0]),
        (["steps=3", "grid=eta", "etas=[4.0,0.5]"], [0.994, 0.8, 1 / 3, 0.0]),  # OT-FM: t = eta / (1 + eta)
    ],
)
def test_pushforward_grids_and_network_calls(toy, tmp_path, net_calls, overrides, grid):
    record = sample(toy, tmp_path, "n=10", "batch_size=10", "compare_steps=[]", *overrides)
    assert record["grid"] == pytest.approx(grid, abs=1e-5)
    N = len(grid) - 1
    assert [c[0] for c in net_calls] == [10] * N  # one call per step, the whole batch
    assert [float(c[1][0]) for c in net_calls] == pytest.approx([1000 * t for t in grid[:-1]], abs=1e-2)
    assert [float(c[2][0]) for c in net_calls] == pytest.approx([1000 * t for t in grid[1:]], abs=1e-2)


def test_restart_sampler_jumps_to_the_end_every_step(toy, tmp_path, net_calls):
    record = sample(toy, tmp_path, "n=12", "batch_size=5", "steps=4", "sampler=restart", "compare_steps=[]")
    assert record["grid"] == pytest.approx(UNIFORM_4)
    assert [c[0] for c in net_calls] == [5, 5, 5, 5, 5, 5, 5, 5, 2, 2, 2, 2]  # 3 batches x 4 steps
    assert all(float(c[2][0]) == 0.0 for c in net_calls)  # s = eps = 0 at every call
    assert [float(c[1][0]) for c in net_calls[:4]] == pytest.approx([1000 * t for t in UNIFORM_4[:-1]])


def test_guidance_doubles_the_batch_not_the_calls(digits, tmp_path, net_calls):
    sample(digits, tmp_path / "g", "n=6", "steps=2", "guidance=1.5", "labels=[3,7]", "compare_steps=[]")
    assert [c[0] for c in net_calls] == [12, 12]  # 2 steps, each one call on [conditional; unconditional]
    labels = net_calls[0][3]
    assert labels.tolist() == [3, 7, 3, 7, 3, 7] + [10] * 6  # explicit labels cycled, then the null label
    net_calls.clear()
    sample(digits, tmp_path / "w1", "n=6", "steps=2", "guidance=1", "compare_steps=[]")
    assert [c[0] for c in net_calls] == [6, 6] and net_calls[0][3].tolist() == [0, 1, 2, 3, 4, 5]
    net_calls.clear()
    sample(digits, tmp_path / "u", "n=4", "steps=1", "guidance=1", "labels=uncond", "compare_steps=[]")
    assert net_calls[0][3].tolist() == [10] * 4


def test_step_comparison_decodes_the_same_noise(toy, tmp_path, net_calls):
    record = sample(toy, tmp_path, "n=40", "batch_size=100", "steps=2", "compare_steps=[1,2,4,8]")
    # 2 steps for the samples, then 1, 4 and 8 steps on the same 40 noise draws (2 is reused)
    assert [c[0] for c in net_calls] == [40] * (2 + 1 + 4 + 8)
    assert (tmp_path / "steps.png").stat().st_size > 10_000 and "steps.png" in record["files"]


# -- images ---------------------------------------------------------------------------------------
def test_image_samples_npz_png_and_guidance_default(digits, tmp_path):
    record = sample(digits, tmp_path, "n=12", "steps=1", "seed=1")
    assert record["guidance"] == 1.5  # null: the training run's eval.guidance (the digits experiment's 1.5)
    with np.load(tmp_path / "samples.npz") as z:
        images, u8, labels, grid = z["images"], z["uint8"], z["labels"], z["grid"]
    assert images.shape == (12, 1, 16, 16) and images.dtype == np.float32
    assert images.min() >= -1 and images.max() <= 1
    assert u8.shape == (12, 16, 16, 1) and u8.dtype == np.uint8
    np.testing.assert_array_equal(u8[..., 0], ((images[:, 0] * 127.5 + 128).clip(0, 255)).astype(np.uint8))
    assert labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1] and grid.tolist() == [0.994, 0.0]
    from PIL import Image

    assert Image.open(tmp_path / "samples.png").size == (4 * 18 + 2, 3 * 18 + 2)  # 4 per row, 2 px gaps
    assert Image.open(tmp_path / "steps.png").size[1] > Image.open(tmp_path / "steps.png").size[0] / 8

    client = MlflowClient(tracking_uri=digits.uri)
    logged = {a.path for a in client.list_artifacts(digits.run_id, f"samples/{record['label']}")}
    assert f"samples/{record['label']}/samples.npz" in logged and record["label"].endswith("w1.5-n12-seed1")


# -- where results go and what is refused -----------------------------------------------------------
def test_new_run_when_asked_or_when_the_checkpoint_has_none(toy, tmp_path):
    client = MlflowClient(tracking_uri=toy.uri)
    exp = client.get_experiment_by_name("imm").experiment_id
    before = {r.info.run_id for r in client.search_runs([exp])}
    record = sample(toy, tmp_path, "n=20", "compare_steps=[]", "tracking.new_run=true", "tracking.run_name=mine")
    new = client.get_run(record["mlflow_run_id"])
    assert new.info.run_id not in before and new.info.run_name == "mine" and new.info.status == "FINISHED"
    assert new.data.params["steps"] == "1" and new.data.params["ckpt"] == str(toy.ckpt)
    assert new.data.tags["ckpt.mlflow_run_id"] == toy.run_id

    state = checkpoint.load(toy.ckpt)  # a checkpoint of a run trained with tracking.enabled=false
    state["mlflow_run_id"] = None
    anonymous = tmp_path / "anon" / "checkpoints" / "step-00000020.pt"
    anonymous.parent.mkdir(parents=True)
    torch.save(state, anonymous)
    cfg = compose_task(
        "sample",
        f"ckpt={anonymous.parent.parent}",
        f"tracking.uri={toy.uri}",
        f"out={tmp_path}/o",
        "n=20",
        "compare_steps=[]",
    )
    record = sample_task.run(cfg, launch_dir=tmp_path)
    assert record["mlflow_run_id"] not in before | {new.info.run_id}

    cfg = compose_task("sample", f"ckpt={toy.ckpt}", f"out={tmp_path}/x", "tracking.enabled=false", "n=5")
    assert sample_task.run(cfg, launch_dir=tmp_path)["mlflow_run_id"] is None


def test_refusals(toy, digits, tmp_path):
    def refused(error, match, run, *overrides):
        with pytest.raises(error, match=match):
            sample(run, tmp_path, *overrides)

    refused(ConfigError, "needs a class-conditional model", toy, "guidance=1.5")
    refused(ConfigError, "needs a class-conditional model", toy, "labels=[1]")
    refused(ConfigError, "must be class ids in 0..9", digits, "labels=[10]")
    refused(ConfigError, "nothing to mix", digits, "labels=uncond", "guidance=2")
    refused(ConfigError, "etas=.* must hold steps - 1 = 1", toy, "steps=2", "etas=[1.4,0.5]")
    refused(ConfigError, "no 4-step grid", toy, "steps=1", "grid=eta", "compare_steps=[1,4]")
    refused(ConfigError, "sampler='euler' is not allowed", toy, "sampler=euler")
    cfg = compose_task("sample", f"ckpt={tmp_path}/nowhere.pt", f"out={tmp_path}")
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        sample_task.run(cfg)
    # the checkpoint's run is not in the store the command looks at: say so instead of logging elsewhere
    cfg = compose_task("sample", f"ckpt={toy.ckpt}", f"out={tmp_path}", "n=5")
    with pytest.raises(TrackingError, match="tracking.uri"):
        sample_task.run(cfg, launch_dir=tmp_path)
    assert not (tmp_path / "mlflow.db").exists()
