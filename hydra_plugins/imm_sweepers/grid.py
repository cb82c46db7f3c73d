"""`hydra/sweeper=grid`: Hydra's basic sweeper (the cartesian product of `key=a,b` values) with a dry run."""

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser


class GridSweeper(BasicSweeper):
    def sweep(self, arguments):
        if not self.config.dry_run:
            return super().sweep(arguments)
        from imm.launch import dry_run
        from imm.launch.sweep import swept_keys

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([*self._parse_config(), *arguments])
        jobs = [job for batch in self.split_arguments(overrides, None) for job in batch]
        return dry_run.sweep(self.hydra_context, self.config, self.launcher, jobs, keys=swept_keys(self.config))
