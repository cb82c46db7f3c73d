"""The configuration schema: every knob a researcher turns, typed.

Registered in Hydra's ConfigStore as the base of `conf/config.yaml`, so an unknown key or a value
of the wrong type fails while the config is composed. `validate` then builds the method's objects on
the CPU (imm.core checks its own arguments) and checks what neither types nor imm.core can (option
names of the other groups, data and architecture fit, ranges), raising ConfigError with one sentence
that names the key, the value and what is allowed, before any data is loaded or any run is created.

One place per default: these dataclasses hold every default the options of a group share; a field
whose value tells the options of a group apart (the schedule's name, a DiT's widths) is MISSING here
and written in each conf/<group>/*.yaml; option files and conf/experiment/*.yaml hold only deltas.
The option lists (CHOICES) come from the code that implements the options. Each number's range is
written beside its default too (`ranged(3, ">= 0")`, imm/ranges.py): validate checks it, `--help` prints it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from imm import data as data_mod
from imm import nets
from imm.core import mapping, methods, objective, parameterization, sampling, schedules
from imm.core.sampling import TWO_STEP_ETA
from imm.core.util import ArgumentError
from imm.evaluation.metrics import KNN_K, MIN_POINTS
from imm.ranges import ConfigError, allowed_values, check_values, ranged

# Keys that may differ when a run is resumed (longer training, other logging, another machine): the
# resume check (training/loop.py) lets them change, and they do not enter a run directory's experiment
# hash (training/rundir.py).
RESUMABLE_KEYS = (
    "resume",
    "fresh",
    "dry_run",
    "train.steps",
    "train.log_every",
    "train.ckpt_every",
    "train.snapshot_every",
    "train.keep_last",
    "train.micro_batch",
    "train.device",
    "train.threads",
    "train.compile",
    "eval.",
    "tracking.",
    "data.num_workers",
    "data.root",
    "data.path",
    "data.download",
    "data.vae",
    "data.source_root",
    "hydra",
)


def _run_dir(base, name, overrides, fresh, dry_run=False):
    from imm.training.rundir import run_dir

    return run_dir(base, name, overrides, fresh, claim=not dry_run)


# `${imm.run_dir:runs,NAME,${hydra.overrides.task},${fresh}}` in conf/config.yaml: the run (or sweep)
# directory named after the experiment (training/rundir.py). Cached like Hydra's `${now:}`: the value
# resolved by the launching process travels with the config to every job of a sweep (also to a
# requeued one), so they all agree on the sweep directory. Registered at import: a submitit job
# process imports this module when it unpickles the schema, before it resolves its directory.
OmegaConf.register_new_resolver("imm.run_dir", _run_dir, use_cache=True, replace=True)
# `${imm.if:${dry_run},A,B}`: A in a dry run, else B (conf/config.yaml: a dry run writes no .hydra/ or launch.log).
OmegaConf.register_new_resolver(
    "imm.if", lambda condition, then, otherwise: then if condition else otherwise, replace=True
)


# Notes of fields whose range another rule owns (only finiteness is checked here).
CORE = "imm.core checks the rest"
GRID_RULES = "the time-grid rules check the rest"
KNN_NOTE = f"the k-NN metrics compare each point with its k = {KNN_K} nearest"


@dataclass
class ScheduleConfig:
    name: str = MISSING  # the interpolant (CHOICES["schedule.name"])
    param: str = MISSING  # the f-level parameterization
    sigma_data: float = ranged(0.5, "> 0")
    time_scale: float = ranged(1000.0, "> 0")  # c_noise(t) = time_scale * t (Table 5: 1000t)
    second_time: str = "s"  # the second time input: s, or stride = t - s (the DiT-XL* variant)


@dataclass
class KernelConfig:
    """The MMD kernel (imm/core/objective.py kernel_matrix); the defaults are the paper's Laplace kernel."""

    weighting: str = MISSING  # w~(s,t): paper = 1/|c_out(s,t)|, inv_stride = 1/(t-s), unit = 1
    function: str = "laplace"  # or rbf
    # Laplace: distances / sqrt(D ref_dim), /D's bandwidth at D = ref_dim
    ref_dim: Optional[int] = ranged(None, ">= 1", "null: the paper's / D")
    # Laplace cusp smoothing: pseudo-Huber width kappa x the particles' input gap
    kappa: float = ranged(0.0, ">= 0", "0: the paper's kernel")


