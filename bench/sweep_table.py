"""A point-data sweep's runs as one table, averaged over seeds: ED/floor, precision and recall at each step count,
for the training's own (final) evaluation and for every `evaluate` run logged into the runs since (another
sampler or grid: evaluate_restart/..., evaluate_edm/...).

    python bench/sweep_table.py SWEEP_DIR --tracking-uri sqlite:///$PWD/mlflow.db [--out bench/results/x.json]

Rows: the swept values other than train.seed (the data set first), then the sampling (pushforward/uniform for the
training's final evaluation, else the evaluate prefix); cells: the mean over seeds (min-max after it with --spread).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from imm.report import find_sweep, render, swept_params  # noqa: E402

STEPS = (1, 2, 4, 8)
# metric families shown, as (column title, family regex)
FAMILIES = (("ED/floor", r"energy_ratio\d+k?"), ("precision", "precision"), ("recall", "recall"))
PREFIXES = {"final": "pushforward, uniform", "evaluate_restart": "restart, uniform", "evaluate_edm": "pushforward, edm"}


def cells(metrics: dict, prefix: str) -> dict:
    """{(column title, N): value} of one run's metrics under `prefix`."""
    out = {}
    for name, value in metrics.items():
        m = re.fullmatch(rf"{prefix}/(?P<family>.+)_(?P<steps>\d+)step", name)
        if m is None:
            continue
        for title, family in FAMILIES:
            if re.fullmatch(family, m["family"]):
                out[title, int(m["steps"])] = value
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="the sweep directory (with sweep.json) or its parent run id")
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--steps", nargs="+", type=int, default=list(STEPS), help="step counts of the ED/floor columns")
    p.add_argument("--pr-steps", nargs="+", type=int, default=[1, 8], help="step counts of precision and recall")
    p.add_argument("--spread", action="store_true", help="add min-max over seeds to each ED/floor cell")
    p.add_argument("--out", type=Path, default=None, help="also write the per-run values and the means as JSON")
    args = p.parse_args(argv)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=args.tracking_uri)
    parent, children = find_sweep(client, args.sweep)
    keys = [k for k in swept_params(parent, children) if k != "train.seed"]
    keys.sort(key=lambda k: k != "data.name")  # the data set first
    groups: dict[tuple, list[dict]] = {}
    for run in children:
        if run.info.status != "FINISHED":
            continue
        for prefix in PREFIXES:
            c = cells(run.data.metrics, prefix)
            if c:
                group = (*(run.data.params.get(k, "") for k in keys), PREFIXES[prefix])
                groups.setdefault(group, []).append(c)
    columns = [("ED/floor", n) for n in args.steps] + [(t, n) for t in ("precision", "recall") for n in args.pr_steps]
    header = [*keys, "sampling", "seeds", *(f"{t} {n}" for t, n in columns)]
    rows, means = [], {}
    for group in sorted(groups):
        runs = groups[group]
        row = [*group, len(runs)]
        for col in columns:
            values = [r[col] for r in runs if col in r]
            mean = statistics.mean(values) if values else None
            means.setdefault(" | ".join(group), {})[f"{col[0]} {col[1]}"] = mean
            text = "" if mean is None else f"{mean:.3g}" if col[0] == "ED/floor" else f"{mean:.3f}"
            if args.spread and col[0] == "ED/floor" and len(values) > 1:
                text += f" ({min(values):.3g}-{max(values):.3g})"
            row.append(text)
        rows.append(row)
    print(f"sweep {parent.info.run_name} ({parent.info.run_id}): {len(children)} runs, means over seeds")
    print(render(header, rows, markdown=True))
    if args.out:
        per_run = [
            {
                "run": r.info.run_name,
                "params": {k: r.data.params.get(k) for k in [*keys, "train.seed"]},
                "metrics": {k: v for k, v in r.data.metrics.items() if k.startswith(tuple(PREFIXES))},
            }
            for r in children
        ]
        args.out.write_text(json.dumps({"sweep": parent.info.run_id, "means": means, "runs": per_run}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
