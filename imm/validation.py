"""Every rule a config must meet before a launch does any work, checked once, in config terms.

`validate` holds a composed training config to its schema's ranges (imm.ranges), to the option lists
(`choices`: each from the code that implements it), to imm.core's own argument checks (the method's
objects are built on the CPU and their ArgumentError becomes a ConfigError naming the config key), and to
the rules between groups (data and architecture, batch and particles, the time grids of the evaluation).
The checks that need more than the config (the device, the loaded data, a checkpoint being resumed) are
here too, so training, the dry run and the sweeps call the same functions. Each raises ConfigError with
one sentence: the key, the value, what is allowed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import torch
from omegaconf import OmegaConf

from imm import data as data_mod
from imm import factory, nets
from imm.config import ICTConfig, KernelConfig, LossConfig, MeanFlowConfig, saved_config
from imm.core import mapping, methods, objective, parameterization, sampling, schedules
from imm.core.util import ArgumentError
from imm.errors import ConfigError
from imm.metrics import KNN_K, MIN_POINTS
from imm.ranges import check_values
from imm.runs import RESUMABLE_KEYS
from imm.tracking.mlflow_run import flatten

POINT_DATA = tuple(name for name in data_mod.DATASET_NAMES if name not in data_mod.IMAGE_NAMES)
IMAGE_DATA = tuple(data_mod.IMAGE_NAMES)
# The core argument each config key feeds, so imm.core's own argument errors name the config key.
ARG_KEYS = {
    "schedule": "schedule.name",
    "param": "schedule.param",
    "second_time": "schedule.second_time",
    "numerics": "schedule.numerics",
    "kernel": "kernel.function",
    "weighting": "kernel.weighting",
    "ref_dim": "kernel.ref_dim",
    "kappa": "kernel.kappa",
    "mapping": "loss.mapping",
    "M": "loss.M",
    "eps": "loss.eps",
    "T": "loss.T",
    "eta_max": "loss.eta_max",
    "eta_min": "loss.eta_min",
    "min_gap": "loss.min_gap",
    "label_dropout": "loss.label_dropout",
    "augment_p": "data.augment_p",
}


@functools.cache
def choices() -> dict[str, tuple]:
    """{option key: its allowed values}, each list from the code that implements the options."""
    return {
        "schedule.name": tuple(schedules.SCHEDULES),
        "schedule.param": tuple(parameterization.PARAMETERIZATIONS),
        "schedule.second_time": tuple(parameterization.SECOND_TIME_INPUTS),
        "schedule.numerics": tuple(parameterization.NUMERICS),
        "kernel.weighting": tuple(objective.WEIGHTINGS),
        "kernel.function": tuple(objective.KERNELS),
        "loss.objective": tuple(methods.OBJECTIVES),
        "loss.mapping": tuple(mapping.MAPPINGS),
        "target.kind": ("online", "ema"),  # imm.training.loop: theta^- is the online net unless ema
        "data.name": tuple(data_mod.DATASET_NAMES),
        "arch.name": tuple(nets.ARCHS),
        "optim.name": tuple(factory.OPTIMIZERS),
        "optim.lr_schedule": tuple(factory.LR_SCHEDULES),
        "train.precision": ("fp32", "tf32", "bf16", "fp16"),  # imm.training.loop's autocast and TF32 switches
        "eval.sampler": tuple(sampling.SAMPLERS),
        "eval.grid": tuple(sampling.GRIDS),
    }


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def not_allowed(key: str, value, allowed) -> ConfigError:
    return ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}.")


def from_core(e: ArgumentError) -> ConfigError:
    """imm.core's argument error as the one-sentence ConfigError that names the config keys."""
    if e.allowed is not None:
        return not_allowed(ARG_KEYS.get(e.arg, e.arg), e.value, e.allowed)
    return ConfigError(e.render(ARG_KEYS) + ".")


