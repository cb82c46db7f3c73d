"""What launch.py runs inside Hydra: resolve run directory, tracking URI and run name, then train.

Errors a user can fix (config, data, checkpoint, tracking) are printed as one sentence and the
process exits with status 2, before any data is loaded or any MLflow run is created.
"""

from __future__ import annotations

import logging
import sys

from hydra.core.hydra_config import HydraConfig

from .config import ConfigError
from .data import DataError
from .tracking.mlflow_run import TrackingError, check_reachable, default_uri
from .training.checkpoint import CheckpointError

log = logging.getLogger("imm")
USER_ERRORS = (ConfigError, DataError, CheckpointError, TrackingError)
NOT_IN_RUN_NAME = ("hydra", "tracking.", "resume", "train.device", "+sweep", "sweep")


def run_name_from_overrides(overrides, experiment: str | None) -> str:
    """`kernel=seed,loss.k=15` from the command-line overrides (launcher and tracking keys left out)."""
    keep = [o.lstrip("+~") for o in overrides if not o.lstrip("+~").startswith(NOT_IN_RUN_NAME)]
    return ",".join(keep) or (experiment or "default")


def tracking_uri(cfg, launch_dir) -> str:
    """tracking.uri, defaulting to sqlite:///<launch dir>/mlflow.db; optionally falling back to it."""
    uri = cfg.tracking.uri or default_uri(launch_dir)
    if cfg.tracking.fallback_local and uri != default_uri(launch_dir):
        try:
            check_reachable(uri)
        except TrackingError as e:
            log.warning("%s; falling back to %s (tracking.fallback_local=true)", e, default_uri(launch_dir))
            uri = default_uri(launch_dir)
    return uri


def run(cfg):
    from .training.loop import train  # torch-heavy imports after Hydra has parsed the command line

    hc = HydraConfig.get()
    try:
        uri = tracking_uri(cfg, hc.runtime.cwd)
        name = cfg.tracking.run_name or run_name_from_overrides(hc.overrides.task, hc.runtime.choices.get("experiment"))
        tags = {"hydra.job.num": str(hc.job.num)} if hc.mode.name == "MULTIRUN" else {}
        return train(cfg, hc.runtime.output_dir, tracking_uri=uri, run_name=name, extra_tags=tags)
    except USER_ERRORS as e:
        log.error("%s", e)
        sys.exit(2)
