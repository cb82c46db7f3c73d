"""The presets (conf/experiment, sweeps/, conf/arch) compose and validate, and the option lists come from the code."""

import itertools

import pytest
import yaml
from helpers import CONF, ROOT, compose_cfg
from omegaconf import OmegaConf

from imm import data, factory, nets
from imm.core import mapping, methods, objective, parameterization, sampling, schedules
from imm.errors import ConfigError
from imm.factory import loss_T
from imm.launch.search import corners, job_overrides, search_space
from imm.nets.dit import DIT_PRESETS
from imm.validation import choices, validate

CHOICES = choices()  # every option list, from the code that implements it

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


# what a user must add to a preset: where its data are (no default location exists for latents)
REQUIRED = {"imagenet256_paper": ("data.root=/latents/in256",), "imagenet256_paper_a2": ("data.root=/latents/in256",)}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_preset_composes_and_validates(experiment):
    validate(compose_cfg(f"experiment={experiment}", *REQUIRED.get(experiment, ())))
    if experiment in REQUIRED:
        with pytest.raises(ConfigError, match=r"^data.root is missing; data=latents needs data.root="):
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
    assert CHOICES["loss.objective"] == tuple(methods.OBJECTIVES)
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


# Table 5 (imm_spec.md section 2), DiT-XL column, and App. I.1's latent normalisation; docs/presets.md lists where
# each value is set
IMAGENET_XL = {
    "arch.name": "dit_xl_2",
    "arch.dropout": 0.0,
    "schedule.name": "fm",
    "schedule.param": "euler_fm",
    "schedule.time_scale": 1000.0,
    "schedule.second_time": "s",
    "schedule.sigma_data": 0.5,
    "train.steps": 1_200_000,
    "train.batch_size": 4096,
    "train.precision": "tf32",
    "optim.name": "adamw",
    "optim.lr": 1e-4,
    "optim.eps": 1e-8,
    "optim.betas": [0.9, 0.999],
    "optim.weight_decay": 0.0,
    "optim.warmup_steps": 0,
    "optim.lr_schedule": "constant",
    "optim.grad_clip": None,
    "loss.M": 4,
    "kernel.function": "laplace",
    "kernel.weighting": "paper",
    "loss.mapping": "eta_decrement",
    "loss.k": 12,
    "loss.min_gap": 0.0,
    "loss.eps": 0.0,
    "loss.a": 1.0,
    "loss.b": 4.0,
    "ema.decay": 0.9999,
    "data.name": "latents",
    "data.hflip": False,
    "data.resolution": 256,
    "data.latent_mean": [0.86488, -0.27787343, 0.21616915, 0.3738409],
    "data.latent_std": [4.85503674, 5.31922414, 3.93725398, 3.9870003],
    "eval.sampler": "pushforward",
    "eval.grid": "uniform",
    "eval.two_step_eta": None,
    "eval.guidance": 1.5,
}
# DiT-XL*: a = 2, minimum t - r gap 1e-4, t - s as the second time input, FP16 (App. I.6)
IMAGENET_XL_STAR = {
    **IMAGENET_XL,
    "loss.a": 2.0,
    "loss.min_gap": 1e-4,
    "schedule.second_time": "stride",
    "train.precision": "fp16",
}


@pytest.mark.parametrize(
    "experiment,table", [("imagenet256_paper", IMAGENET_XL), ("imagenet256_paper_a2", IMAGENET_XL_STAR)]
)
def test_imagenet_presets_are_table_5(experiment, table):
    cfg = compose_cfg(f"experiment={experiment}", "data.root=/latents")
    assert {key: OmegaConf.select(cfg, key) for key in table} == table
    assert cfg.loss.label_dropout is None and factory.label_dropout(cfg, num_classes=1000) == 0.1
    assert loss_T(cfg) == 0.994  # p(t) = U(0, 0.994)
    assert nets.count_parameters_of("dit_xl_2", (4, 32, 32), num_classes=1000) == 676_440_592  # Table 5: 675M


def test_cifar10_paper_preset_is_table_5():
    cfg = compose_cfg("experiment=cifar10_paper")
    table = {
        "arch.name": "ddpmpp",
        "arch.dropout": 0.2,
        "schedule.param": "simple_edm",
        "schedule.second_time": "s",
        "loss.k": 15,
        "loss.a": 1.0,
        "loss.b": 5.0,
        "loss.eps": 0.006,
        "loss.T": 0.994,
        "optim.name": "radam",
        "optim.lr": 1e-4,
        "train.batch_size": 4096,
        "train.steps": 400_000,
        "ema.decay": 0.9999,
        "data.hflip": True,
        "data.use_labels": False,
        "eval.two_step_eta": 1.4,
    }
    assert {key: OmegaConf.select(cfg, key) for key in table} == table
