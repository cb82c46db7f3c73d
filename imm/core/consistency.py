"""Improved consistency training, iCT (Song & Dhariwal 2023, "Improved Techniques for Training Consistency
Models"): discrete-time consistency training from scratch.

The paper works in EDM's variance-exploding frame x_sigma = x + sigma n, n ~ N(0, I). This platform's
interpolant is x_t = alpha_t x + sigma_t eps with eps ~ N(0, sigma_d^2 I), i.e. x_t = alpha_t (x + eta_t eps):
the same noisy sample scaled by alpha_t, at EDM noise level

    sigma(t) = sigma_d eta(t) = sigma_d sigma_t / alpha_t        (inverse: t = eta^-1(sigma / sigma_d)).

So every iCT quantity is computed in EDM's sigma (the paper's numbers hold as printed: sigma_min = 0.002,
sigma_max = 80, P_mean = -1.1, P_std = 2, lambda = 1/(sigma_{i+1} - sigma_i)) and the network sees the
platform's inputs: c_in(t) x_t equals EDM's c_in(sigma) x_sigma = x_sigma / sqrt(sigma^2 + sigma_d^2) exactly,
and the noise input is time_scale t (a monotone relabelling of sigma, the same for every method here).
The platform's time range [eps, T] is [t(sigma_min), t(sigma_max)].

The consistency function (EDM's boundary-condition parameterization, as iCT uses it):
    f(x_sigma, sigma) = c_skip(sigma) x_sigma + c_out(sigma) F,
    c_skip = sigma_d^2 / ((sigma - sigma_min)^2 + sigma_d^2),
    c_out = sigma_d (sigma - sigma_min) / sqrt(sigma_d^2 + sigma^2),
so f(x, sigma_min) = x. In x_t terms it is the clean-sample model g(x_t, t) = (c_skip / alpha_t) x_t + c_out F,
and the platform's f_{s,t} = DDIM(x_t, g, s, t) (1-step: s = eps; the restart sampler re-noising from g is
the paper's multistep consistency sampling).
"""

from __future__ import annotations

import math

import torch

from imm.core import schedules
from imm.core.objective import Draws, _fp32, _Objective, _replay_rng, _rng_state
from imm.core.parameterization import Parameterization
from imm.core.util import ArgumentError, bcast, f64

Tensor = torch.Tensor

HUBER_SCALE = 0.00054  # c = 0.00054 sqrt(d) (Sec. 3.3): 0.03 for CIFAR-10's d = 3072


