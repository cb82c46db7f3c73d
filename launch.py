#!/usr/bin/env python
"""Train IMM: `python launch.py [group=option ...] [key=value ...]`; `-m` (or +sweep=NAME) for sweeps.

A thin entry point: Hydra composes conf/, imm.cli.run validates and runs the task.
"""

import functools
import os
import sys

# Ctrl-C outside a training step (while torch loads, Hydra composes, the data load, or between a sweep's jobs)
# is this one line and exit status 130; inside training, the loop checkpoints and prints how to resume.
STOPPED = "stopped by SIGINT (Ctrl-C) outside a training step; nothing was lost: run the same command to start again."

try:
    import hydra

    from imm.launch import overrides, register

    register()
except KeyboardInterrupt:
    sys.stderr.write(STOPPED + "\n")
    sys.exit(130)


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg):
    from imm.cli import run

    return run(cfg)


def composed():
    """main(), with Hydra's errors about what was typed (a misspelled key, a value of the wrong type, an unknown
    option) as one sentence and exit status 2 (imm/launch/overrides.py); anything else as Hydra reports it."""
    hydra_reports = "HYDRA_FULL_ERROR" not in os.environ
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors here instead of printing them
    try:
        main()
    except Exception as e:
        line = overrides.sentence(e, [a for a in sys.argv[1:] if not a.startswith("-")])
        if line is not None:
            sys.stderr.write(line + "\n")
            sys.exit(2)
        if not hydra_reports:
            raise
        del os.environ["HYDRA_FULL_ERROR"]
        # Hydra's own report (the function hydra.main reports through; hydra-core is pinned below 1.4)
        from hydra._internal.utils import run_and_report

        run_and_report(functools.partial(_raise, e))


def _raise(error: Exception):
    raise error


if __name__ == "__main__":
    try:
        composed()
    except KeyboardInterrupt:
        sys.stderr.write(STOPPED + "\n")
        sys.exit(130)
