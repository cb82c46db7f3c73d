"""What `--config-name sample` and `--config-name evaluate` share: restore a checkpoint, check its
options against it (choices, guidance, labels, time grids), and say where the results go (the output
directory and the MLflow run). Each command's module holds only its command.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from imm import factory
from imm.config import saved_config
from imm.data import DataBundle
from imm.data.latents import LatentCodec
from imm.data.points import Standardizer
from imm.errors import CheckpointError, ConfigError, TrackingError
from imm.evaluation.evaluator import LABEL_MODES
from imm.factory import loss_T
from imm.tracking.mlflow_run import Tracker, check_store, default_uri, flatten, sqlite_path, ui_links
from imm.training import checkpoint
from imm.training.threads import IdleCores, torch_threads
from imm.validation import POINT_DATA, Sampling, not_allowed, sampling_plan

log = logging.getLogger("imm.task")

WEIGHTS = ("ema", "online")


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
    latents: object  # data=latents: imm.data.latents.LatentCodec (normalisation and VAE); else None
    weights: str
    device: torch.device
    _bundle: DataBundle | None = field(default=None, repr=False)

    def plan(self, options, steps: dict[str, list], guidance: float) -> Sampling:
        """The Sampling of `options` on this model's schedule, T and eps (imm.validation.sampling_plan); a grid
        the options cannot give: ConfigError naming its key."""
        return sampling_plan(
            options,
            steps,
            schedule=self.param.schedule,
            T=self.T,
            eps=self.eps,
            guidance=guidance,
            numerics=self.param.numerics,
        )

    @property
    def kind(self) -> str:
        return "points" if self.cfg.data.name in POINT_DATA else "images"

    def bundle(self, need_data: bool) -> DataBundle:
        """The training data (rebuilt from the config); images without `need_data`, and latents (whose FID
        reference is the images they were encoded from): shape, classes and the codec only."""
        if self._bundle is not None:
            return self._bundle
        if self.kind == "images" and (not need_data or self.latents is not None):
            return DataBundle(
                self.cfg.data.name, "images", None, None, self.shape, self.num_classes, latents=self.latents
            )
        self._bundle = factory.dataset(self.cfg)
        if tuple(self._bundle.shape) != self.shape:
            raise CheckpointError(
                f"{self.path} was trained on samples of shape {list(self.shape)}, but its data"
                f" now give {list(self._bundle.shape)}; check data.root / data.path"
            )
        return self._bundle


def require_ckpt(ckpt):
    """`ckpt`, or the ConfigError that says it is missing."""
    if ckpt is None or str(ckpt).strip() == "":
        raise ConfigError(
            "ckpt is missing; give a checkpoint file or a run directory (runs/<experiment>/<hash>), e.g."
            " ckpt=runs/toy/e3b0c442."
        )
    return ckpt


def restore(ckpt, *, weights: str = "ema", device: str = "auto", data=None) -> Restored:
    """Load the file `ckpt` names (an EMA snapshot or a training state, or a run directory: its newest of
    either; weights_only) and rebuild its network with the EMA or, from a training state, the online weights;
    `data`: where the training data (and for latents the VAE and the encoded images) live now. Of a training
    state only the weights are used."""
    check_choices([("weights", weights, WEIGHTS)])
    dev = factory.device(device, key="device")
    path = checkpoint.resolve(require_ckpt(ckpt), key="ckpt", snapshots=True)
    state = checkpoint.load(path, required=checkpoint.SAMPLING_KEYS)
    if weights == "online" and state.get("kind") == checkpoint.SNAPSHOT:
        raise CheckpointError(
            f"{path} is an EMA snapshot, which holds no online weights; for weights=online give a training state"
            f" (a step-XXXXXXXX.pt file in the run's {checkpoint.CKPT_DIR}/), or use weights=ema."
        )
    cfg = saved_config(state["config"])
    for key in ("root", "path"):  # the data moved since training
        if data is not None and data.get(key):
            OmegaConf.update(cfg, f"data.{key}", data.get(key), force_add=True)
    shape, nc = tuple(int(d) for d in state["shape"]), int(state["num_classes"])
    _take_threads(cfg.arch.name)
    net = factory.net(cfg, shape, nc)
    if weights == "ema":
        prefix = "ema_model."
        weights_sd = {k[len(prefix) :]: v for k, v in state["ema"].items() if k.startswith(prefix)}
        if not weights_sd:
            raise CheckpointError(f"{path} holds no EMA weights (no ema_model.* keys); use weights=online")
    else:
        weights_sd = state.get("model")
        if not weights_sd:
            raise CheckpointError(f"{path} holds no online weights (no model key); use weights=ema")
    try:
        net.load_state_dict(weights_sd)
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: the {weights} weights do not fit the network its config builds ({str(e).splitlines()[0]})"
        ) from None
    net.to(dev).eval().requires_grad_(False)
    standardizer = None
    if state.get("standardizer"):
        standardizer = Standardizer.from_state_dict(state["standardizer"])
    latents = None
    if state.get("latents"):
        moved = {key: data.get(key) if data is not None else None for key in ("vae", "source_root")}
        latents = LatentCodec.from_state_dict(state["latents"], **moved)
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
        latents=latents,
        weights=weights,
        device=dev,
    )


def _take_threads(arch: str) -> None:
    """torch threads by the training's rule (imm.training.threads.torch_threads): a point net takes the cores other
    processes leave idle, measured now over half a second (a second thread beside a busy process made a point
    evaluation 13x slower), an image net its cores; OMP_NUM_THREADS decides where it is set."""
    threads = torch_threads(None, arch)
    count = IdleCores().settle() if threads.follow else threads.count
    torch.set_num_threads(count)
    log.info("torch threads: %d (%s)", count, threads.source)


def sample_count(n, bundle: DataBundle, *, images: int) -> int:
    """`n` samples, or by default `images` for images and the held-out size for points: `sample`'s steps.png and
    `evaluate` read ED/floor at the same n unless told otherwise (docs/commands.md)."""
    if n:
        return int(n)
    return images if bundle.kind == "images" else len(bundle.heldout)


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


class ResultsRun:
    """The MLflow run a task logs into: the checkpoint's own run, a new run, or none."""

    def __init__(self, cfg, restored: Restored, launch_dir, command: str):
        self.cfg, self.restored, self.command = cfg.tracking, restored, command
        self.enabled = bool(self.cfg.enabled)
        self.tracker, self.new = Tracker.disabled(), False
        if not self.enabled:
            self.uri = None
            return
        trained_uri = restored.cfg.tracking.get("uri", None)
        self.uri = self.cfg.uri or trained_uri or default_uri(launch_dir)
        check_store(self.uri)
        self.new = self.cfg.new_run or not restored.run_id
        if not self.new:
            self._check_run_exists()

    def _check_run_exists(self) -> None:
        run_id, uri = self.restored.run_id, self.uri
        hint = (
            "set tracking.uri to the store the training logged to (the launch directory's mlflow.db), or"
            " tracking.new_run=true to log into a new run"
        )
        if (db := sqlite_path(uri)) is not None and not db.is_file():
            raise TrackingError(
                f"the checkpoint's MLflow run {run_id} cannot be in {uri}: the file does not exist; {hint}"
            )
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            run = MlflowClient(tracking_uri=uri).get_run(run_id)
        except MlflowException:
            raise TrackingError(f"the checkpoint's MLflow run {run_id} is not in {uri}; {hint}") from None
        if run.info.lifecycle_stage == "deleted":
            raise TrackingError(
                f"the checkpoint's MLflow run {run_id} was deleted in {uri}; restore it (mlflow runs restore --run-id"
                f" {run_id}) or set tracking.new_run=true to log into a new run."
            )

    def open(self, params: dict) -> Tracker:
        """The tracker to log into (created only now, after the work succeeded)."""
        if not self.enabled:
            return self.tracker
        if self.new:
            experiment = self.cfg.experiment or self.restored.cfg.tracking.get("experiment", None) or "imm"
            name = (
                self.cfg.run_name or f"{self.command} {self.restored.path.parent.parent.name}/{self.restored.path.name}"
            )
            tags = {
                "ckpt": str(self.restored.path.resolve()),
                "ckpt.step": str(self.restored.step),
                "command": self.command,
            }
            if self.restored.run_id:
                tags["ckpt.mlflow_run_id"] = self.restored.run_id
            self.tracker = Tracker.open(self.uri, experiment, run_name=name, params=params, tags=tags)
        else:
            from mlflow.tracking import MlflowClient

            # the training run: logged into, its status left alone
            self.tracker = Tracker(MlflowClient(tracking_uri=self.uri), self.restored.run_id)
        return self.tracker

    def close(self, status: str = "FINISHED") -> None:
        if self.new:
            self.tracker.end(status)

    def where(self) -> str:
        """The run and its store; and its page in the MLflow UI, a direct address (MLflow 3 opens on GenAI pages)."""
        if not self.enabled:
            return "MLflow logging disabled (tracking.enabled=false)"
        which = "new MLflow run" if self.new else "the checkpoint's MLflow run"
        links = ui_links(self.uri, self.tracker.run_id)
        return f"{which} {self.tracker.run_id} in {self.uri}" + (f"; in the MLflow UI: {links[0]}" if links else "")


