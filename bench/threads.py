"""The default job's training throughput alone and beside one busy one-thread process, with torch's
default thread count (the old default) and with the platform's choice (imm/training/threads.py).

    python bench/threads.py --repeats 3 --steps 600

Each timed case is a real `python launch.py` training (the default job: 2-D checkerboard, MLP; no
evaluation during training, a tiny one at the end, no tracking), run in a fresh process with
OMP_NUM_THREADS and MKL_NUM_THREADS removed from its environment, so torch picks its own default.
The cases alternate within every round (old alone, old + competitor, new alone, new + competitor), so
a neighbour's load hits all alike. samples/s is the median of the trainer's log lines (wall clock) after
the first one (warm-up). The competitor is a one-thread torch matmul loop (--competitor matmul) or a
pure Python loop (--competitor python), started before the training and killed after it.

Target (issue 14, item 6): with the competitor at least 0.7x of alone.
Writes bench/results/threads.json and the table to bench/results/threads.md (--out to change).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET = 0.7
COMPETITORS = {
    "matmul": "import torch\ntorch.set_num_threads(1)\na = torch.randn(256, 256)\nwhile True:\n    a @ a",
    "python": "x = 0\nwhile True:\n    x += 1",
}
STEP_LINE = re.compile(r"step \d+/\d+ .* ([\d.]+) samples/s")
THREADS_LINE = re.compile(r"torch threads: (\d+) \((.*)\)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="rounds; each runs every case once")
    p.add_argument("--steps", type=int, default=600, help="training steps per run")
    p.add_argument("--log-every", type=int, default=100, help="steps between the trainer's samples/s lines")
    p.add_argument("--competitor", default="matmul", choices=sorted(COMPETITORS), help="the busy neighbour")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every training")
    p.add_argument("--out", type=Path, default=C.RESULTS_DIR / "threads.json", help="JSON file (table: .md beside)")
    return p.parse_args(argv)


def clean_env() -> dict:
    """This environment without the thread variables, so torch (and the platform) choose."""
    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "HYDRA_FULL_ERROR")}


def torch_default_threads(env) -> int:
    code = "import torch; print(torch.get_num_threads())"
    return int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout)


def train_once(args, overrides, run_dir: Path, env) -> dict:
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
    proc = subprocess.run(cmd, cwd=run_dir.parent, env=env, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({proc.returncode}): {' '.join(cmd)}\n{text[-3000:]}")
    rates = [float(m.group(1)) for m in STEP_LINE.finditer(text)]
    threads = THREADS_LINE.search(text)
    return {
        "samples_per_s": statistics.median(rates[1:] or rates),
        "log_lines": rates,
        "threads": int(threads.group(1)) if threads else None,
        "threads_from": threads.group(2) if threads else None,
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
    old_threads = torch_default_threads(env)
    cases = {"old (torch default)": [f"train.threads={old_threads}"], "new (platform default)": []}
    info = C.machine_info(C.resolve_device("cpu"))
    info["torch_default_threads"] = old_threads
    C.log(f"{C.describe(info)}; torch's default in a fresh process: {old_threads} thread(s)")
    results = {name: {"alone": [], "competitor": []} for name in cases}
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp:
        i = 0
        for r in range(args.repeats):
            for name, overrides in cases.items():
                for where in ("alone", "competitor"):
                    i += 1
                    res = run_case(args, overrides, Path(tmp) / f"run-{i}", env, competitor=where == "competitor")
                    results[name][where].append(res)
                    C.log(f"  round {r + 1}/{args.repeats}: {name}, {where}: {res['samples_per_s']:.0f} samples/s")
    old_alone = C.median([x["samples_per_s"] for x in results["old (torch default)"]["alone"]])
    rows = []
    for name, res in results.items():
        alone = C.median([x["samples_per_s"] for x in res["alone"]])
        busy = C.median([x["samples_per_s"] for x in res["competitor"]])
        rows.append(
            {
                "case": name,
                "threads": res["alone"][0]["threads"],
                "threads_from": res["alone"][0]["threads_from"],
                "alone": alone,
                "competitor": busy,
                "ratio": busy / alone,
                "ratio_vs_old_alone": busy / old_alone,
            }
        )
    text = C.table(
        rows,
        [
            ("case", "case", None),
            ("torch threads", "threads", None),
            ("chosen by", "threads_from", None),
            ("samples/s alone", "alone", ".0f"),
            (f"samples/s + one {args.competitor} process", "competitor", ".0f"),
            ("competitor / alone", "ratio", ".2f"),
            ("competitor / old alone", "ratio_vs_old_alone", ".2f"),
        ],
    )
    new = rows[-1]
    verdict = "met" if new["ratio"] >= TARGET else "NOT met"
    summary = f"target: new default with the competitor >= {TARGET}x of alone: {new['ratio']:.2f} ({verdict})"
    header = f"{C.describe(info)}\n\n`{info['command']}` ({args.repeats} rounds, {args.steps} steps per run)\n\n"
    print(text)
    print(summary)
    C.write_json(args.out, {"info": info, "args": vars(args), "rows": rows, "runs": results, "target": TARGET})
    Path(args.out).with_suffix(".md").write_text(header + text + "\n\n" + summary + "\n")


if __name__ == "__main__":
    main()
