"""The configuration schema: every knob a researcher turns, typed.

Registered in Hydra's ConfigStore as the base of `conf/config.yaml`, so an unknown key or a value
of the wrong type fails while the config is composed. `validate` then checks what types cannot
(ranges, combinations) and raises ConfigError with one sentence that names the key, the value and
what is allowed, before any data is loaded or any run is created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

# `${imm.pid:}` in conf/config.yaml's run and sweep directories: the launching process's id, so two
# runs started in the same microsecond never share a directory. Cached like Hydra's `${now:}`: the
# value resolved by the launching process travels with the config to every job of a sweep (also to a
# requeued one), so they all agree on the sweep directory. Registered at import: a submitit job
# process imports this module when it unpickles the schema, before it resolves its directory.
OmegaConf.register_new_resolver("imm.pid", os.getpid, use_cache=True, replace=True)


class ConfigError(ValueError):
    """A configuration a user can fix; its message is one sentence."""


@dataclass
class ScheduleConfig:
    name: str = "fm"  # interpolant: fm (OT-FM) | cosine
    param: str = "euler_fm"  # f-level parameterization: euler_fm | simple_edm | identity
    sigma_data: float = 0.5
    time_scale: float = 1000.0  # c_noise(t) = time_scale * t (Table 5: 1000t)
    second_time: str = "s"  # second time input: s | stride (t - s; the FP16 variant)


@dataclass
class KernelConfig:
    weighting: str = "paper"  # paper: 1/|c_out(s,t)| | seed: 1/(t-s) | unit: 1
    function: str = "laplace"  # laplace | rbf


@dataclass
class LossConfig:
    objective: str = "imm"  # imm | fm (the flow-matching baseline)
    M: int = 4  # particles per group
    k: int = 12  # r(s,t) step = range / 2^k
    a: float = 1.0  # time weight exponent
    b: float = 4.0  # time weight shift
    mapping: str = "eta_decrement"  # eta_decrement | t_decrement | lambda_decrement | inv_eta_increment
    eps: float = 0.0  # t ~ U(eps, T)
    T: Optional[float] = None  # null: the schedule's default (0.994 fm, 0.996 cosine)
    eta_max: Optional[float] = None  # null: eta(T)
    eta_min: Optional[float] = None  # null: eta(eps)
    min_gap: float = 0.0  # minimum t - r (FP16 variant: 1e-4)
    label_dropout: Optional[float] = None  # null: 0.1 for class-conditional data, else 0
    drop_target_labels: bool = False  # target pass sees the student's dropped labels
    target_fp32: bool = True  # target pass outside autocast
    share_dropout: bool = True  # target pass reuses the student's dropout masks


@dataclass
class TargetConfig:
    kind: str = "online"  # online: theta^- = current weights, no grad (the paper) | ema
    ema_decay: float = 0.99  # decay of the EMA target (kind=ema only)


@dataclass
class EMAConfig:
    """The evaluation EMA (ema-pytorch), separate from the target choice."""

    decay: float = 0.999  # beta; the paper uses 0.9999 for long runs
    power: float = 0.6667  # warm-up: decay_n = min(decay, 1 - (1 + n / inv_gamma)^-power)
    inv_gamma: float = 1.0
    update_every: int = 1


@dataclass
class DataConfig:
    name: str = "checkerboard"
    path: Optional[str] = None  # points: a .npy [N, D] file
    root: Optional[str] = None  # image datasets: where the files live
    download: bool = False
    resolution: Optional[int] = None
    hflip: bool = False
    use_labels: bool = True  # false: train unconditionally on a labelled set (the paper's CIFAR-10)
    class_subfolders: Optional[bool] = None  # folder: null = subfolders are classes when all images sit in one
    n_train: int = 100_000  # toy sets
    n_heldout: int = 5000
    heldout_fraction: float = 0.1  # points files
    seed: int = 0
    num_workers: int = 0
    pin_memory: bool = True


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | radam
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # constant | cosine (decay to min_lr_ratio * lr at train.steps)
    min_lr_ratio: float = 0.0
    grad_clip: Optional[float] = 1.0  # max gradient norm; null disables clipping


@dataclass
class TrainConfig:
    steps: int = 4000
    batch_size: int = 512  # global batch; divisible by M x world size
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | tf32 | bf16 | fp16 (the last three on CUDA only)
    compile: bool = False
    threads: Optional[int] = None  # torch CPU threads; null: torch's default
    log_every: int = 100
    ckpt_every: int = 1000
    keep_last: int = 3  # checkpoints kept besides the latest
    max_nonfinite: int = 5  # consecutive non-finite steps before the run stops


@dataclass
class EvalConfig:
    every: int = 1000  # steps between evaluations (0: only at the end)
    steps: List[int] = field(default_factory=lambda: [1, 2, 4, 8])
    n_samples: int = 5000
    batch_size: int = 1000
    sampler: str = "pushforward"  # pushforward | restart
    grid: str = "uniform"  # uniform | edm | eta
    two_step_eta: Optional[float] = 1.4  # the paper's 2-step eta point; null: use `grid` for 2 steps
    guidance: float = 1.0
    fid: bool = False  # image runs: FID at every evaluation (eval.fid_n_samples generated images)
    fid_n_samples: int = 5000
    fid_cache: Optional[str] = None  # reference statistics cache; null: ~/.cache/imm/fid
    inception_weights: Optional[str] = None  # a local Inception weights file (offline machines)
    seed: int = 1234
    draws: int = 8  # points: the energy distance is the mean over this many noise draws of n_samples, as its floor


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # null: sqlite:///<launch dir>/mlflow.db
    experiment: str = "imm"
    run_name: Optional[str] = None  # null: from the command-line overrides
    fallback_local: bool = False  # an unreachable server: fall back to the local SQLite store


@dataclass
class Config:
    arch: Any = MISSING
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    resume: Optional[str] = None  # a checkpoint file or run directory to resume from


# -- architectures: one schema per family -----------------------------------------------------
@dataclass
class MLPArch:
    name: str = "mlp"
    width: int = 256
    depth: int = 3
    emb_dim: int = 128
    dropout: float = 0.0


@dataclass
class DiTArch:
    name: str = "dit_s_4"
    hidden_size: Optional[int] = None  # null: the preset's
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: Optional[int] = None
    mlp_ratio: float = 4.0
    dropout: float = 0.0


@dataclass
class DDPMppArch:
    name: str = "ddpmpp"
    model_channels: int = 128
    channel_mult: List[int] = field(default_factory=lambda: [2, 2, 2])
    num_blocks: int = 4
    attn_resolutions: List[int] = field(default_factory=lambda: [16])
    dropout: float = 0.2


def register() -> None:
    from omegaconf import OmegaConf

    # ${imm.max:1,${.gpus_per_node}}: one task per GPU, at least one (launcher presets)
    OmegaConf.register_new_resolver("imm.max", lambda *values: max(values), replace=True)
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    cs.store(group="arch", name="_mlp", node=MLPArch)
    cs.store(group="arch", name="_dit", node=DiTArch)
    cs.store(group="arch", name="_ddpmpp", node=DDPMppArch)
    __import__("imm.tasks", fromlist=["register_schemas"]).register_schemas(cs)  # conf/sample.yaml, evaluate.yaml


# -- validation ---------------------------------------------------------------------------------
POINT_DATA = ("checkerboard", "eight_gaussians", "moons", "rings", "points")
IMAGE_DATA = ("digits", "mnist", "cifar10", "folder")
POINT_ARCHS = ("mlp",)
DEFAULT_T = {"fm": 0.994, "cosine": 0.996}  # spec 1.5 / Table 5: T < 1 keeps eta(T) finite
CHOICES = {
    "schedule.name": ("fm", "cosine"),
    "schedule.param": ("euler_fm", "simple_edm", "identity"),
    "schedule.second_time": ("s", "stride"),
    "kernel.weighting": ("paper", "seed", "unit"),
    "kernel.function": ("laplace", "rbf"),
    "loss.objective": ("imm", "fm"),
    "loss.mapping": ("eta_decrement", "t_decrement", "lambda_decrement", "inv_eta_increment"),
    "target.kind": ("online", "ema"),
    "data.name": POINT_DATA + IMAGE_DATA,
    "optim.name": ("adamw", "radam"),
    "optim.lr_schedule": ("constant", "cosine"),
    "train.precision": ("fp32", "tf32", "bf16", "fp16"),
    "eval.sampler": ("pushforward", "restart"),
    "eval.grid": ("uniform", "edm", "eta"),
}
POSITIVE = (
    "optim.lr",
    "train.steps",
    "train.batch_size",
    "loss.M",
    "train.log_every",
    "train.ckpt_every",
    "eval.n_samples",
    "eval.batch_size",
    "eval.draws",
    "schedule.sigma_data",
    "schedule.time_scale",
)


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def loss_T(cfg) -> float:
    """loss.T, or the schedule's default when it is null."""
    return float(cfg.loss.T) if cfg.loss.T is not None else DEFAULT_T[cfg.schedule.name]