def check_point_samples(key: str, n: int) -> None:
    """Point data are evaluated with k-NN metrics (each sample against its k nearest): the option `key`=`n`
    must give at least MIN_POINTS samples."""
    if n < MIN_POINTS:
        raise ConfigError(
            f"{key}={n} is too few for point data: the k-NN precision/recall compares each sample with its"
            f" k = {KNN_K} nearest; use {key} >= {MIN_POINTS}."
        )


def validate(cfg, world_size: int = 1) -> None:
    """Raise ConfigError (one sentence: key, value, what is allowed) for a config that cannot run."""

    def fail(msg: str):
        raise ConfigError(msg)

    check_values(cfg)
    # The method's objects check their own arguments (names, time range, mapping and parameterization
    # rules); the IMM pieces are built for either objective, as today's fm runs still carry them.
    core_checked = set(ARG_KEYS.values())
    for key, allowed in choices().items():
        if key not in core_checked and _get(cfg, key) not in allowed:
            raise not_allowed(key, _get(cfg, key), allowed)
    if "time_features" in cfg.arch and cfg.arch.time_features not in nets.TIME_FEATURES:  # the image nets' option
        raise not_allowed("arch.time_features", cfg.arch.time_features, nets.TIME_FEATURES)
    try:
        label_dropout = cfg.loss.label_dropout or 0.0
        factory.imm_objective(cfg, label_dropout=label_dropout, num_classes=1, augment=factory.augment(cfg))
    except ArgumentError as e:  # num_classes=1: whether the data have labels is known once they are loaded
        raise from_core(e) from None
    check_method(cfg)  # loss=meanflow / ict: their options, and the IMM options they do not use

    B, M = cfg.train.batch_size, cfg.loss.M
    if B % (M * world_size):
        fail(
            f"train.batch_size={B} must be divisible by loss.M x world size = {M} x {world_size} ="
            f" {M * world_size}, so every group of M particles stays on one process."
        )
    micro, share = cfg.train.micro_batch, B // world_size
    if micro is not None and (share % micro or micro % M):
        fail(
            f"train.micro_batch={micro} must divide each process's share of the batch (train.batch_size / world size"
            f" = {B} / {world_size} = {share}) and be a multiple of loss.M={M}, so no group of M particles is split;"
            " use a divisor of the share that M divides, or null for no accumulation."
        )
    T, eps = factory.loss_T(cfg), cfg.loss.eps
    time_grids("eval.steps", cfg.eval.steps, cfg.eval, schedule=cfg.schedule.name, T=T, eps=eps)
    points = cfg.data.name in POINT_DATA
    if points != (cfg.arch.name in nets.POINT_ARCHS):
        kind = "2-D/point" if points else "image"
        fail(
            f"arch.name={cfg.arch.name!r} does not fit {kind} data data.name={cfg.data.name!r}; use"
            f" {'arch=mlp' if points else 'an image architecture (dit_*, ddpmpp)'}."
        )
    if cfg.data.augment_p > 0 and points:
        fail(
            f"data.augment_p={cfg.data.augment_p} augments images, but data.name={cfg.data.name!r} is point data;"
            " use data.augment_p=0."
        )
    if points:
        check_point_samples("eval.n_samples", cfg.eval.n_samples)
    if cfg.tracking.enabled and not str(cfg.tracking.experiment).strip():
        fail("tracking.experiment is empty; name the MLflow experiment the run goes to, e.g. tracking.experiment=imm.")
    if cfg.data.name == "points" and not cfg.data.path:
        fail("data.path is missing; data=points needs data.path=/path/to/file.npy holding an [N, D] array.")
    if cfg.data.name == "folder" and not cfg.data.root:
        fail("data.root is missing; data=folder needs data.root=/path/to/images.")
    if cfg.data.name == "latents" and not cfg.data.root:
        fail("data.root is missing; data=latents needs data.root=/path/to/latents (the out= of --config-name encode).")
    if points:  # point data never have labels; image data are checked once loaded (load_data)
        check_guidance(cfg, num_classes=0)


