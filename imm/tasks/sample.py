"""`python launch.py --config-name sample ckpt=PATH`: few-step samples from a training checkpoint.

Rebuilds the network, parameterization and data from the config stored in the checkpoint, samples
through the trainer's Evaluator (so the noise, labels and grids follow the same rules as the
evaluations logged during training), and writes into `out`:

- samples.png: an image grid (the first 256 images) or a 2-D scatter over the held-out data;
- samples.npz (images: `images` float32 in [-1, 1] [N, C, H, W], `uint8` [N, H, W, C], `labels`,
  `grid`) or samples.npy (points, [N, D] in DATA units: the checkpoint's standardizer undone);
- steps.png: the same noise decoded with each of `compare_steps` (1, 2, 4, 8) side by side;
- sample.json: the options, the exact time grid, the checkpoint and the timing.

Everything is logged to the checkpoint's MLflow run (artifacts under samples/<label>/, the options
as a tag), or to a new run when the checkpoint has none or tracking.new_run=true.

The helpers here (restore a checkpoint, pick the MLflow run) are shared with imm.tasks.evaluate.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from imm import factory
from imm.config import POINT_DATA, ConfigError, loss_T
from imm.data import DataBundle
from imm.evaluation import figures
from imm.evaluation.evaluate import LABEL_MODES, Evaluator, guidance_tag, time_grid
from imm.tracking.mlflow_run import Tracker, TrackingError, check_reachable, default_uri, flatten
from imm.training import checkpoint
from imm.training.checkpoint import CheckpointError

log = logging.getLogger("imm.sample")

WEIGHTS = ("ema", "online")
SAMPLERS = ("pushforward", "restart")
GRIDS = ("uniform", "edm", "eta")
GRID_PNG_MAX = 256  # samples.png shows at most this many images (all are in samples.npz)


# -- the checkpoint ------------------------------------------------------------------------------
@dataclass
class Restored:
    """A checkpoint's network (chosen weights, eval mode) with what is needed to sample from it."""

    path: Path
    step: int
    cfg: object  # the training config (DictConfig)
    net: torch.nn.Module
    param: object
    T: float
    eps: float
    shape: tuple
    num_classes: int
    run_id: str | None
    standardizer: object  # points: imm.data.Standardizer; images: None
    weights: str
    device: torch.device
    _bundle: DataBundle | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return "points" if self.cfg.data.name in POINT_DATA else "images"

    def bundle(self, need_data: bool) -> DataBundle:
        """The training data (rebuilt from the config); images without `need_data`: shape and classes only."""
        if self._bundle is not None:
            return self._bundle
        if self.kind == "images" and not need_data:
            return DataBundle(self.cfg.data.name, "images", None, None, self.shape, self.num_classes)
        self._bundle = factory.dataset(self.cfg)
        if tuple(self._bundle.shape) != self.shape:
            raise CheckpointError(
                f"{self.path} was trained on samples of shape {list(self.shape)}, but its data"
                f" now give {list(self._bundle.shape)}; check data.root / data.path"
            )
        return self._bundle


def resolve_ckpt(ckpt) -> Path:
    """A checkpoint file, or the newest checkpoint of a run directory (or of its checkpoints/ folder)."""
    if ckpt is None or str(ckpt).strip() == "":
        raise ConfigError(
            "ckpt is missing; give a checkpoint file or a run directory, e.g. ckpt=runs/2025-01-01/12-00-00-000000."
        )
    p = Path(str(ckpt)).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        found = checkpoint.list_checkpoints(p) or (
            checkpoint.list_checkpoints(p.parent) if p.name == checkpoint.CKPT_DIR else []
        )
        if not found:
            raise CheckpointError(f"ckpt={ckpt} is a directory without checkpoints in {checkpoint.ckpt_dir(p)}")
        return found[-1]
    raise CheckpointError(f"ckpt={ckpt} does not exist; give a checkpoint file or a run directory")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA device is available; use device=auto or cpu.")
    return device


def _training_config(text: str):
    """The stored training config over today's schema (keys added since then get their defaults)."""
    from imm.config import Config

    saved = OmegaConf.create(text)
    try:
        return OmegaConf.merge(OmegaConf.structured(Config), saved)
    except Exception:  # a key the schema no longer has: use the config as it was saved
        return saved


