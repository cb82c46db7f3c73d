"""NFE accounting (issue 18, item 6): the number of network function evaluations beside every step count, with
classifier-free guidance in one doubled call counted as 2 per step (the paper's Table 2 footnote)."""

import json

import pytest
import torch
from helpers import compose_task
from mlflow.tracking import MlflowClient

from imm import nets, report
from imm.core import parameterization, sampling
from imm.evaluation.evaluator import nfe_metric
from imm.tasks import evaluate as evaluate_task
from imm.tasks import sample as sample_task

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors (conftest.py)


def test_nfe_is_steps_times_two_with_guidance():
    assert [sampling.nfe(N) for N in (1, 2, 4, 8)] == [1, 2, 4, 8]
    assert [sampling.nfe(N, 1.5) for N in (1, 2, 4, 8)] == [2, 4, 8, 16]  # Table 2: NFE = 2 x steps with CFG
    assert sampling.nfe(8, 1.25) == 16 and sampling.nfe(3, 1.0) == 3
    with pytest.raises(ValueError, match="positive integer"):
        sampling.nfe(0)
    assert nfe_metric(8, 1.5) == "eval/nfe_8step_w1.5" and nfe_metric(2, prefix="sample") == "sample/nfe_2step"


@pytest.mark.parametrize("sampler", ["pushforward", "restart"])
@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_nfe_counts_what_the_samplers_evaluate(sampler, guidance):
    """Per sample, the rows the network sees over all its calls: N calls, each on a doubled batch with guidance."""
    torch.manual_seed(0)
    net = nets.build("dit_s_2", (1, 8, 8), num_classes=3, hidden_size=16, depth=1, num_heads=2)
    rows = []
    net.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    param = parameterization.get("euler_fm", schedule="fm")
    n = 5
    for N in (1, 2, 4):
        rows.clear()
        grid = sampling.time_grid("uniform", N, schedule="fm")
        noise = torch.randn(n, 1, 8, 8) * 0.5
        labels = torch.arange(n) % 3
        sampling.sample(net, param, noise, grid, sampler=sampler, labels=labels, guidance=guidance, null_label=3)
        assert sum(rows) / n == sampling.nfe(N, guidance) and len(rows) == N


def test_evaluate_table_shows_the_nfe_beside_the_step_counts():
    results = {
        "eval/fid50k_1step_w1.5": 8.05,
        "eval/fid50k_8step_w1.5": 1.99,
        "eval/nfe_1step_w1.5": 2,
        "eval/nfe_8step_w1.5": 16,
    }
    lines = evaluate_task.table(results).splitlines()
    assert lines[0].split() == ["metric", "1", "step", "8", "steps"]
    assert lines[2].split() == ["nfe", "w=1.5", "2", "16"]


def test_sample_and_evaluate_log_the_nfe(digits, tmp_path):
    """The digits run evaluates with guidance 1.5: NFE = 2 x steps; guidance 1 (an override): NFE = steps."""
    cfg = compose_task(
        "sample", f"ckpt={digits.ckpt}", f"tracking.uri={digits.uri}", f"out={tmp_path}", "steps=2", "n=4"
    )
    record = sample_task.run(cfg, launch_dir=digits.root)
    assert record["nfe"] == 4 and json.loads((tmp_path / "sample.json").read_text())["nfe"] == 4
    client = MlflowClient(tracking_uri=digits.uri)
    assert client.get_run(digits.run_id).data.metrics["sample/nfe_2step_w1.5"] == 4
    assert json.loads(client.get_run(digits.run_id).data.tags[f"samples.{record['label']}"])["nfe"] == 4
    cfg = compose_task(
        "evaluate",
        f"ckpt={digits.ckpt}",
        f"out={tmp_path / 'e'}",
        "eval.feature_net=toynets:TinyRandomFeatures",
        "eval.n_samples=8",
        "eval.steps=[1,4]",
        "eval.guidance=[1.0,1.5]",
        f"eval.fid_cache={tmp_path / 'fid'}",
        "tracking.enabled=false",
    )
    results = evaluate_task.run(cfg, launch_dir=digits.root)
    nfe = {k: v for k, v in results.items() if "/nfe_" in k}
    assert nfe == {
        "evaluate/nfe_1step": 1,
        "evaluate/nfe_4step": 4,
        "evaluate/nfe_1step_w1.5": 2,
        "evaluate/nfe_4step_w1.5": 8,
    }


def test_report_shows_the_nfe_of_guided_sampling(tmp_path):
    """A real MLflow store holding a two-run guidance sweep, as the sweep callback tags it."""
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("imm")
    parent = client.create_run(exp, run_name="sweep", tags={"sweep.role": "parent", "sweep.keys": "eval.guidance"})
    pid = parent.info.run_id
    for w, fid in (("1.0", 3.0), ("1.5", 2.0)):
        child = client.create_run(exp, run_name=f"eval.guidance={w}", tags={"sweep.id": pid, "sweep.role": "child"})
        client.log_param(child.info.run_id, "eval.guidance", w)
        tag = "" if w == "1.0" else f"_w{w}"
        for name, value in {f"final/fid5k_8step{tag}": fid, f"final/nfe_8step{tag}": 8 if w == "1.0" else 16}.items():
            client.log_metric(child.info.run_id, name, value)
    parent, children = report.find_sweep(client, pid)
    header, rows = report.table(parent, children, "final/fid5k_8step_w1.5")
    assert "final/nfe_8step_w1.5" in header and "final/nfe_8step" not in header  # unguided NFE = the step count
    assert [r[header.index("final/nfe_8step_w1.5")] for r in rows] == ["16", ""]
    header, rows = report.table(parent, children, "final/fid5k_8step", ["final/nfe_8step"])
    assert header[-1] == "final/nfe_8step" and rows[0][-1] == "8"
