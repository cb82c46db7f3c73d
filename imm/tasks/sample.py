"""`python launch.py --config-name sample ckpt=PATH`: few-step samples from a training checkpoint.

Rebuilds the network, parameterization and data from the config stored in the checkpoint, samples
through the trainer's Evaluator (so the noise, labels and grids follow the same rules as the
evaluations logged during training), and writes into `out`:

- samples.png: an image grid (the first 256 images) or a 2-D scatter with the held-out data drawn over it;
- samples.npz (images and latents: `samples`, the sampler's float64 output in model space, unclamped;
  images: `images` float32 in [-1, 1] [N, C, H, W], `uint8` [N, H, W, C], `labels`, `grid`; latents: `latents`
  float32 [N, C, h, w] in model space and `uint8` the images the VAE decodes them to) or samples.npy (points,
  [N, D] in DATA units: the checkpoint's standardizer undone);
- steps.png: the same noise decoded with each of `compare_steps` (1, 2, 4, 8) side by side; for points with
  each panel's ED/floor (one noise draw, at the n of the floor) and recall;
- sample.json: the options, the exact time grid, the NFE, the checkpoint, the panels' numbers and the timing.

Points default to the held-out size, the n `evaluate` measures at, so steps.png's ED/floor and evaluate's
energy_ratio<n> have the same n (evaluate's is the mean over eval.draws noise draws; the label says which).
With `noise=FILE.npy` the sampler starts from the file's states ([n, *sample shape], already scaled by
sigma_data, as the official generator's latents are) instead of drawing them, and `labels` may be a list or a
.npy file of one class id per sample: any result can be compared with another tool's on identical inputs.

Everything is logged to the checkpoint's MLflow run (artifacts under samples/<label>/, the options
as a tag), or to a new run when the checkpoint has none or tracking.new_run=true.

The helpers it shares with `evaluate` (restore a checkpoint, pick the MLflow run) are imm.tasks.common's.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from imm.core.sampling import GRIDS, SAMPLERS, grid_spec, nfe
from imm.diskspace import replacing, writing
from imm.errors import ConfigError
from imm.evaluation import figures
from imm.evaluation.evaluator import Evaluator, guidance_tag, nfe_metric
from imm.evaluation.fid import to_uint8
from imm.metrics import MIN_POINTS
from imm.ranges import check_values
from imm.tasks.common import (
    WEIGHTS,
    ResultsRun,
    check_choices,
    check_labels,
    label_spec,
    log_results,
    read_npy,
    require_ckpt,
    resolve_guidance,
    restore,
    sample_count,
    task_dirs,
)

log = logging.getLogger("imm.sample")

GRID_PNG_MAX = 256  # samples.png shows at most this many images (all are in samples.npz)


def _validate(cfg) -> None:
    if OmegaConf.is_missing(cfg, "ckpt"):
        require_ckpt(None)
    check_values(cfg)
    check_choices([("weights", cfg.weights, WEIGHTS), ("sampler", cfg.sampler, SAMPLERS), ("grid", cfg.grid, GRIDS)])
    if cfg.etas is not None and len(cfg.etas) != cfg.steps - 1:
        raise ConfigError(
            f"etas={list(cfg.etas)} must hold steps - 1 = {cfg.steps - 1} eta points for steps={cfg.steps}."
        )
    check_labels(cfg.labels)
    if cfg.noise is not None and not Path(cfg.noise).expanduser().is_file():
        raise ConfigError(f"noise={cfg.noise} does not exist; give a .npy file of the sampler's first states.")


def _noise(cfg, restored) -> torch.Tensor | None:
    """noise=FILE.npy: [n, *sample shape] floats, the sampler's first state as it is (already x sigma_data)."""
    if cfg.noise is None:
        return None
    noise = read_npy(cfg.noise, "noise")
    shape = list(restored.shape)
    if noise.dtype.kind != "f" or list(noise.shape[1:]) != shape or noise.ndim != len(shape) + 1 or not len(noise):
        raise ConfigError(
            f"noise={cfg.noise} holds {noise.dtype} of shape {list(noise.shape)}; this model samples floats of shape"
            f" [n, {', '.join(map(str, shape))}]."
        )
    if cfg.n is not None and cfg.n != len(noise):
        raise ConfigError(f"n={cfg.n} but noise={cfg.noise} holds {len(noise)} samples; leave n out with noise.")
    return torch.from_numpy(noise.copy())


