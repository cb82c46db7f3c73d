"""Helpers shared by the core modules: float64 promotion, per-sample broadcasting, argument errors."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def f64(t) -> Tensor:
    """t as a float64 tensor (schedule quantities are computed in float64, spec section 6)."""
    return torch.as_tensor(t, dtype=torch.float64)


def bcast(coef: Tensor, x: Tensor) -> Tensor:
    """A scalar or per-sample [B] coefficient cast to x's dtype/device and shaped [B, 1, ..., 1]."""
    coef = torch.as_tensor(coef).to(device=x.device, dtype=x.dtype)
    if coef.dim() == 0:
        return coef
    return coef.reshape(coef.shape[0], *([1] * (x.dim() - 1)))


class ArgumentError(ValueError):
    """A ValueError that names the argument(s) breaking a rule, so a caller that took them from its own
    keys (imm.config: `loss.eps`, ...) can say the same sentence with its names.

    `message` writes each argument it names as `{name}`; str() shows the plain argument names and
    `render(keys)` the caller's. `allowed` is set when the value is not one of a fixed list of options.
    """

    def __init__(self, message: str, *args: str, value=None, allowed=None):
        self.template, self.args_named, self.value, self.allowed = message, args, value, allowed
        super().__init__(self.render({}))

    @property
    def arg(self) -> str:
        """The argument the rule is about (the first one named)."""
        return self.args_named[0]

    def render(self, keys: dict[str, str]) -> str:
        out = self.template
        for name in self.args_named:
            out = out.replace("{" + name + "}", keys.get(name, name))
        return out


def check_choice(arg: str, value, allowed, what: str) -> None:
    """Raise ArgumentError unless `value` is one of `allowed` (`what`: the option kind, for the message)."""
    if value not in allowed:
        message = f"unknown {what} {value!r}; choose one of {list(allowed)}"
        raise ArgumentError(message, arg, value=value, allowed=allowed)
