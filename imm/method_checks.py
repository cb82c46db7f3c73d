"""The rules of loss.objective=meanflow|ict in config terms: each method's options only on its own runs, the IMM
options off theirs, and the method's own objects built once on the CPU so that imm.core's argument checks name
config keys. One sentence per error (ConfigError), before any data is loaded."""

from __future__ import annotations

from dataclasses import fields

from imm import factory
from imm.config import ICTConfig, KernelConfig, LossConfig, MeanFlowConfig
from imm.core.util import ArgumentError
from imm.errors import ConfigError

NEW_METHODS = ("meanflow", "ict")
METHOD_NODES = {"meanflow": MeanFlowConfig, "ict": ICTConfig}  # loss.<method>.*: that method's options
# IMM's own keys: a MeanFlow or iCT run that sets one has asked for something it would silently ignore
IMM_LOSS_KEYS = ("M", "k", "a", "b", "mapping", "eta_max", "eta_min", "min_gap", "drop_target_labels")
IMM_KERNEL_KEYS = ("function", "ref_dim", "kappa")


def check(cfg) -> None:
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
        factory.method_objective(cfg, label_dropout=_label_dropout(cfg), num_classes=1, augment=factory.augment(cfg))
    except ArgumentError as e:
        raise factory.method_error(e, objective) from None


def _label_dropout(cfg) -> float:
    """loss.label_dropout as a class-conditional run resolves it (null: 0.1)."""
    return 0.1 if cfg.loss.label_dropout is None else float(cfg.loss.label_dropout)
