"""Shared fixtures: a real Hydra compose of conf/ and the repository paths."""

from pathlib import Path

from hydra import compose, initialize_config_dir

from imm.config import register

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

register()


def compose_cfg(*overrides: str):
    """The config launch.py would build for these command-line overrides."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=list(overrides))


import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from slurm_fixture import slurm_cluster  # noqa: E402,F401  (the real single-node SLURM cluster)


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module of tiny tensors (`pytestmark = pytest.mark.usefixtures("single_thread")`):
    extra intra-op threads only add synchronisation, and stall when other processes share the cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


SWEEP_TINY = [
    "train.steps=60",
    "train.batch_size=64",
    "arch.width=32",
    "arch.depth=1",
    "eval.every=30",
    "eval.n_samples=300",
    "eval.steps=[1,2]",
    "data.n_train=2000",
    "data.n_heldout=300",
    "train.log_every=10",
    "train.threads=1",
]


@pytest.fixture(scope="session")
def toy_sweep(tmp_path_factory):
    """A real 3-job toy sweep (+sweep=kernel_weighting, short runs) in a fresh MLflow store."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("toy_sweep")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch.py"),
            "+sweep=kernel_weighting",
            *SWEEP_TINY,
            f"hydra.sweep.dir={root}/sweep",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
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
    }
