"""A sweep's child runs as a table, sorted by a metric, and a metric-against-step plot; through the
MLflow client API.

    python -m imm.report <sweep id | sweep dir> [--metric final/energy_1step] [--plot eval/energy_ratio5k_1step]
                         [--tracking-uri sqlite:///mlflow.db] [--out report.png]

The plot defaults to the evaluation metric every run of the sweep logged (imm.metrics.PRIMARY: the energy
ratio, the classifier's FD ratio or FID, at the fewest steps), which reads the same whatever the objective.
A loss is on its objective's and kernel weighting's own scale: runs that differ in either get a panel each.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from imm.metrics import find_metric, metric_parts, primary_metrics
from imm.runs import sweep_info
from imm.tracking.mlflow_run import default_uri, sqlite_path


def find_sweep(client, sweep: str):
    """(parent run, child runs) for a parent run id or a sweep directory holding sweep.json."""
    from mlflow.exceptions import MlflowException

    parent_id = sweep_info(sweep).get("parent_run_id") if Path(sweep).is_dir() else sweep
    if not parent_id:
        raise SystemExit(f"{sweep} has no {Path(sweep) / 'sweep.json'}; give the sweep's parent run id instead")
    try:
        parent = client.get_run(parent_id)
    except MlflowException:
        raise SystemExit(f"{sweep} is neither a sweep directory nor a run id in {client.tracking_uri}") from None
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`sweep.id` = '{parent_id}' and tags.`sweep.role` = 'child'",
        max_results=5000,
    )
    return parent, children


def table(parent, children, metric: str, columns: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows: run name, swept values, status, then the final metrics; sorted by `metric`. `metric` and
    `columns` may name a ratio without its n (final/energy_ratio_1step: each run's final/energy_ratio<n>_1step)."""
    swept = swept_params(parent, children)
    finals = sorted(
        {m for r in children for m in r.data.metrics if m.startswith("final/") and not m.endswith("_floor")}
    )
    # NFE beside the step counts where guidance doubles it (final/nfe_2step_w1.5 = 4); unguided it is the step count
    compact = [
        m
        for m in finals
        if m.startswith(("final/energy_ratio", "final/recall", "final/fid"))
        or m == "final/loss"
        or (m.startswith("final/nfe_") and "_w" in m)
    ]
    finals = list(columns) if columns else (compact or finals)
    if find_metric(metric, finals) is None:
        finals.insert(0, metric)
    header = ["run", *swept, "status", *finals]

    def value(run, name, missing=None):
        return run.data.metrics.get(find_metric(name, run.data.metrics), missing)

    ordered = sorted(children, key=lambda r: (value(r, metric, math.inf), r.info.run_name))
    rows = [
        [
            r.info.run_name,
            *(r.data.params.get(k, "") for k in swept),
            r.info.status,
            *(_fmt(value(r, m)) for m in finals),
        ]
        for r in ordered
    ]
    return header, rows


def swept_params(parent, children) -> list[str]:
    """The params a sweep varies: each swept key itself, or for a config group (`kernel`) the params
    under it whose values differ between the runs (`kernel.weighting`)."""
    out = []
    for key in filter(None, parent.data.tags.get("sweep.keys", "").split(",")):
        candidates = (
            [key]
            if any(key in r.data.params for r in children)
            else sorted({p for r in children for p in r.data.params if p.startswith(key + ".")})
        )
        out += [p for p in candidates if p not in out and len({r.data.params.get(p) for r in children}) > 1 or p == key]
    return out


# The params that set a loss's scale: its values are comparable only between runs that agree on these.
LOSS_SCALE = ("loss.objective", "kernel.weighting")


def shared_eval_metric(children) -> str | None:
    """The evaluation metric to plot: of the eval/ metrics every run logged, the primary one (imm.metrics.PRIMARY)
    at the fewest steps, unguided first (eval/energy_ratio5k_1step); None when the runs share none."""
    common = set.intersection(*(set(r.data.metrics) for r in children)) if children else set()
    found = primary_metrics(sorted(m for m in common if m.startswith("eval/"))).values()
    return min(found, key=lambda m: (metric_parts(m)[1], metric_parts(m)[2] is not None, m), default=None)


def loss_panels(children, metric: str) -> dict[str, list]:
    """{panel title: its runs}: one panel for any metric but a loss; a loss gets one per value of LOSS_SCALE."""
    if "loss" not in metric.split("/")[-1]:
        return {metric: list(children)}
    panels: dict[str, list] = {}
    for r in children:
        scale = ", ".join(f"{k}={r.data.params.get(k, '?')}" for k in LOSS_SCALE)
        panels.setdefault(f"{metric} ({scale})", []).append(r)
    return panels