# -- loss.objective=meanflow|ict: each method's options only on its own runs, the IMM options off theirs --
NEW_METHODS = ("meanflow", "ict")
METHOD_NODES = {"meanflow": MeanFlowConfig, "ict": ICTConfig}  # loss.<method>.*: that method's options
# IMM's own keys: a MeanFlow or iCT run that sets one has asked for something it would silently ignore
IMM_LOSS_KEYS = ("M", "k", "a", "b", "mapping", "eta_max", "eta_min", "min_gap", "drop_target_labels")
IMM_KERNEL_KEYS = ("function", "ref_dim", "kappa")


def check_method(cfg) -> None:
    """Raise ConfigError for a method option on another method's run (e.g. loss.meanflow.ratio on an IMM run, loss.k
    on a MeanFlow run, target=ema on an iCT run) and for an impossible MeanFlow or iCT setting."""
    objective = cfg.loss.objective
    for method, schema in METHOD_NODES.items():
        if method == objective:
            continue
        defaults = schema()
        for f in fields(schema):
            value = cfg.loss[method][f.name]
            if value != getattr(defaults, f.name):
                raise ConfigError(
                    f"loss.{method}.{f.name}={value} is a {method} option, unused by loss.objective={objective};"
                    f" drop it or use loss={method}."
                )
    if objective not in NEW_METHODS:
        return
    loss_defaults, kernel_defaults = LossConfig(), KernelConfig()
    changed = [f"loss.{k}={cfg.loss[k]}" for k in IMM_LOSS_KEYS if cfg.loss[k] != getattr(loss_defaults, k)]
    changed += [f"kernel.{k}={cfg.kernel[k]}" for k in IMM_KERNEL_KEYS if cfg.kernel[k] != getattr(kernel_defaults, k)]
    if cfg.kernel.weighting != "paper":
        changed.append(f"kernel.weighting={cfg.kernel.weighting}")
    if changed:
        raise ConfigError(
            f"{changed[0]} is an IMM option, unused by loss.objective={objective}; drop it (or use loss=imm)."
        )
    if cfg.target.kind != "online":
        raise ConfigError(
            f"target.kind={cfg.target.kind} is an IMM option: loss.objective={objective} takes its target from the"
            " online weights under stop-gradient (iCT removes the EMA teacher, Sec. 3.2); use target=online."
        )
    try:  # num_classes=1: whether the data have labels is known once they are loaded (factory checks it again)
        label_dropout = factory.label_dropout(cfg, num_classes=1)  # as a class-conditional run resolves it
        factory.method_objective(cfg, label_dropout=label_dropout, num_classes=1, augment=factory.augment(cfg))
    except ArgumentError as e:
        raise factory.method_error(e, objective) from None


def time_grids(
    key: str, steps, options, *, schedule, T: float, eps: float, float32_points: bool = False
) -> dict[int, torch.Tensor]:
    """{N: the N-step grid} for each step count in `steps` (listed under the option `key`), by
    imm.core.sampling.time_grid's rules with the options' grid, two_step_eta and etas (where they have
    them); float32_points: the official generator's rounding of the eta points (schedule.numerics=official). A
    grid the options cannot give is the one-sentence ConfigError naming `key`: the commands' and the trainer's
    check before they sample."""
    grids = {}
    for N in steps:
        try:
            grids[int(N)] = sampling.time_grid(
                options.grid,
                int(N),
                schedule=schedule,
                T=T,
                eps=eps,
                two_step_eta=options.two_step_eta,
                etas=getattr(options, "etas", None),
                float32_points=float32_points,
            )
        except ValueError as e:
            raise ConfigError(f"{key}: no {int(N)}-step grid: {e}.") from None
    return grids


