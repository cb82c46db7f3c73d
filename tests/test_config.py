"""Every config group option composes, validates and instantiates; bad configs fail with one sentence."""

import copy
import functools
import math

import pytest
import torch
from helpers import CONF, compose_cfg
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from imm import factory
from imm.errors import ConfigError
from imm.validation import validate

GROUPS = ["arch", "schedule", "kernel", "loss", "target", "data", "optim", "train", "tracking", "experiment"]
IMAGE_DATA = {"digits", "mnist", "cifar10", "folder", "latents"}


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def fitting_overrides(group, option):
    """Overrides that make `group=option` a runnable combination (an image arch needs image data, ...)."""
    extra = []
    if group == "arch" and option != "mlp":
        extra = ["data=digits"] if option != "ddpmpp" else ["data=digits", "data.resolution=16"]
    if group == "data" and option in IMAGE_DATA:
        extra = ["arch=dit_s_4"]
    if group == "data" and option == "points":
        extra = ["data.path=/nonexistent.npy"]
    if (group == "data" and option in ("folder", "latents")) or (group, option[:11]) == ("experiment", "imagenet256"):
        extra += ["data.root=/nonexistent"]
    return extra


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_validates_and_instantiates(group, option):
    cfg = compose_cfg(f"{group}={option}", *fitting_overrides(group, option))
    validate(cfg)
    par = factory.parameterization(cfg)
    obj = factory.objective(cfg, num_classes=10 if cfg.data.name in IMAGE_DATA else 0)
    assert obj.param.name == par.name
    shape = (1, 16, 16) if cfg.data.name in IMAGE_DATA else (2,)
    with torch.device("meta"):  # full-size nets without the memory
        net = factory.net(cfg, shape, 10 if cfg.data.name in IMAGE_DATA else 0)
    assert sum(p.numel() for p in net.parameters()) > 0
    factory.optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))], torch.device("cpu"))


def test_group_choices_land_where_expected():
    cfg = compose_cfg(
        "schedule=cosine",
        "kernel=inv_stride",
        "loss=cifar10",
        "target=ema",
        "optim=radam",
        "arch=ddpmpp",
        "data=digits",
    )
    assert (cfg.schedule.name, cfg.schedule.param) == ("cosine", "simple_edm")
    assert cfg.kernel.weighting == "inv_stride" and cfg.loss.k == 15 and cfg.loss.b == 5 and cfg.loss.eps == 0.006
    assert cfg.target.kind == "ema" and cfg.optim.name == "radam" and cfg.arch.model_channels == 128
    xl_star = compose_cfg("loss=imagenet_xl_star")
    assert xl_star.loss.a == 2 and xl_star.loss.min_gap == 1e-4 and xl_star.schedule.second_time == "stride"
    # the command line wins over the experiment's choices
    assert (
        compose_cfg("loss=cifar10").loss.k == 15 and compose_cfg("arch=dit_s_4", "data=digits").arch.name == "dit_s_4"
    )


def test_loss_T_defaults_per_schedule():
    from imm.factory import loss_T

    assert loss_T(compose_cfg()) == 0.994
    assert loss_T(compose_cfg("schedule=cosine")) == 0.996
    assert loss_T(compose_cfg("schedule=cosine", "loss.T=0.99")) == 0.99


COMPOSE_ERRORS = {  # Hydra rejects these while composing
    "unknown group option": (["kernel=nope"], "kernel/nope"),
    "unknown key": (["loss.kk=3"], "kk"),
    "wrong type": (["loss.M=four"], "M"),
    "unknown arch key": (["arch.widht=3"], "widht"),
}


@pytest.mark.parametrize("case", COMPOSE_ERRORS)
def test_composition_errors(case):
    overrides, needle = COMPOSE_ERRORS[case]
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError)) as e:
        compose_cfg(*overrides)
    assert needle in str(e.value) + str(e.value.__cause__)


