"""`python launch.py --config-name evaluate ckpt=PATH`: the metrics of a training checkpoint.

- Images: FID against the training set for every step count in eval.steps and guidance scale in
  eval.guidance, on eval.n_samples generated images (50000 by default, as in the paper), named
  evaluate/fid50k_2step (evaluate/fid50k_2step_w1.5 with guidance); eval.fid=false skips it. The
  training set's Inception statistics are cached in eval.fid_cache. Offline, point
  eval.inception_weights at a local weights file. Labelled sets with a held-out split (digits, MNIST)
  also get the classifier metric (imm/evaluation/classifier.py) on eval.n_samples capped at the
  training split's size.
- Points: energy distance (the mean over eval.draws noise draws), sliced W2 and k-NN
  precision/recall (k = 5) against the held-out data for every step count, and the same metrics
  between two data samples (the noise floor).

Sampling and metrics are the trainer's Evaluator's, so with the same settings the numbers repeat
those logged during training. The metrics are logged to the checkpoint's MLflow run at the
checkpoint's step under their own prefix, evaluate/... (online weights: evaluate_online/..., another
sampler or grid: evaluate_restart_edm/...; metric_prefix), so they never add to the training's eval/...
history; they are printed as a table and written to `out` (results.json, results.txt, steps.png).
"""

from __future__ import annotations

import json
import logging
import math
import time

from omegaconf import OmegaConf

from imm.config import EvaluateOptions
from imm.core.sampling import GRIDS, SAMPLERS
from imm.diskspace import replacing, writing
from imm.errors import ConfigError
from imm.evaluation import figures
from imm.evaluation.evaluator import Evaluator, feature_network, has_classifier_metric
from imm.evaluation.fid import MissingInceptionWeights, resolve_inception_weights
from imm.metrics import metric_parts
from imm.ranges import check_values
from imm.report import render
from imm.tasks.common import (
    WEIGHTS,
    ResultsRun,
    check_choices,
    log_results,
    require_ckpt,
    resolve_guidance,
    restore,
    sample_count,
    task_dirs,
)
from imm.validation import check_point_samples

log = logging.getLogger("imm.evaluate")
FID_N_DEFAULT = 50_000  # FID-50k, as every reported number in the paper


def metric_prefix(weights: str, options) -> str:
    """evaluate (EMA weights, pushforward sampler, uniform grid), evaluate_online, evaluate_restart_edm, ...:
    the prefix of the evaluate command's metrics, apart from the training's eval/ and from each other's."""
    parts = ["evaluate"] + (["online"] if weights == "online" else [])
    defaults = EvaluateOptions()
    parts += [getattr(options, k) for k in ("sampler", "grid") if getattr(options, k) != getattr(defaults, k)]
    return "_".join(parts)


def _what(n: int, guidances, feature_net, classifier, n_heldout: int) -> str:
    """What is measured, for the log line and the results header."""
    if classifier is None and feature_net is None:
        return f"{n} samples against {n_heldout} held-out points"
    scales = ", ".join(f"{w:g}" for w in guidances)
    parts = [f"FID of {n} images ({feature_net} features)"] if feature_net else []
    if classifier is not None:
        parts.append(f"classifier metric of {classifier.n} images against {classifier.n_heldout} held-out images")
    return f"{' and '.join(parts)}, guidance {scales}"


def _validate(cfg) -> None:
    if OmegaConf.is_missing(cfg, "ckpt"):
        require_ckpt(None)
    check_values(cfg)
    ev = cfg.eval
    check_choices(
        [
            ("weights", cfg.weights, WEIGHTS),
            ("eval.sampler", ev.sampler, SAMPLERS),
            ("eval.grid", ev.grid, GRIDS),
        ]
    )
    feature_network(ev.feature_net)  # a module:Class that cannot be imported: one sentence now


def _guidances(cfg, restored) -> list[float]:
    value = cfg.eval.guidance
    values = list(value) if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else [value]
    try:
        values = [None if v is None else float(v) for v in values]
    except (TypeError, ValueError):
        raise ConfigError(
            f"eval.guidance={value!r} must be a number or a list of numbers, e.g. eval.guidance=[1.0,1.5]."
        ) from None
    return list(dict.fromkeys(resolve_guidance(v, restored, "eval.guidance") for v in values))


