"""`hydra/sweeper=optuna`: a Bayesian search on optuna's ask/tell API; the work is in imm/launch/search.py."""

from typing import Any, Optional

from hydra.plugins.sweeper import Sweeper


class OptunaSweeper(Sweeper):
    def __init__(
        self,
        metric: str,
        direction: str,
        n_trials: int,
        n_jobs: int,
        sampler: str,
        seed: Optional[int],
        storage: Optional[str],
        study_name: Optional[str],
        params: Optional[dict] = None,
    ) -> None:
        self.options = dict(
            metric=metric,
            direction=direction,
            n_trials=n_trials,
            n_jobs=n_jobs,
            sampler=sampler,
            seed=seed,
            storage=storage,
            study_name=study_name,
            params=dict(params or {}),
        )
        self.hydra_context = self.config = self.launcher = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments) -> Any:
        from imm.launch import search

        return search.run(self, arguments)
