"""Comparing runs: what a sweep's runs carry, the report command, and the MLflow UI in a real browser."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import conftest
import pytest
from helpers import LAUNCH, ROOT

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser import ui  # noqa: E402

KERNELS = tuple(sorted(conftest.KERNELS))  # the toy sweep's values, sorted as the run names are compared
NAMES = [f"kernel={k}" for k in KERNELS]
PARAM = "kernel.weighting"


@pytest.mark.slow
def test_sweep_runs_carry_names_params_tags_metrics_and_figures(toy_sweep):
    client, parent, children = toy_sweep["client"], toy_sweep["parent"], toy_sweep["children"]
    assert sorted(children) == NAMES and parent.info.status == "FINISHED"
    for name, run in children.items():
        assert run.data.params[PARAM] == name.split("=")[1]
        assert run.data.params["loss.k"] == "12" and run.data.params["train.steps"] == "60"
        tags = run.data.tags
        assert tags["sweep.id"] == parent.info.run_id == tags["mlflow.parentRunId"]
        assert tags["hydra.job.num"] in {"0", "1", "2"} and tags["device"] == "cpu" and tags["world_size"] == "1"
        assert len(tags["mlflow.source.git.commit"]) == 40 and tags["mlflow.source.name"] == str(LAUNCH)
        assert tags["mlflow.note.content"].startswith(f"`python {LAUNCH} {name} ")  # this job alone, as one run
        assert any(k.startswith("system/") for k in run.data.metrics)
        for key in (
            "train/loss",
            "train/grad_norm",
            "train/lr",
            "train/samples_per_s",
            "eval/energy_1step",
            "eval/energy_2step",
            "eval/recall_2step",
            "final/energy_1step",
            "best/energy_2step",
        ):
            assert key in run.data.metrics, key
        assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/energy_1step")] == [30, 60]
        figures = [a.path for a in client.list_artifacts(run.info.run_id, "figures")]
        assert len(figures) == 2 and all(f.endswith(".png") for f in figures)
        assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    # a job's summary (jobs run in this process, whose command line is the whole sweep's) points at the sweep
    train_on = [
        line.split("train on", 1)[1].strip() for line in toy_sweep["output"].splitlines() if "train on " in line
    ]
    assert train_on == ["run the sweep command again with a larger train.steps"] * len(NAMES), train_on


@pytest.mark.slow
def test_report_command_tables_and_plots_a_sweep(toy_sweep, tmp_path):
    out = tmp_path / "loss.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "imm.report",
            str(toy_sweep["sweep_dir"]),
            "--tracking-uri",
            toy_sweep["uri"],
            "--metric",
            "final/energy_1step",
            "--plot",
            "train/loss",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = lines[1].split()
    assert header[:3] == ["run", PARAM, "status"] and "final/energy_1step" in header
    rows = [ln.split() for ln in lines[3:6]]
    col = header.index("final/energy_1step")
    energies = [float(r[col]) for r in rows]
    assert energies == sorted(energies) and sorted(r[0] for r in rows) == NAMES
    assert out.is_file() and out.stat().st_size > 10_000
    by_id = subprocess.run(
        [
            sys.executable,
            "-m",
            "imm.report",
            toy_sweep["parent"].info.run_id,
            "--tracking-uri",
            toy_sweep["uri"],
            "--out",
            str(tmp_path / "b.png"),
        ],
        capture_output=True,
        text=True,
    )
    assert by_id.returncode == 0 and by_id.stdout.splitlines()[3:6] == lines[3:6]


def test_report_reads_a_ratio_named_without_its_n(tmp_path):
    """--metric/--columns final/energy_ratio_1step find each run's final/energy_ratio<n>_1step (real MLflow store)."""
    from mlflow.tracking import MlflowClient

    from imm import report

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("imm")
    parent = client.create_run(exp, run_name="sweep", tags={"sweep.role": "parent", "sweep.keys": "loss.k"})
    pid = parent.info.run_id
    for k, name, ratio in (("8", "final/energy_ratio5k_1step", 3.0), ("12", "final/energy_ratio2k_1step", 2.0)):
        child = client.create_run(exp, run_name=f"loss.k={k}", tags={"sweep.id": pid, "sweep.role": "child"})
        client.log_param(child.info.run_id, "loss.k", k)
        client.log_metric(child.info.run_id, name, ratio)
    parent, children = report.find_sweep(client, pid)
    header, rows = report.table(parent, children, "final/energy_ratio_1step", ["final/energy_ratio_1step"])
    assert header.count("final/energy_ratio_1step") == 1
    column = header.index("final/energy_ratio_1step")
    assert [(r[0], r[column]) for r in rows] == [("loss.k=12", "2"), ("loss.k=8", "3")]  # sorted by it