def _grid_name(N: int, cfg) -> str:
    """The grid's part of the MLflow label: "" (1 step), "-eta1.4" (eta points), else "-<grid>"."""
    kind, points = grid_spec(cfg.grid, N, etas=cfg.etas, two_step_eta=cfg.two_step_eta)
    if kind == "endpoints":
        return ""
    return "-eta" + "_".join(f"{e:g}" for e in points) if points is not None else f"-{kind}"


def _label(cfg, restored, N: int, guidance: float, spec, n: int) -> str:
    """What tells this sampling apart in the MLflow run: step0000400-ema-2step-pushforward-eta1.4_w1.5-n64-seed0."""
    if isinstance(spec, str):
        labels_name = {"cycle": "", "uncond": "-uncond"}.get(spec)
    else:
        labels_name = "-labels" + "_".join(map(str, spec))
    return (
        f"step{restored.step:08d}-{restored.weights}-{N}step-{cfg.sampler}{_grid_name(N, cfg)}{guidance_tag(guidance)}"
        f"{labels_name}-n{n}-seed{cfg.seed}"
    )


def run(cfg, *, launch_dir=None, out_dir=None) -> dict:
    """Sample according to `cfg` (conf/sample.yaml); returns what sample.json records."""
    started = time.perf_counter()
    _validate(cfg)
    launch_dir, out = task_dirs(cfg, launch_dir, out_dir)
    restored = restore(cfg.ckpt, weights=cfg.weights, device=cfg.device, data=cfg.data)
    guidance = resolve_guidance(cfg.guidance, restored, "guidance")
    spec = label_spec(cfg.labels, restored, guidance)
    N, compare = int(cfg.steps), sorted({int(n) for n in cfg.compare_steps})
    plan = restored.plan(cfg, {"steps": [N], "compare_steps": compare}, guidance)
    grid = plan.grids[N]
    results_run = ResultsRun(cfg, restored, launch_dir, "sample")
    bundle = restored.bundle(need_data=restored.kind == "points")  # points: the held-out data in the scatter
    noise = _noise(cfg, restored)
    n = len(noise) if noise is not None else sample_count(cfg.n, bundle, images=64)
    if isinstance(spec, list) and isinstance(cfg.labels, str) and len(spec) != n:
        raise ConfigError(f"labels={cfg.labels} holds {len(spec)} ids for {n} samples; give one id per sample.")
    ev = Evaluator.from_options(  # the figure's panels show ED/floor and recall only: the energy's floor suffices
        cfg,
        bundle,
        restored.param,
        plan,
        device=restored.device,
        n_samples=n,
        labels=spec,
        max_images=None,
        energy_floor_only=True,
    )
    if noise is not None:  # the sampler's first states from the file (the labels as the spec gives them)
        ev.noise = noise
    log.info(
        "sampling %d %s from %s (step %d, %s weights): %d step%s (NFE %d), %s, grid %s, guidance %g",
        n,
        restored.kind,
        restored.path,
        restored.step,
        restored.weights,
        N,
        "s" * (N > 1),
        nfe(N, guidance),
        cfg.sampler,
        [round(float(t), 5) for t in grid],
        guidance,
    )
    t0 = time.perf_counter()
    x = ev.samples(restored.net, N)
    seconds = time.perf_counter() - t0
    log.info("sampled in %.2f s", seconds)

    with writing(out):  # a read-only file system: DiskFullError
        out.mkdir(parents=True, exist_ok=True)
    title = f"{N} step{'s' * (N > 1)}, {cfg.sampler}{guidance_tag(guidance).replace('_w', ', w=')}"
    if restored.kind == "points":
        files = _write_points(x, restored, bundle, out, title)
    else:
        files = _write_images(x, ev, bundle, grid, out, cfg.batch_size)
    panels = _write_steps_figure(x, ev, restored, N, compare, out, files) if compare else {}

    label = _label(cfg, restored, N, guidance, spec, n)
    record = {
        "ckpt": str(restored.path.resolve()),
        "step": restored.step,
        "weights": restored.weights,
        "steps": N,
        "sampler": cfg.sampler,
        "grid": [float(t) for t in grid],
        "guidance": guidance,
        "nfe": nfe(N, guidance),
        "labels": spec,
        "n": n,
        "seed": cfg.seed,
        "noise": None if noise is None else str(Path(cfg.noise).expanduser().resolve()),
        "kind": restored.kind,
        "compare_steps": compare,
        "steps_figure": {str(k): v for k, v in panels.items()},  # each panel's text: ED/floor (n, draws), recall
        "seconds": round(seconds, 3),
        "files": files,
        "label": label,
        "training_run_id": restored.run_id,
    }
    with replacing(out / "sample.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    files.append("sample.json")

    shown = ("steps", "nfe", "sampler", "grid", "guidance", "labels", "n", "seed", "weights")
    record["mlflow_run_id"] = log_results(
        results_run,
        cfg,
        restored,
        out,
        files,
        folder=f"samples/{label}",
        tags={f"samples.{label}": json.dumps({k: record[k] for k in shown})},
        metrics={f"sample/seconds_{N}step": seconds, nfe_metric(N, guidance, prefix="sample"): record["nfe"]},
    )
    if results_run.enabled:
        log.info("logged under samples/%s to %s", label, results_run.where())
    # the whole command since its start (loading, the floor, the figure, MLflow), not the sampling alone
    log.info("wrote %s to %s; %.1f s in all", ", ".join(files), out.resolve(), time.perf_counter() - started)
    return record


def _write_points(x, restored, bundle, out: Path, title: str) -> list[str]:
    """samples.npy (in the data's units) and samples.png (a scatter over the held-out points)."""
    unscale = restored.standardizer.unscale if restored.standardizer is not None else bundle.unscale
    data_units = unscale(x.float())
    with replacing(out / "samples.npy", needed=data_units.numpy().nbytes) as tmp:  # full disk: DiskFullError
        np.save(tmp, data_units.numpy())
    figures.save_png(figures.scatter(data_units, bundle.unscale(bundle.heldout), title=title), out / "samples.png")
    return ["samples.npy", "samples.png"]


def _write_images(x, ev, bundle, grid, out: Path, batch_size: int) -> list[str]:
    """samples.npz (model-space floats, uint8 images, labels, the grid) and samples.png (a grid of images)."""
    n = len(x)
    labels = ev.labels if ev.labels is not None else torch.full((n,), -1)
    # latents: decoded by the VAE in batches, kept as uint8 (50k float images at 256 x 256 would take 39 GB)
    u8 = torch.cat([to_uint8(bundle.to_images(chunk.float())) for chunk in x.split(batch_size)])
    if bundle.latents is None:
        arrays = {"images": x.float().clamp(-1, 1).numpy()}
    else:  # model space, no [-1, 1] range; the images are the VAE's decoding (uint8)
        arrays = {"latents": x.float().numpy()}
    # the sampler's float64 output in model space, as it is (unclamped): what another tool's samples compare with
    arrays.update(samples=x.numpy(), uint8=u8.permute(0, 2, 3, 1).numpy(), labels=labels.numpy(), grid=grid.numpy())
    with replacing(out / "samples.npz", needed=sum(a.nbytes for a in arrays.values())) as tmp:
        np.savez(tmp, **arrays)
    k = min(n, GRID_PNG_MAX)
    with replacing(out / "samples.png") as tmp:
        Image.fromarray(figures.image_grid(u8[:k], nrow=math.ceil(math.sqrt(k)))).save(tmp)
    return ["samples.npz", "samples.png"]


def _write_steps_figure(x, ev, restored, N: int, compare, out: Path, files: list) -> dict:
    """steps.png (added to `files`), its time logged; returns {step count: its panel's text}."""
    started = time.perf_counter()
    fig, panels = _steps_figure(x, ev, restored, N, compare)
    figures.save_png(fig, out / "steps.png")
    files.append("steps.png")
    log.info(
        "steps.png: %s steps on the same noise%s in %.2f s",
        ", ".join(map(str, compare)),
        f", ED/floor and recall of {ev.floor_n} samples each" if panels else "",
        time.perf_counter() - started,
    )
    return panels


def _steps_figure(x, ev, restored, N: int, compare) -> tuple[object, dict]:
    """The step-comparison figure: the same noise at each of `compare` step counts (x: the N-step samples), and
    {step count: its panel's text}. Points: the panels' ED/floor on as many samples as the floor (floor_n)."""
    # images: the figure shows 8 per row; points: as many as the floor has for the panels' metrics (2000 drawn)
    k = min(len(x), 8 if restored.kind == "images" else ev.floor_n)
    measured = restored.kind == "points" and k == ev.floor_n and k >= MIN_POINTS  # the k-NN recall needs that many
    by_steps, text = {}, {}
    for n_steps in compare:
        by_steps[n_steps] = x[:k] if n_steps == N else ev.samples(restored.net, n_steps, n=k)
        if measured:
            text[n_steps] = ev.panel_text(by_steps[n_steps])
    return ev.figures(by_steps, text or None)["figures/steps.png"], text