@dataclass
class MeanFlowConfig:
    """loss=meanflow's options (imm/core/meanflow.py). Defaults: the MeanFlow paper's ablation defaults (Table 1,
    Sec. 4.3); experiment=cifar10_meanflow sets its CIFAR-10 values (docs/presets.md)."""

    P_mean: float = ranged(-0.4)  # (t, r) ~ logit-normal(P_mean, P_std)
    P_std: float = ranged(1.0, "> 0")
    ratio: float = ranged(0.25, "[0, 1]", "the fraction of samples with r != t")
    norm_p: float = ranged(1.0, ">= 0", "0: the squared L2 loss")  # adaptive weight 1 / (||D||^2 + c)^p
    norm_eps: float = ranged(1e-3, "> 0")  # its c
    omega: float = ranged(1.0, "> 0", "1: no guidance in training")  # class-conditional data only
    kappa: float = ranged(0.0, "[0, 1)", "0: omega alone")
    t_guide_min: float = ranged(0.0, "[0, 1]")  # guidance only for t in [t_guide_min, t_guide_max]
    t_guide_max: float = ranged(1.0, "[0, 1]")


@dataclass
class ICTConfig:
    """loss=ict's options (imm/core/consistency.py); the paper's values (iCT Sec. 3). Its noise range is loss.eps
    and loss.T (sigma = sigma_d eta(t)), which conf/loss/ict.yaml sets to sigma_min = 0.002, sigma_max = 80."""

    total_steps: Optional[int] = ranged(None, ">= 1", "null: train.steps")  # K of the curriculum N(k)
    s0: int = ranged(10, ">= 1")  # N(k) = min(s0 2^floor(k/K'), s1) + 1
    s1: int = ranged(1280, ">= 1")
    rho: float = ranged(7.0, "> 0")  # the Karras grid's exponent
    P_mean: float = ranged(-1.1)  # the lognormal noise-level distribution
    P_std: float = ranged(2.0, "> 0")
    huber: Optional[float] = ranged(None, "> 0", "null: 0.00054 sqrt(d)")  # the pseudo-Huber c


@dataclass
class LossConfig:
    """Defaults: Table 5's ImageNet column (k=12, a=1, b=4, M=4, p(t) = U(0, T)), the loss=imm option."""

    objective: str = "imm"  # or fm (the flow-matching baseline), meanflow, ict (CHOICES["loss.objective"])
    M: int = ranged(4, note=CORE)  # particles per group
    k: int = ranged(12, "[1, 24]", "the paper uses 12 to 15")  # r(s,t) step = range / 2^k
    a: float = ranged(1.0, "{1, 2}", "the time weight's exponent, Eq. 13")
    b: float = ranged(4.0)  # time weight shift
    mapping: str = "eta_decrement"  # r(s,t) (CHOICES["loss.mapping"])
    eps: float = ranged(0.0, note=CORE)  # t ~ U(eps, T)
    T: Optional[float] = ranged(None, note=CORE)  # null: the schedule's default (0.994 fm, 0.996 cosine)
    eta_max: Optional[float] = ranged(None, note=CORE)  # null: eta(T)
    eta_min: Optional[float] = ranged(None, note=CORE)  # null: eta(eps)
    min_gap: float = ranged(0.0, note=CORE)  # minimum t - r (DiT-XL* variant: 1e-4)
    label_dropout: Optional[float] = ranged(None, note=CORE)  # null: 0.1 for class-conditional data, else 0
    drop_target_labels: bool = False  # target pass sees the student's dropped labels
    target_fp32: bool = True  # target pass outside autocast
    share_dropout: bool = True  # target pass reuses the student's dropout masks
    meanflow: MeanFlowConfig = field(default_factory=MeanFlowConfig)  # loss.objective=meanflow only
    ict: ICTConfig = field(default_factory=ICTConfig)  # loss.objective=ict only


@dataclass
class TargetConfig:
    kind: str = MISSING  # online: theta^- = current weights, no grad (the paper); ema
    ema_decay: float = ranged(0.99, "(0, 1)")  # decay of the EMA target (kind=ema only)


