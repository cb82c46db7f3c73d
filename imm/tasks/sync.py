"""`python launch.py --config-name sync run=DIR [tracking.uri=URI]`: a training run's MLflow record completed from
the journal in its run directory (imm.tracking.sync), after its tracking store was away when the training ended.

Prints one line per journal (what was sent where, and the run's status there) on stdout; an unusable store,
a run directory without a journal or held by a running training is one sentence and exit status 2.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from imm.errors import ConfigError
from imm.tracking.sync import sync


def run(cfg) -> list[str]:
    if OmegaConf.is_missing(cfg, "run"):
        raise ConfigError("run is missing; give the training's run directory: run=runs/<experiment>/<hash>.")
    run_dir = Path(cfg.run).expanduser()
    if not run_dir.is_dir():
        raise ConfigError(f"run={cfg.run} is not a directory; give the training's run directory.")
    lines = sync(run_dir, cfg.tracking.uri)
    for line in lines:
        print(line, flush=True)
    return lines