BAD = {
    "zero lr": (["optim.lr=0"], "optim.lr=0"),
    "negative lr": (["optim.lr=-1e-3"], "optim.lr"),
    "zero batch": (["train.batch_size=0"], "train.batch_size"),
    "zero steps": (["train.steps=0"], "train.steps"),
    "zero M": (["loss.M=0"], "loss.M"),
    "zero evaluation draws": (["eval.draws=0"], "eval.draws"),
    "M does not divide batch": (["train.batch_size=510"], "divisible by loss.M"),
    "k out of range": (["loss.k=40"], "loss.k=40"),
    "a not 1 or 2": (["loss.a=3"], "loss.a=3"),
    "eps >= T": (["loss.eps=0.995"], "loss.eps=0.995"),
    "T >= 1 with eta mapping": (["loss.T=1.0"], "loss.T=1.0"),
    "euler_fm on cosine": (["schedule=cosine", "schedule.param=euler_fm"], "euler_fm needs schedule.name=fm"),
    "bad weighting": (["kernel.weighting=fancy"], "kernel.weighting='fancy'"),
    "missing data.path": (["data=points"], "data.path is missing"),
    "guidance on unconditional": (["eval.guidance=1.5"], "eval.guidance=1.5"),
    "image arch on 2-D data": (["arch=dit_s_4"], "does not fit 2-D/point data"),
    "mlp on image data": (["data=digits"], "does not fit image data"),
    "lambda mapping needs eps": (["loss.mapping=lambda_decrement"], "loss.eps=0.0 must be > 0"),
    # imm.core's own argument errors, said with the config keys
    "unknown mapping": (["loss.mapping=nope"], "loss.mapping='nope' is not allowed; choose one of eta_decrement,"),
    "unknown second time input": (["schedule.second_time=r"], "schedule.second_time='r' is not allowed"),
    "identity needs eps": (["schedule.param=identity"], "loss.eps=0.0 must be > 0 with schedule.param=identity"),
    "eta range": (["loss.eta_min=2", "loss.eta_max=1"], "loss.eta_max > loss.eta_min >= 0"),
    "zero M with the fm objective": (["loss=fm", "loss.M=0"], "loss.M=0"),
    "negative min_gap": (["loss.min_gap=-1"], "loss.min_gap=-1.0 must be >= 0"),
    "augmentation probability 1": (["data=digits", "arch=dit_s_4", "data.augment_p=1"], "data.augment_p=1.0 must be"),
    "augmenting point data": (["data.augment_p=0.1"], "data.augment_p=0.1 augments images, but data.name="),
    "empty experiment name": (["tracking.experiment="], "tracking.experiment is empty"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_configs_fail_with_one_sentence(case):
    overrides, needle = BAD[case]
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(*overrides))
    msg = str(e.value)
    assert needle in msg
    assert "\n" not in msg and msg.endswith(".")


def test_batch_must_divide_by_world_size_times_M():
    validate(compose_cfg("train.batch_size=8", "loss.M=4"), world_size=2)
    with pytest.raises(ConfigError, match="4 x 3 = 12"):
        validate(compose_cfg("train.batch_size=16", "loss.M=4"), world_size=3)


def test_label_dropout_defaults():
    cfg = compose_cfg()
    assert factory.label_dropout(cfg, 10) == 0.1 and factory.label_dropout(cfg, 0) == 0.0
    with pytest.raises(ConfigError, match="label_dropout"):
        factory.label_dropout(compose_cfg("loss.label_dropout=0.2"), 0)


def test_lr_schedule():
    cfg = compose_cfg("optim.warmup_steps=10", "train.steps=100", "optim.lr=1.0")
    assert factory.lr_at(cfg, 0) == pytest.approx(0.1)
    assert factory.lr_at(cfg, 9) == pytest.approx(1.0 * 0.5 * (1 + torch.cos(torch.tensor(0.09 * torch.pi)).item()))
    assert factory.lr_at(cfg, 100) == pytest.approx(0.0, abs=1e-12)
    const = compose_cfg("optim.lr_schedule=constant", "optim.warmup_steps=0", "optim.lr=0.5")
    assert factory.lr_at(const, 57) == 0.5


# -- ranges: every number's range is written once, beside its default (imm.ranges.Range) ----------------
def _schemas():
    """Every schema dataclass: the training config's nodes, the architectures', sample's, evaluate's and encode's."""
    from dataclasses import fields, is_dataclass

    from imm.config import ARCH_SCHEMAS, Config, EncodeConfig, EvaluateConfig, SampleConfig

    todo, seen = [Config, *ARCH_SCHEMAS.values(), SampleConfig, EvaluateConfig, EncodeConfig], []
    while todo:
        schema = todo.pop()
        if schema not in seen:
            seen.append(schema)
            todo += [f.default_factory for f in fields(schema) if is_dataclass(f.default_factory)]
    return seen


def test_every_number_of_every_schema_has_its_range():
    """int, float and lists of them, Optional or not: none without a Range (a new knob must say its range)."""
    from dataclasses import fields

    from imm.ranges import RANGE

    numbers = {"int", "float", "List[int]", "List[float]"}
    unranged = []
    for schema in _schemas():
        for f in fields(schema):
            kind = str(f.type).replace("Optional[", "").rstrip("]") + ("]" if "List[" in str(f.type) else "")
            if kind in numbers and RANGE not in f.metadata:
                unranged.append(f"{schema.__name__}.{f.name}")
    assert unranged == []


@pytest.mark.parametrize(
    "text,inside,outside",
    [
        ("> 0", [1e-12, 3], [0, -1, float("inf"), float("nan")]),
        (">= 1", [1, 7], [0, 0.5, -3]),
        ("[1, 24]", [1, 12, 24], [0, 25, 0.99]),
        ("(0, 1)", [0.5, 1e-9], [0, 1, 1.5]),
        ("[0, 1)", [0, 0.999], [1, -0.1]),
        ("{1, 2}", [1, 2.0], [3, 1.5, 0]),
        ("any", [-1e30, 0, 4], [float("inf"), float("-inf"), float("nan")]),
    ],
)
def test_range_notation_reference_values(text, inside, outside):
    from imm.ranges import Range

    r = Range(text)
    assert all(r.allows(x) for x in inside) and not any(r.allows(x) for x in outside)


def _outside(r, integer: bool):
    """A value the Range r refuses (for a list field: a list with one such item, or too few items)."""
    if r.text == "any":
        value = math.inf
    elif r.text.startswith("{"):
        value = max(float(v) for v in r.text.strip("{}").split(",")) + 1
    else:  # just below the lower bound: `> 0`, `(0, 1)` -> 0; `>= 1`, `[1, 24]` -> 0; `[0, 1)` -> -1
        value = float(r.text.strip(">=[( ").split(",")[0]) - (0 if r.text.startswith(("> ", "(")) else 1)
    value = int(value) if integer else value
    if r.items:
        return [] if r.min_items or r.length else [value]
    return value


def _ranged_keys(*overrides):
    """(key, its Range, whether it is an integer) for every ranged key of the config these overrides compose."""
    from imm.ranges import RANGE, _typed_nodes

    return [
        (prefix + f.name, f.metadata[RANGE], "int" in str(f.type))
        for prefix, node, known in _typed_nodes(compose_cfg(*overrides))
        for f in known.values()
        if RANGE in f.metadata
    ]


BASES = [(), ("arch=dit_s_4", "data=digits"), ("arch=ddpmpp", "data=digits")]
# (key, range, the overrides it needs) for every ranged key of the training config and of each architecture; an
# integer key whose range is any number (imm.core checks the rest) has no integer outside it
RANGED = [
    (key, r, integer, base)
    for base in BASES
    for key, r, integer in _ranged_keys(*base)
    if (not base or key.startswith("arch.")) and not (integer and r.text == "any")
]


@functools.cache
def _composed(base):
    return compose_cfg(*base)


def test_the_defaults_are_inside_their_ranges():
    for base in BASES:
        validate(_composed(base))


@pytest.mark.parametrize("key,r,integer,base", RANGED, ids=[f"{k}{'-' + b[0] if b else ''}" for k, _, _, b in RANGED])
def test_every_ranged_key_refuses_a_value_outside_its_range_in_one_sentence(key, r, integer, base):
    """Each key the training config has, at a value just outside its range (set on the composed, typed config
    as an override would set it): ConfigError naming the key and the value, saying the range."""
    cfg = copy.deepcopy(_composed(base))
    OmegaConf.update(cfg, key, _outside(r, integer))
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    assert msg.startswith(f"{key}=") and r.describe() in msg, msg
    assert "\n" not in msg and msg.endswith("."), msg


ADDS = "(a + override adds keys the schema does not have)"
APPENDED = {
    "+loss.kk=3": f"loss.kk=3 is not a key of loss {ADDS}; the nearest is loss.k: use loss.k=3.",
    "+train.stesp=30": f"train.stesp=30 is not a key of train {ADDS}; the nearest is train.steps: use train.steps=30.",
    "++arch.widht=64": f"arch.widht=64 is not a key of arch {ADDS}; the nearest is arch.width: use arch.width=64.",
    "+foo=1": f"foo=1 is not a key of the config {ADDS}; its keys are arch, schedule, kernel, loss, target, ema, data,"
    " optim, train, eval, tracking, resume, init, fresh, dry_run.",
}


@pytest.mark.parametrize("override", APPENDED)
def test_a_key_appended_to_the_schema_is_refused_naming_the_nearest_real_key(override):
    """What Hydra's own hint suggests for a typo (`+loss.kk=3`) composes; validate refuses it."""
    cfg = compose_cfg(override)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value) == APPENDED[override]