def restore(ckpt, *, weights: str = "ema", device: str = "auto", data=None) -> Restored:
    """Load a checkpoint (weights_only) and rebuild its network with the EMA or the online weights."""
    if weights not in WEIGHTS:
        raise ConfigError(f"weights={weights!r} is not allowed; choose one of {', '.join(WEIGHTS)}.")
    dev = resolve_device(device)
    path = resolve_ckpt(ckpt)
    state = checkpoint.load(path, required=(*checkpoint.REQUIRED_KEYS, "shape", "num_classes"))
    cfg = _training_config(state["config"])
    for key in ("root", "path"):  # the data moved since training
        if data is not None and data.get(key):
            OmegaConf.update(cfg, f"data.{key}", data.get(key), force_add=True)
    shape, nc = tuple(int(d) for d in state["shape"]), int(state["num_classes"])
    net = factory.net(cfg, shape, nc)
    if weights == "ema":
        prefix = "ema_model."
        weights_sd = {k[len(prefix) :]: v for k, v in state["ema"].items() if k.startswith(prefix)}
        if not weights_sd:
            raise CheckpointError(f"{path} holds no EMA weights (no ema_model.* keys); use weights=online")
    else:
        weights_sd = state["model"]
    try:
        net.load_state_dict(weights_sd)
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: the {weights} weights do not fit the network its config builds ({str(e).splitlines()[0]})"
        ) from None
    net.to(dev).eval().requires_grad_(False)
    standardizer = None
    if state.get("standardizer"):
        from imm.data.points import Standardizer

        standardizer = Standardizer.from_state_dict(state["standardizer"])
    return Restored(
        path=path,
        step=int(state["step"]),
        cfg=cfg,
        net=net,
        param=factory.parameterization(cfg),
        T=loss_T(cfg),
        eps=float(cfg.loss.eps),
        shape=shape,
        num_classes=nc,
        run_id=state.get("mlflow_run_id"),
        standardizer=standardizer,
        weights=weights,
        device=dev,
    )


# -- where things go -------------------------------------------------------------------------------
def task_dirs(cfg, launch_dir=None, out_dir=None) -> tuple[Path, Path]:
    """(launch directory, output directory): Hydra's when run through launch.py, else the cwd and `out`."""
    hydra_out = None
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        launch_dir, hydra_out = launch_dir or hc.runtime.cwd, hc.runtime.output_dir
    except ValueError:  # not inside @hydra.main (a test or a notebook)
        pass
    out = cfg.out or out_dir or hydra_out
    if not out:
        raise ConfigError("out is missing; set out=/path/to/output/directory.")
    return Path(launch_dir or os.getcwd()), Path(out)


class Target:
    """The MLflow run a task logs into: the checkpoint's own run, a new run, or none."""

    def __init__(self, cfg, restored: Restored, launch_dir, command: str):
        self.cfg, self.r, self.command = cfg.tracking, restored, command
        self.enabled = bool(self.cfg.enabled)
        self.tracker, self.new = Tracker.disabled(), False
        if not self.enabled:
            self.uri = None
            return
        trained_uri = restored.cfg.tracking.get("uri", None)
        self.uri = self.cfg.uri or trained_uri or default_uri(launch_dir)
        check_reachable(self.uri)
        self.new = self.cfg.new_run or not restored.run_id
        if not self.new:
            self._check_run_exists()

    def _check_run_exists(self) -> None:
        run_id, uri = self.r.run_id, self.uri
        hint = (
            "set tracking.uri to the store the training logged to (the launch directory's mlflow.db), or"
            " tracking.new_run=true to log into a new run"
        )
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
            raise TrackingError(
                f"the checkpoint's MLflow run {run_id} cannot be in {uri}: the file does not exist; {hint}"
            )
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient(tracking_uri=uri).get_run(run_id)
        except MlflowException:
            raise TrackingError(f"the checkpoint's MLflow run {run_id} is not in {uri}; {hint}") from None

    def open(self, params: dict) -> Tracker:
        """The tracker to log into (created only now, after the work succeeded)."""
        if not self.enabled:
            return self.tracker
        if self.new:
            experiment = self.cfg.experiment or self.r.cfg.tracking.get("experiment", None) or "imm"
            name = self.cfg.run_name or f"{self.command} {self.r.path.parent.parent.name}/{self.r.path.name}"
            tags = {"ckpt": str(self.r.path.resolve()), "ckpt.step": str(self.r.step), "command": self.command}
            if self.r.run_id:
                tags["ckpt.mlflow_run_id"] = self.r.run_id
            self.tracker = Tracker.open(self.uri, experiment, run_name=name, params=params, tags=tags)
        else:
            from mlflow.tracking import MlflowClient

            self.tracker = Tracker(MlflowClient(tracking_uri=self.uri), self.r.run_id)  # its status is left alone
        return self.tracker

    def close(self, status: str = "FINISHED") -> None:
        if self.new:
            self.tracker.end(status)

    def describe(self) -> str:
        if not self.enabled:
            return "MLflow logging disabled (tracking.enabled=false)"
        which = "new MLflow run" if self.new else "the checkpoint's MLflow run"
        return f"{which} {self.tracker.run_id} in {self.uri}"


