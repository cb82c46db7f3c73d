"""What the tests share: the repository paths, a real Hydra compose of conf/, and launch.py run as a
user runs it (a subprocess). Fixtures live in tests/conftest.py; tiny runs use the `debug=toy` option
(conf/debug/toy.yaml) instead of override lists copied into each test file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from imm.launch import register

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
LAUNCH = ROOT / "launch.py"
TESTS = ROOT / "tests"

register()


def compose_cfg(*overrides: str, config_name: str = "config"):
    """The config launch.py would build for these command-line overrides."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name, overrides=list(overrides))


def compose_task(name: str, *overrides: str):
    """The config of the command `launch.py --config-name NAME` (sample, evaluate) for these overrides."""
    return compose_cfg(*overrides, config_name=name)


def one_thread_env(extra: dict | None = None) -> dict:
    """The environment for a subprocess on the 2 shared cores: one BLAS/OpenMP thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "IMM_FAULT")}
    # tests/ importable, as in pytest: eval.feature_net=toynets:TinyRandomFeatures
    path = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": path, **(extra or {})}


def launch(cwd, *args, env: dict | None = None, timeout: float = 600, check: bool = False, script=LAUNCH, prefix=()):
    """`python launch.py args...` in cwd (behind `prefix`, e.g. taskset), output captured; with check=True a
    failure raises with its output."""
    proc = subprocess.run(
        [*prefix, sys.executable, str(script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else one_thread_env(),
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"launch.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def start(cwd, *args, env: dict | None = None) -> subprocess.Popen:
    """`python launch.py args...` started in the background in cwd, stdout and stderr together in one pipe."""
    return subprocess.Popen(
        [sys.executable, str(LAUNCH), *args],
        cwd=cwd,
        env=env if env is not None else one_thread_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def assert_identical(a, b, path="", skip=()):
    """Equal nested states: tensors bit for bit (torch.equal, same dtype), everything else with ==."""
    if path.lstrip(".") in skip:
        return
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (path, set(a) ^ set(b))
        for k in a:
            assert_identical(a[k], b[k], f"{path}.{k}", skip)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]", skip)
    else:
        assert a == b, (path, a, b)
