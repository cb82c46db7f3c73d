"""Shared fixtures (a real SLURM cluster, a real toy sweep, one torch thread); shared helpers are in
tests/helpers/."""

from types import SimpleNamespace

import pytest
from helpers import ROOT, compose_cfg, launch  # noqa: F401  (compose_cfg, ROOT: still importable from conftest)
from slurm_fixture import slurm_cluster  # noqa: F401  (the real single-node SLURM cluster)


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module of tiny tensors (`pytestmark = pytest.mark.usefixtures("single_thread")`):
    extra intra-op threads only add synchronisation, and stall when other processes share the cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


KERNELS = ("paper", "inv_stride", "unit")  # the toy sweep's three jobs
# The toy sweep's jobs: debug=toy, a little longer, evaluated twice at 1 and 2 steps, system metrics every second.
SWEEP_TINY = [
    "debug=toy",
    "train.steps=60",
    "eval.every=30",
    "eval.n_samples=300",
    "eval.steps=[1,2]",
    "data.n_heldout=300",
    "tracking.system_metrics_every=1",
]


@pytest.fixture(scope="session")
def toy_sweep(tmp_path_factory):
    """A real 3-job toy sweep over the kernel weighting (inline, so research presets in sweeps/ can change
    freely; tests/test_presets.py composes those), short runs, in a fresh MLflow store."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("toy_sweep")
    proc = launch(root, "-m", f"kernel={','.join(KERNELS)}", *SWEEP_TINY, f"hydra.sweep.dir={root}/sweep", timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("imm")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("sweep.role") == "child"}
    return {
        "root": root,
        "uri": uri,
        "sweep_dir": root / "sweep",
        "experiment_id": exp.experiment_id,
        "parent": parent,
        "children": children,
        "client": client,
        "output": proc.stdout + proc.stderr,
    }


# -- tiny finished training runs for the sample and evaluate commands -----------------------------------
TOY = ("debug=toy", "train.threads=null", "train.steps=20", "train.ckpt_every=20")
DIGITS = (
    "experiment=digits",
    "arch.hidden_size=32",
    "arch.depth=1",
    "arch.num_heads=2",
    "train.steps=4",
    "train.batch_size=16",
    "train.ckpt_every=4",
    "train.log_every=2",
    "eval.every=0",
    "eval.steps=[1]",
    "eval.n_samples=8",
    "eval.classifier=false",  # the classifier metric has its own tests (tests/test_classifier_metric.py)
)


def trained(root, *overrides, name):
    """A finished tiny training run (in this process): its checkpoint, MLflow store and run id."""
    from imm.training import checkpoint
    from imm.training.loop import train

    uri = f"sqlite:///{root}/mlflow.db"
    train(compose_cfg(*overrides), root / "run", tracking_uri=uri, run_name=name)
    ckpt = checkpoint.list_checkpoints(root / "run")[-1]
    run_id = checkpoint.load(ckpt)["mlflow_run_id"]
    assert run_id
    return SimpleNamespace(root=root, run_dir=root / "run", ckpt=ckpt, uri=uri, run_id=run_id)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A 20-step toy run (debug=toy)."""
    return trained(tmp_path_factory.mktemp("toy"), *TOY, name="toy")


@pytest.fixture(scope="session")
def classifier_cache(tmp_path_factory):
    """A directory for eval.fid_cache holding digits' evaluation classifier (trained once per session)."""
    from imm.data import build_dataset
    from imm.evaluation.classifier import ClassifierMetric
    from imm.evaluation.evaluator import fid_cache_file, fid_dataset_key

    bundle = build_dataset("digits", heldout_fraction=0.2)
    key, cache = fid_dataset_key(bundle), tmp_path_factory.mktemp("classifier")
    return cache, bundle, ClassifierMetric(bundle, 5000, fid_cache_file(cache, key, "classifier"), key)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A 4-step class-conditional digits run with a 1-block DiT."""
    return trained(tmp_path_factory.mktemp("digits"), *DIGITS, name="digits")
