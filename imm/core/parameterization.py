"""The one-step map f_{s,t}(x_t) = c_skip(s,t) x_t + c_out(s,t) G(c_in(t) x_t, c_noise(t), c_noise_2).

Spec section 1.3 (paper Sec. 4.2, App. C.5). The network G is raw; this module owns every scaling
around it, so networks never see schedule details. The f-level coefficients are DDIM (Eq. 11)
applied to the g-level x-prediction g = c_skip(t) x_t + c_out(t) G, which the tests check.

| name | g: c_skip(t), c_out(t) | f: c_skip(s,t) | f: c_out(s,t) |
| --- | --- | --- | --- |
| identity | 0, 1 | sigma_s/sigma_t | alpha_s - (sigma_s/sigma_t) alpha_t |
| simple_edm | a/(a^2+s^2), -sd s/sqrt(a^2+s^2) | (a_s a + s_s s)/(a^2+s^2) | -sd (a_s s - s_s a)/sqrt(a^2+s^2) |
| euler_fm | 1, -t sd   (OT-FM only) | 1 | -(t - s) sd |
(a, s: alpha_t, sigma_t; a_s, s_s: alpha_s, sigma_s; sd: sigma_d.)

c_in(t) = 1 / (sigma_d sqrt(alpha_t^2 + sigma_t^2)); noise conditioning c_noise(t) = time_scale * t
(time_scale = 1000, Table 5); the second time input is time_scale * s ("s") or time_scale * (t - s)
("stride", App. I.1 / I.6; for the target pass f_{s,r} this is r - s).
"""

from __future__ import annotations

from typing import Callable

import torch

from imm.core import schedules
from imm.core.util import ArgumentError, bcast, check_choice, f64

Tensor = torch.Tensor
Net = Callable[..., Tensor]

SECOND_TIME_INPUTS = ("s", "stride")
# How the network call rounds (schedule.numerics): "standard" forms c_in(t) x_t and the time inputs in float64 and
# casts them to the network's dtype at the last moment, and mixes guidance in the network's dtype; "official" is
# the official IMM generator's rounding (lumalabs/imm training/preconds.py: IMMPrecond.cfg_forward): t and s cast
# to float32 first, c_in(t), c_in x_t, time_scale t and time_scale (t - s) formed in float32, and the guidance mix
# G_u + w (G_c - G_u) in float64 on a doubled batch whose unconditional half comes first.
NUMERICS = ("standard", "official")


