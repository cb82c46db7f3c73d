"""This project's Hydra sweepers (Hydra loads sweepers only from the `hydra_plugins` package).

- grid (`hydra/sweeper=grid`, the default in conf/config.yaml): Hydra's basic grid sweeper, plus the
  dry run of a multirun (`dry_run=true`: every job checked, one line each; imm/dry_run.py).
- optuna (`hydra/sweeper=optuna`, the `+sweep=search` preset): a Bayesian search over a study in an
  SQLite file beside the MLflow store, on optuna's ask/tell API (imm/search.py).

The classes are thin: the work lives in imm/, imported when a sweep runs (Hydra imports every
module here whenever any Hydra application starts).
"""
