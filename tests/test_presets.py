"""The presets (conf/experiment, sweeps/, conf/arch) compose and validate, and the option lists come from the code."""

import itertools

import pytest
import yaml
from helpers import CONF, ROOT, compose_cfg
from omegaconf import OmegaConf

from imm import data, factory, nets
from imm.config import CHOICES, validate
from imm.core import mapping, objective, parameterization, sampling, schedules
from imm.nets.dit import DIT_PRESETS
from imm.search import corners, job_overrides, search_space

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_composes_and_validates(experiment):
    validate(compose_cfg(f"experiment={experiment}"))


def sweep_jobs(path):
    """The override lists of a sweep's jobs: the cartesian product of its params, as Hydra's basic sweeper;
    for a search (hydra/sweeper=optuna), the corners of its space, which reach every value it can take."""
    preset = yaml.safe_load(path.read_text())
    params = preset["hydra"]["sweeper"]["params"]
    if {"override /hydra/sweeper": "optuna"} in preset.get("defaults", []):
        space, _ = search_space(params, [])
        return [tuple(job_overrides([], point)) for point in corners(space)]
    values = [[f"{key}={v.strip()}" for v in str(choices).split(",")] for key, choices in params.items()]
    return list(itertools.product(*values))


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.stem)
def test_every_sweep_job_composes_and_validates(sweep):
    jobs = sweep_jobs(sweep)
    assert jobs
    for job in jobs:
        cfg = compose_cfg(f"+sweep={sweep.stem}", *job)
        validate(cfg)
        for override in job:  # the job's value landed where the sweep meant it
            key, value = override.split("=")
            if "." in key:
                assert OmegaConf.select(cfg, key) == yaml.safe_load(value), override


@pytest.mark.parametrize("name", sorted(DIT_PRESETS))
def test_every_dit_option_file_writes_the_library_preset(name):
    arch = compose_cfg(f"arch={name}", "data=digits").arch
    assert arch.name == name
    assert {key: arch[key] for key in DIT_PRESETS[name]} == DIT_PRESETS[name]


def test_dit_option_files_and_library_presets_are_the_same_set():
    assert sorted(p.stem for p in (CONF / "arch").glob("dit_*.yaml")) == sorted(DIT_PRESETS)


def test_digits_narrows_dit_s_4_as_its_delta():
    arch = compose_cfg("experiment=digits").arch
    assert (arch.name, arch.hidden_size, arch.depth, arch.num_heads, arch.patch_size) == ("dit_s_4", 128, 4, 4, 4)


def test_option_lists_are_the_code_s():
    assert CHOICES["kernel.weighting"] == objective.WEIGHTINGS
    assert CHOICES["kernel.function"] == objective.KERNELS
    assert CHOICES["loss.objective"] == tuple(objective.OBJECTIVES)
    assert CHOICES["loss.mapping"] == mapping.MAPPINGS
    assert CHOICES["schedule.name"] == tuple(schedules.SCHEDULES)
    assert CHOICES["schedule.param"] == tuple(parameterization.PARAMETERIZATIONS)
    assert CHOICES["schedule.second_time"] == parameterization.SECOND_TIME_INPUTS
    assert CHOICES["eval.sampler"] == sampling.SAMPLERS and CHOICES["eval.grid"] == sampling.GRIDS
    assert CHOICES["arch.name"] == tuple(nets.ARCHS)
    assert CHOICES["data.name"] == tuple(data.DATASET_NAMES)
    assert CHOICES["optim.name"] == tuple(factory.OPTIMIZERS)


@pytest.mark.parametrize(
    "group,key", [("kernel", "weighting"), ("target", "kind"), ("optim", "name"), ("data", "name")]
)
def test_every_option_file_picks_a_listed_option(group, key):
    for path in (CONF / group).glob("*.yaml"):
        assert yaml.safe_load(path.read_text())[key] in CHOICES[f"{group}.{key}"], path


def test_help_lists_no_schema_nodes():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]
    groups = out.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    arch = next(line for line in groups.splitlines() if line.startswith("arch: "))
    assert arch.removeprefix("arch: ").split(", ") == sorted(nets.ARCHS)
    assert not [line for line in groups.splitlines() if ": _" in line or ", _" in line]
