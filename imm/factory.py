"""Config -> objects: the one place that knows how config keys map onto constructors."""

from __future__ import annotations

import math

import torch
from omegaconf import OmegaConf

from imm import nets
from imm.core import consistency as consistency_mod
from imm.core import mapping as mapping_mod
from imm.core import meanflow as meanflow_mod
from imm.core import objective as objective_mod
from imm.core import parameterization as param_mod
from imm.core import schedules
from imm.core.util import ArgumentError
from imm.data import DataBundle, build_dataset
from imm.data.augment import AUGMENT_DIM, Augment
from imm.errors import ConfigError


def device(name: str, *, key: str = "train.device", local_rank: int = 0) -> torch.device:
    """The torch device for the option `key`=`name`: auto is this process's GPU (cuda:local_rank) or the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key}={name!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name!r} but no CUDA device is available; use {key}=auto or cpu.")
    return dev


def loss_T(cfg) -> float:
    """loss.T, or the schedule's default when it is null."""
    return float(cfg.loss.T) if cfg.loss.T is not None else schedules.get(cfg.schedule.name).default_T


OPTIMIZERS = {"adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}  # optim.name
LR_SCHEDULES = ("constant", "cosine")  # optim.lr_schedule, see lr_at


def parameterization(cfg) -> param_mod.Parameterization:
    """schedule.param around the network; iCT's consistency function in its place when loss.objective=ict."""
    sch = cfg.schedule
    common = dict(
        schedule=sch.name,
        sigma_data=sch.sigma_data,
        time_scale=sch.time_scale,
        second_time=sch.second_time,
        numerics=sch.numerics,
    )
    if cfg.loss.get("objective") == "ict":  # the boundary condition f(x, sigma_min) = x sits at t = loss.eps
        return consistency_mod.Consistency(t_min=cfg.loss.eps, **common)
    return param_mod.get(sch.param, **common)


def mapping(cfg) -> mapping_mod.Mapping:
    lo = cfg.loss
    return mapping_mod.Mapping(
        lo.mapping,
        schedule=cfg.schedule.name,
        k=lo.k,
        eps=lo.eps,
        T=loss_T(cfg),
        eta_max=lo.eta_max,
        eta_min=lo.eta_min,
        min_gap=lo.min_gap,
    )


def label_dropout(cfg, num_classes: int) -> float:
    """loss.label_dropout, defaulting to 0.1 for class-conditional data (Table 5) and 0 otherwise."""
    if cfg.loss.label_dropout is not None:
        if cfg.loss.label_dropout > 0 and num_classes == 0:
            raise ConfigError(
                f"loss.label_dropout={cfg.loss.label_dropout} needs class-conditional data, but"
                f" data.name={cfg.data.name!r} has no labels; set loss.label_dropout=0."
            )
        return float(cfg.loss.label_dropout)
    return 0.1 if num_classes > 0 else 0.0


def imm_objective(cfg, **common) -> objective_mod.IMMObjective:
    """The IMM objective of cfg; `common`: label_dropout, num_classes, rank, world_size."""
    lo = cfg.loss
    return objective_mod.IMMObjective(
        parameterization(cfg),
        mapping(cfg),
        M=lo.M,
        a=lo.a,
        b=lo.b,
        kernel=cfg.kernel.function,
        weighting=cfg.kernel.weighting,
        ref_dim=cfg.kernel.ref_dim,
        kappa=cfg.kernel.kappa,
        drop_target_labels=lo.drop_target_labels,
        target_fp32=lo.target_fp32,
        share_dropout=lo.share_dropout,
        **common,
    )


def augment(cfg) -> Augment | None:
    """EDM's augmentation at data.augment_p, or None when it is 0 (off)."""
    return None if cfg.data.augment_p == 0 else Augment(cfg.data.augment_p)


def objective(cfg, num_classes: int = 0, rank: int = 0, world_size: int = 1):
    """The IMM objective, or the flow-matching baseline when loss.objective=fm."""
    common = dict(
        label_dropout=label_dropout(cfg, num_classes),
        num_classes=num_classes,
        augment=augment(cfg),
        rank=rank,
        world_size=world_size,
    )
    if cfg.loss.objective == "fm":
        return objective_mod.FMObjective(parameterization(cfg), eps=cfg.loss.eps, T=loss_T(cfg), **common)
    if cfg.loss.objective in ("meanflow", "ict"):
        try:  # a rule that needs the data (guidance on unlabelled data) is known only now
            return method_objective(cfg, **common)
        except ArgumentError as e:
            raise method_error(e, cfg.loss.objective) from None
    return imm_objective(cfg, **common)


# imm.core argument names -> config keys, so the new objectives' argument errors name the keys a user sets
METHOD_ARG_KEYS = {"param": "schedule.param", "eps": "loss.eps", "T": "loss.T", "label_dropout": "loss.label_dropout"}


def method_error(e: ArgumentError, objective: str) -> ConfigError:
    """A MeanFlow or iCT argument error as one sentence naming the config keys (loss.<objective>.<arg>)."""
    keys = {**{arg: f"loss.{objective}.{arg}" for arg in e.args_named}, **METHOD_ARG_KEYS}
    if e.allowed is not None:
        return ConfigError(f"{keys.get(e.arg, e.arg)}={e.value!r} is not allowed; choose one of {list(e.allowed)}.")
    return ConfigError(e.render(keys) + ".")


def method_objective(cfg, **common):
    """The MeanFlow or iCT objective of cfg (loss.meanflow.*, loss.ict.*); `common` as imm_objective's."""
    lo, kw = cfg.loss, dict(eps=cfg.loss.eps, T=loss_T(cfg), target_fp32=cfg.loss.target_fp32)
    kw["share_dropout"] = lo.share_dropout
    if lo.objective == "meanflow":
        options = OmegaConf.to_container(lo.meanflow)
        return meanflow_mod.MeanFlowObjective(parameterization(cfg), **options, **kw, **common)
    ict = OmegaConf.to_container(lo.ict)
    ict["total_steps"] = ict["total_steps"] or cfg.train.steps  # K: set it to extend a run without moving N(k)
    return consistency_mod.ICTObjective(parameterization(cfg), **ict, **kw, **common)


def dataset(cfg) -> DataBundle:
    d = cfg.data
    bundle = build_dataset(
        d.name,
        root=d.root,
        path=d.path,
        n_train=d.n_train,
        n_heldout=d.n_heldout,
        heldout_fraction=d.heldout_fraction,
        seed=d.seed,
        resolution=d.resolution,
        download=d.download,
        hflip=d.hflip,
        class_subfolders=d.class_subfolders,
        vae=d.vae,
        latent_mean=d.latent_mean,
        latent_std=d.latent_std,
        source_root=d.source_root,
    )
    if not d.use_labels:  # the batches then carry no labels and the net is built unconditional
        bundle.num_classes = bundle.train.num_classes = 0
    return bundle


def net(cfg, shape, num_classes: int) -> torch.nn.Module:
    """The architecture arch.name for samples of `shape`, taking augmentation labels when data.augment_p > 0;
    null fields (DiT widths in configs saved before conf/arch/dit_*.yaml wrote them) keep the preset's value."""
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.arch, resolve=True).items() if k != "name" and v is not None}
    augment_dim = AUGMENT_DIM if augment(cfg) is not None else 0
    try:
        return nets.build(cfg.arch.name, tuple(shape), num_classes, augment_dim, **kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def optimizer(cfg, params, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    cls = OPTIMIZERS[o.name]
    kwargs = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "radam":
        kwargs["decoupled_weight_decay"] = True  # AdamW-style decay, like the AdamW option
    if device.type == "cuda":
        kwargs["foreach"] = True
    return cls(params, **kwargs)


def lr_at(cfg, step: int, steps: int | None = None) -> float:
    """Linear warm-up over optim.warmup_steps, then constant or cosine decay to min_lr_ratio * lr at train.steps
    (or `steps`). The cosine spans the train.steps of the launch that runs: a run extended to more steps
    follows the longer cosine from the step it reached (docs/runs.md#extending-a-run)."""
    o = cfg.optim
    warm = min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps > 0 else 1.0
    if o.lr_schedule == "constant":
        return o.lr * warm
    progress = min(1.0, step / max(1, steps or cfg.train.steps))
    decay = o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return o.lr * warm * decay
