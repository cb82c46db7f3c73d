"""The default job alone and beside one busy one-thread process, with torch's default thread count, with one
thread (the platform's choice until 2026-12-08), and with the platform's choice (imm/training/threads.py: a lone
MLP training follows the idle cores).

    python bench/threads.py --repeats 3 --steps 2000       # training throughput (samples/s)
    python bench/threads.py --job --repeats 2              # the whole `python launch.py`: wall seconds

Each timed case is a real `python launch.py` in a fresh process with OMP_NUM_THREADS and MKL_NUM_THREADS
removed from its environment, so torch and the platform choose. Throughput runs train the default job
without evaluation during training, a tiny one at the end and no tracking; samples/s is the median of the
trainer's log lines after the first (warm-up; the idle cores are first measured 2 s in). --job runs the default
job as a new user does (its two evaluations, MLflow tracking into a fresh store in the run's directory) and
times the whole command. The cases alternate within every round (each case alone, then beside the
competitor), so a neighbour's load hits all alike. The competitor is a one-thread torch matmul loop
(--competitor matmul) or a pure Python loop (--competitor python), started before the training and killed
after it. The torch-default case runs only with --torch-default (never with --job): beside the competitor it
collapses (0.30x on an AMD EPYC, 0.02x on an Intel Xeon: 2000 steps would take half an hour).

Targets (issue 14, item 6; issue 26, item 11): beside the competitor, the platform's choice at least 0.9x of one
thread's speed (no collapse: it gives the core back); alone, the whole default job within 150 s on an idle 2-core
machine. (Issue 14's "beside / alone >= 0.7" held while the platform's choice was one thread; a choice that takes
the idle core alone cannot reach it, as two cores alone against one beside is at most about 0.67.)
Writes bench/results/threads.json (threads_job.json with --job) and the table beside it as .md (--out to change).
"""

from __future__ import annotations

import argparse
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

TARGET = 0.9  # beside the competitor, the platform's choice / one thread (it gives the idle core back)
JOB_TARGET_S = 150.0  # the whole default job alone, the platform's choice
COMPETITORS = {
    "matmul": "import torch\ntorch.set_num_threads(1)\na = torch.randn(256, 256)\nwhile True:\n    a @ a",
    "python": "x = 0\nwhile True:\n    x += 1",
}
STEP_LINE = re.compile(r"step \d+/\d+ .* ([\d.]+) samples/s")
THREADS_LINE = re.compile(r"torch threads: (\d+) \((.*)\)")
CHANGE_LINE = re.compile(r"torch threads (\d+) -> (\d+)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="rounds; each runs every case once")
    p.add_argument("--steps", type=int, default=2000, help="training steps per run (not with --job)")
    p.add_argument("--job", action="store_true", help="time the whole default job (python launch.py) instead")
    p.add_argument(
        "--torch-default", action="store_true", help="also torch's default thread count (beside the competitor: long)"
    )
    p.add_argument("--log-every", type=int, default=100, help="steps between the trainer's samples/s lines")
    p.add_argument("--competitor", default="matmul", choices=sorted(COMPETITORS), help="the busy neighbour")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every training")
    p.add_argument("--out", type=Path, default=None, help="JSON file (table: .md beside); default results/threads.json")
    args = p.parse_args(argv)
    args.out = args.out or C.RESULTS_DIR / ("threads_job.json" if args.job else "threads.json")
    return args


def clean_env() -> dict:
    """This environment without the thread variables, so torch (and the platform) choose."""
    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "HYDRA_FULL_ERROR")}


def torch_default_threads(env) -> int:
    code = "import torch; print(torch.get_num_threads())"
    return int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout)


def train_once(args, overrides, run_dir: Path, env) -> dict:
    if args.job:  # the default job as typed, its run directory and MLflow store in a fresh directory
        run_dir.mkdir()
        cmd = [sys.executable, str(C.REPO / "launch.py"), *args.set, *overrides]
    else:
        cmd = [
            sys.executable,
            str(C.REPO / "launch.py"),
            f"train.steps={args.steps}",
            f"train.log_every={args.log_every}",
            "eval.every=0",
            "eval.n_samples=200",
            "eval.steps=[1]",
            "tracking.enabled=false",
            f"hydra.run.dir={run_dir}",
            *args.set,
            *overrides,
        ]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=run_dir if args.job else run_dir.parent, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({proc.returncode}): {' '.join(cmd)}\n{text[-3000:]}")
    rates = [float(m.group(1)) for m in STEP_LINE.finditer(text)]
    threads = THREADS_LINE.search(text)
    return {
        "seconds": seconds,
        "samples_per_s": statistics.median(rates[1:] or rates),
        "log_lines": rates,
        "threads": int(threads.group(1)) if threads else None,
        "threads_from": threads.group(2) if threads else None,
        "thread_changes": [f"{a}->{b}" for a, b in CHANGE_LINE.findall(text)],
    }