def plot(client, children, metric: str, path) -> tuple[Path, int]:
    """One line per child run: `metric` against training step, saved as a PNG; a loss of runs with different
    objectives or kernel weightings in a panel per scale (loss_panels), never on one axis. (path, panels)."""
    from matplotlib.figure import Figure

    panels = loss_panels(children, metric)
    fig = Figure(figsize=(7, 4.2 * len(panels)))
    for ax, (title, runs) in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], sorted(panels.items())):
        for r in sorted(runs, key=lambda r: r.info.run_name):
            history = client.get_metric_history(r.info.run_id, metric)
            if history:
                ax.plot([m.step for m in history], [m.value for m in history], label=r.info.run_name, marker=".")
        ax.set_title(title if len(panels) > 1 else metric, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if len(panels) > 1:
        fig.suptitle(f"{metric}: one panel per {' and '.join(LOSS_SCALE)}, whose scales differ", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path, len(panels)


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4g}"


def render(header, rows, *, right=(), rule: bool = True, markdown: bool = False) -> str:
    """The one renderer of the project's tables (this report, `evaluate`'s metric table, bench/'s):
    plain text padded to each column's widest cell, the columns whose index is in `right` (numbers)
    right-aligned and, with `rule`, a dashed line under the header; or, with `markdown`, a Markdown
    table (unpadded, for pasting into documents)."""
    if markdown:
        line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"  # noqa: E731
        return "\n".join([line(header), "|" + "|".join("---" for _ in header) + "|", *(line(r) for r in rows)])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(
            str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    return "\n".join([line(header), *([line("-" * w for w in widths)] if rule else []), *(line(r) for r in rows)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m imm.report", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", help="the sweep's parent run id, or its sweep directory (with sweep.json)")
    p.add_argument("--tracking-uri", default=None, help="default: sqlite:///<cwd>/mlflow.db")
    p.add_argument("--metric", default="final/energy_1step", help="sort the table by this metric (ascending)")
    p.add_argument(
        "--columns",
        default=None,
        help="comma-separated metrics to show (default: final/loss, the final energy ratios, recalls or FIDs, and the"
        " NFE of guided sampling; e.g. final/nfe_8step for the NFE of unguided 8-step sampling)",
    )
    p.add_argument(
        "--plot",
        default=None,
        help="the metric to plot against step (default: the evaluation metric every run logged, e.g."
        " eval/energy_ratio5k_1step; a loss gets a panel per objective and kernel weighting)",
    )
    p.add_argument("--out", default=None, help="PNG path for the plot (default: report-<metric>.png in the sweep dir)")
    args = p.parse_args(argv)

    from mlflow.tracking import MlflowClient

    uri = args.tracking_uri or default_uri(Path.cwd())
    if (db := sqlite_path(uri)) is not None and not db.is_file():
        raise SystemExit(f"no MLflow store at {uri}; run from the directory you launched from or pass --tracking-uri")
    client = MlflowClient(tracking_uri=uri)
    parent, children = find_sweep(client, args.sweep)
    if not children:
        print(f"sweep {parent.info.run_name} ({parent.info.run_id}) has no child runs yet", file=sys.stderr)
        return 1
    header, rows = table(parent, children, args.metric, args.columns.split(",") if args.columns else None)
    print(f"{parent.info.run_name} ({parent.info.run_id}), {len(children)} runs, sorted by {args.metric}")
    print(render(header, rows))
    if any("loss" in h.split("/")[-1] for h in header) and len(loss_panels(children, "loss")) > 1:
        print(f"(a loss column is on each run's own scale, set by {' and '.join(LOSS_SCALE)}: not a ranking)")
    metric = args.plot or shared_eval_metric(children) or "train/loss"
    out = Path(args.out or _sweep_dir(args.sweep, parent) / f"report-{metric.replace('/', '_')}.png")
    path, panels = plot(client, children, metric, out)
    split = f" (a panel per {' and '.join(LOSS_SCALE)}: a loss's scale depends on them)" if panels > 1 else ""
    print(f"plot of {metric} against step{split}: {path}")
    return 0


def _sweep_dir(sweep: str, parent) -> Path:
    """Where the sweep's files are: the directory given, else the one its parent run names (else here)."""
    if Path(sweep).is_dir():
        return Path(sweep)
    recorded = Path(parent.data.tags.get("sweep.dir", "."))
    return recorded if recorded.is_dir() else Path.cwd()


if __name__ == "__main__":
    sys.exit(main())
