"""The MLflow record of a training run, read back through the MLflow client: MLflow's standard tags
(user, source, commit, description with the command line), system metrics, the dataset as a run input,
launch.log and the final EMA weights as artifacts."""

import getpass
import json
import subprocess

import pytest
from helpers import LAUNCH, ROOT, compose_cfg, launch
from mlflow.tracking import MlflowClient

from imm import data, factory

RUN = ("debug=toy", "train.steps=200", "train.log_every=50")


def only_run(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("imm").experiment_id])
    return client, run


@pytest.mark.slow
def test_a_run_records_tags_description_system_metrics_dataset_log_and_weights(tmp_path):
    run_dir = tmp_path / "run"
    args = (*RUN, "tracking.system_metrics_every=0.2", "tracking.log_weights=true", f"hydra.run.dir={run_dir}")
    launch(tmp_path, *args, check=True)
    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"

    tags = run.data.tags
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.user"] == getpass.getuser()
    assert tags["mlflow.source.name"] == str(LAUNCH) and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.git.commit"] == commit and tags["git.dirty"] in ("true", "false")
    note = tags["mlflow.note.content"]
    assert note.startswith(f"`python {LAUNCH} {' '.join(args)}`")  # the command line, then what the run trains
    assert "IMM (k=12, a=1, b=4, M=4" in note and "checkerboard (2000 samples of shape (2,))" in note

    system = [k for k in run.data.metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system and "system/system_memory_usage_megabytes" in system
    history = client.get_metric_history(run.info.run_id, "system/system_memory_usage_megabytes")
    assert [m.step for m in history] == list(range(len(history))) and history[0].value > 0

    (entry,) = run.inputs.dataset_inputs
    dataset = entry.dataset
    bundle = factory.dataset(compose_cfg(*RUN))
    assert (dataset.name, dataset.digest) == ("checkerboard", data.digest(bundle))
    assert json.loads(dataset.profile) == {"num_rows": 2000, "sample_shape": [2], "num_classes": 0}
    assert json.loads(dataset.schema)["mlflow_tensorspec"]["features"]  # the sample tensor's dtype and shape
    assert [(t.key, t.value) for t in entry.tags] == [("mlflow.data.context", "train")]

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"launch.log", "weights", "config.yaml"} <= artifacts
    log = client.download_artifacts(run.info.run_id, "launch.log", str(tmp_path / "download"))
    text = open(log).read()
    assert "step 200/200 loss" in text and "run FINISHED: step 0 -> 200 of 200" in text  # the whole log, summary too
    (weights,) = [a.path for a in client.list_artifacts(run.info.run_id, "weights")]
    assert weights == "weights/snapshot-00000200.pt"


def test_the_data_digest_names_the_samples():
    one, same, other = (factory.dataset(compose_cfg("debug=toy", *o)) for o in ([], [], ["data.seed=1"]))
    assert data.digest(one) == data.digest(same) != data.digest(other)
    assert len(data.digest(one)) == 8


@pytest.mark.slow
def test_system_metrics_switch_off(tmp_path):
    launch(tmp_path, "debug=toy", "train.steps=100", "tracking.system_metrics=false", check=True)
    _, run = only_run(tmp_path)
    assert run.info.status == "FINISHED" and not [k for k in run.data.metrics if k.startswith("system/")]
    assert "weights" not in {
        a.path for a in MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").list_artifacts(run.info.run_id)
    }
