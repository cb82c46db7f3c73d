"""Shared fixtures: a real Hydra compose of conf/ and the repository paths."""

from pathlib import Path

from hydra import compose, initialize_config_dir

from imm.config import register

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

register()


def compose_cfg(*overrides: str):
    """The config launch.py would build for these command-line overrides."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=list(overrides))

from slurm_fixture import slurm_cluster  # noqa: E402,F401  (the real single-node SLURM cluster)