def table(results: dict, floor_prefix: str = "eval") -> str:
    """The results as rows (metric, guidance) by columns (step counts, then the noise floor)."""
    rows, columns, cells = {}, set(), {}  # rows: {row label: its metric family}
    floors = {}
    for name, value in results.items():
        parts = metric_parts(name)
        if parts is None:
            if name.endswith("_floor"):
                floors[name.split("/", 1)[1][: -len("_floor")]] = value
            continue
        family, steps, guidance = parts
        row = family + ("" if guidance is None else f" w={guidance}")
        rows.setdefault(row, family)
        columns.add(steps)
        cells[row, steps] = value
    columns = sorted(columns)
    header = ["metric"] + [f"{n} step" + "s" * (n > 1) for n in columns] + (["floor"] if floors else [])
    lines = [header]
    for row, family in rows.items():
        floor = [_fmt(floors.get(family))] if floors else []
        lines.append([row] + [_fmt(cells.get((row, n))) for n in columns] + floor)
    return render(lines[0], lines[1:], right=range(1, len(header)), rule=False)


def _fmt(v) -> str:
    if v is None:
        return "-"
    return "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.5g}"


def _check_against_model(ev_cfg, restored, guidances, fid: bool) -> None:
    """The options the model decides: FID's Inception weights must be there (before any work), guidance and the
    k-NN sample count fit point models only as they are."""
    if fid and ev_cfg.feature_net == "inception":
        try:
            resolve_inception_weights(ev_cfg.inception_weights, ev_cfg.allow_download)
        except MissingInceptionWeights as e:
            raise ConfigError(str(e)) from None
    if restored.kind != "images" and guidances != [1.0]:
        raise ConfigError(f"eval.guidance={guidances} is for class-conditional image models; use eval.guidance=1.")
    if restored.kind != "images" and ev_cfg.n_samples is not None:
        check_point_samples("eval.n_samples", ev_cfg.n_samples)


def _evaluator(ev_cfg, restored, bundle, plan, n: int, guidances, fid: bool) -> Evaluator:
    """The Evaluator of `evaluate`'s options: images get n FID (and classifier-metric) samples per step count and
    guidance scale, and 64 fixed-noise images for the figure; points get n samples."""
    if restored.kind == "images":  # n is the FID's (and the classifier metric's) count; 64 are the figure's
        return Evaluator.from_options(
            ev_cfg,
            bundle,
            restored.param,
            plan,
            device=restored.device,
            data_root=restored.cfg.data.get("root", None),
            n_samples=64,
            fid=fid,
            fid_n_samples=n,
            fid_guidances=guidances,
            classifier_n_samples=n,
        )
    return Evaluator.from_options(ev_cfg, bundle, restored.param, plan, device=restored.device, n_samples=n)


def _measured(ev_cfg, restored, guidances) -> tuple[bool, bool, object]:
    """Whether FID and the classifier metric are measured, and the data the measuring needs, else ConfigError."""
    images = restored.kind == "images"
    fid = images and ev_cfg.fid
    _check_against_model(ev_cfg, restored, guidances, fid)
    if fid and not ev_cfg.fid_ref and restored.latents is not None and not restored.latents.source.get("root"):
        raise ConfigError(
            f"{restored.path} records no images its latents came from (an imported model), so FID needs reference"
            " statistics: set eval.fid_ref=FILE.npz (ADM's VIRTUAL_imagenet256_labeled.npz for ImageNet-256), or"
            " data.source_root=DIR (the images) and data.vae."
        )
    # with fixed reference statistics (eval.fid_ref) images need no training data, unless a classifier metric does
    no_classifier = not ev_cfg.classifier or restored.num_classes == 0
    bundle = restored.bundle(need_data=not (images and fid and ev_cfg.fid_ref and no_classifier))
    classifier = images and ev_cfg.classifier and has_classifier_metric(bundle)
    if images and not (fid or classifier):
        why = (
            "with eval.classifier=false"
            if not ev_cfg.classifier
            else f"as data.name={restored.cfg.data.name!r} has no classifier metric (labelled digits or mnist)"
        )
        raise ConfigError(f"eval.fid=false leaves nothing to measure {why}; use eval.fid=true.")
    return fid, classifier, bundle