def run_case(args, overrides, run_dir, env, competitor: bool) -> dict:
    busy = None
    if competitor:
        busy = subprocess.Popen([sys.executable, "-c", COMPETITORS[args.competitor]], env=env)
    try:
        return train_once(args, overrides, run_dir, env)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


def main(argv=None):
    args = parse_args(argv)
    env = clean_env()
    torch_default = torch_default_threads(env)
    cases = {
        f"torch default ({torch_default} threads)": [f"train.threads={torch_default}"],
        "one thread": ["train.threads=1"],
        "platform's choice": [],
    }
    if args.job or not args.torch_default:
        del cases[f"torch default ({torch_default} threads)"]
    info = C.machine_info(C.resolve_device("cpu"))
    info["torch_default_threads"] = torch_default
    C.log(f"{C.describe(info)}; torch's default in a fresh process: {torch_default} thread(s)")
    measure = "seconds" if args.job else "samples_per_s"
    results = {name: {"alone": [], "competitor": []} for name in cases}
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp:
        i = 0
        for r in range(args.repeats):
            for name, overrides in cases.items():
                for where in ("alone", "competitor"):
                    i += 1
                    res = run_case(args, overrides, Path(tmp) / f"run-{i}", env, competitor=where == "competitor")
                    results[name][where].append(res)
                    changes = " ".join(res["thread_changes"]) or "none"
                    C.log(f"  round {r + 1}/{args.repeats}: {name}, {where}: {res[measure]:.1f} (threads: {changes})")
    report(args, info, results)


def report(args, info: dict, results: dict) -> None:
    """The table and the targets from the runs' results (also: `report` on a saved JSON's args, info and runs)."""
    measure = "seconds" if args.job else "samples_per_s"
    rows = []
    for name, res in results.items():
        alone = C.median([x[measure] for x in res["alone"]])
        busy = C.median([x[measure] for x in res["competitor"]])
        rows.append(
            {
                "case": name,
                "threads_from": res["alone"][0]["threads_from"],
                "changes_alone": " ".join(res["alone"][0]["thread_changes"]) or "-",
                "changes_busy": " ".join(res["competitor"][0]["thread_changes"]) or "-",
                "alone": alone,
                "competitor": busy,
                "ratio": busy / alone if not args.job else alone / busy,  # 1.0: no slower beside the competitor
            }
        )
    unit = "s, whole job" if args.job else "samples/s"
    text = C.table(
        rows,
        [
            ("case", "case", None),
            ("threads chosen by", "threads_from", None),
            ("thread changes alone", "changes_alone", None),
            ("beside the competitor", "changes_busy", None),
            (f"{unit} alone", "alone", ".1f" if args.job else ".0f"),
            (f"{unit} + one {args.competitor} process", "competitor", ".1f" if args.job else ".0f"),
            ("speed beside the competitor / alone", "ratio", ".2f"),
        ],
    )
    one, new = (next(r for r in rows if r["case"] == c) for c in ("one thread", "platform's choice"))
    speed = (lambda r, k: 1 / r[k]) if args.job else (lambda r, k: r[k])
    beside = speed(new, "competitor") / speed(one, "competitor")
    targets = [
        (
            f"beside the competitor, the platform's choice >= {TARGET}x of one thread's speed: {beside:.2f}",
            beside >= TARGET,
        )
    ]
    if args.job:
        targets.append(
            (
                f"the whole default job alone within {JOB_TARGET_S:.0f} s: {new['alone']:.1f} s",
                new["alone"] <= JOB_TARGET_S,
            )
        )
    summary = "\n".join(f"target: {t} ({'met' if ok else 'NOT met'})" for t, ok in targets)
    summary += (
        f"\nalone, the platform's choice is {speed(new, 'alone') / speed(one, 'alone'):.2f}x as fast as one thread"
    )
    what = "the whole default job" if args.job else f"{args.steps} steps per run"
    header = f"{C.describe(info)}\n\n`{info['command']}` ({args.repeats} rounds, {what})\n\n"
    print(text)
    print(summary)
    C.write_json(args.out, {"info": info, "args": vars(args), "rows": rows, "runs": results, "target": TARGET})
    Path(args.out).with_suffix(".md").write_text(header + text + "\n\n" + summary + "\n")


if __name__ == "__main__":
    main()
