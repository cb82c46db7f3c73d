"""The launch wing: how Hydra runs this project's commands. One job (job.py: its run name, tracking URI, exit
status, and the run-directory check), a multirun's MLflow parent run and its jobs' lines (sweep.py,
watcher.py), the dry run (dry_run.py) and the Bayesian search (search.py)."""

from imm import config, validation


def register() -> None:
    """The schemas and resolvers Hydra needs, with each option key's choices for `--help`."""
    config.register(validation.choices)
