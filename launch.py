#!/usr/bin/env python
"""Train IMM: `python launch.py [group=option ...] [key=value ...]`; `-m` (or +sweep=NAME) for sweeps.

A thin entry point: Hydra composes conf/, imm.cli.run validates and runs the task.
"""

import hydra

from imm.config import register

register()


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg):
    from imm.cli import run

    return run(cfg)


if __name__ == "__main__":
    main()