def run(cfg, *, launch_dir=None, out_dir=None) -> dict:
    """Evaluate according to `cfg` (conf/evaluate.yaml); returns {metric name: value}."""
    _validate(cfg)
    launch_dir, out = task_dirs(cfg, launch_dir, out_dir)
    ev_cfg = cfg.eval
    restored = restore(cfg.ckpt, weights=cfg.weights, device=cfg.device, data=cfg.data)
    guidances = _guidances(cfg, restored)
    plan = restored.plan(ev_cfg, {"eval.steps": ev_cfg.steps}, guidances[0])
    fid, classifier, bundle = _measured(ev_cfg, restored, guidances)
    results_run = ResultsRun(cfg, restored, launch_dir, "evaluate")
    n = sample_count(ev_cfg.n_samples, bundle, images=FID_N_DEFAULT)
    evaluator = _evaluator(ev_cfg, restored, bundle, plan, n, guidances, fid)
    n_heldout = 0 if bundle.heldout is None else len(bundle.heldout)
    what = _what(n, guidances, ev_cfg.feature_net if fid else None, evaluator.classifier, n_heldout)
    log.info(
        "evaluating %s (step %d, %s weights): %s at %s steps",
        restored.path,
        restored.step,
        restored.weights,
        what,
        list(ev_cfg.steps),
    )
    t0 = time.perf_counter()
    results, figs, _ = evaluator(restored.net)
    if classifier:
        results.update(evaluator.classifier_results(restored.net, guidances=guidances[1:]))
    seconds = time.perf_counter() - t0
    if fid:
        fe = evaluator.fid_evaluator
        cache = f" ({fe.reference_cache})" if fe.reference_cache is not None else ""
        log.info("FID reference statistics: %s%s", fe.reference_source, cache)
    prefix = metric_prefix(restored.weights, ev_cfg)  # never the training's eval/: its history stays as logged
    results = {f"{prefix}/{k.split('/', 1)[1]}": v for k, v in results.items()}

    with writing(out):  # a read-only file system: DiskFullError
        out.mkdir(parents=True, exist_ok=True)
    text = table(results)
    header = (
        f"{restored.path} (step {restored.step}, {restored.weights} weights): {what},"
        f" {ev_cfg.sampler} sampler, {ev_cfg.grid} grid"
    )
    if 2 in ev_cfg.steps and ev_cfg.two_step_eta is not None:
        header += f" (2 steps: eta {ev_cfg.two_step_eta:g})"
    if fid:
        header += f"; FID reference statistics: {evaluator.fid_evaluator.reference_source}"
    with replacing(out / "results.txt") as tmp:  # a full disk: DiskFullError, any earlier results kept
        tmp.write_text(header + "\n" + text + "\n")
    label = f"step{restored.step:08d}-{restored.weights}"
    record = {
        "ckpt": str(restored.path.resolve()),
        "step": restored.step,
        "weights": restored.weights,
        "n_samples": n,
        "guidance": guidances,
        "steps": list(ev_cfg.steps),
        "sampler": ev_cfg.sampler,
        "grid": ev_cfg.grid,
        "two_step_eta": ev_cfg.two_step_eta,
        "seed": ev_cfg.seed,
        "seconds": round(seconds, 2),
        "feature_net": ev_cfg.feature_net if fid else None,
        "fid_reference": evaluator.fid_evaluator.reference_source if fid else None,
        "results": results,
    }
    with replacing(out / "results.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    files = ["results.txt", "results.json"]
    for name, fig in figs.items():
        figures.save_png(fig, out / "steps.png")
        files.append("steps.png")

    shown = ("n_samples", "guidance", "steps", "sampler", "grid", "two_step_eta", "seed", "feature_net")
    log_results(
        results_run,
        cfg,
        restored,
        out,
        files,
        folder=f"evaluations/{label}",
        tags={f"evaluate.{label}": json.dumps({k: record[k] for k in shown})},
        metrics=results,
    )
    print(header)
    print(text, flush=True)
    log.info("evaluated in %.1f s; wrote %s to %s", seconds, ", ".join(files), out.resolve())
    if results_run.enabled:
        log.info("metrics logged at step %d to %s", restored.step, results_run.where())
    return results
