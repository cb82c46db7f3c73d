"""What MLflow tracking costs a training step, with the background writer and its journal (issue 29): the
default job's and a DiT-S/4 job's step time with tracking on against off, alternately, and the journal's size.

    python bench/tracking_cost.py --repeats 3 --steps 1000                   # both jobs, CPU or the GPU there is
    python bench/tracking_cost.py --jobs dit --device cuda --steps 2000 --tracking-uri http://127.0.0.1:5000

Each timed case is a real `python launch.py` training in a fresh process and launch directory (no evaluation
during training, a tiny one at the end): `tracking.enabled=true` (into a SQLite store in that directory, or
--tracking-uri: a running `mlflow server`) and `tracking.enabled=false`, alternating within every round, so a
neighbour's load hits both alike. The step time is batch / samples/s, the median over the trainer's log lines
(one every --log-every steps, wall clock) after the first (warm-up); each log line's interval includes the
previous log call, so the per-step share of logging is in it. With tracking on, the run directory's journal is
measured too: bytes of the training's metrics per 1000 steps, of one system-metrics sample, and of the rest
(the run's head, params, tags, config text, dataset: written once).

Jobs: `default` (the default job: checkerboard, a 3x256 MLP, batch 512) and `dit` (arch=dit_s_4 on --dit-images
random 32x32 RGB images as data=folder, batch 32, as the seed code's CIFAR-10 setting). Also, in this process:
the loop's own cost of one log call (Tracker.log_metrics of the default job's metric line, with the writer, into a
SQLite store) against a disabled tracker, --calls calls each, alternately.

Writes bench/results/tracking_cost.json and the table to bench/results/tracking_cost.md (--out to change).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

STEP_LINE = re.compile(r"step \d+/\d+ .* ([\d.]+) samples/s")
JOBS = {
    "default": {"batch": 512, "overrides": []},
    "dit": {
        "batch": 32,
        "overrides": ["arch=dit_s_4", "data=folder", "data.resolution=32", "data.num_workers=0", "train.batch_size=32"],
    },
}
# the default job's metric line (imm.training.progress.Progress.tick): train/* and diag/*
LINE_METRICS = ["train/loss", "train/grad_norm", "train/lr", "train/ema_decay", "train/skipped_steps"]
LINE_METRICS += ["train/samples_per_s"] + [f"diag/{k}" for k in ("mmd", "K_tt", "K_tr", "K_rr", "w", "log_w_tilde")]
LINE_METRICS += [f"diag/{k}" for k in ("t", "t_minus_s", "t_minus_r", "r_equals_s")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", default="default,dit", help="comma-separated: default, dit")
    p.add_argument("--repeats", type=int, default=3, help="rounds; each runs every case once")
    p.add_argument("--steps", type=int, default=1000, help="training steps per run")
    p.add_argument("--log-every", type=int, default=100, help="train.log_every (one metric line, and one log call)")
    p.add_argument("--device", default="auto", help="train.device: auto, cpu, cuda, cuda:N")
    p.add_argument("--tracking-uri", default=None, help="a running MLflow server (default: SQLite in each run's dir)")
    p.add_argument("--system-every", type=float, default=10.0, help="tracking.system_metrics_every (seconds)")
    p.add_argument("--dit-images", type=int, default=512, help="random images in the dit job's folder")
    p.add_argument("--calls", type=int, default=2000, help="log calls per timed sample of the in-process measure")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every run")
    p.add_argument("--out", type=Path, default=C.RESULTS_DIR / "tracking_cost.json", help="JSON (table: .md beside)")
    return p.parse_args(argv)


def image_folder(root: Path, n: int) -> Path:
    """n random 32x32 RGB PNGs (the dit job's data: its step cost does not depend on what the pixels show)."""
    import numpy as np
    from PIL import Image

    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return folder


def train_once(args, job: str, tracking: bool, launch_dir: Path, extra: list) -> dict:
    launch_dir.mkdir(parents=True)
    run_dir = launch_dir / "run"
    cmd = [
        sys.executable,
        str(C.REPO / "launch.py"),
        *JOBS[job]["overrides"],
        *extra,
        f"train.steps={args.steps}",
        f"train.log_every={args.log_every}",
        f"train.device={args.device}",
        "eval.every=0",
        "eval.n_samples=200",
        "eval.steps=[1]",
        "eval.fid=false",
        f"tracking.enabled={str(tracking).lower()}",
        f"tracking.system_metrics_every={args.system_every}",
        *([f"tracking.uri={args.tracking_uri}"] if args.tracking_uri and tracking else []),
        f"hydra.run.dir={run_dir}",
        *args.set,
    ]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=launch_dir, env=env, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({proc.returncode}): {' '.join(cmd)}\n{text[-3000:]}")
    rates = [float(m.group(1)) for m in STEP_LINE.finditer(text)]
    rate = statistics.median(rates[1:] or rates)
    out = {
        "samples_per_s": rate,
        "step_ms": 1e3 * JOBS[job]["batch"] / rate,
        "log_lines": rates,
        "process_s": time.perf_counter() - started,
    }
    if tracking:
        out["journal"] = journal_sizes(run_dir / "mlflow_journal.jsonl", args.steps)
    return out


def journal_sizes(path: Path, steps: int) -> dict:
    """Bytes of the journal by kind: the training's metrics per 1000 steps, one system sample, the rest."""
    training = system = other = n_system = 0
    for line in path.read_bytes().splitlines(keepends=True):
        record = json.loads(line)
        if record["op"] == "metrics" and any(k.startswith("system/") for k in record["metrics"]):
            system, n_system = system + len(line), n_system + 1
        elif record["op"] == "metrics":
            training += len(line)
        else:
            other += len(line)
    return {
        "total_bytes": path.stat().st_size,
        "metrics_bytes_per_1000_steps": training * 1000 / steps,
        "system_sample_bytes": system / n_system if n_system else None,
        "system_samples": n_system,
        "once_bytes": other,
    }


def log_call_cost(args, tmp: Path) -> dict:
    """Seconds per Tracker.log_metrics call in this process: with the writer (SQLite store) and disabled."""
    from imm.tracking.mlflow_run import Tracker

    tracker = Tracker.open(
        f"sqlite:///{tmp / 'calls.db'}",
        "bench",
        run_name="log calls",
        params={},
        tags={},
        journal=tmp / "calls" / "mlflow_journal.jsonl",
    )
    disabled = Tracker.disabled()
    metrics = {k: 0.5 for k in LINE_METRICS}
    step = [0]

    def calls(t):
        def run():
            for _ in range(args.calls):
                step[0] += 1
                t.log_metrics(metrics, step[0])

        return run

    device = C.resolve_device("cpu")
    times = C.interleaved({"on": calls(tracker), "off": calls(disabled)}, device, repeats=5, warmup=1)
    tracker.end("FINISHED")
    return {
        k: {
            "us_per_call_wall": 1e6 * C.median(v["wall"]) / args.calls,
            "us_per_call_cpu": 1e6 * C.median(v["cpu"]) / args.calls,
        }
        for k, v in times.items()
    }


def main(argv=None):
    args = parse_args(argv)
    jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    unknown = [j for j in jobs if j not in JOBS]
    if unknown:
        raise SystemExit(f"--jobs: unknown {unknown}; choose from {sorted(JOBS)}")
    info = C.machine_info(C.resolve_device(args.device))
    C.log(C.describe(info))
    results = {job: {"on": [], "off": []} for job in jobs}
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmp:
        tmp = Path(tmp)
        extra = {job: [] for job in jobs}
        if "dit" in jobs:
            extra["dit"] = [f"data.root={image_folder(tmp, args.dit_images)}"]
        i = 0
        for r in range(args.repeats):
            for job in jobs:
                for case in ("on", "off") if r % 2 == 0 else ("off", "on"):
                    i += 1
                    res = train_once(args, job, case == "on", tmp / f"run-{i}", extra[job])
                    results[job][case].append(res)
                    C.log(f"  round {r + 1}/{args.repeats}: {job}, tracking {case}: {res['step_ms']:.3f} ms/step")
        calls = log_call_cost(args, tmp)
    rows = []
    for job in jobs:
        on = C.median([x["step_ms"] for x in results[job]["on"]])
        off = C.median([x["step_ms"] for x in results[job]["off"]])
        journal = results[job]["on"][-1]["journal"]
        rows.append(
            {
                "job": job,
                "on": on,
                "off": off,
                "ratio": on / off,
                "metrics_kb": journal["metrics_bytes_per_1000_steps"] / 1000,
                "system_b": journal["system_sample_bytes"],
                "once_kb": journal["once_bytes"] / 1000,
            }
        )
    text = C.table(
        rows,
        [
            ("job", "job", None),
            ("ms/step tracking on", "on", ".3f"),
            ("ms/step off", "off", ".3f"),
            ("on / off", "ratio", ".3f"),
            (f"journal: metrics kB per 1000 steps (log_every={args.log_every})", "metrics_kb", ".1f"),
            ("journal: bytes per system sample", "system_b", ".0f"),
            ("journal: kB written once", "once_kb", ".1f"),
        ],
    )
    per_call = (
        f"one log call of the metric line ({len(LINE_METRICS)} metrics) in the loop: "
        f"{calls['on']['us_per_call_wall']:.1f} us with the writer, {calls['off']['us_per_call_wall']:.2f} us disabled"
    )
    store = args.tracking_uri or "SQLite in the launch directory"
    header = (
        f"{C.describe(info)}\n\n`{info['command']}` ({args.repeats} rounds, {args.steps} steps per run, {store})\n\n"
    )
    print(text)
    print(per_call)
    C.write_json(args.out, {"info": info, "args": vars(args), "rows": rows, "runs": results, "log_call": calls})
    Path(args.out).with_suffix(".md").write_text(header + text + "\n\n" + per_call + "\n")


if __name__ == "__main__":
    main()