def task_params(cfg, restored: Restored) -> dict:
    params = {k: v for k, v in flatten(cfg).items() if not k.startswith("tracking.")}
    params.update({"ckpt": str(restored.path.resolve()), "ckpt.step": str(restored.step)})
    return params


def resolve_guidance(value, restored: Restored, key: str) -> float:
    """A guidance scale, null meaning the training run's eval.guidance; refused for unconditional models."""
    w = float(restored.cfg.eval.guidance if value is None else value)
    if not math.isfinite(w):
        raise ConfigError(f"{key}={value} must be a finite number.")
    if w != 1.0 and restored.num_classes == 0:
        raise ConfigError(
            f"{key}={w:g} needs a class-conditional model, but {restored.path.name} was trained"
            f" on unconditional data (data.name={restored.cfg.data.name!r}); use {key}=1."
        )
    return w


def check_grid(key: str, N: int, restored: Restored, grid: str, two_step_eta, etas=None) -> torch.Tensor:
    try:
        return time_grid(
            N,
            schedule=restored.param.schedule,
            T=restored.T,
            eps=restored.eps,
            grid=grid,
            two_step_eta=two_step_eta,
            etas=etas,
        )
    except ValueError as e:
        raise ConfigError(f"{key}: no {N}-step grid: {e}.") from None


# -- the command -------------------------------------------------------------------------------
def _validate(cfg) -> None:
    if OmegaConf.is_missing(cfg, "ckpt"):
        resolve_ckpt(None)
    for key, allowed in (("weights", WEIGHTS), ("sampler", SAMPLERS), ("grid", GRIDS)):
        if cfg[key] not in allowed:
            raise ConfigError(f"{key}={cfg[key]!r} is not allowed; choose one of {', '.join(allowed)}.")
    for key in ("steps", "batch_size"):
        if cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} must be a positive integer.")
    if cfg.n is not None and cfg.n < 1:
        raise ConfigError(f"n={cfg.n} must be a positive integer.")
    if any(n < 1 for n in cfg.compare_steps):
        raise ConfigError(f"compare_steps={list(cfg.compare_steps)} must hold positive integers.")
    if cfg.etas is not None and len(cfg.etas) != cfg.steps - 1:
        raise ConfigError(
            f"etas={list(cfg.etas)} must hold steps - 1 = {cfg.steps - 1} eta points for steps={cfg.steps}."
        )
    labels = cfg.labels
    if not (labels in LABEL_MODES or OmegaConf.is_list(labels) or isinstance(labels, (list, tuple))):
        raise ConfigError(
            f"labels={labels!r} is not allowed; use cycle, uncond or a list of class ids like labels=[3,7]."
        )


def _label_spec(cfg, restored: Restored, guidance: float):
    spec = cfg.labels if isinstance(cfg.labels, str) else [int(c) for c in cfg.labels]
    nc = restored.num_classes
    if isinstance(spec, list):
        if nc == 0:
            raise ConfigError(
                f"labels={spec} needs a class-conditional model, but {restored.path.name} is"
                " unconditional; leave labels=cycle."
            )
        if not spec or min(spec) < 0 or max(spec) >= nc:
            raise ConfigError(f"labels={spec} must be class ids in 0..{nc - 1}.")
    if spec == "uncond" and guidance != 1.0:
        raise ConfigError(
            f"labels=uncond samples with the null label, so guidance={guidance:g} has nothing to"
            " mix; use guidance=1 or class labels."
        )
    return spec


def _grid_name(N: int, cfg) -> str:
    if N == 1:
        return ""
    if cfg.etas is not None or (N == 2 and cfg.two_step_eta is not None):
        etas = list(cfg.etas) if cfg.etas is not None else [cfg.two_step_eta]
        return "-eta" + "_".join(f"{e:g}" for e in etas)
    return f"-{cfg.grid}"


