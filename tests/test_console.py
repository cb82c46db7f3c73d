"""`imm ...` (the console script of pyproject.toml) and `python -m imm ...` are `python launch.py ...` from any
directory: runs and the MLflow store go under the directory they start in, and the lines that say how to go on
name the command as it was typed."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import one_thread_env

IMM = Path(sys.executable).parent / "imm"  # installed beside the interpreter by `pip install -e .`


def run(cwd, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=one_thread_env())


@pytest.mark.slow
def test_the_imm_command_trains_where_it_starts_and_says_imm_in_its_resume_line(tmp_path):
    assert IMM.is_file(), f"no console script at {IMM}: install the project with pip install -e ."
    first = run(tmp_path, str(IMM), "debug=toy", "train.steps=20")
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "toy").iterdir()
    assert (run_dir / "launch.log").is_file() and (tmp_path / "mlflow.db").is_file()
    train_on = re.search(r"train on +(.*)", first.stderr)[1]
    assert train_on == "imm debug=toy train.steps=40"
    on = run(tmp_path, str(IMM), *shlex.split(train_on)[1:])
    assert on.returncode == 0 and f"resumed from {run_dir}/checkpoints/step-00000020.pt at step 20" in on.stderr

    typo = run(tmp_path, sys.executable, "-m", "imm", "train.step=3")
    assert typo.returncode == 2
    assert typo.stderr.strip() == "train.step=3 is not a key of train; the nearest is train.steps: use train.steps=3."
