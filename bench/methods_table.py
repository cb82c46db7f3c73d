"""The few-step methods side by side from their runs: per method (loss.objective) and sampling, each seed's value
and the mean at every step count, with the NFE and each run's wall time, as a Markdown table and a JSON file.

    python bench/methods_table.py RUN_DIR... --tracking-uri sqlite:///$PWD/mlflow.db [--out bench/results/x.json]

RUN_DIR: a run directory (it holds mlflow_run_id) or a sweep directory (its numbered job directories). The metric is
the one the runs logged: the classifier metric on images (final/fd_ratio<n>_<N>step_w<w>, with the class accuracy
after it), the energy distance over its floor on points (final/energy_ratio<n>_<N>step). Besides the training's own
final evaluation (pushforward on the uniform grid), each `evaluate` run logged into a run since (another sampler or
grid: evaluate_restart/..., evaluate_edm/...) is a row of its own.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from imm.report import render  # noqa: E402

ORDER = ("imm", "fm", "meanflow", "ict")  # the rows' order (docs/methods.md's)
SAMPLINGS = {"final": "pushforward", "evaluate_restart": "restart", "evaluate_edm": "pushforward, edm grid"}
# (the metric, its companion shown in brackets or None, NFE) for images and for points; {p} a prefix, {n} steps
FAMILIES = {
    "images": (r"{p}/fd_ratio\d+_{n}step_w[\d.]+", r"{p}/accuracy_{n}step_w[\d.]+", r"{p}/nfe_{n}step_w[\d.]+"),
    "points": (r"{p}/energy_ratio\d+k?_{n}step", None, None),
}


def run_dirs(paths) -> list[Path]:
    """Each path that is a run directory, and the numbered job directories of each that is a sweep directory."""
    out = []
    for p in map(Path, paths):
        if (p / "mlflow_run_id").is_file():
            out.append(p)
        elif not p.is_dir():
            raise SystemExit(f"{p} is not a directory; give a run directory or a sweep directory")
        else:
            jobs = sorted((d for d in p.iterdir() if d.name.isdigit()), key=lambda d: int(d.name))
            out += [d for d in jobs if (d / "mlflow_run_id").is_file()]
    return out


def pick(metrics: dict, pattern: str | None):
    if pattern is None:
        return None
    found = [k for k in metrics if re.fullmatch(pattern, k)]
    return metrics[found[0]] if len(found) == 1 else None


def cells(metrics: dict, prefix: str, steps) -> tuple[str, dict] | None:
    """(family, {N: (value, companion, nfe)}) of one run under `prefix`, or None when it logged neither family."""
    for family, (metric, companion, nfe) in FAMILIES.items():
        out = {}
        for n in steps:
            value = pick(metrics, metric.format(p=prefix, n=n))
            if value is not None:
                c, f = (pick(metrics, q.format(p=prefix, n=n)) if q else None for q in (companion, nfe))
                out[n] = (value, c, int(f) if f is not None else n)  # unguided: one network call per step
        if out:
            return family, out
    return None


def collect(client, dirs, steps) -> list[dict]:
    """One record per run and sampling: method, seed, data, sampling, wall minutes, run dir, values by step."""
    records = []
    for d in dirs:
        run = client.get_run((d / "mlflow_run_id").read_text().strip())
        params, metrics = run.data.params, run.data.metrics
        wall = (run.info.end_time - run.info.start_time) / 60e3 if run.info.end_time else None
        for prefix, sampling in SAMPLINGS.items():
            found = cells(metrics, prefix, steps)
            if found is None:
                continue
            family, by_step = found
            records.append(
                {
                    "loss": params.get("loss.objective"),
                    "seed": int(params.get("train.seed", 0)),
                    "data": params.get("data.name"),
                    "sampling": sampling,
                    "family": family,
                    "status": run.info.status,
                    "wall_min": round(wall, 1) if wall is not None and prefix == "final" else None,
                    "run_dir": str(d),
                    "mlflow_run_id": run.info.run_id,
                    "steps": {str(n): {"value": v, "companion": c, "nfe": f} for n, (v, c, f) in by_step.items()},
                }
            )
    return records


def num(v: float) -> str:
    """Three significant digits, without an exponent (flow matching's 1-step energy ratio reads 1206)."""
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def rows_of(records, steps) -> tuple[list[str], list[list[str]], dict]:
    """The table (seeds as 'a / b', the mean after them) and the means by (data, method, sampling)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["data"], r["loss"], r["sampling"]), []).append(r)
    rank = {m: i for i, m in enumerate(ORDER)}
    header = ["data", "method", "sampling", "seeds", *(f"{n} step{'s' * (n > 1)}" for n in steps), "NFE", "wall min"]
    rows, means = [], {}
    for key in sorted(groups, key=lambda k: (k[0] or "", rank.get(k[1], 99), k[2])):
        runs = sorted(groups[key], key=lambda r: r["seed"])
        row = [*key, " / ".join(str(r["seed"]) for r in runs)]
        mean = {}
        for n in map(str, steps):
            values = [r["steps"][n]["value"] for r in runs if n in r["steps"]]
            comps = [r["steps"][n]["companion"] for r in runs if n in r["steps"]]
            if not values:
                row.append("")
                continue
            mean[n] = statistics.mean(values)
            text = " / ".join(map(num, values)) + (f" (mean {num(mean[n])})" if len(values) > 1 else "")
            if all(c is not None for c in comps):
                mean[n + "_companion"] = statistics.mean(comps)
                text += " [" + " / ".join(f"{c:.3f}" for c in comps) + "]"
            row.append(text)
        row.append(", ".join(str(runs[0]["steps"][n]["nfe"]) for n in map(str, steps) if n in runs[0]["steps"]))
        row.append(" / ".join("" if r["wall_min"] is None else f"{r['wall_min']:.1f}" for r in runs))
        rows.append(row)
        means[" | ".join(map(str, key))] = mean
    return header, rows, means


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories or sweep directories")
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--out", type=Path, default=None, help="also write each run's values and the means as JSON")
    p.add_argument("--note", default="", help="a sentence stored in the JSON (machine, what is missing)")
    args = p.parse_args(argv)

    from mlflow.tracking import MlflowClient

    records = collect(MlflowClient(tracking_uri=args.tracking_uri), run_dirs(args.runs), args.steps)
    header, rows, means = rows_of(records, args.steps)
    print(render(header, rows, markdown=True))
    print("\ncells: each seed's value, the mean, and [the class accuracy] where the runs logged one")
    if args.out:
        payload = {"command": " ".join(["python", "bench/methods_table.py", *sys.argv[1:]]), "note": args.note}
        payload.update({"means": means, "runs": records})
        args.out.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
