"""MeanFlow (Geng, Deng, Bai, Kolter, He 2025, "Mean Flows for One-step Generative Modeling").

The network predicts the AVERAGE velocity u(z_t, r, t) = 1/(t - r) int_r^t v(z_tau, tau) dtau of the
flow from time t back to r (t = 1 prior, 0 data), so one step z_r = z_t - (t - r) u lands exactly
on the trajectory. Training uses the MeanFlow identity:

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),   d/dt u = v . grad_z u + du/dt,

with the total derivative computed by ONE Jacobian-vector product through the network, tangent
(v, 0, 1) for (z, r, t). The target u_tgt = sg(v - (t - r) d/dt u) is regressed with the adaptive
weight w = 1 / (||u - u_tgt||^2 + c)^p under stop-gradient.

How it sits on this platform: the OT-FM interpolant z_t = (1 - t) x + t eps with eps ~ N(0, sigma_d^2 I)
(so v = eps - x) and the Euler-FM parameterization f_{s,t}(z) = z - (t - s) sigma_d G, read as
u(z_t, r=s, t) = sigma_d G: the network's second time input is r (or t - r with the stride input), and
the platform's pushforward sampler IS MeanFlow's 1-step and multi-step sampler (z_r = z_t - (t - r) u).

DDP: the JVP runs through `target` (the online, un-wrapped network) under no_grad: the target is a
stop-gradient anyway, and the gradient flows only through an ordinary forward of the student (the
DDP-wrapped network), so DDP's gradient all-reduce sees every parameter. Differentiating the JVP's
primal output instead (what `torch.func.jvp` on `model.module` does) would skip DDP's hooks and leave
each rank with its own gradient, without any error.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from imm.core.objective import Draws, _fp32, _Objective, _replay_rng, _rng_state
from imm.core.util import ArgumentError, bcast, f64

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------
# pieces, each with its formula (tests/test_meanflow.py checks them)
# --------------------------------------------------------------------------------------------
def logit_normal(normal: Tensor, mean: float, std: float) -> Tensor:
    """t = sigmoid(mean + std n) for standard normal draws n (the paper's "logit-normal" time sampler)."""
    return torch.sigmoid(mean + std * normal)


def order_and_tie(t: Tensor, r: Tensor, u: Tensor, ratio: float) -> tuple[Tensor, Tensor]:
    """(t, r) = (max, min) of two independent draws, then r = t unless u < ratio: a fraction `ratio` of the
    samples has r != t (the paper's ablation of this ratio; its CIFAR-10 code draws this per sample, as here)."""
    t, r = torch.maximum(t, r), torch.minimum(t, r)
    return t, torch.where(u < ratio, r, t)


def mean_flow_target(u_fn, z: Tensor, v: Tensor, t: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """(u(z, r, t), u_tgt = v - (t - r) d/dt u(z, r, t)) with d/dt u from one torch.func.jvp of
    u_fn(z, t) (r held fixed, so the tangent is (v, 0, 1) for (z, r, t)). t and r are per-sample [B]."""
    u, dudt = torch.func.jvp(u_fn, (z, t), (v, torch.ones_like(t)))
    return u, v - bcast(t - r, v) * dudt


def adaptive_weight(sq_error: Tensor, p: float, c: float) -> Tensor:
    """w = 1 / (||Delta||^2 + c)^p per sample (the adaptive loss weight; p = 0 is the plain squared L2 loss, p = 1/2 a
    pseudo-Huber-like loss); the caller stops its gradient."""
    return 1.0 / (sq_error + c) ** p


def guided_velocity(v: Tensor, v_uncond: Tensor, v_cond: Tensor | None, omega, kappa) -> Tensor:
    """The training-time guidance field (the paper's guidance-in-training, with kappa as in the authors' JAX code):
    v~ = omega v + kappa u(z_t, t, t | c) + (1 - omega - kappa) u(z_t, t, t | null); omega = 1, kappa = 0
    is v itself. omega and kappa are per-sample [B] (1 and 0 outside the guidance interval)."""
    out = bcast(omega, v) * v + bcast(1.0 - omega - kappa, v) * v_uncond
    if v_cond is not None:
        out = out + bcast(kappa, v) * v_cond
    return out


# --------------------------------------------------------------------------------------------
class MeanFlowObjective(_Objective):
    """MeanFlow's training loss on the platform's interpolant and network interface.

    Per sample: (t, r) from two logit-normal(P_mean, P_std) draws ordered so t >= r, r = t except for a
    fraction `ratio`, then clamped into [eps, T]; z_t = (1 - t) x + t eps, v = eps - x.
    u = sigma_d G(z_t, r, t) with gradient (student); u_tgt = sg(v~ - (t - r) d/dt u) by a JVP through
    the target network under no_grad; loss = mean over samples of sg(w) ||u - u_tgt||^2 (sum over elements).

    Guidance in training (class-conditional data, `omega` != 1 or `kappa` != 0): v is replaced by v~
    (`guided_velocity`) for samples whose label was kept and t in [t_guide_min, t_guide_max]; v~ costs one
    (kappa = 0) or two (kappa > 0) extra no-grad passes at r = t; sampling then needs no guidance (1 NFE).
    `share_dropout` replays the RNG so the JVP pass and the student pass see the same dropout masks (the
    official PyTorch code's advice), `target_fp32` runs the JVP outside autocast (the official code does).
    """

    def __init__(
        self,
        param,
        *,
        eps: float = 0.0,
        T: float = 0.994,
        P_mean: float = -0.4,
        P_std: float = 1.0,
        ratio: float = 0.25,
        norm_p: float = 1.0,
        norm_eps: float = 1e-3,
        omega: float = 1.0,
        kappa: float = 0.0,
        t_guide_min: float = 0.0,
        t_guide_max: float = 1.0,
        share_dropout: bool = True,
        target_fp32: bool = True,
        **common,
    ):
        super().__init__(param, eps=eps, T=T, **common)
        if param.name != "euler_fm":
            raise ArgumentError(
                f"MeanFlow reads sigma_d G as the average velocity, which is the Euler-FM parameterization;"
                f" {{param}}={param.name} is not (use euler_fm on the fm schedule)",
                "param",
            )
        if not P_std > 0:
            raise ArgumentError(f"{{P_std}}={P_std} must be > 0", "P_std")
        if not 0.0 <= ratio <= 1.0:
            raise ArgumentError(f"{{ratio}}={ratio} must be in [0, 1] (the fraction of samples with r != t)", "ratio")
        if not (norm_p >= 0 and norm_eps > 0):
            raise ArgumentError("the adaptive weight needs {norm_p} >= 0 and {norm_eps} > 0", "norm_p", "norm_eps")
        guided = omega != 1.0 or kappa != 0.0
        if guided and self.num_classes == 0:
            raise ArgumentError(
                f"{{omega}}={omega}, {{kappa}}={kappa} guide towards a class, but the data are unconditional;"
                " use {omega}=1 and {kappa}=0",
                "omega",
                "kappa",
            )
        if guided and self.label_dropout == 0.0:
            raise ArgumentError(
                f"{{omega}}={omega} mixes in the null-label velocity, which {{label_dropout}}=0 never trains; use"
                " {label_dropout} > 0 (the paper: 0.1)",
                "omega",
                "label_dropout",
            )
        if not (omega > 0 and 0.0 <= kappa < 1.0 and 0.0 <= t_guide_min < t_guide_max <= 1.0):
            raise ArgumentError(
                f"guidance needs {{omega}} > 0, 0 <= {{kappa}} < 1 and 0 <= t_guide_min < t_guide_max <= 1, got"
                f" {omega}, {kappa}, [{t_guide_min}, {t_guide_max}]",
                "omega",
                "kappa",
            )
        self.P_mean, self.P_std, self.ratio = float(P_mean), float(P_std), float(ratio)
        self.norm_p, self.norm_eps = float(norm_p), float(norm_eps)
        self.omega, self.kappa = float(omega), float(kappa)
        self.t_guide = (float(t_guide_min), float(t_guide_max))
        self.share_dropout, self.target_fp32 = share_dropout, target_fp32

    def sample_times(self, n: int, generator=None, device=None) -> tuple[Tensor, Tensor]:
        """(t, r) per sample, float64 [n], each drawn for the global batch (this rank keeps its slice)."""
        shape = n * self.world_size
        normal = torch.randn(2, shape, generator=generator, device=device, dtype=torch.float64)
        t, r = (self._local(logit_normal(v, self.P_mean, self.P_std)) for v in normal)
        t, r = order_and_tie(t, r, self._rand(n, generator, device), self.ratio)
        # [eps, T] is the platform's one time range: sampling starts at T (docs/methods.md)
        return t.clamp(self.eps, self.T), r.clamp(self.eps, self.T)

    def draw(self, x: Tensor, labels: Tensor | None = None, generator=None) -> Draws:
        """(t, r) per sample, then noise, then label drops, then the augmentation (each for the global batch)."""
        B = x.shape[0]
        t, r = self.sample_times(B, generator, x.device)
        noise = self._noise(x, generator)
        dropped = self._drop_labels(labels, generator)
        augment, margin = self._draw_augment(x, 1, generator)
        return Draws((t, r), noise, dropped, labels, 1, augment, margin)

    def _velocity(self, net, z: Tensor, r: Tensor, t: Tensor, labels, augment_labels) -> Tensor:
        """u(z, r, t) = sigma_d G(c_in(t) z, c_noise(t), c_noise(r or t - r)), in z's dtype."""
        return self.sigma_data * self.param.net_output(net, z, r, t, labels, augment_labels=augment_labels)

    def _guidance(self, target, z_t, v, t, draws: Draws, augment_labels) -> Tensor:
        """v~ for the samples that are guided; v for the others (label dropped, or t outside the interval)."""
        if self.omega == 1.0 and self.kappa == 0.0:
            return v
        kept = draws.labels_student != self.num_classes
        inside = (t >= self.t_guide[0]) & (t <= self.t_guide[1]) & kept
        omega = torch.where(inside, self.omega, 1.0)
        kappa = torch.where(inside, self.kappa, 0.0)
        null = torch.full_like(draws.labels_target, self.num_classes)
        v_uncond = self._velocity(target, z_t, t, t, null, augment_labels)
        v_cond = self._velocity(target, z_t, t, t, draws.labels_target, augment_labels) if self.kappa else None
        return guided_velocity(v, v_uncond, v_cond, omega, kappa).to(v.dtype)

    def target_velocity(self, target, z_t: Tensor, v_g: Tensor, t: Tensor, r: Tensor, labels, augment_labels):
        """u_tgt = v~ - (t - r) d/dt u(z_t, r, t) (float32), by one JVP through `target` without gradient."""

        def u_fn(z, tt):
            return self._velocity(target, z, r, tt, labels, augment_labels)

        # Forward-mode AD has no rule for the fused attention kernels (flash / memory-efficient SDPA); the math
        # kernel is plain matmuls and softmax, which it differentiates.
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            return mean_flow_target(u_fn, z_t.float(), v_g.float(), t, r)[1]

    def loss(self, net, x: Tensor, draws: Draws, *, target=None):
        """(loss, diagnostics) for samples x (the share or a micro-batch) and their draws."""
        self._check_draws(x, draws)
        (t, r), noise, labels = draws.times, draws.noise, draws.labels_student
        target = target if target is not None else net
        x, augment_labels = self._augmented(x, draws)
        z_t = self._interpolate(x, noise, t)
        v = noise - x  # d/dt of (1 - t) x + t eps

        # Target first (its activations are freed before the student's are stored), the student's RNG replayed
        # so both passes see the same dropout masks.
        rng = _rng_state(x.device) if self.share_dropout else None
        with torch.no_grad(), _fp32(x.device, self.target_fp32):
            v_g = self._guidance(target, z_t, v, t, draws, augment_labels)
            with _replay_rng(rng, x.device):
                u_tgt = self.target_velocity(target, z_t, v_g, t, r, labels, augment_labels)
        u = self._velocity(net, z_t, r, t, labels, augment_labels).float()

        sq = (u - u_tgt).square().flatten(1).sum(1)  # the squared L2 norm per sample (sum over elements)
        w = adaptive_weight(sq.detach(), self.norm_p, self.norm_eps)
        loss = (w * sq).mean()
        diagnostics = {
            "t": t.mean(),
            "t_minus_r": (t - r).mean(),
            "r_equals_t": (r == t).double().mean(),
            "sq_error": sq.mean(),
            "v_error": (u - v.float()).square().flatten(1).sum(1).mean(),  # ||u - v||^2: how far from plain FM
        }
        return loss, {k: v.detach() for k, v in diagnostics.items()}


def average_velocity_step(u: Tensor, z_t: Tensor, r, t) -> Tensor:
    """z_r = z_t - (t - r) u: one MeanFlow step; the platform's Euler-FM pushforward computes the same
    with u = sigma_d G."""
    return z_t - bcast((f64(t) - f64(r)).clamp(min=0.0), z_t) * u