@dataclass
class EMAConfig:
    """The evaluation EMA (ema-pytorch), separate from the target choice. Its decay at update n is
    min(decay, 1 - (1 + n / inv_gamma)^-power): with power = inv_gamma = 1 that is min(decay, 1 - 1/(n+1)),
    the plain mean of the weights so far until the EMA's window 1/(1 - decay) is full (update
    1/(1 - decay) - 1), then `decay` itself; the run logs the decay in use as train/ema_decay."""

    decay: float = ranged(0.999, "(0, 1)")  # beta; the paper uses 0.9999 (Table 5) for 400K+ steps
    # warm-up exponent (ema-pytorch's default 2/3 reaches 0.999 only after 31,622 updates)
    power: float = ranged(1.0, "> 0")
    inv_gamma: float = ranged(1.0, "> 0")
    update_every: int = ranged(1, ">= 1")


@dataclass
class DataConfig:
    name: str = MISSING
    path: Optional[str] = None  # points: a .npy [N, D] file
    root: Optional[str] = None  # image datasets: where the files live
    download: bool = False
    resolution: Optional[int] = ranged(None, ">= 1", "null: the dataset's own")
    hflip: bool = False
    # EDM's augmentation, each transform with this probability (imm/data/augment.py checks [0, 1))
    augment_p: float = ranged(0.0, note="in [0, 1); 0: off")
    use_labels: bool = True  # false: train unconditionally on a labelled set (the paper's CIFAR-10)
    class_subfolders: Optional[bool] = None  # folder: null = subfolders are classes when all images sit in one
    # data=latents (root: the out= of --config-name encode; imm/data/latents.py):
    vae: Optional[str] = None  # the VAE that decodes samples (hub id or folder); null: the one that encoded
    # per-channel mean and std of the raw latents; null: the manifest's measured values
    latent_mean: Optional[List[float]] = ranged(None, items=True)
    latent_std: Optional[List[float]] = ranged(None, "> 0", items=True)
    source_root: Optional[str] = None  # where the encoded images (the FID reference) are now; null: as encoded
    n_train: int = ranged(data_mod.DEFAULT_TOY_TRAIN, ">= 1")  # toy sets
    n_heldout: int = ranged(data_mod.DEFAULT_TOY_HELDOUT, f">= {MIN_POINTS}", KNN_NOTE)
    # points files and digits (conf/data/digits.yaml: 0.2)
    heldout_fraction: float = ranged(data_mod.DEFAULT_HELDOUT_FRACTION, "(0, 1)")
    seed: int = ranged(0)
    num_workers: int = ranged(0, ">= 0", "0: load in the training process")
    pin_memory: bool = True


@dataclass
class OptimConfig:
    name: str = MISSING
    lr: float = ranged(1e-4, "> 0")  # Table 5
    betas: List[float] = ranged(text="[0, 1)", factory=lambda: [0.9, 0.999], length=2)
    eps: float = ranged(1e-8, "> 0")
    weight_decay: float = ranged(0.0, ">= 0")
    warmup_steps: int = ranged(100, ">= 0")
    lr_schedule: str = "cosine"  # or constant; cosine decays to min_lr_ratio * lr at train.steps
    min_lr_ratio: float = ranged(0.0, "[0, 1]")
    grad_clip: Optional[float] = ranged(1.0, "> 0", "null: no clipping")  # max gradient norm


@dataclass
class TrainConfig:
    steps: int = ranged(4000, ">= 1")
    batch_size: int = ranged(512, ">= 1")  # global batch; divisible by M x world size
    # samples per rank per forward/backward (gradient accumulation)
    micro_batch: Optional[int] = ranged(None, ">= 1", "null: the whole share, no accumulation")
    seed: int = ranged(0)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # CHOICES["train.precision"]; all but fp32 on CUDA only
    compile: bool = False
    # torch CPU threads; null: chosen (imm/training/threads.py torch_threads)
    threads: Optional[int] = ranged(None, ">= 1", "null: chosen for the machine")
    log_every: int = ranged(100, ">= 1")
    ckpt_every: int = ranged(1000, ">= 1")
    # steps between EMA-weight snapshots (never pruned; also the last step)
    snapshot_every: int = ranged(1000, ">= 0", "0: none")
    keep_last: int = ranged(3, ">= 0")  # training states kept besides the latest (snapshots are never pruned)
    max_nonfinite: int = ranged(5, ">= 1")  # consecutive non-finite steps before the run stops


