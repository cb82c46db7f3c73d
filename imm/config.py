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

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from imm import data as data_mod
from imm import runs
from imm.core.sampling import TWO_STEP_ETA
from imm.data.vae import PAPER_VAE
from imm.metrics import KNN_K, MIN_POINTS
from imm.ranges import allowed_values, ranged


def _run_dir(base, name, overrides, fresh, dry_run=False):
    return runs.run_dir(base, name, overrides, fresh, claim=not dry_run)


# `${imm.run_dir:runs,NAME,${hydra.overrides.task},${fresh}}` in conf/config.yaml: the run (or sweep)
# directory named after the experiment (imm/runs.py). Cached like Hydra's `${now:}`: the value
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
    # how the network call rounds: standard (float64 times, cast at the network), or official (the official IMM
    # generator's: float32 time inputs, float32 eta grid points, the guidance mix in float64; imported models)
    numerics: str = "standard"


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
    # torch CPU threads; null: chosen (imm/training/threads.py torch_threads: a lone MLP follows the idle cores)
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
    (SampleConfig, EvaluateOptions below), so each key has one name and one default everywhere."""

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
    # a .npz of reference statistics (mu, sigma: EDM's cifar10-32x32.npz, ADM's VIRTUAL_imagenet256_labeled.npz), as
    # papers measure FID; null: the statistics of the training images, computed here (and cached in fid_cache)
    fid_ref: Optional[str] = None
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
    # seconds the end of a run waits for the store to take the rest of its record (the journal keeps what it did not)
    flush_timeout: float = ranged(30.0, ">= 0")


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
    # the weights a new training starts from (step 0, a fresh optimizer, the EMA from the same weights): a run
    # directory (e.g. `--config-name import`'s out), a checkpoint or snapshot file, or a released official checkpoint
    init: Optional[str] = None
    fresh: bool = False  # true: a new run directory of this experiment, not its newest (imm/runs.py)
    dry_run: bool = (
        False  # true: check everything a launch checks, print what it would do, train nothing (imm/launch/dry_run.py)
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
    time_features: str = "float32"  # the sin/cos time features in float32, or float64 (the official IMM DiT)


@dataclass
class DDPMppArch:
    name: str = MISSING
    model_channels: int = ranged(128, ">= 1")
    channel_mult: List[int] = ranged(text=">= 1", factory=lambda: [2, 2, 2], min_items=1)
    num_blocks: int = ranged(4, ">= 1")
    attn_resolutions: List[int] = ranged(text=">= 1", factory=lambda: [16])
    dropout: float = ranged(0.2, "[0, 1)")
    # float64: the time features and the mapping network in float64 (EDM's SongUNet, the official IMM CIFAR-10 net)
    time_features: str = "float32"


ARCH_SCHEMAS = {"arch_mlp": MLPArch, "arch_dit": DiTArch, "arch_ddpmpp": DDPMppArch}


# -- the commands besides training: `--config-name sample`, `evaluate` (on a checkpoint), `encode` --------------
# built on the sampling options the training config's `eval` node uses: one name and one default per key.
@dataclass
class TaskTrackingConfig:
    """Where the results go in MLflow: the checkpoint's own run unless it has none or new_run=true."""

    enabled: bool = True
    uri: Optional[str] = None  # null: sqlite:///<launch dir>/mlflow.db, as in training
    new_run: bool = False  # log into a new run even when the checkpoint names its training run
    experiment: Optional[str] = None  # new runs only; null: the training run's tracking.experiment
    run_name: Optional[str] = None  # new runs only; null: "<command> <checkpoint>"


@dataclass
class DataOverrideConfig:
    """Where the training data lives now, when it moved since training (null: as in the checkpoint)."""

    root: Optional[str] = None  # image datasets (mnist, cifar10, folder)
    path: Optional[str] = None  # data=points: the .npy file
    vae: Optional[str] = None  # data=latents: the VAE that decodes (hub id or folder)
    source_root: Optional[str] = None  # data=latents: the images the latents were encoded from (FID reference)