# --------------------------------------------------------------------------------------------
# the paper's formulas (tests/test_ict.py checks each against its printed value)
# --------------------------------------------------------------------------------------------
def discretization_steps(k: int, K: int, s0: int = 10, s1: int = 1280) -> int:
    """N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2 floor(s1 / s0) + 1)) (the
    doubling curriculum; s0 = 10, s1 = 1280). K' is floored at 1: a run of fewer steps than doublings doubles N
    at every step."""
    K_prime = max(1, math.floor(K / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (k // K_prime), s1) + 1


def karras_sigmas(N: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """sigma_i = (sigma_min^(1/rho) + (i - 1)/(N - 1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho, i = 1..N,
    ascending (EDM's grid, as iCT uses it), float64 [N]."""
    frac = torch.arange(N, dtype=torch.float64) / (N - 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + frac * (hi - lo)) ** rho


def lognormal_probs(sigmas: Tensor, P_mean: float = -1.1, P_std: float = 2.0) -> Tensor:
    """p(sigma_i) proportional to erf((log sigma_{i+1} - P_mean)/(sqrt 2 P_std)) - erf((log sigma_i - P_mean)/(sqrt 2
    P_std)), i = 1..N-1 (the lognormal noise schedule, Sec. 3): the lognormal mass of [sigma_i, sigma_{i+1}),
    normalised, float64 [N - 1]."""
    cdf = torch.special.erf((torch.log(f64(sigmas)) - P_mean) / (math.sqrt(2.0) * P_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


def huber_c(D: int) -> float:
    """The pseudo-Huber constant c = 0.00054 sqrt(d) for samples of d elements (Sec. 3.3)."""
    return HUBER_SCALE * math.sqrt(D)


def pseudo_huber(x: Tensor, y: Tensor, c: float) -> Tensor:
    """d(x, y) = sqrt(||x - y||^2 + c^2) - c per sample [B] (Sec. 3.3): L2-like near 0, L1-like far away."""
    sq = (x.float() - y.float()).square().flatten(1).sum(1)
    return torch.sqrt(sq + c * c) - c


def cm_c_skip(sigma, sigma_min: float, sigma_data: float) -> Tensor:
    """c_skip(sigma) = sigma_d^2 / ((sigma - sigma_min)^2 + sigma_d^2): 1 at sigma_min."""
    sigma = f64(sigma)
    return sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)


def cm_c_out(sigma, sigma_min: float, sigma_data: float) -> Tensor:
    """c_out(sigma) = sigma_d (sigma - sigma_min) / sqrt(sigma_d^2 + sigma^2): 0 at sigma_min."""
    sigma = f64(sigma)
    return sigma_data * (sigma - sigma_min) / torch.sqrt(sigma_data**2 + sigma**2)


# --------------------------------------------------------------------------------------------
class Consistency(Parameterization):
    """The consistency function as a platform parameterization (see the module docstring).

    g-level: g = c_skip(sigma(t)) / alpha_t x_t + c_out(sigma(t)) G; f-level f_{s,t} = DDIM(x_t, g, s, t), so
    c_skip(s,t) = sigma_s/sigma_t + (alpha_s - sigma_s alpha_t / sigma_t) g_c_skip(t) and
    c_out(s,t) = (alpha_s - sigma_s alpha_t / sigma_t) g_c_out(t). The network takes ONE time: its second input
    is always the boundary time t_min (time_scale t_min, or time_scale (t - t_min) with the stride input), so the
    samplers may ask for any s without feeding the network a time it never saw.
    """

    name = "consistency"

    def __init__(self, schedule="fm", *, t_min: float, **kw):
        super().__init__(schedule, **kw)
        self.t_min = float(t_min)
        self.sigma_min = float(self.sigma_of(self.t_min))  # computed as sigma(t) is, so sigma(t_min) - sigma_min = 0

    def sigma_of(self, t) -> Tensor:
        """EDM's noise level of time t: sigma_d eta(t)."""
        return self.sigma_data * self.schedule.eta(f64(t))

    def t_of(self, sigma) -> Tensor:
        """The time of EDM noise level sigma: eta^-1(sigma / sigma_d)."""
        return self.schedule.t_from_eta(f64(sigma) / self.sigma_data)

    def g_c_skip(self, t) -> Tensor:
        t = f64(t)
        return cm_c_skip(self.sigma_of(t), self.sigma_min, self.sigma_data) / self.schedule.alpha(t)

    def g_c_out(self, t) -> Tensor:
        return cm_c_out(self.sigma_of(t), self.sigma_min, self.sigma_data)

    def _ddim(self, s, t) -> tuple[Tensor, Tensor]:
        sch, s, t = self.schedule, f64(s), f64(t)
        ratio = sch.sigma(s) / sch.sigma(t)
        return ratio, sch.alpha(s) - ratio * sch.alpha(t)

    def c_skip(self, s, t) -> Tensor:
        ratio, c_x = self._ddim(s, t)
        return ratio + c_x * self.g_c_skip(t)

    def c_out(self, s, t) -> Tensor:
        return self._ddim(s, t)[1] * self.g_c_out(t)

    def noise_inputs(self, s, t) -> tuple[Tensor, Tensor]:
        return super().noise_inputs(torch.full_like(f64(t), self.t_min), t)

    def g(self, net, x_t: Tensor, t, labels=None, **kw) -> Tensor:
        """The consistency function in x_t terms, g(x_t, t) = g_c_skip(t) x_t + g_c_out(t) G."""
        G = self.net_output(net, x_t, t, t, labels, **kw)
        t = f64(t).to(x_t.device).expand(x_t.shape[0])
        return bcast(self.g_c_skip(t), x_t) * x_t + bcast(self.g_c_out(t), x_t) * G


# --------------------------------------------------------------------------------------------
class ICTObjective(_Objective):
    """One iCT loss: per sample an index i ~ p(sigma_i) on the N(k)-point Karras grid of step k, the same noise
    at sigma_i and sigma_{i+1}, loss = mean lambda(sigma_i) d(f_theta(x_{sigma_{i+1}}), sg f_theta(x_{sigma_i}))
    with lambda = 1/(sigma_{i+1} - sigma_i) and d the pseudo-Huber distance.

    theta^- is the online network under no_grad (Sec. 3.2: no EMA teacher); `share_dropout` gives both passes
    the same dropout masks (Sec. 3.1, and the consistency-models code passes one dropout key to both).
    `total_steps` is K of the curriculum. `draw` needs the training step (`needs_step`).
    """

    needs_step = True

    def __init__(
        self,
        param: Consistency,
        *,
        eps: float,
        T: float,
        total_steps: int,
        s0: int = 10,
        s1: int = 1280,
        rho: float = 7.0,
        P_mean: float = -1.1,
        P_std: float = 2.0,
        huber: float | None = None,
        share_dropout: bool = True,
        target_fp32: bool = True,
        **common,
    ):
        super().__init__(param, eps=eps, T=T, **common)
        if not isinstance(param, Consistency) or abs(param.t_min - self.eps) > 0:
            raise ValueError("iCT needs the Consistency parameterization with t_min = eps")
        if total_steps < 1:
            raise ArgumentError(f"{{total_steps}}={total_steps} must be >= 1 (K of the curriculum)", "total_steps")
        if not 1 <= s0 <= s1:
            raise ArgumentError(f"the curriculum needs 1 <= {{s0}} <= {{s1}}, got {s0}, {s1}", "s0", "s1")
        if not (rho > 0 and P_std > 0):
            raise ArgumentError(f"{{rho}}={rho} and {{P_std}}={P_std} must be > 0", "rho", "P_std")
        if huber is not None and not huber > 0:
            raise ArgumentError(f"{{huber}}={huber} must be > 0 (null: 0.00054 sqrt(d))", "huber")
        self.sigma_min, self.sigma_max = param.sigma_min, float(param.sigma_of(self.T))
        self.K, self.s0, self.s1, self.rho = int(total_steps), int(s0), int(s1), float(rho)
        self.P_mean, self.P_std, self.huber = float(P_mean), float(P_std), huber
        self.share_dropout, self.target_fp32 = share_dropout, target_fp32

    def grid(self, step: int) -> tuple[Tensor, Tensor, Tensor]:
        """(sigmas, their times, p(sigma_i)) of training step `step`; the end times are exactly eps and T."""
        N = discretization_steps(step, self.K, self.s0, self.s1)
        sigmas = karras_sigmas(N, self.sigma_min, self.sigma_max, self.rho)
        times = self.param.t_of(sigmas)
        times[0], times[-1] = self.eps, self.T
        return sigmas, times, lognormal_probs(sigmas, self.P_mean, self.P_std)

    def draw(self, x: Tensor, labels: Tensor | None = None, generator=None, step: int = 0) -> Draws:
        """The index i per sample (inverse CDF of p(sigma_i) at a uniform draw), then noise, then label drops, then
        the augmentation (each for the global batch). times = (t_i, t_{i+1}, lambda_i)."""
        B = x.shape[0]
        sigmas, times, probs = self.grid(step)
        cdf = torch.cumsum(probs, 0)
        u = self._rand(B, generator, x.device).cpu()
        i = torch.searchsorted(cdf, u * cdf[-1], right=True).clamp(max=len(probs) - 1)
        lam = 1.0 / (sigmas[i + 1] - sigmas[i])
        t_lo, t_hi, lam = (v.to(x.device) for v in (times[i], times[i + 1], lam))
        noise = self._noise(x, generator)
        dropped = self._drop_labels(labels, generator)
        augment, margin = self._draw_augment(x, 1, generator)
        return Draws((t_lo, t_hi, lam), noise, dropped, dropped, 1, augment, margin)

    def loss(self, net, x: Tensor, draws: Draws, *, target=None):
        """(loss, diagnostics) for samples x (the share or a micro-batch) and their draws."""
        self._check_draws(x, draws)
        (t_lo, t_hi, lam), noise, labels = draws.times, draws.noise, draws.labels_student
        x, augment_labels = self._augmented(x, draws)
        x_hi = self._interpolate(x, noise, t_hi)
        x_lo = self._interpolate(x, noise, t_lo)  # the same noise: x_{sigma_i} = x + sigma_i n

        rng = _rng_state(x.device) if self.share_dropout else None
        with torch.no_grad(), _replay_rng(rng, x.device), _fp32(x.device, self.target_fp32):
            teacher = target if target is not None else net
            g_lo = self.param.g(teacher, x_lo, t_lo, labels, augment_labels=augment_labels)
        g_hi = self.param.g(net, x_hi, t_hi, labels, augment_labels=augment_labels)

        c = self.huber if self.huber is not None else huber_c(x[0].numel())
        d = pseudo_huber(g_hi, g_lo.detach(), c)
        loss = (lam.to(d) * d).mean()
        sig_hi = self.param.sigma_of(t_hi)
        diagnostics = {"sigma": sig_hi.mean(), "log_sigma": sig_hi.log().mean(), "lambda": lam.mean()}
        diagnostics["distance"] = d.mean()
        return loss, {k: v.detach() for k, v in diagnostics.items()}


def t_range(sigma_min: float, sigma_max: float, schedule="fm", sigma_data: float = 0.5) -> tuple[float, float]:
    """(eps, T) of the platform's time range that gives EDM noise levels [sigma_min, sigma_max]."""
    sch = schedules.get(schedule)
    return tuple(float(sch.t_from_eta(f64(v) / sigma_data)) for v in (sigma_min, sigma_max))