@dataclass
class SamplingOptions:
    """How samples are drawn from a network (spec 4; Alg. 2, 5; App. I.2): one schema for the training
    run's `eval` node, `--config-name evaluate`'s `eval` node and `--config-name sample`'s top level
    (imm/tasks/__init__.py), so each key has one name and one default everywhere."""

    sampler: str = "pushforward"  # pushforward | restart
    grid: str = "uniform"  # uniform | edm | eta (eta beyond 2 steps: `sample`'s etas)
    # 2 steps use eta(t_1) = 1.4 (App. I.2); null: 2 steps follow `grid`
    two_step_eta: Optional[float] = ranged(TWO_STEP_ETA, note=GRID_RULES)
    guidance: float = ranged(1.0, note="1: none")  # classifier-free guidance w (Eq. 14)
    seed: int = ranged(1234)  # the fixed noise (and labels) every evaluation decodes
    # 500: one size for every command; FID pushes each batch through Inception-v3 at 299 x 299
    batch_size: int = ranged(500, ">= 1")


@dataclass
class EvalOptions(SamplingOptions):
    """What the training evaluation and `evaluate` share beyond sampling: step counts and metrics."""

    steps: List[int] = ranged(text=">= 1", factory=lambda: [1, 2, 4, 8], min_items=1)
    # points: the energy distance is the mean over this many noise draws of n_samples, as its floor
    draws: int = ranged(8, ">= 1")
    classifier: bool = True  # labelled images with a held-out split (digits, MNIST): the classifier metric
    fid_cache: Optional[str] = None  # reference statistics cache; null: ~/.cache/imm/fid
    inception_weights: Optional[str] = None  # a local Inception weights file (offline machines)


@dataclass
class EvalConfig(EvalOptions):
    """The training run's periodic evaluation (`eval.*`)."""

    every: int = ranged(1000, ">= 0", "0: only at the end")  # steps between evaluations
    n_samples: int = ranged(5000, ">= 1", f"point data: >= {MIN_POINTS}, for the k-NN metrics")
    fid: bool = False  # image runs: FID at every evaluation (eval.fid_n_samples generated images)
    fid_n_samples: int = ranged(5000, ">= 2", "the covariance needs 2")


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # null: sqlite:///<launch dir>/mlflow.db
    experiment: str = "imm"
    run_name: Optional[str] = None  # null: from the command-line overrides
    fallback_local: bool = False  # an unreachable server: fall back to the local SQLite store
    system_metrics: bool = True  # system/* metrics (CPU, memory, disk, network; GPU with nvidia-ml-py)
    system_metrics_every: float = ranged(10.0, "> 0")  # seconds between system metric samples
    log_weights: bool = False  # the final EMA snapshot as an artifact (weights/)


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
    fresh: bool = False  # true: a new run directory of this experiment, not its newest (training/rundir.py)
    dry_run: bool = (
        False  # true: check everything a launch checks, print what it would do, train nothing (imm/dry_run.py)
    )


# -- architectures: one schema per family -----------------------------------------------------
@dataclass
class MLPArch:
    name: str = MISSING
    width: int = ranged(256, ">= 1")
    depth: int = ranged(3, ">= 1")
    emb_dim: int = ranged(128, ">= 2", "even")
    dropout: float = ranged(0.0, "[0, 1)")


@dataclass
class DiTArch:
    """The widths tell the DiT presets apart: each conf/arch/dit_*.yaml writes its preset's (DIT_PRESETS)."""

    name: str = MISSING
    hidden_size: int = ranged(MISSING, ">= 1", "divisible by num_heads")
    depth: int = ranged(MISSING, ">= 1")
    num_heads: int = ranged(MISSING, ">= 1")
    patch_size: int = ranged(MISSING, ">= 1", "dividing the resolution")
    mlp_ratio: float = ranged(4.0, "> 0")
    dropout: float = ranged(0.0, "[0, 1)")


@dataclass
class DDPMppArch:
    name: str = MISSING
    model_channels: int = ranged(128, ">= 1")
    channel_mult: List[int] = ranged(text=">= 1", factory=lambda: [2, 2, 2], min_items=1)
    num_blocks: int = ranged(4, ">= 1")
    attn_resolutions: List[int] = ranged(text=">= 1", factory=lambda: [16])
    dropout: float = ranged(0.2, "[0, 1)")