@dataclass
class SampleConfig(SamplingOptions):
    """`--config-name sample`: the sampling options (imm.config.SamplingOptions) at the top level."""

    ckpt: str = MISSING  # a snapshot or training-state file, or a run directory (its newest of either)
    weights: str = "ema"  # ema | online
    steps: int = ranged(1, ">= 1")  # sampling steps N (one count here; the evaluations take a list)
    # explicit intermediate eta points (steps - 1 of them), e.g. [1.4]
    etas: Optional[List[float]] = ranged(None, note=GRID_RULES, items=True)
    # classifier-free guidance w
    guidance: Optional[float] = ranged(None, note="null: the training run's eval.guidance; 1: none")
    # not the evaluations' 1234: the README's documented samples were drawn with seed 0
    seed: int = ranged(0)
    # cycle (all classes in turn) | uncond (the null label) | a list of class ids (cycled) | a .npy file: an id a sample
    labels: Any = "cycle"
    # number of samples; points by default as many as `evaluate` measures, so steps.png's ED/floor reads at its n
    n: Optional[int] = ranged(None, ">= 1", "null: 64 images, the held-out size for points; with noise: its count")
    # a .npy file [n, *sample shape]: the sampler's first state x_T, already scaled by sigma_data (as the official
    # generator's latents are); null: drawn from seed
    noise: Optional[str] = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out: Optional[str] = None  # output directory; null: the Hydra run directory (runs/samples/<date>/<time>)
    compare_steps: List[int] = ranged(text=">= 1", note="[]: no figure", factory=lambda: [1, 2, 4, 8])
    data: DataOverrideConfig = field(default_factory=DataOverrideConfig)
    tracking: TaskTrackingConfig = field(default_factory=TaskTrackingConfig)


@dataclass
class EvaluateOptions(EvalOptions):
    """`evaluate`'s `eval` node: the training config's eval options (imm.config.EvalOptions), same names."""

    guidance: Any = None  # a scale or a list of scales; null: [the training run's eval.guidance]
    # null: 50000 for images (FID-50k, the paper), the held-out size for points
    n_samples: Optional[int] = ranged(None, ">= 2", f"FID's covariance needs 2; point data: >= {MIN_POINTS}")
    fid: bool = True  # images: FID (false: only the classifier metric of digits and MNIST, and the figure)
    allow_download: bool = True  # false: never download the Inception weights
    # inception, or module:Class: another feature network (an importable nn.Module; its numbers are not FID)
    feature_net: str = "inception"


@dataclass
class EvaluateConfig:
    ckpt: str = MISSING  # a snapshot or training-state file, or a run directory (its newest of either)
    weights: str = "ema"  # ema | online; metrics are logged as evaluate/... (online: evaluate_online/...)
    device: str = "auto"
    out: Optional[str] = None  # null: the Hydra run directory (runs/evaluations/<date>/<time>)
    eval: EvaluateOptions = field(default_factory=EvaluateOptions)
    data: DataOverrideConfig = field(default_factory=DataOverrideConfig)
    tracking: TaskTrackingConfig = field(default_factory=TaskTrackingConfig)


@dataclass
class SyncTrackingConfig:
    # null: the store the run logged to (its journal says which); another store: the run is copied there
    uri: Optional[str] = None


@dataclass
class SyncConfig:
    """`--config-name sync`: a training run's MLflow record completed from the journal in its run directory."""

    run: str = MISSING  # the training's run directory (it holds mlflow_journal.jsonl)
    tracking: SyncTrackingConfig = field(default_factory=SyncTrackingConfig)


@dataclass
class EncodeConfig:
    """`--config-name encode`: the images of `data` (any image dataset option, as in training) as VAE latents."""

    out: str = MISSING  # the latents folder (data.root of data=latents); an unfinished encode there continues
    vae: str = PAPER_VAE  # hub id or local folder of a diffusers AutoencoderKL
    batch_size: int = ranged(64, ">= 1")  # images per VAE call
    shard_size: int = ranged(
        10000, ">= 1"
    )  # images per shard file; a killed encode resumes after its last complete shard
    dtype: str = "float32"  # of the stored latents: float32 | float16 (half the disk)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)  # data.hflip=true also encodes flipped copies