def validate(cfg, world_size: int = 1) -> None:
    """Raise ConfigError (one sentence: key, value, what is allowed) for a config that cannot run."""
    from imm.nets import ARCHS  # the registry of architecture names

    def fail(msg: str):
        raise ConfigError(msg)

    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            fail(f"{key}={_get(cfg, key)!r} is not allowed; choose one of {', '.join(allowed)}.")
    if cfg.arch.name not in ARCHS:
        fail(f"arch.name={cfg.arch.name!r} is not an architecture; choose one of {', '.join(ARCHS)}.")
    for key in POSITIVE:
        if not _get(cfg, key) > 0:
            fail(f"{key}={_get(cfg, key)} must be positive.")

    B, M = cfg.train.batch_size, cfg.loss.M
    if B % (M * world_size):
        fail(
            f"train.batch_size={B} must be divisible by loss.M x world size = {M} x {world_size} ="
            f" {M * world_size}, so every group of M particles stays on one process."
        )
    if not 1 <= cfg.loss.k <= 24:
        fail(f"loss.k={cfg.loss.k} is out of range; use 1 <= k <= 24 (the paper uses 12 to 15).")
    if cfg.loss.a not in (1, 2):
        fail(f"loss.a={cfg.loss.a} is not allowed; the time weight's exponent a is 1 or 2 (Eq. 13).")
    T, eps = loss_T(cfg), cfg.loss.eps
    if not 0 <= eps < T:
        fail(f"loss.eps={eps} must satisfy 0 <= eps < loss.T={T}.")
    if T > 1 or (T >= 1 and cfg.loss.mapping in ("eta_decrement", "lambda_decrement")):
        fail(
            f"loss.T={T} must be < 1 for the {cfg.loss.mapping} mapping (eta(1) is infinite); the paper"
            " uses 0.994 (fm) or 0.996 (cosine)."
        )
    if cfg.loss.mapping in ("lambda_decrement", "inv_eta_increment") and eps <= 0:
        fail(f"loss.eps={eps} must be > 0 for the {cfg.loss.mapping} mapping (e.g. 0.001 or 0.005).")
    if cfg.schedule.param == "identity" and eps <= 0:
        fail(f"loss.eps={eps} must be > 0 with schedule.param=identity (it divides by sigma_t).")
    if cfg.schedule.param == "euler_fm" and cfg.schedule.name != "fm":
        fail(
            f"schedule.param=euler_fm needs schedule.name=fm (OT-FM), not {cfg.schedule.name!r};"
            " use simple_edm or identity with the cosine schedule."
        )
    if cfg.loss.min_gap < 0:
        fail(f"loss.min_gap={cfg.loss.min_gap} must be >= 0.")
    if cfg.loss.label_dropout is not None and not 0 <= cfg.loss.label_dropout < 1:
        fail(f"loss.label_dropout={cfg.loss.label_dropout} must be in [0, 1).")
    for key in ("target.ema_decay", "ema.decay"):
        if not 0 < _get(cfg, key) < 1:
            fail(f"{key}={_get(cfg, key)} must be in (0, 1).")
    if cfg.optim.warmup_steps < 0:
        fail(f"optim.warmup_steps={cfg.optim.warmup_steps} must be >= 0.")
    if cfg.optim.grad_clip is not None and cfg.optim.grad_clip <= 0:
        fail(f"optim.grad_clip={cfg.optim.grad_clip} must be positive, or null to disable clipping.")
    if not cfg.eval.steps or any(int(n) != n or n < 1 for n in cfg.eval.steps):
        fail(f"eval.steps={list(cfg.eval.steps)} must be a non-empty list of positive integers.")
    if cfg.train.max_nonfinite < 1:
        fail(f"train.max_nonfinite={cfg.train.max_nonfinite} must be >= 1.")

    points = cfg.data.name in POINT_DATA
    if points != (cfg.arch.name in POINT_ARCHS):
        kind = "2-D/point" if points else "image"
        fail(
            f"arch.name={cfg.arch.name!r} does not fit {kind} data data.name={cfg.data.name!r}; use"
            f" {'arch=mlp' if points else 'an image architecture (dit_*, ddpmpp)'}."
        )
    if cfg.data.name == "points" and not cfg.data.path:
        fail("data.path is missing; data=points needs data.path=/path/to/file.npy holding an [N, D] array.")
    if cfg.data.name == "folder" and not cfg.data.root:
        fail("data.root is missing; data=folder needs data.root=/path/to/images.")
    if cfg.eval.guidance != 1.0 and points:
        fail(
            f"eval.guidance={cfg.eval.guidance} needs class-conditional data, but data.name="
            f"{cfg.data.name!r} is unconditional; use eval.guidance=1."
        )
