"""The commands besides training: `--config-name sample` and `--config-name evaluate` (on a training
checkpoint) and `--config-name encode` (an image dataset into VAE latents, for data=latents).

This module holds only their typed schemas (registered through `imm.config.register`, so a typo in
`conf/sample.yaml`, `conf/evaluate.yaml` or on the command line fails while Hydra composes), built on
the sampling options the training config's `eval` node uses (imm.config.SamplingOptions, EvalOptions):
one name and one default per key. The commands themselves are `imm.tasks.sample.run` and
`imm.tasks.evaluate.run` and `imm.tasks.encode.run`, which `imm.cli.run` picks by the config name; the
helpers sample and evaluate share are in `imm.tasks.common`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING

from imm.config import GRID_RULES, DataConfig, EvalOptions, SamplingOptions
from imm.data.vae import PAPER_VAE
from imm.evaluation.metrics import MIN_POINTS
from imm.ranges import ranged


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
    labels: Any = "cycle"  # cycle (all classes in turn) | uncond (the null label) | a list of class ids
    n: Optional[int] = ranged(None, ">= 1", "null: 64 images, 5000 points")  # number of samples
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
    feature_net: str = "inception"  # inception | tiny_random (a small fixed-seed conv net: FOR TESTS ONLY)


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


def register_schemas(cs=None) -> None:
    """Store the schemas `conf/sample.yaml`, `conf/evaluate.yaml` and `conf/encode.yaml` build on."""
    from hydra.core.config_store import ConfigStore

    cs = cs or ConfigStore.instance()
    cs.store(name="sample_schema", node=SampleConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="encode_schema", node=EncodeConfig)
