"""This project's Hydra sweepers (Hydra loads sweepers only from the `hydra_plugins` package).

- grid.GridSweeper (`hydra/sweeper=basic`, the default: conf/hydra/sweeper/basic.yaml shadows Hydra's
  own): Hydra's basic grid sweeper, plus the dry run of a multirun (`dry_run=true`: every job checked,
  one line each; imm/launch/dry_run.py).
- search.OptunaSweeper (`hydra/sweeper=optuna`, the `+sweep=search` preset): a Bayesian search over a
  study in an SQLite file beside the MLflow store, on optuna's ask/tell API (imm/launch/search.py).

The classes are thin: the work lives in imm/, imported when a sweep runs (Hydra imports every
module here whenever any Hydra application starts).
"""