ARCH_SCHEMAS = {"arch_mlp": MLPArch, "arch_dit": DiTArch, "arch_ddpmpp": DDPMppArch}


def register() -> None:
    import warnings

    from omegaconf import OmegaConf

    # conf/hydra/sweeper/basic.yaml replaces Hydra's `basic` sweeper option with its subclass (a dry run added;
    # hydra_plugins/imm_sweepers/grid.py); Hydra validates it against its own schema of that name, as wanted,
    # and warns that this matching by name is deprecated.
    warnings.filterwarnings("ignore", message=r"\s*'hydra/sweeper/basic' is validated against ConfigStore schema")
    # ${imm.max:1,${.gpus_per_node}}: one task per GPU, at least one (launcher presets)
    OmegaConf.register_new_resolver("imm.max", lambda *values: max(values), replace=True)
    # ${imm.allowed:} in hydra.help.footer: `--help` ends with each key's range (allowed_values)
    OmegaConf.register_new_resolver("imm.allowed", lambda *, _root_: allowed_values(_root_, _choices()), replace=True)
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    # outside the arch group, so `--help` lists only real options; conf/arch/*.yaml: `- /arch_dit@_here_`
    for name, node in ARCH_SCHEMAS.items():
        cs.store(name=name, node=node)
    __import__("imm.tasks", fromlist=["register_schemas"]).register_schemas(cs)  # conf/sample.yaml, evaluate.yaml


# -- validation ---------------------------------------------------------------------------------
POINT_DATA = tuple(name for name in data_mod.DATASET_NAMES if name not in data_mod.IMAGE_NAMES)
IMAGE_DATA = tuple(data_mod.IMAGE_NAMES)
# The core argument each config key feeds, so imm.core's own argument errors name the config key.
ARG_KEYS = {
    "schedule": "schedule.name",
    "param": "schedule.param",
    "second_time": "schedule.second_time",
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
def _choices() -> dict[str, tuple]:
    from imm import factory  # factory imports this module

    return {
        "schedule.name": tuple(schedules.SCHEDULES),
        "schedule.param": tuple(parameterization.PARAMETERIZATIONS),
        "schedule.second_time": tuple(parameterization.SECOND_TIME_INPUTS),
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


def __getattr__(name: str):
    """CHOICES: every option list, from the code that implements it (built on first use: imm.factory
    imports this module)."""
    if name == "CHOICES":
        return _choices()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def loss_T(cfg) -> float:
    """loss.T, or the schedule's default when it is null."""
    return float(cfg.loss.T) if cfg.loss.T is not None else schedules.get(cfg.schedule.name).default_T


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
    from imm import factory  # factory imports this module

    def fail(msg: str):
        raise ConfigError(msg)

    check_values(cfg)
    # The method's objects check their own arguments (names, time range, mapping and parameterization
    # rules); the IMM pieces are built for either objective, as today's fm runs still carry them.
    core_checked = set(ARG_KEYS.values())
    for key, allowed in _choices().items():
        if key not in core_checked and _get(cfg, key) not in allowed:
            raise not_allowed(key, _get(cfg, key), allowed)
    try:
        label_dropout = cfg.loss.label_dropout or 0.0
        factory.imm_objective(cfg, label_dropout=label_dropout, num_classes=1, augment=factory.augment(cfg))
    except ArgumentError as e:  # num_classes=1: whether the data have labels is known once they are loaded
        raise from_core(e) from None
    from imm import method_checks  # imports this module

    method_checks.check(cfg)  # loss=meanflow / ict: their options, and the IMM options they do not use

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
    from imm.evaluation.evaluate import time_grids  # imports this module

    time_grids("eval.steps", cfg.eval.steps, cfg.eval, schedule=cfg.schedule.name, T=loss_T(cfg), eps=cfg.loss.eps)
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
    if cfg.eval.guidance != 1.0 and points:
        fail(
            f"eval.guidance={cfg.eval.guidance} needs class-conditional data, but data.name="
            f"{cfg.data.name!r} is unconditional; use eval.guidance=1."
        )