class Parameterization:
    """Coefficients of f_{s,t} and g_t for one schedule, plus the network call around them."""

    name: str = ""

    def __init__(
        self,
        schedule="fm",
        sigma_data: float = 0.5,
        time_scale: float = 1000.0,
        second_time: str = "s",
        numerics: str = "standard",
    ):
        check_choice("second_time", second_time, SECOND_TIME_INPUTS, "second time input")
        check_choice("numerics", numerics, NUMERICS, "rounding of the network call")
        self.schedule = schedules.get(schedule)
        self.sigma_data = float(sigma_data)
        self.time_scale = float(time_scale)
        self.second_time = second_time
        self.numerics = numerics

    # -- coefficients (float64) ---------------------------------------------------------------
    def c_skip(self, s, t) -> Tensor:
        raise NotImplementedError

    def c_out(self, s, t) -> Tensor:
        raise NotImplementedError

    def g_c_skip(self, t) -> Tensor:
        raise NotImplementedError

    def g_c_out(self, t) -> Tensor:
        raise NotImplementedError

    def c_in(self, t) -> Tensor:
        """c_in(t) = 1 / (sigma_d sqrt(alpha_t^2 + sigma_t^2)) (App. C.5)."""
        sch = self.schedule
        return 1.0 / (self.sigma_data * torch.sqrt(sch.alpha(t) ** 2 + sch.sigma(t) ** 2))

    def noise_inputs(self, s, t) -> tuple[Tensor, Tensor]:
        """(c_noise(t), second input) = (time_scale t, time_scale s) or (time_scale t, time_scale (t - s))."""
        s, t = f64(s), f64(t)
        second = s if self.second_time == "s" else t - s
        return self.time_scale * t, self.time_scale * second

    # -- the network call -----------------------------------------------------------------------
    def net_output(
        self,
        net: Net,
        x_t: Tensor,
        s,
        t,
        labels=None,
        *,
        augment_labels: Tensor | None = None,
        guidance: float = 1.0,
        null_label: int | None = None,
        net_dtype: torch.dtype | None = None,
    ) -> Tensor:
        """The raw network output G(c_in(t) x_t, c_noise(t), c_noise_2, labels), in x_t's dtype.

        With guidance w != 1 (Eq. 14): G^w = w G(c) + (1 - w) G(null), computed in ONE network call
        on a doubled batch. `net_dtype` is what the network sees (float32 when x_t is float64, as in
        the sampler: spec section 4, "x and t in float64, the network in float32"). `augment_labels`
        [B, augment_dim] (training with augmentation) reach the net only when given: sampling passes none.
        """
        B = x_t.shape[0]
        s, t = (f64(v).to(x_t.device).expand(B) for v in (s, t))  # scalars or [B]
        net_dtype = net_dtype or (torch.float32 if x_t.dtype == torch.float64 else x_t.dtype)
        if self.numerics == "official":
            x_in, noise_t, noise_2 = self._official_inputs(x_t, s, t)
        else:
            x_in = (bcast(self.c_in(t), x_t) * x_t).to(net_dtype)
            noise_t, noise_2 = (v.to(torch.float32) for v in self.noise_inputs(s, t))
        # only when given: a network trained without augmentation has no such input
        augment = {} if augment_labels is None else {"augment_labels": augment_labels}
        if guidance != 1.0 and self.numerics == "official":
            if labels is None or null_label is None:
                raise ValueError("classifier-free guidance needs class labels and the null label index")
            null = torch.full_like(labels, null_label)
            G_u, G_c = (
                net(
                    torch.cat([x_in, x_in]),
                    torch.cat([noise_t, noise_t]),
                    torch.cat([noise_2, noise_2]),
                    torch.cat([null, labels]),
                    **{k: torch.cat([v, v]) for k, v in augment.items()},
                )
                .to(torch.float64)
                .chunk(2)
            )
            return (G_u + guidance * (G_c - G_u)).to(x_t.dtype)
        if guidance != 1.0:
            if labels is None or null_label is None:
                raise ValueError("classifier-free guidance needs class labels and the null label index")
            null = torch.full_like(labels, null_label)
            G_c, G_u = net(
                torch.cat([x_in, x_in]),
                torch.cat([noise_t, noise_t]),
                torch.cat([noise_2, noise_2]),
                torch.cat([labels, null]),
                **{k: torch.cat([v, v]) for k, v in augment.items()},
            ).chunk(2)
            G = G_u + guidance * (G_c - G_u)
        else:
            G = net(x_in, noise_t, noise_2, labels, **augment)
        return G.to(x_t.dtype)

    def _official_inputs(self, x_t: Tensor, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_in(t) x_t, time_scale t, second input) as the official generator rounds them (NUMERICS)."""
        t32, s32 = t.to(torch.float32), s.to(torch.float32)
        if self.schedule.name == "fm":
            alpha, sigma = 1 - t32, t32
        else:  # cosine
            alpha, sigma = torch.cos(t32 * torch.pi * 0.5), torch.sin(t32 * torch.pi * 0.5)
        c_in = (alpha**2 + sigma**2).rsqrt() / self.sigma_data
        x32 = x_t.to(torch.float32)
        x_in = c_in.reshape(-1, *([1] * (x32.ndim - 1))) * x32
        second = s32 if self.second_time == "s" else t32 - s32
        return x_in, t32 * self.time_scale, second * self.time_scale

    def f(self, net: Net, x_t: Tensor, s, t, labels=None, **kw) -> Tensor:
        """f_{s,t}(x_t) = c_skip(s,t) x_t + c_out(s,t) G (Sec. 4.2); f_{s,s}(x) = x."""
        G = self.net_output(net, x_t, s, t, labels, **kw)
        return self.apply(G, x_t, s, t)

    def apply(self, G: Tensor, x_t: Tensor, s, t) -> Tensor:
        """c_skip(s,t) x_t + c_out(s,t) G for a network output G already computed."""
        return bcast(self.c_skip(s, t), x_t) * x_t + bcast(self.c_out(s, t), x_t) * G

    def __repr__(self) -> str:
        numerics = "" if self.numerics == "standard" else f", numerics={self.numerics!r}"
        return (
            f"{type(self).__name__}(schedule={self.schedule.name!r}, sigma_data={self.sigma_data},"
            f" time_scale={self.time_scale}, second_time={self.second_time!r}{numerics})"
        )


class Identity(Parameterization):
    """g = G (x-prediction): f = DDIM(x_t, G, s, t). Boundary condition holds only for s > 0."""

    name = "identity"

    def c_skip(self, s, t) -> Tensor:
        return self.schedule.sigma(s) / self.schedule.sigma(t)

    def c_out(self, s, t) -> Tensor:
        sch = self.schedule
        return sch.alpha(s) - sch.sigma(s) / sch.sigma(t) * sch.alpha(t)

    def g_c_skip(self, t) -> Tensor:
        return torch.zeros_like(f64(t))

    def g_c_out(self, t) -> Tensor:
        return torch.ones_like(f64(t))


class SimpleEDM(Parameterization):
    """Simple-EDM (Lu & Song 2024); on cosine sigma_d G is v-prediction. Allows s = 0."""

    name = "simple_edm"

    def _norm2(self, t) -> Tensor:
        return self.schedule.alpha(t) ** 2 + self.schedule.sigma(t) ** 2

    def c_skip(self, s, t) -> Tensor:
        sch = self.schedule
        return (sch.alpha(s) * sch.alpha(t) + sch.sigma(s) * sch.sigma(t)) / self._norm2(t)

    def c_out(self, s, t) -> Tensor:
        sch = self.schedule
        cross = sch.alpha(s) * sch.sigma(t) - sch.sigma(s) * sch.alpha(t)
        return -self.sigma_data * cross / torch.sqrt(self._norm2(t))

    def g_c_skip(self, t) -> Tensor:
        return self.schedule.alpha(t) / self._norm2(t)

    def g_c_out(self, t) -> Tensor:
        return -self.sigma_data * self.schedule.sigma(t) / torch.sqrt(self._norm2(t))


class EulerFM(Parameterization):
    """Euler-FM: f = x_t - (t - s) sigma_d G, an Euler step of the FM ODE (OT-FM only)."""

    name = "euler_fm"

    def __init__(self, schedule="fm", **kw):
        super().__init__(schedule, **kw)
        if self.schedule.name != "fm":
            raise ArgumentError(
                f"{{param}}=euler_fm needs {{schedule}}=fm (OT-FM), not {self.schedule.name!r}; use simple_edm or"
                f" identity with the {self.schedule.name} schedule",
                "param",
                "schedule",
            )

    def c_skip(self, s, t) -> Tensor:
        return torch.ones_like(f64(t) - f64(s))

    def c_out(self, s, t) -> Tensor:
        return -(f64(t) - f64(s)) * self.sigma_data

    def g_c_skip(self, t) -> Tensor:
        return torch.ones_like(f64(t))

    def g_c_out(self, t) -> Tensor:
        return -f64(t) * self.sigma_data


PARAMETERIZATIONS = {"euler_fm": EulerFM, "simple_edm": SimpleEDM, "identity": Identity}


def get(
    name: str | Parameterization,
    schedule="fm",
    sigma_data: float = 0.5,
    time_scale: float = 1000.0,
    second_time: str = "s",
    numerics: str = "standard",
) -> Parameterization:
    """The parameterization called `name` on `schedule`; an instance is returned unchanged."""
    if isinstance(name, Parameterization):
        return name
    check_choice("param", name, list(PARAMETERIZATIONS), "parameterization")
    return PARAMETERIZATIONS[name](
        schedule, sigma_data=sigma_data, time_scale=time_scale, second_time=second_time, numerics=numerics
    )
