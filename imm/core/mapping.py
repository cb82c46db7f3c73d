"""The mapping r(s, t): where the target pass starts, a small step from t towards s.

Spec section 1.5 (paper App. C.6, C.7, I.6). Every mapping takes a constant step delta in some
reparameterisation of time, with delta = (range of that quantity) / 2^k, then r = max(s, .):

| name               | r(s, t)                                     | delta                          |
|--------------------|---------------------------------------------|--------------------------------|
| eta_decrement      | max(s, eta^-1(eta(t) - delta))   (default)  | (eta_max - eta_min) / 2^k      |
| t_decrement        | max(s, t - delta)                           | (T - eps) / 2^k                |
| lambda_decrement   | max(s, lambda^-1(lambda(t) + delta))        | (lambda(eps) - lambda(T)) / 2^k|
| inv_eta_increment  | max(s, eta^-1(1 / (1/eta(t) + delta)))      | (1/eta_min - 1/eta_max) / 2^k  |

lambda grows towards the data, so the lambda step ADDS delta (the literal "lambda(t) - delta" of the
paper's table would give r > t). eta_max/eta_min default to eta(T)/eta(eps) (the official
"nt_high/nt_low"). The FP16 variant (App. I.6) adds a minimum gap Delta:
r = max(s, min(t - Delta, r_mapping)). The result is always clamped into [s, t] (spec section 6:
eta(t) - delta < eta_min would otherwise give r < s, or for FM with delta >= 1 even r > t).
"""

from __future__ import annotations

import math

import torch

from imm.core import schedules
from imm.core.util import ArgumentError, check_choice, f64

Tensor = torch.Tensor

MAPPINGS = ("eta_decrement", "t_decrement", "lambda_decrement", "inv_eta_increment")


class Mapping:
    """r(s, t) for one schedule and one set of (k, eps, T, eta range, minimum gap)."""

    def __init__(
        self,
        name: str = "eta_decrement",
        *,
        schedule="fm",
        k: int = 12,
        eps: float = 0.0,
        T: float = 0.994,
        eta_max: float | None = None,
        eta_min: float | None = None,
        min_gap: float = 0.0,
    ):
        check_choice("mapping", name, MAPPINGS, "mapping")
        check_time_range(eps, T)
        if min_gap < 0:
            raise ArgumentError(f"{{min_gap}}={min_gap} must be >= 0", "min_gap")
        self.name, self.k, self.eps, self.T, self.min_gap = name, k, float(eps), float(T), float(min_gap)
        self.schedule = sch = schedules.get(schedule)
        self.eta_max = float(sch.eta(T)) if eta_max is None else float(eta_max)
        self.eta_min = float(sch.eta(eps)) if eta_min is None else float(eta_min)
        if not self.eta_max > self.eta_min >= 0.0:
            raise ArgumentError(
                f"the eta range needs {{eta_max}} > {{eta_min}} >= 0, got {{eta_max}}={self.eta_max},"
                f" {{eta_min}}={self.eta_min}",
                "eta_max",
                "eta_min",
            )
        self.delta = self._delta(explicit_eta_min=eta_min is not None)

    def _delta(self, explicit_eta_min: bool = False) -> float:
        """The constant step in the mapping's own variable: (range) / 2^k."""
        scale = 2.0**self.k
        if self.name == "eta_decrement":
            if math.isinf(self.eta_max):
                raise ArgumentError(
                    f"{{T}}={self.T} is too large: the eta_decrement mapping needs T < 1 (eta(1) is infinite) or a"
                    " finite {eta_max}; the paper uses 0.994 (fm) or 0.996 (cosine)",
                    "T",
                    "eta_max",
                )
            return (self.eta_max - self.eta_min) / scale
        if self.name == "t_decrement":
            return (self.T - self.eps) / scale
        if self.name == "lambda_decrement":
            if self.eps <= 0.0:
                raise ArgumentError(
                    f"{{eps}}={self.eps} must be > 0 for the lambda_decrement mapping (lambda is infinite at 0;"
                    " e.g. 0.001 or 0.005)",
                    "eps",
                )
            if self.T >= 1.0:
                raise ArgumentError(
                    f"{{T}}={self.T} must be < 1 for the lambda_decrement mapping (lambda is infinite at 1); the"
                    " paper uses 0.994 (fm) or 0.996 (cosine)",
                    "T",
                )
            lam_max, lam_min = self.schedule.logsnr(self.eps), self.schedule.logsnr(self.T)
            return float(lam_max - lam_min) / scale
        # inv_eta_increment
        if self.eta_min <= 0.0:
            if explicit_eta_min:
                raise ArgumentError(
                    f"{{eta_min}}={self.eta_min} must be > 0 for the inv_eta_increment mapping", "eta_min"
                )
            raise ArgumentError(
                f"{{eps}}={self.eps} must be > 0 for the inv_eta_increment mapping, so that eta_min > 0 (e.g. 0.001"
                " or 0.005)",
                "eps",
            )
        return (1.0 / self.eta_min - 1.0 / self.eta_max) / scale

    def __call__(self, s, t) -> Tensor:
        """r(s, t) in float64, with s <= r <= t."""
        s, t = f64(s), f64(t)
        sch = self.schedule
        if self.name == "eta_decrement":
            eta_r = (sch.eta(t) - self.delta).clamp(min=self.eta_min)
            r = sch.t_from_eta(eta_r)
        elif self.name == "t_decrement":
            r = t - self.delta
        elif self.name == "lambda_decrement":
            r = sch.t_from_logsnr(sch.logsnr(t) + self.delta)
        else:
            r = sch.t_from_eta(1.0 / (1.0 / sch.eta(t) + self.delta))
        if self.min_gap > 0.0:
            r = torch.minimum(r, t - self.min_gap)
        return torch.minimum(torch.maximum(r, s), t)

    def __repr__(self) -> str:
        return (
            f"Mapping({self.name!r}, k={self.k}, eps={self.eps}, T={self.T}, delta={self.delta:.3g},"
            f" min_gap={self.min_gap})"
        )


def check_time_range(eps: float, T: float) -> None:
    """The training time range: 0 <= eps < T <= 1 (t = 1 is the prior)."""
    if not 0.0 <= eps < T:
        raise ArgumentError(f"{{eps}}={eps} must satisfy 0 <= eps < {{T}}={T}", "eps", "T")
    if T > 1.0:
        raise ArgumentError(
            f"{{T}}={T} must be <= 1 (t = 1 is the prior); the paper uses 0.994 (fm) or 0.996 (cosine)", "T"
        )
