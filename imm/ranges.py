"""The values each config key may take, written once beside its default in the schema (imm/config.py,
imm/config.py): `keep_last: int = ranged(3, ">= 0")`. check_values() holds a composed config
to its schema (no key the schema lacks, as `+loss.kk=3` would add; every number in its Range) and
allowed_values() prints the same ranges at the end of `--help`.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Optional

from omegaconf import MISSING, OmegaConf

from imm.errors import ConfigError

RANGE = "imm.range"  # the dataclass-field metadata key that holds a field's Range
_INTERVAL = re.compile(
    r"^(?:(?P<op>>=|>) *(?P<min>\S+)|(?P<left>[\[(]) *(?P<lo>[^,]+), *(?P<hi>[^\])]+)(?P<right>[\])]))$"
)


@dataclass(frozen=True)
class Range:
    """The values a number field (or each item of a list field) may take, in the notation `--help` prints:
    `> 0`, `>= 1`, an interval `[0, 1)`, a set `{1, 2}`, or `any` (any finite number). `note` says what a
    special value means (`0: none`); a list field also has `min_items` or an exact `length`. Null passes
    where the field is Optional. `check_values` checks every field's Range; `describe` is what --help shows."""

    text: str
    note: str = ""
    items: bool = False  # a list field: the range is each item's
    min_items: int = 0
    length: Optional[int] = None

    def __post_init__(self):
        self.allows(0)  # a typo in the notation fails at import, not when a value is checked

    def allows(self, x) -> bool:
        if not math.isfinite(x):
            return False
        if self.text == "any":
            return True
        if self.text.startswith("{"):
            return x in {float(v) for v in self.text.strip("{}").split(",")}
        m = _INTERVAL.match(self.text)
        if m is None:
            raise ValueError(f"unreadable range {self.text!r}")
        if m["op"]:
            return x >= float(m["min"]) if m["op"] == ">=" else x > float(m["min"])
        lo, hi = float(m["lo"]), float(m["hi"])
        return (x >= lo if m["left"] == "[" else x > lo) and (x <= hi if m["right"] == "]" else x < hi)

    def describe(self) -> str:
        """What a value must be: `>= 1`, `in [0, 1)`, `in {1, 2}`, `a finite number`, `a list of exactly 2 values,
        each in [0, 1)`, with the note in parentheses."""
        text = "a finite number" if self.text == "any" else self.text
        text = f"in {text}" if text[0] in "[({" else text
        if self.items:
            n = self.length if self.length is not None else self.min_items
            count = f"{'exactly' if self.length is not None else 'at least'} {n} value{'s' * (n != 1)}, " if n else ""
            text = f"a list of {count or 'values, '}each {text}"
        return f"{text} ({self.note})" if self.note else text

    def check(self, key: str, value) -> None:
        """Raise ConfigError (one sentence naming the key, the value and the range) unless value fits."""
        if value is None:
            return
        if not OmegaConf.is_list(value) and not isinstance(value, (list, tuple)):
            if not self.allows(value):
                raise ConfigError(f"{key}={value} is out of range; {key} must be {self.describe()}.")
            return
        items = list(value)
        n = len(items)
        if n < self.min_items or (self.length is not None and n != self.length):
            raise ConfigError(f"{key}={items} holds {n} value{'s' * (n != 1)}; {key} must be {self.describe()}.")
        if bad := [x for x in items if not self.allows(x)]:
            raise ConfigError(f"{key}={items} holds {bad[0]}, which is out of range; {key} must be {self.describe()}.")


def ranged(
    default=MISSING, text: str = "any", note: str = "", *, factory=None, items=None, min_items: int = 0, length=None
):
    """A schema field with its Range: `k: int = ranged(12, "[1, 24]")`; a list: `ranged(factory=..., ...)` (or
    items=True for an Optional list whose default is None)."""
    meta = {RANGE: Range(text, note, factory is not None if items is None else items, min_items, length)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _typed_nodes(cfg, prefix: str = ""):
    """(prefix, node, {field name: field}) for `cfg` and each node below it typed by a schema dataclass."""
    schema = OmegaConf.get_type(cfg)
    if not is_dataclass(schema):
        return
    known = {f.name: f for f in fields(schema)}
    yield prefix, cfg, known
    for name in known:
        if not OmegaConf.is_missing(cfg, name) and OmegaConf.is_dict(cfg[name]):
            yield from _typed_nodes(cfg[name], f"{prefix}{name}.")


def check_values(cfg) -> None:
    """Every key of `cfg` is one its schema has and every number is in its Range, else ConfigError: the
    training config, `sample`'s and `evaluate`'s alike (Hydra's own `hydra` node, which a job's full config
    carries, is not the schema's)."""
    for prefix, node, known in _typed_nodes(cfg):
        for key in node:
            if key not in known and not (prefix == "" and key == "hydra"):
                raise ConfigError(unknown_key(prefix, key, node[key], known, added=True))
        for name, f in known.items():
            if RANGE in f.metadata and not OmegaConf.is_missing(node, name):
                f.metadata[RANGE].check(prefix + name, node[name])


def allowed_values(cfg, choices: dict[str, tuple]) -> str:
    """What each key of `cfg` may be (its Range, or its option list in `choices`), one key a line: `--help`'s
    last part."""
    rows = []
    for prefix, node, known in _typed_nodes(cfg):
        for name, f in known.items():
            key = prefix + name
            if RANGE in f.metadata:
                rows.append((key, f.metadata[RANGE].describe()))
            elif key in choices:
                rows.append((key, "one of " + ", ".join(map(str, choices[key]))))
    width = max(len(key) for key, _ in rows)
    lines = [f"  {key:<{width}}  {what}" for key, what in rows]
    return "\n".join(
        ["== Allowed values ==", "A value outside these stops the command before any work (exit status 2).", ""] + lines
    )


def unknown_key(prefix: str, key: str, value, known, *, added: bool = False) -> str:
    """`train.step=300` (a misspelled key) or, `added`, `+loss.kk=3` (a key added to a schema node): one
    sentence naming the nearest real key."""
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    near = [prefix + k for k in difflib.get_close_matches(key, known, n=1)]
    node = prefix.rstrip(".") or "the config"
    fix = f"the nearest is {near[0]}: use {near[0]}={value}." if near else f"its keys are {', '.join(known)}."
    why = " (a + override adds keys the schema does not have)" if added else ""
    return f"{prefix}{key}={value} is not a key of {node}{why}; {fix}"
