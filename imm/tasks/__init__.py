"""Commands that work on a training checkpoint: `--config-name sample` and `--config-name evaluate`.

This module holds only their typed schemas (registered through `imm.config.register`, so a typo in
`conf/sample.yaml`, `conf/evaluate.yaml` or on the command line fails while Hydra composes), built on
the sampling options the training config's `eval` node uses (imm.config.SamplingOptions, EvalOptions):
one name and one default per key. The commands themselves are `imm.tasks.sample.run` and
`imm.tasks.evaluate.run`, which `imm.cli.run` picks by the config name; the helpers both use are in
`imm.tasks.common`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING

from imm.config import GRID_RULES, EvalOptions, SamplingOptions
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


@dataclass
class SampleConfig(SamplingOptions):
    """`--config-name sample`: the sampling options (imm.config.SamplingOptions) at the top level."""

    ckpt: str = MISSING  # a checkpoint file, or a run directory (its newest checkpoint)
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
    allow_download: bool = True  # false: never download the Inception weights
    feature_net: str = "inception"  # inception | tiny_random (a small fixed-seed conv net: FOR TESTS ONLY)


@dataclass
class EvaluateConfig:
    ckpt: str = MISSING
    weights: str = "ema"  # ema | online (online metrics are logged as eval_online/...)
    device: str = "auto"
    out: Optional[str] = None  # null: the Hydra run directory (runs/evaluations/<date>/<time>)
    eval: EvaluateOptions = field(default_factory=EvaluateOptions)
    data: DataOverrideConfig = field(default_factory=DataOverrideConfig)
    tracking: TaskTrackingConfig = field(default_factory=TaskTrackingConfig)


def register_schemas(cs=None) -> None:
    """Store the schemas `conf/sample.yaml` and `conf/evaluate.yaml` build on."""
    from hydra.core.config_store import ConfigStore

    cs = cs or ConfigStore.instance()
    cs.store(name="sample_schema", node=SampleConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
