"""Interpolants (noise schedules): x_t = alpha_t x + sigma_t eps, eps ~ N(0, sigma_d^2 I).

Spec section 1.1. Convention: t = 0 is data, t = 1 is the prior. All quantities are computed in
float64 (spec section 6: lambda and eta overflow or lose precision near t = 0 and t = 1 in float32);
callers cast to the network dtype at the last moment.
"""

from __future__ import annotations

import math

import torch

from imm.core.util import bcast, check_choice
from imm.core.util import f64 as _f64

Tensor = torch.Tensor


class Schedule:
    """Base interface. Subclasses define alpha(t), sigma(t), -dlambda/dt and the eta inverse."""

    name: str = ""
    default_T: float  # the training range's end by default (spec 1.5, Table 5): T < 1 keeps eta(T) finite

    def alpha(self, t) -> Tensor:
        raise NotImplementedError

    def sigma(self, t) -> Tensor:
        raise NotImplementedError

    def logsnr(self, t) -> Tensor:
        """lambda_t = log(alpha_t^2 / sigma_t^2) = 2 (log alpha_t - log sigma_t)."""
        t = _f64(t)
        return 2.0 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def neg_dlogsnr_dt(self, t) -> Tensor:
        """-dlambda_t/dt (positive: log-SNR falls from data to prior)."""
        raise NotImplementedError

    def eta(self, t) -> Tensor:
        """eta_t = sigma_t / alpha_t = exp(-lambda_t / 2) (the "nt" of the official code)."""
        t = _f64(t)
        return self.sigma(t) / self.alpha(t)

    def t_from_eta(self, eta) -> Tensor:
        """Inverse of eta(t). Negative eta is clamped to 0 (spec section 6: eta_t - delta < 0)."""
        raise NotImplementedError

    def t_from_logsnr(self, logsnr) -> Tensor:
        """Inverse of lambda(t), through eta = exp(-lambda / 2)."""
        return self.t_from_eta(torch.exp(-0.5 * _f64(logsnr)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FlowMatching(Schedule):
    """OT-FM: alpha_t = 1 - t, sigma_t = t; lambda_t = 2 log((1-t)/t); -dlambda/dt = 2 / (t (1-t))."""

    name = "fm"
    default_T = 0.994

    def alpha(self, t) -> Tensor:
        return 1.0 - _f64(t)

    def sigma(self, t) -> Tensor:
        return _f64(t)

    def neg_dlogsnr_dt(self, t) -> Tensor:
        t = _f64(t)
        return 2.0 / (t * (1.0 - t))

    def t_from_eta(self, eta) -> Tensor:
        """t = eta / (1 + eta), written as 1 - 1/(1 + eta) for large eta so eta = inf gives t = 1."""
        eta = _f64(eta).clamp(min=0.0)
        return torch.where(eta > 1.0, 1.0 - 1.0 / (1.0 + eta), eta / (1.0 + eta))


class Cosine(Schedule):
    """Cosine (VP): alpha_t = cos(pi t / 2), sigma_t = sin(pi t / 2); -dlambda/dt = 2 pi / sin(pi t)."""

    name = "cosine"
    default_T = 0.996

    def alpha(self, t) -> Tensor:
        return torch.cos(0.5 * math.pi * _f64(t))

    def sigma(self, t) -> Tensor:
        return torch.sin(0.5 * math.pi * _f64(t))

    def neg_dlogsnr_dt(self, t) -> Tensor:
        return 2.0 * math.pi / torch.sin(math.pi * _f64(t))

    def t_from_eta(self, eta) -> Tensor:
        """t = (2 / pi) atan(eta)."""
        return (2.0 / math.pi) * torch.atan(_f64(eta).clamp(min=0.0))


SCHEDULES = {"fm": FlowMatching, "cosine": Cosine}


def get(name: str | Schedule) -> Schedule:
    """The schedule called `name` ("fm" or "cosine"); a Schedule instance is returned unchanged."""
    if isinstance(name, Schedule):
        return name
    check_choice("schedule", name, list(SCHEDULES), "schedule")
    return SCHEDULES[name]()


def ddim(x_t: Tensor, x: Tensor, s, t, schedule: Schedule) -> Tensor:
    """DDIM(x_t, x, s, t) = (alpha_s - (sigma_s/sigma_t) alpha_t) x + (sigma_s/sigma_t) x_t.

    Spec section 1.2, Eq. 11, in the paper's argument order: the target time s comes first and the
    coefficients are taken at s. It maps a sample at time t to time s along the interpolant through
    x. s and t broadcast against the leading (batch) dimension of x.
    """
    s, t = _f64(s), _f64(t)
    ratio = schedule.sigma(s) / schedule.sigma(t)
    c_x = schedule.alpha(s) - ratio * schedule.alpha(t)
    return bcast(c_x, x) * x + bcast(ratio, x) * x_t