def run(cfg, *, launch_dir=None, out_dir=None) -> dict:
    """Sample according to `cfg` (conf/sample.yaml); returns what sample.json records."""
    _validate(cfg)
    launch_dir, out = task_dirs(cfg, launch_dir, out_dir)
    r = restore(cfg.ckpt, weights=cfg.weights, device=cfg.device, data=cfg.data)
    guidance = resolve_guidance(cfg.guidance, r, "guidance")
    spec = _label_spec(cfg, r, guidance)
    N, compare = int(cfg.steps), sorted({int(n) for n in cfg.compare_steps})
    grid = check_grid("steps", N, r, cfg.grid, cfg.two_step_eta, cfg.etas)
    for M in compare:
        check_grid("compare_steps", M, r, cfg.grid, cfg.two_step_eta, cfg.etas)
    target = Target(cfg, r, launch_dir, "sample")
    bundle = r.bundle(need_data=r.kind == "points")  # points: the held-out data under the scatter
    n = cfg.n or (64 if r.kind == "images" else 5000)

    ev = Evaluator(
        bundle,
        r.param,
        T=r.T,
        eps=r.eps,
        steps=[N],
        n_samples=n,
        batch_size=cfg.batch_size,
        sampler=cfg.sampler,
        grid=cfg.grid,
        two_step_eta=cfg.two_step_eta,
        etas=cfg.etas,
        guidance=guidance,
        seed=cfg.seed,
        device=r.device,
        labels=spec,
        max_images=None,
    )
    log.info(
        "sampling %d %s from %s (step %d, %s weights): %d step%s, %s, grid %s, guidance %g",
        n,
        r.kind,
        r.path,
        r.step,
        r.weights,
        N,
        "s" * (N > 1),
        cfg.sampler,
        [round(float(t), 5) for t in grid],
        guidance,
    )
    t0 = time.perf_counter()
    x = ev.samples(r.net, N)
    seconds = time.perf_counter() - t0

    out.mkdir(parents=True, exist_ok=True)
    files = []
    title = f"{N} step{'s' * (N > 1)}, {cfg.sampler}{guidance_tag(guidance).replace('_w', ', w=')}"
    if r.kind == "points":
        data_units = r.standardizer.unscale(x.float()) if r.standardizer is not None else bundle.unscale(x.float())
        np.save(out / "samples.npy", data_units.numpy())
        figures.save_png(figures.scatter(data_units, bundle.unscale(bundle.heldout), title=title), out / "samples.png")
        files += ["samples.npy", "samples.png"]
    else:
        images = x.float().clamp(-1, 1)
        labels = ev.labels if ev.labels is not None else torch.full((n,), -1)
        from imm.evaluation.fid import to_uint8

        np.savez(
            out / "samples.npz",
            images=images.numpy(),
            uint8=to_uint8(images).permute(0, 2, 3, 1).numpy(),
            labels=labels.numpy(),
            grid=grid.numpy(),
        )
        k = min(n, GRID_PNG_MAX)
        from PIL import Image

        Image.fromarray(figures.image_grid(images[:k], nrow=math.ceil(math.sqrt(k)))).save(out / "samples.png")
        files += ["samples.npz", "samples.png"]

    if compare:
        # images: the figure shows 8 per row; points: up to 5000 for the panels' metrics (2000 are drawn)
        k = min(n, 8 if r.kind == "images" else 5000)
        by_steps, text = {}, {}
        for M in compare:
            by_steps[M] = x[:k] if M == N else ev.samples(r.net, M, n=k)
            if r.kind == "points" and k > 5:  # k-NN recall needs more than k = 5 points
                text[M] = ev.point_results(by_steps[M], M)[1]
        fig = ev.figures(by_steps, text or None)["figures/steps.png"]
        figures.save_png(fig, out / "steps.png")
        files.append("steps.png")

    labels_name = (
        {"cycle": "", "uncond": "-uncond"}.get(spec) if isinstance(spec, str) else "-labels" + "_".join(map(str, spec))
    )
    label = (
        f"step{r.step:08d}-{r.weights}-{N}step-{cfg.sampler}{_grid_name(N, cfg)}{guidance_tag(guidance)}"
        f"{labels_name}-n{n}-seed{cfg.seed}"
    )
    record = {
        "ckpt": str(r.path.resolve()),
        "step": r.step,
        "weights": r.weights,
        "steps": N,
        "sampler": cfg.sampler,
        "grid": [float(t) for t in grid],
        "guidance": guidance,
        "labels": spec,
        "n": n,
        "seed": cfg.seed,
        "kind": r.kind,
        "compare_steps": compare,
        "seconds": round(seconds, 3),
        "files": files,
        "label": label,
        "training_run_id": r.run_id,
    }
    (out / "sample.json").write_text(json.dumps(record, indent=2) + "\n")
    files.append("sample.json")

    tracker = target.open(task_params(cfg, r))
    try:
        for f in files:
            tracker.log_artifact(out / f, f"samples/{label}")
        tracker.set_tags(
            {
                f"samples.{label}": json.dumps(
                    {k: record[k] for k in ("steps", "sampler", "grid", "guidance", "labels", "n", "seed", "weights")}
                )
            }
        )
        tracker.log_metrics({f"sample/seconds_{N}step": seconds}, r.step)
    except BaseException:
        target.close("FAILED")
        raise
    target.close("FINISHED")
    record["mlflow_run_id"] = tracker.run_id
    log.info("wrote %s to %s in %.2f s", ", ".join(files), out.resolve(), seconds)
    if target.enabled:
        log.info("logged to %s under samples/%s", target.describe(), label)
    return record
