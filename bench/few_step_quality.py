"""Few-step sample quality of IMM against the flow-matching baseline, through the real training loop.

    python bench/few_step_quality.py                                     # the full job (4000 steps)
    python bench/few_step_quality.py --steps 1500 --seeds 0 --jobs 2     # the reduced run

Every run is imm.training.loop.train on a config composed by Hydra from conf/ exactly as
`python launch.py` composes it (default job: 3x256 MLP, batch 512, Euler-FM on OT-FM, k=12, a=1,
b=4, M=4, AdamW 3e-4 with cosine decay, evaluation EMA 0.999), plus the overrides of its variant:

  imm         the default job (kernel=paper, target=online)
  fm          loss=fm: the flow-matching baseline, same network, steps and batch
  kernel_seed kernel=inv_stride   (w~ = 1/(t - s); the label predates the rename, bench/results keep it)
  kernel_unit kernel=unit   (w~ = 1)
  target_ema  target=ema    (theta^- an EMA of the weights instead of the online weights)

The final evaluation (the loop's Evaluator: 5000 samples from fixed noise at 1, 2, 4, 8 steps
against 5000 held-out points, the energy distance averaged over 8 noise draws) gives energy
distance (ED), sliced W2 (SW2) and k-NN precision/recall; ED and SW2 are reported as ratios to the
noise floor (the same metric between two independent data samples), recall next to the floor's
recall. Variants are compared at 1 step.

Runs are independent processes (--jobs in parallel, each with train.threads=--threads); results
are written to --out after every run, and --reuse skips runs already in --out.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

VARIANTS = {
    "imm": [],
    "fm": ["loss=fm"],
    "kernel_seed": ["kernel=inv_stride"],
    "kernel_unit": ["kernel=unit"],
    "target_ema": ["target=ema"],
}
DATASETS = ("checkerboard", "eight_gaussians", "rings")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4000, help="training steps per run (the default job: 4000)")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), help="data=... options (2-D point sets)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="train.seed values")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--eval-steps", nargs="+", type=int, default=[1, 2, 4, 8], help="sampling steps evaluated")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra override for every run, repeatable (e.g. --override train.batch_size=256)",
    )
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    p.add_argument("--threads", type=int, default=1, help="train.threads of each run")
    p.add_argument("--device", default="cpu", help="train.device (cpu, cuda, auto)")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="log every run to this MLflow store (e.g. sqlite:////tmp/bench.db); default: tracking off",
    )
    p.add_argument("--reuse", action="store_true", help="keep the runs already in --out, run only the missing ones")
    p.add_argument("--out", type=Path, default=C.RESULTS_DIR / "few_step_quality.json")
    return p.parse_args(argv)


def run_key(dataset, variant, seed) -> str:
    return f"{dataset}/{variant}/seed{seed}"


def overrides_for(args, dataset, variant, seed):
    steps = ",".join(str(n) for n in args.eval_steps)
    return [
        f"data={dataset}",
        *VARIANTS[variant],
        f"train.steps={args.steps}",
        f"train.seed={seed}",
        f"train.threads={args.threads}",
        f"train.device={args.device}",
        f"train.ckpt_every={args.steps}",
        "train.keep_last=0",
        "eval.every=0",
        f"eval.steps=[{steps}]",
        f"tracking.enabled={'true' if args.tracking_uri else 'false'}",
        *args.override,
    ]


def run_one(overrides, tracking_uri, run_name):
    """Compose the config as launch.py does and train; returns (summary, seconds). Runs in a worker."""
    from hydra import compose, initialize_config_dir

    from imm.launch import register
    from imm.training.loop import train

    logging.basicConfig(level=logging.WARNING)
    register()
    with initialize_config_dir(config_dir=str(C.REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=list(overrides))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="imm-bench-") as run_dir:
        summary = train(cfg, run_dir, tracking_uri=tracking_uri, run_name=run_name)
    return summary, time.perf_counter() - t0


def main(argv=None):
    args = parse_args(argv)
    import torch

    info = C.machine_info(torch.device("cuda" if args.device.startswith("cuda") else "cpu"))
    info["torch_threads"] = args.threads
    results = {}
    if args.reuse and args.out.exists():
        previous = json.loads(args.out.read_text())
        results = previous.get("runs", {})
    todo = [
        (d, v, s) for d in args.datasets for s in args.seeds for v in args.variants if run_key(d, v, s) not in results
    ]
    if args.reuse and not todo and args.out.exists():
        info = previous.get("machine", info)  # nothing new measured: keep the description of the runs
    C.log(f"{len(todo)} runs to do ({len(results)} reused), {args.steps} steps each, {args.jobs} at a time")

    def save():
        payload = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": info,
            "runs": results,
        }
        payload["tables"] = tables(results, args)
        C.write_json(args.out, payload)

    with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {
            pool.submit(run_one, overrides_for(args, d, v, s), args.tracking_uri, f"bench-{d}-{v}-s{s}"): (d, v, s)
            for d, v, s in todo
        }
        for fut in cf.as_completed(futures):
            d, v, s = futures[fut]
            summary, seconds = fut.result()
            results[run_key(d, v, s)] = {
                "dataset": d,
                "variant": v,
                "seed": s,
                "steps": args.steps,
                "seconds": seconds,
                "overrides": overrides_for(args, d, v, s),
                "summary": summary,
            }
            ed1 = next(
                (v for k, v in summary.items() if k.startswith("final/energy_ratio") and k.endswith("_1step")), None
            )
            C.log(f"done {run_key(d, v, s)} in {seconds:.0f}s: ED/floor 1 step {ed1 or float('nan'):.3g}")
            save()
    save()
    report(results, args, info)
    print(f"\nwrote {args.out}")


# -- tables ------------------------------------------------------------------------------------------
def _metric(summary, name, N):
    return summary.get(f"final/{name}_{N}step")


def _ratio(summary, name, N):
    v, floor = _metric(summary, name, N), summary.get(f"final/{name}_floor")
    return v / floor if v is not None and floor else None


def _agg(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None, None
    return statistics.mean(values), min(values), max(values)


def tables(results, args) -> dict:
    """Per (dataset, variant, N): mean (min, max) over seeds of ED/floor, SW2/floor, recall, precision."""
    groups = {}
    for r in results.values():
        groups.setdefault((r["dataset"], r["variant"]), []).append(r["summary"])
    out = []
    for (d, v), summaries in sorted(groups.items()):
        for N in args.eval_steps:
            row = {"dataset": d, "variant": v, "steps": N, "seeds": len(summaries)}
            for name, fn in (
                ("ed_ratio", lambda s: _ratio(s, "energy", N)),
                ("sw2_ratio", lambda s: _ratio(s, "sw2", N)),
                ("recall", lambda s: _metric(s, "recall", N)),
                ("precision", lambda s: _metric(s, "precision", N)),
            ):
                mean, lo, hi = _agg([fn(s) for s in summaries])
                row[name], row[name + "_min"], row[name + "_max"] = mean, lo, hi
            row["recall_floor"] = _agg([s.get("final/recall_floor") for s in summaries])[0]
            row["precision_floor"] = _agg([s.get("final/precision_floor") for s in summaries])[0]
            out.append(row)
    return {"rows": out}


def _cell(row, name, spec):
    v = row.get(name)
    if v is None:
        return "n/a"
    if row.get("seeds", 1) > 1:
        return f"{format(v, spec)} ({format(row[name + '_min'], spec)}-{format(row[name + '_max'], spec)})"
    return format(v, spec)


def report(results, args, info):
    rows = tables(results, args)["rows"]
    seeds = sorted({r["seed"] for r in results.values()})
    secs = [r["seconds"] for r in results.values()]
    print(f"\n## few-step quality: {args.steps} training steps, seeds {seeds} (mean (min-max) over seeds when > 1)")
    print(C.describe(info))
    if secs:
        print(f"{len(secs)} runs, {statistics.median(secs):.0f} s per run (median, train + final evaluation)\n")
    cols = [
        ("dataset", "dataset", None),
        ("objective", "variant", None),
        ("steps", "steps", "d"),
        ("ED / floor", lambda r: _cell(r, "ed_ratio", ".3g"), None),
        ("SW2 / floor", lambda r: _cell(r, "sw2_ratio", ".3g"), None),
        ("recall", lambda r: _cell(r, "recall", ".3f"), None),
        ("precision", lambda r: _cell(r, "precision", ".3f"), None),
        (
            "floor recall / precision",
            lambda r: f"{C.fmt(r.get('recall_floor'), '.3f')} / {C.fmt(r.get('precision_floor'), '.3f')}",
            None,
        ),
    ]
    main_rows = [r for r in rows if r["variant"] in ("imm", "fm")]
    if main_rows:
        print("IMM vs flow matching (same network, steps, batch):")
        print(C.table(sorted(main_rows, key=lambda r: (r["dataset"], r["steps"], r["variant"] != "imm")), cols))
    var_rows = [r for r in rows if r["steps"] == 1 and r["variant"] not in ("fm",)]
    if any(r["variant"] not in ("imm",) for r in var_rows):
        print("\nkernel weighting and target variants at 1 step (imm = kernel=paper, target=online):")
        print(
            C.table(
                sorted(var_rows, key=lambda r: (r["dataset"], list(VARIANTS).index(r["variant"]))),
                [c for c in cols if c[0] != "steps"],
            )
        )


if __name__ == "__main__":
    main()