def _printed_addresses_show_the_run(toy_sweep, base: str, shots: Path) -> None:
    """A first visit (no UI settings stored): the run page and runs table addresses a job's summary printed
    (launch.log) show that run, where the UI's own front page is MLflow 3's GenAI "Send your first trace"."""
    child = toy_sweep["children"][NAMES[0]]
    summary = (Path(child.data.tags["run_dir"]) / "launch.log").read_text()
    printed = {label: re.search(rf"{label} +(\S+)", summary)[1] for label in ("run page", "runs table")}
    parent = toy_sweep["parent"].info.run_id  # the sweep's last line: the parent run's page
    assert f"the sweep's parent run {printed['runs table']}/{parent};" in toy_sweep["output"]
    local = {label: url.replace("http://127.0.0.1:5000", base, 1) for label, url in printed.items()}
    assert local["run page"] != printed["run page"], printed  # the address `mlflow ui` serves by default
    with ui.chromium_driver(shots, presets=False) as driver:
        ui.open_address(driver, local["run page"], [NAMES[0], child.info.run_id, "Overview"], "printed-run-page")
        ui.open_address(driver, local["runs table"], [toy_sweep["parent"].info.run_name], "printed-runs-table")


def _nontrivial_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, path


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mlflow_ui_shows_the_sweep_in_a_real_browser(toy_sweep, tmp_path, monkeypatch):
    reason = ui.browser_missing_reason()
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    shots = Path(os.environ.get("IMM_UI_SCREENSHOTS") or tmp_path / "screenshots")
    children = toy_sweep["children"]
    exp_id = toy_sweep["experiment_id"]
    run_ids = [children[n].info.run_id for n in NAMES]
    figure = [a.path for a in toy_sweep["client"].list_artifacts(run_ids[0], "figures")][-1]
    with ui.mlflow_server(toy_sweep["uri"], toy_sweep["root"] / "mlartifacts") as base:
        _printed_addresses_show_the_run(toy_sweep, base, shots)
        with ui.chromium_driver(shots) as driver:
            paths = [ui.open_experiment(driver, base, exp_id, expected_runs=4)]
            visible = ui.run_names_visible(driver)
            assert set(NAMES) <= set(visible) and toy_sweep["parent"].info.run_name in visible, visible
            paths.append(ui.show_param_column(driver, PARAM, KERNELS))
            assert {k: v for k, v in ui.param_values_visible(driver, PARAM).items() if k in NAMES} == {
                n: n.split("=")[1] for n in NAMES
            }
            paths.append(ui.open_compare(driver, base, run_ids, exp_id, expected_names=NAMES, param_key=PARAM))
            table = ui.compare_table(driver)
            assert table["Run Name:"] == NAMES and table[PARAM] == list(KERNELS), table
            compare_shot = paths[-1]
            paths.append(ui.open_artifact(driver, base, exp_id, run_ids[0], figure))
            (img,) = [i for i in ui.rendered_images(driver) if i["alt"] == figure]
            assert img["natural"][0] > 200, img
            # the run page: the description (command line, what it trains), system metrics, the dataset
            child = children[NAMES[0]]
            command, summary = child.data.tags["mlflow.note.content"].split("\n\n")
            shown = [command.strip("`"), summary[:60], "System metrics", "system/cpu_utilization_percentage"]
            paths.append(ui.open_run(driver, base, exp_id, child.info.run_id, [*shown, "checkerboard"]))
            run_shot = paths[-1]
    for p in paths:
        _nontrivial_png(p)
    print("screenshots:", *map(str, paths), sep="\n  ")
    if os.environ.get("IMM_UPDATE_DOCS"):  # regenerate the docs' screenshots from this test
        shutil.copy(compare_shot, ROOT / "docs" / "figures" / "mlflow_compare.png")
        shutil.copy(run_shot, ROOT / "docs" / "figures" / "mlflow_run.png")


