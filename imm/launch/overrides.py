"""The mistakes a user makes on the command line, as one sentence each instead of Hydra's text.

Hydra composes the config before any of this project's code runs, and reports a misspelled key, a value of
the wrong type, an unknown option or a missing `+` in its own words (exit status 1, with hints such as
"To append to your config use +train.step=300" that are the wrong fix for a typo). launch.py hands those
errors to `sentence`, which names the value, the nearest key or option and the range, for exit status 2
like every other error a user can fix. An error this module does not recognise gets Hydra's own text.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from imm.ranges import RANGE, unknown_key

COMMANDS = ("sample", "evaluate", "encode")  # --config-name values besides training's config
KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def sentence(error: BaseException, overrides: list[str]) -> str | None:
    """One sentence for a composition error Hydra raised on these command-line `overrides`, or None."""
    if isinstance(error, OverrideParseException):
        why = str(error).strip().splitlines()[0].rstrip(".")
        return (
            f"{error.override} cannot be read as key=value ({why}); quote a value that holds spaces, brackets or"
            " commas, e.g. 'eval.steps=[1,2,4]'."
        )
    if isinstance(error, MissingConfigException):
        return _missing_config(error, overrides)
    if not isinstance(error, ConfigCompositionException):
        return None
    cause = error.__cause__ or error.__context__  # a list item's error is only the context
    message = str(error)
    if message.startswith("Could not override") and "No match in the defaults list" in message:
        key = message.split("'")[1]
        value = _values(overrides).get(key, "NAME")
        return f"{key}={value} adds a config group the default config does not list: write +{key}={value}."
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and message.startswith("Could not override"):
        return _unknown(cause, message.split("'")[1], overrides)
    if isinstance(cause, ValidationError) and message.startswith("Error merging override"):
        return _wrong_type(cause, message.removeprefix("Error merging override").strip())
    return None


def _values(overrides: list[str]) -> dict[str, str]:
    """{key: the value as typed} of `key=value` overrides (a leading +, ++ or ~ dropped)."""
    pairs = (o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    return {k: v for k, v in pairs}


def _unknown(cause, key: str, overrides: list[str]) -> str | None:
    """`train.step=300`: a key the schema node does not have; the nearest real key."""
    schema = getattr(cause, "object_type", None)
    if not dataclasses.is_dataclass(schema):
        return None
    prefix = key.rpartition(".")[0]
    return unknown_key(
        f"{prefix}." if prefix else "",
        key.rpartition(".")[2],
        _values(overrides).get(key, "..."),
        [f.name for f in dataclasses.fields(schema)],
    )


def _wrong_type(cause, override: str) -> str | None:
    """`train.steps=3k`: a value its field's type cannot hold; what the field takes."""
    schema, name = getattr(cause, "object_type", None), getattr(cause, "key", None)
    if isinstance(getattr(cause, "parent_node", None), ListConfig):  # `eval.steps=[1,x]`: the list's field
        items = cause.parent_node
        schema, name = OmegaConf.get_type(items._get_parent()), items._key()
    if not dataclasses.is_dataclass(schema) or name is None:
        return None
    field = {f.name: f for f in dataclasses.fields(schema)}.get(str(name))
    if field is None:
        return None
    kind = typing.get_type_hints(schema).get(field.name)
    if typing.get_origin(kind) is typing.Union:  # Optional[int] -> int
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    list_of = typing.get_origin(kind) in (list, typing.List)
    item = typing.get_args(kind)[0] if list_of and typing.get_args(kind) else kind
    what = KINDS.get(item)
    if what is None:
        return None
    if list_of:
        what = f"a list of {what.removeprefix('an ').removeprefix('a ')}s"
    key = override.split("=", 1)[0]
    allowed = f"; {key} must be {field.metadata[RANGE].describe()}" if RANGE in field.metadata else ""
    return f"{override} is not {what}{allowed}."


def _missing_config(error: MissingConfigException, overrides: list[str]) -> str | None:
    """`data=checkerbord`: an option no file in conf/data/ has; `--config-name sampl`: no such command."""
    missing = error.missing_cfg_file or ""
    if str(error).startswith("Cannot find primary config"):
        return f"--config-name {missing} names no command; use sample, evaluate or encode (or leave it out to train)."
    group, _, option = missing.rpartition("/")
    if not group:
        return None
    options = sorted(error.options or ())
    near = difflib.get_close_matches(option, options, n=1)
    typed = next((o for o in overrides if o.lstrip("+~").split("=", 1)[0] == group), f"{group}={option}")
    fix = f"the nearest is {group}={near[0]}" if near else f"the options are {', '.join(options)}"
    return f"{typed} is not an option of {group} (conf/{group}/ has no {option}.yaml); {fix}."
