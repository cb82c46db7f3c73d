"""`imm [group=option ...] [key=value ...]` (the console script) and `python -m imm`: `python launch.py` from any
directory. The commands, overrides and config are launch.py's (the repository's conf/); runs, sweeps and the
MLflow store go under the directory the command starts in, as they do for launch.py."""

import sys
from pathlib import Path

LAUNCH = Path(__file__).resolve().parents[1] / "launch.py"


def main() -> None:
    if not LAUNCH.is_file():  # installed without its repository: there is no conf/ to compose
        sys.stderr.write(
            f"the imm command runs the repository's launch.py, and there is none at {LAUNCH}; install the project"
            " from its repository with pip install -e <repository>, or run python launch.py there.\n"
        )
        sys.exit(2)
    # launch.py as the main script, with sys.argv as typed (runpy would make argv[0] launch.py's path): the
    # resume lines and the MLflow description then say `imm ...`, the command that reproduces the run here
    code = compile(LAUNCH.read_bytes(), str(LAUNCH), "exec")
    exec(code, {"__name__": "__main__", "__file__": str(LAUNCH), "__builtins__": __builtins__})


if __name__ == "__main__":
    main()