def _hand_made_sweep(root: Path, weightings=("paper", "inv_stride", "unit")) -> tuple[str, Path]:
    """A sweep over the kernel weighting in a real MLflow store, written through the client: (uri, sweep dir)."""
    import json

    from mlflow.tracking import MlflowClient

    uri, sweep_dir = f"sqlite:///{root}/mlflow.db", root / "sweep"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("imm")
    tags = {"sweep.role": "parent", "sweep.keys": "kernel", "sweep.dir": str(sweep_dir)}
    parent = client.create_run(exp, run_name="sweep kernel_weighting sweep", tags=tags).info.run_id
    for i, weighting in enumerate(weightings):
        run = client.create_run(exp, run_name=f"kernel={weighting}", tags={"sweep.id": parent, "sweep.role": "child"})
        rid = run.info.run_id
        client.log_param(rid, "kernel.weighting", weighting)
        client.log_param(rid, "loss.objective", "imm")
        for step in (10, 20):  # a loss on each weighting's own scale; evaluation metrics on one scale
            client.log_metric(rid, "train/loss", 0.3 / (i + 1) ** 2 / step, step=step)
            client.log_metric(rid, "eval/energy_ratio5k_1step", 3.0 + i - step / 10, step=step)
            client.log_metric(rid, "eval/energy_ratio5k_2step", 4.0 + i, step=step)
            client.log_metric(rid, "eval/recall_1step", 0.9, step=step)
        client.log_metric(rid, "final/energy_1step", 0.01 * (i + 1), step=20)
        client.log_metric(rid, "final/loss", 0.3 / (i + 1) ** 2, step=20)
        client.set_terminated(rid)
    client.set_terminated(parent)
    sweep_dir.mkdir()
    (sweep_dir / "sweep.json").write_text(json.dumps({"parent_run_id": parent, "keys": ["kernel"], "argv": []}))
    return uri, sweep_dir


@pytest.mark.slow
def test_report_plots_the_shared_evaluation_metric_into_the_sweep_dir_and_never_mixes_loss_scales(tmp_path):
    """python -m imm.report: the default plot is the evaluation metric all runs share (not train/loss, whose scale
    the kernel weighting sets), the PNG goes into the sweep directory, the header names the sweep once; a loss
    asked for gets a panel per weighting, and says so."""
    uri, sweep_dir = _hand_made_sweep(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def report(*args):
        proc = subprocess.run(
            [sys.executable, "-m", "imm.report", str(sweep_dir), "--tracking-uri", uri, *args],
            capture_output=True,
            text=True,
            cwd=elsewhere,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    lines = report()
    assert lines[0].startswith("sweep kernel_weighting sweep (") and "3 runs" in lines[0], lines[0]
    assert (
        lines[-2]
        == "(a loss column is on each run's own scale, set by loss.objective and kernel.weighting: not a ranking)"
    )
    png = sweep_dir / "report-eval_energy_ratio5k_1step.png"
    assert lines[-1] == f"plot of eval/energy_ratio5k_1step against step: {png}", lines[-1]
    assert png.is_file() and not list(elsewhere.iterdir())
    loss = report("--plot", "train/loss")[-1]
    assert loss == (
        "plot of train/loss against step (a panel per loss.objective and kernel.weighting: a loss's scale depends"
        f" on them): {sweep_dir / 'report-train_loss.png'}"
    ), loss