@dataclass
class ImportConfig:
    """`--config-name import`: a checkpoint the IMM authors released (lumalabs/imm) as a run directory of ours. Each
    null setting is what the file says (imm/official/convert.py); a value replaces it (the official README passes
    network.temb_type=identity for imagenet256_s_a1.pkl: here second_time=s)."""

    src: str = MISSING  # the official file: a pickle or torch.save of {'ema': IMMPrecond, ...}
    out: str = MISSING  # the run directory to write (must not hold a run)
    entry: str = "ema"  # the dict entry holding the network
    param: Optional[str] = None  # schedule.param (the file's f_type)
    second_time: Optional[str] = None  # schedule.second_time (the file's temb_type: identity -> s, stride)
    noise_schedule: Optional[str] = None  # schedule.name (the file's noise_schedule: fm, vp_cosine -> cosine)
    sigma_data: Optional[float] = ranged(None, "> 0", "null: the file's")
    time_scale: Optional[float] = ranged(None, "> 0", "null: the file's")
    T: Optional[float] = ranged(None, "(0, 1]", "null: the file's")
    eps: Optional[float] = ranged(None, "[0, 1)", "null: the file's")
    num_heads: Optional[int] = ranged(None, ">= 1", "null: the file's (DiT)")
    time_features: str = "float64"  # arch.time_features of the run (float64: the official forward pass)
    numerics: str = "official"  # schedule.numerics of the run (official: the official generator's rounding)
    # the experiment preset the run takes its training and sampling settings from; null: the paper's preset of a
    # released model (cifar10_paper, imagenet256_paper, imagenet256_paper_a2), else none
    preset: Optional[str] = None
    # the run's data option; null: the preset's, else cifar10 (3 channels, 32x32), latents (4 channels) or folder
    dataset: Optional[str] = None
    overrides: List[str] = field(default_factory=list)  # more keys of the run's config, e.g. ["data.root=/data"]


def saved_config(text: str):
    """A config a checkpoint stored, over today's schema: keys added since it was written get their defaults, so
    a run started by an earlier version resumes and samples as it was (a key the schema no longer has: the
    config as it was saved). The one migration of saved configs."""
    saved = OmegaConf.create(text)
    try:
        return OmegaConf.merge(OmegaConf.structured(Config), saved)
    except Exception:  # noqa: BLE001  OmegaConf's errors for a key or type the schema no longer has
        return saved


def register(choices=None) -> None:
    """Store the schemas in Hydra's ConfigStore and register the resolvers the config files use; `choices`
    (imm.validation.choices) makes `--help` end with each option key's allowed values too."""
    import warnings

    # conf/hydra/sweeper/basic.yaml replaces Hydra's `basic` sweeper option with its subclass (a dry run added;
    # hydra_plugins/imm_sweepers/grid.py); Hydra validates it against its own schema of that name, as wanted,
    # and warns that this matching by name is deprecated.
    warnings.filterwarnings("ignore", message=r"\s*'hydra/sweeper/basic' is validated against ConfigStore schema")
    # ${imm.max:1,${.gpus_per_node}}: one task per GPU, at least one (launcher presets)
    OmegaConf.register_new_resolver("imm.max", lambda *values: max(values), replace=True)
    # ${imm.allowed:} in hydra.help.footer: `--help` ends with each key's range (allowed_values)
    OmegaConf.register_new_resolver(
        "imm.allowed", lambda *, _root_: allowed_values(_root_, choices() if choices else {}), replace=True
    )
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    # outside the arch group, so `--help` lists only real options; conf/arch/*.yaml: `- /arch_dit@_here_`
    for name, node in ARCH_SCHEMAS.items():
        cs.store(name=name, node=node)
    cs.store(name="sample_schema", node=SampleConfig)  # conf/sample.yaml, evaluate.yaml, encode.yaml
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="encode_schema", node=EncodeConfig)
    cs.store(name="import_schema", node=ImportConfig)
    cs.store(name="sync_schema", node=SyncConfig)