def task_params(cfg, restored: Restored) -> dict:
    params = {k: v for k, v in flatten(cfg).items() if not k.startswith("tracking.")}
    params.update({"ckpt": str(restored.path.resolve()), "ckpt.step": str(restored.step)})
    return params


def log_results(results_run: ResultsRun, cfg, restored: Restored, out: Path, files, *, folder, tags, metrics) -> str:
    """The command's files (under the artifact `folder`), tags and metrics (at the checkpoint's step) in its
    MLflow run, opened only now that the work succeeded; a new run ends FINISHED, or FAILED when logging
    fails. Returns the run id (None without tracking)."""
    tracker = results_run.open(task_params(cfg, restored))
    try:
        tracker.log_metrics(metrics, restored.step)
        for f in files:
            tracker.log_artifact(out / f, folder)
        tracker.set_tags(tags)
    except BaseException:
        results_run.close("FAILED")
        raise
    results_run.close("FINISHED")
    return tracker.run_id


# -- the options against the model ---------------------------------------------------------------
def check_choices(pairs) -> None:
    """(key, value, allowed) triples: the first value not allowed raises ConfigError naming its key."""
    for key, value, allowed in pairs:
        if value not in allowed:
            raise not_allowed(key, value, allowed)


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


def check_labels(labels) -> None:
    """`labels` is cycle, uncond, a list or a .npy file (before anything is loaded; the ids are checked by
    label_spec)."""
    if isinstance(labels, str) and labels.endswith(".npy"):
        if not Path(labels).expanduser().is_file():
            raise ConfigError(f"labels={labels} does not exist; give a .npy file of one class id per sample.")
        return
    if not (labels in LABEL_MODES or OmegaConf.is_list(labels) or isinstance(labels, (list, tuple))):
        raise ConfigError(
            f"labels={labels!r} is not allowed; use cycle, uncond, a list of class ids like labels=[3,7] or a .npy"
            " file of one id per sample."
        )


def read_npy(path, key: str):
    """The array of the .npy file the option `key` names; a file that is not one: ConfigError."""
    import numpy as np

    try:
        return np.load(Path(path).expanduser(), allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}={path} cannot be read as a .npy array ({str(e).splitlines()[0]}).") from None


def label_spec(labels, restored: Restored, guidance: float):
    """`labels` (cycle | uncond | a list of class ids | a .npy file of ids) checked against the model: the
    Evaluator's label spec."""
    if isinstance(labels, str) and labels.endswith(".npy"):
        ids = read_npy(labels, "labels")
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ConfigError(
                f"labels={labels} holds {ids.dtype} of shape {list(ids.shape)}, not one class id per sample."
            )
        labels = ids.tolist()
    spec = labels if isinstance(labels, str) else [int(c) for c in labels]
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