@dataclass(frozen=True)
class Sampling:
    """How an evaluation draws its samples, from the options to imm.core.sampling.sample: the step counts it
    evaluates, the time grid of each step count it may sample with (built once, here, where it is checked),
    the sampler, the guidance scale, the seed of the fixed noise and the batch size."""

    steps: tuple[int, ...]
    grids: dict[int, torch.Tensor]
    sampler: str
    guidance: float
    seed: int
    batch_size: int


def sampling_plan(
    options, steps: dict[str, list], *, schedule: str, T: float, eps: float, guidance=None, numerics="standard"
) -> Sampling:
    """The Sampling of `options` (a SamplingOptions node: the training's `eval`, `evaluate`'s `eval`, `sample`'s
    top level) for the step counts listed under each option key in `steps` (the first key's are evaluated, the
    others only sampled, as `sample`'s compare_steps); `guidance`: the scale a command resolved (default: the
    options'); `numerics`: the model's schedule.numerics (official: the eta points rounded as the official
    generator's). A grid the options cannot give is the ConfigError naming its key."""
    grids = {}
    points32 = numerics == "official"
    for key, counts in steps.items():
        grids.update(time_grids(key, counts, options, schedule=schedule, T=T, eps=eps, float32_points=points32))
    first = next(iter(steps.values()))
    return Sampling(
        steps=tuple(int(n) for n in first),
        grids=grids,
        sampler=options.sampler,
        guidance=float(options.guidance if guidance is None else guidance),
        seed=int(options.seed),
        batch_size=int(options.batch_size),
    )


def check_precision(precision: str, device) -> None:
    """Mixed precision and TF32 are CUDA-only."""
    if precision != "fp32" and torch.device(device).type != "cuda":
        raise ConfigError(
            f"train.precision={precision} needs a CUDA device, but this run is on {device}; use train.precision=fp32."
        )


def load_data(cfg):
    """The dataset, and the check that needs it (guidance needs labels): the data step of a launch's checks."""
    bundle = factory.dataset(cfg)
    check_guidance(cfg, bundle.num_classes)
    return bundle


def check_guidance(cfg, num_classes: int) -> None:
    """Guidance mixes a class-conditional and the null-label output: refuse it for unconditional training."""
    if cfg.eval.guidance == 1.0 or num_classes > 0:
        return
    unlabelled = not cfg.data.use_labels and cfg.data.name not in POINT_DATA  # labels the run leaves out
    why = (
        f"data.use_labels=false trains data.name={cfg.data.name!r} unconditionally"
        if unlabelled
        else f"data.name={cfg.data.name!r} is unconditional"
    )
    fix = "eval.guidance=1" + (" or data.use_labels=true" if unlabelled else "")
    raise ConfigError(f"eval.guidance={cfg.eval.guidance} needs class-conditional data, but {why}; use {fix}.")


def check_steps_reached(cfg, step: int, path) -> None:
    """A run resumed from its checkpoint at `step` trains on to train.steps: fewer steps than it has is a typo
    (it would end FINISHED at a step beyond what was asked, without training)."""
    if cfg.train.steps < step:
        raise ConfigError(
            f"train.steps={cfg.train.steps} is below step {step}, which this run has reached ({path}); use"
            f" train.steps={step} or more to train on, or fresh=true for a new run of this experiment."
        )


def check_same_run(cfg, saved_yaml: str, path) -> dict[str, str]:
    """Resuming must continue the same experiment: only RESUMABLE_KEYS may differ. Returns those that
    did, as tags (MLflow params are logged once, when the run is created, and cannot change)."""
    saved = flatten(saved_config(saved_yaml))  # keys added to the schema since: their defaults
    # a sweep job's full config (the dry run's) also holds Hydra's node, which resolves only inside the job
    now = flatten(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg)
    changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    for k in changed:
        if not k.startswith(RESUMABLE_KEYS):
            raise ConfigError(
                f"{path} belongs to a run with a different config ({k} was {saved.get(k)!r}, now"
                f" {now.get(k)!r}); start a new run directory instead of resuming this one."
            )
    return {f"resumed.{k}": str(now.get(k)) for k in changed}
