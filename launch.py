#!/usr/bin/env python
"""Train IMM: `python launch.py [group=option ...] [key=value ...]`; `-m` (or +sweep=NAME) for sweeps.

A thin entry point: Hydra composes conf/, imm.cli.run validates and runs the task.
"""

import sys

# Ctrl-C outside a training step (while torch loads, Hydra composes, the data load, or between a sweep's jobs)
# is this one line and exit status 130; inside training, the loop checkpoints and prints how to resume.
STOPPED = "stopped by SIGINT (Ctrl-C) outside a training step; nothing was lost: run the same command to start again."

try:
    import hydra

    from imm.launch import register

    register()
except KeyboardInterrupt:
    sys.stderr.write(STOPPED + "\n")
    sys.exit(130)


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg):
    from imm.cli import run

    return run(cfg)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.stderr.write(STOPPED + "\n")
        sys.exit(130)
