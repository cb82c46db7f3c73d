"""Smoke tests of the bench/ scripts at toy sizes: `python -m pytest bench -q` (about a minute).

They check that each script runs end to end on the CPU, prints its table and writes its JSON; the
numbers themselves are the scripts' business (see README, Performance).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent
TINY_DIT = "dit_s_4:hidden_size=32,depth=1,num_heads=2"


def run(script, *args, timeout=600):
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.parametrize(
    "script",
    [
        "step_cost.py",
        "precision_compile.py",
        "few_step_quality.py",
        "sampling_throughput.py",
        "threads.py",
        "accumulation.py",
        "sweep_table.py",
        "methods_table.py",
        "augment_resampling.py",
        "tracking_cost.py",
    ],
)
def test_help(script):
    assert "usage" in run(script, "--help")


def test_step_cost(tmp_path):
    out = tmp_path / "s.json"
    text = run(
        "step_cost.py",
        "--arch",
        "mlp",
        "--arch-override",
        "width=32",
        "--batch",
        "64",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--compare-adamw",
        "--compare-ema",
        "--compare-sync",
        "--methods",
        "--memory-steps",
        "1",
        "--out",
        str(out),
    )
    r = json.loads(out.read_text())
    assert {"imm_over_fm_time", "math_share", "imm_over_fm_memory", "targets", "adamw", "ema", "sync"} <= set(r)
    steps = ("imm_step", "fm_step", "meanflow_step", "ict_step", "meanflow_jvp")
    assert set(steps) <= set(r["over_imm_step"]) and r["over_imm_step"]["imm_step"] == 1.0
    assert all(r["memory"][k]["mb"] > 0 for k in ("meanflow", "ict"))
    assert r["objective_math_ops"] > r["fm_math_ops"] > 0
    assert r["imm_over_fm_time"] > 0 and r["memory"]["imm"]["mb"] > 0
    assert "| imm_step |" in text and "targets:" in text


# a tiny DiT-S/4 for one timed step on 8x8 images
TINY_DIT_STEP = (
    *("--arch", "dit_s_4", "--arch-override", "hidden_size=32", "--arch-override", "depth=1"),
    *("--arch-override", "num_heads=2", "--resolution", "8", "--batch", "8", "--repeats", "1", "--warmup", "0"),
)


def test_step_cost_image_net_channels_last(tmp_path):
    out = tmp_path / "s.json"
    run(
        "step_cost.py",
        *TINY_DIT_STEP,
        "--no-memory",
        "--compare-channels-last",
        "--out",
        str(out),
    )
    assert "channels_last_over_contiguous" in json.loads(out.read_text())["channels_last"]


def test_step_cost_compare_augment(tmp_path):
    out = tmp_path / "s.json"
    text = run(
        "step_cost.py",
        *TINY_DIT_STEP,
        "--no-split",
        "--no-memory",
        "--compare-augment",
        "0.5",
        "--out",
        str(out),
    )
    augment = json.loads(out.read_text())["augment"]
    assert augment["imm_step augment_p=0.5 (current)"]["over_imm_step"] > 0
    assert set(augment["alone_ms"]) == {"4751d4c", "current"}
    assert "| imm_step augment_p=0.5 (4751d4c) |" in text and "the augmentation alone" in text


def test_augment_resampling(tmp_path):
    out = tmp_path / "a.json"
    run("augment_resampling.py", "--old", "4751d4c", "--out", str(out))
    code = json.loads(out.read_text())["code"]
    assert code["current"]["gain"]["0.0"]["pi"] == pytest.approx(1.0, abs=1e-6)  # the identity is exact
    assert code["4751d4c (before)"]["gain"]["0.0"]["pi"] == pytest.approx(0.5, abs=0.01)


def test_precision_compile_cpu_eager(tmp_path):
    out = tmp_path / "p.json"
    text = run(
        "precision_compile.py",
        "--device",
        "cpu",
        "--archs",
        TINY_DIT,
        "--resolution",
        "8",
        "--batch",
        "8",
        "--modes",
        "eager",
        "--repeats",
        "1",
        "--warmup",
        "1",
        "--out",
        str(out),
    )
    rows = json.loads(out.read_text())["rows"]
    assert {r["precision"]: r["status"] for r in rows} == {
        "fp32": "ok",
        "tf32": "n/a (CUDA only)",
        "bf16": "n/a (CUDA only)",
        "fp16": "n/a (CUDA only)",
    }
    assert rows[0]["tflops"] > 0 and "GFLOP per training step" in text


def test_sampling_throughput(tmp_path):
    out = tmp_path / "t.json"
    run(
        "sampling_throughput.py",
        "--archs",
        "mlp",
        TINY_DIT,
        "--resolution",
        "8",
        "--image-batch",
        "4",
        "--points-batch",
        "256",
        "--steps",
        "1",
        "2",
        "--repeats",
        "1",
        "--out",
        str(out),
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(r["steps"]) for r in rows] == [1, 2, 1, 2] and all(r["samples_per_s"] > 0 for r in rows)


def test_few_step_quality_through_the_loop(tmp_path):
    out = tmp_path / "q.json"
    text = run(
        "few_step_quality.py",
        "--steps",
        "20",
        "--seeds",
        "0",
        "--datasets",
        "rings",
        "--variants",
        "imm",
        "fm",
        "--eval-steps",
        "1",
        "2",
        "--override",
        "eval.n_samples=300",
        "--override",
        "data.n_heldout=300",
        "--override",
        "data.n_train=2000",
        "--override",
        "train.batch_size=64",
        "--out",
        str(out),
    )
    r = json.loads(out.read_text())
    assert set(r["runs"]) == {"rings/imm/seed0", "rings/fm/seed0"}
    assert all(row["ed_ratio"] > 0 for row in r["tables"]["rows"])
    assert "IMM vs flow matching" in text


def test_threads(tmp_path):
    out = tmp_path / "threads.json"
    tiny = ["--set", "arch.width=32", "--set", "arch.depth=1", "--set", "train.batch_size=64"]
    args = ["--repeats", "1", "--steps", "20", "--log-every", "10", "--torch-default", *tiny, "--out", str(out)]
    text = run("threads.py", *args)
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"][:13] for r in rows] == ["torch default", "one thread", "platform's ch"]
    assert rows[2]["threads_from"].startswith("arch=mlp")
    assert all(r["alone"] > 0 and r["competitor"] > 0 for r in rows)
    assert "target:" in text and "| platform's choice |" in out.with_suffix(".md").read_text()


def test_threads_whole_job(tmp_path):
    out = tmp_path / "threads_job.json"
    tiny = ["--set", "debug=toy", "--set", "train.steps=20", "--set", "train.threads=null"]
    text = run("threads.py", "--job", "--repeats", "1", *tiny, "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"] for r in rows] == ["one thread", "platform's choice"]
    assert all(r["alone"] > 0 and r["competitor"] > 0 for r in rows)
    assert "the whole default job alone within 150 s" in text and "beside the competitor" in text


def test_accumulation(tmp_path):
    out = tmp_path / "accumulation.json"
    tiny = [f"--arch-override={o}" for o in ("hidden_size=32", "depth=1", "num_heads=2")]
    text = run("accumulation.py", *tiny, "--resolution", "8", "--batch", "16", "--micro", "16,8,4", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["micro_batch"], r["n_micro"]) for r in rows] == [(16, 1), (8, 2), (4, 4)]
    assert all(r["peak_mb"] > 0 and r["step_ms"] > 0 for r in rows)
    assert "| 4 | 4 |" in text and "| 4 | 4 |" in out.with_suffix(".md").read_text()


def launch_in(tmp_path, *args) -> str:
    """`python launch.py args...` in tmp_path on one thread, logging to the SQLite store there (its URI)."""
    env = {"PATH": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(BENCH.parent)}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = subprocess.run(
        [sys.executable, str(BENCH.parent / "launch.py"), *args, f"tracking.uri={uri}"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return uri


def test_sweep_table_averages_seeds_and_adds_the_evaluate_runs(tmp_path):
    """A real 4-job sweep (kernel.kappa x train.seed, debug=toy), one run evaluated again with the restart sampler."""
    tiny = ["debug=toy", "train.steps=10", "eval.steps=[1,2]"]
    uri = launch_in(tmp_path, "-m", *tiny, "kernel.kappa=0,1", "train.seed=0,1", f"hydra.sweep.dir={tmp_path}/sweep")
    launch_in(
        tmp_path, "--config-name", "evaluate", f"ckpt={tmp_path}/sweep/0", "eval.sampler=restart", "eval.steps=[1,2]"
    )
    out = tmp_path / "t.json"
    text = run("sweep_table.py", str(tmp_path / "sweep"), "--tracking-uri", uri, "--steps", "1", "2", "--out", str(out))
    assert "| kernel.kappa | sampling | seeds | ED/floor 1 | ED/floor 2 |" in text
    means = json.loads(out.read_text())["means"]
    assert set(means) == {"0.0 | pushforward, uniform", "1.0 | pushforward, uniform", "0.0 | restart, uniform"}
    assert "| 0.0 | pushforward, uniform | 2 |" in text and "| 0.0 | restart, uniform | 1 |" in text
    assert all(v["ED/floor 1"] > 0 for v in means.values())


def test_methods_table_gives_each_seed_and_the_mean_per_method(tmp_path):
    """A real 4-job sweep (loss=fm,ict x train.seed=0,1, debug=toy) read back per method, with each run's wall time."""
    args = ["-m", "debug=toy", "train.steps=5", "eval.steps=[1,2]", "loss=fm,ict", "train.seed=0,1"]
    uri = launch_in(tmp_path, *args, f"hydra.sweep.dir={tmp_path}/s")
    out = tmp_path / "t.json"
    text = run("methods_table.py", str(tmp_path / "s"), "--tracking-uri", uri, "--steps", "1", "2", "--out", str(out))
    assert "| data | method | sampling | seeds | 1 step | 2 steps | NFE | wall min |" in text
    assert text.index("| fm | pushforward | 0 / 1 |") < text.index("| ict | pushforward | 0 / 1 |")
    r = json.loads(out.read_text())
    assert set(r["means"]) == {"checkerboard | fm | pushforward", "checkerboard | ict | pushforward"}
    assert len(r["runs"]) == 4 and all(run["wall_min"] is not None and run["status"] == "FINISHED" for run in r["runs"])
    assert all(v["1"] > 0 and v["2"] > 0 for v in r["means"].values())


def test_tracking_cost(tmp_path):
    out = tmp_path / "t.json"
    text = run(
        "tracking_cost.py",
        "--jobs",
        "default",
        "--repeats",
        "1",
        "--steps",
        "20",
        "--log-every",
        "5",
        "--calls",
        "20",
        "--set",
        "debug=toy",
        "--out",
        str(out),
    )
    assert "on / off" in text and "one log call of the metric line" in text
    (row,) = json.loads(out.read_text())["rows"]
    assert row["job"] == "default" and row["metrics_kb"] > 0
