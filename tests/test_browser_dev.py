"""Development test for the real-browser MLflow UI helpers (tests/browser/ui.py).

Builds a small sweep-shaped tracking store with the MLflow client (one parent
run, three nested child runs with a swept param, metrics and a PNG artifact),
serves it with ``mlflow server`` and checks it in headless Chromium.

Needs Debian's chromium + chromium-driver (.ci/browser-deps.sh) and selenium;
skipped otherwise.  Screenshots go to $IMM_UI_SCREENSHOTS if set, else tmp.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

# tests/ is not a package (and some wheels install a top-level "tests" package),
# so import the helpers the way the other tests import theirs: from tests/ itself.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser import ui  # noqa: E402

pytestmark = pytest.mark.slow

KERNELS = ("paper", "seed", "unit")
PARAM = "kernel.weighting"
IMAGE = "figures/samples.png"


def _png(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rng = np.random.default_rng(0)
    fig, axes = plt.subplots(2, 4, figsize=(4, 2), dpi=80)
    for ax in axes.flat:
        ax.imshow(rng.random((8, 8)), cmap="viridis")
        ax.axis("off")
    fig.suptitle("samples")
    fig.savefig(path)
    plt.close(fig)
    return path


def build_dev_store(root: Path) -> dict:
    """sqlite store + artifacts under ``root``; returns ids/names for the checks."""
    from mlflow.tracking import MlflowClient

    root.mkdir(parents=True, exist_ok=True)
    artifacts = root / "artifacts"
    artifacts.mkdir(exist_ok=True)
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("sweep-test", artifact_location=artifacts.as_uri())
    parent = client.create_run(exp_id, run_name="sweep kernel_weighting").info.run_id
    image = _png(root / "samples.png")
    children = {}
    for i, kernel in enumerate(KERNELS):
        run = client.create_run(
            exp_id, run_name=f"kernel={kernel}", tags={"mlflow.parentRunId": parent}
        ).info.run_id
        client.log_param(run, PARAM, kernel)
        for step in range(5):
            client.log_metric(run, "train/loss", 1.0 / (step + 1) + 0.1 * i, step=step)
        client.log_metric(run, "final/energy_1step", 0.5 + 0.1 * i)
        client.log_artifact(run, str(image), artifact_path=os.path.dirname(IMAGE))
        client.set_terminated(run)
        children[f"kernel={kernel}"] = run
    client.set_terminated(parent)
    return {"uri": uri, "artifacts": artifacts, "experiment_id": exp_id,
            "parent": parent, "children": children}


def _nontrivial_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert len(data) > 20_000, f"{path} is suspiciously small ({len(data)} bytes)"


@pytest.mark.timeout(900)
def test_mlflow_ui_sweep_in_browser(tmp_path, monkeypatch):
    reason = ui.browser_missing_reason()
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    t0 = time.monotonic()
    store = build_dev_store(tmp_path / "store")
    shots = Path(os.environ.get("IMM_UI_SCREENSHOTS") or tmp_path / "screenshots")
    names = sorted(store["children"])
    timings = {"store": time.monotonic() - t0}

    with ui.mlflow_server(store["uri"], store["artifacts"]) as base:
        timings["server"] = time.monotonic() - t0 - sum(timings.values())
        with ui.chromium_driver(shots) as driver:
            paths = []
            paths.append(ui.open_experiment(driver, base, store["experiment_id"], expected_runs=4))
            visible = ui.run_names_visible(driver)
            assert "sweep kernel_weighting" in visible, visible
            assert set(names) <= set(visible), visible

            paths.append(ui.show_param_column(driver, PARAM, KERNELS))
            assert ui.param_values_visible(driver, PARAM) == {
                f"kernel={k}": k for k in KERNELS} | {"sweep kernel_weighting": "-"}
            paths.append(ui.show_metric_column(driver, "final/energy_1step", ["0.5", "0.6", "0.7"]))

            # reopening keeps the children visible (expanded state persists in
            # localStorage; the helper must not collapse them again)
            ui.open_experiment(driver, base, store["experiment_id"], expected_runs=4)
            assert set(names) <= set(ui.run_names_visible(driver))

            run_ids = [store["children"][n] for n in names]
            paths.append(ui.open_compare(driver, base, run_ids, store["experiment_id"],
                                         expected_names=names, param_key=PARAM))
            table = ui.compare_table(driver)
            assert table["Run Name:"] == names, table
            assert table[PARAM] == list(KERNELS), table

            paths.append(ui.open_artifact(driver, base, store["experiment_id"], run_ids[0], IMAGE))
            (img,) = [i for i in ui.rendered_images(driver) if i["alt"] == IMAGE]
            assert img["natural"][0] > 100, img
            timings["browser"] = time.monotonic() - t0 - sum(timings.values())

    for p in paths:
        _nontrivial_png(p)
    print("screenshots:", *map(str, paths), sep="\n  ")
    print("timings:", {k: round(v, 1) for k, v in timings.items()})