def test_help_ends_with_every_keys_range():
    """--help's footer (hydra.help.footer = ${imm.allowed:}) lists each ranged key with its range and each option
    list, from the schema: one source for validate() and --help."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        footer = compose("config", return_hydra_config=True).hydra.help.footer
    lines = footer.splitlines()
    assert lines[0] == "== Allowed values =="
    for key, r, _ in _ranged_keys():
        assert any(line.split()[:1] == [key] and line.endswith(r.describe()) for line in lines), key
    assert any(line.split()[:1] == ["loss.mapping"] and "eta_decrement" in line for line in lines)
    assert "  train.keep_last" in footer and "$" not in footer  # Hydra's help template substitutes $NAMES


def test_a_run_saved_before_a_key_existed_resumes_with_its_default():
    """A checkpoint's config written before loss.meanflow / loss.ict existed is the same experiment (the keys get
    their defaults); a changed value is still refused."""
    from imm.validation import check_same_run

    cfg = compose_cfg()
    old = OmegaConf.to_container(cfg)
    del old["loss"]["meanflow"], old["loss"]["ict"]
    assert check_same_run(cfg, OmegaConf.to_yaml(old), "old.pt") == {}
    old["loss"]["k"] = 13
    with pytest.raises(ConfigError, match=r"different config \(loss.k was '13', now '12'\)"):
        check_same_run(cfg, OmegaConf.to_yaml(old), "old.pt")
