"""The IMM objective (spec section 1.4, 1.6; paper Eq. 12, 13, 67; App. C.8, C.9) and the
flow-matching baseline on the same interpolant and network interface.

Shapes: a batch of B = G * M samples is G contiguous groups of M particles; each group shares one
(s, r, t). Kernel inputs y are shaped [G, M, ...] and D = the number of elements of one sample.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from imm.core import parameterization as parameterization_mod
from imm.core import schedules
from imm.core.mapping import Mapping, check_time_range
from imm.core.util import ArgumentError, bcast, check_choice, f64

Tensor = torch.Tensor

KERNELS = ("laplace", "rbf")
WEIGHTINGS = ("paper", "inv_stride", "unit")
DIST_FLOOR = 1e-8  # max(||x - y||, 1e-8): App. C.8, keeps gradients finite at zero distance
C_OUT_FLOOR = 1e-8  # 1/|c_out| at s = t would be inf and its gradient NaN (spec section 6)
T_GUARD = 1e-9  # w(s,t) is 0 * inf at t = 0 and t = 1; evaluate just inside (its limits are finite)


# --------------------------------------------------------------------------------------------
# weights and kernels
# --------------------------------------------------------------------------------------------
def kernel_weight(variant: str, param, s, t) -> Tensor:
    """The kernel weight w~(s, t) (float64), one per group.

    - "paper": 1 / |c_out(s, t)| with the f-level c_out (Sec. 4.2, App. C.8; spec section 5.1);
      Euler-FM: 1 / ((t - s) sigma_d); Simple-EDM: sqrt(a_t^2 + s_t^2) / (sigma_d |a_s s_t - s_s a_t|).
    - "inv_stride": 1 / (t - s), what the unofficial seed code computes (no 1/sigma_d).
    - "unit": 1.
    Denominators are floored at 1e-8 so s = t gives a huge but finite weight.
    """
    s, t = f64(s), f64(t)
    if variant == "paper":
        return 1.0 / param.c_out(s, t).abs().clamp(min=C_OUT_FLOOR)
    if variant == "inv_stride":
        return 1.0 / (t - s).clamp(min=C_OUT_FLOOR)
    if variant == "unit":
        return torch.ones_like(t - s)
    raise ValueError(f"unknown kernel weighting {variant!r}; choose one of {list(WEIGHTINGS)}")


def time_weight(schedule, t, a: float, b: float) -> Tensor:
    """w(s,t) = 1/2 sigmoid(b - lambda_t) (-dlambda_t/dt) alpha_t^a / (alpha_t^2 + sigma_t^2) (Eq. 13).

    Depends on t only. Evaluated in float64 with t clamped into [1e-9, 1 - 1e-9]: at t = 0 the
    formula is 0 * inf = NaN although its limit is 0 (spec section 6).
    """
    sch = schedules.get(schedule)
    t = f64(t).clamp(T_GUARD, 1.0 - T_GUARD)
    alpha, sigma = sch.alpha(t), sch.sigma(t)
    elbo = 0.5 * torch.sigmoid(b - sch.logsnr(t)) * sch.neg_dlogsnr_dt(t)
    return elbo * alpha**a / (alpha**2 + sigma**2)


def kernel_norm(D: int, ref_dim: int | None = None) -> float:
    """The distance normaliser N of the Laplace kernel exp(-w~ ||x - y|| / N) (spec section 1.4).

    - ref_dim = None: N = D, the paper's ||x - y|| / D (App. C.8).
    - ref_dim = D_ref: N = sqrt(D D_ref), the same RELATIVE bandwidth at any D that the paper's /D
      has at D_ref: the distance between two samples grows like sqrt(D), so ||x - y|| / D shrinks
      like 1/sqrt(D) and the paper's kernel is sqrt(D_ref / D) times narrower, relative to the
      data, at D than at D_ref (39x at D = 2 against CIFAR-10's D_ref = 3072). N = D at D = D_ref.
    """
    if ref_dim is None:
        return float(D)
    return math.sqrt(float(D) * float(ref_dim))


def cusp_width(kappa: float, schedule, w_tilde, r, t, D: int, norm: float, sigma_data: float = 0.5) -> Tensor:
    """h = kappa w~(s,t) sigma_d sqrt(D ((alpha_t - alpha_r)^2 + (sigma_t - sigma_r)^2)) / N, one per group
    (float64): kappa times the typical input gap ||x_t - x_r|| of a particle's two passes (x and eps
    independent with per-element std sigma_d), in the units of the kernel's exponent w~ ||.|| / N.

    OT-FM with Euler-FM (w~ = 1/((t - s) sigma_d)): h = kappa (t - r)/(t - s) sqrt(2D) / N, i.e.
    kappa (t - r)/(t - s) at D = N = 2. kappa = 0: h = 0, the paper's kernel.
    """
    sch = schedules.get(schedule)
    r, t = f64(r), f64(t)
    gap = torch.sqrt(D * ((sch.alpha(t) - sch.alpha(r)) ** 2 + (sch.sigma(t) - sch.sigma(r)) ** 2))
    return kappa * f64(w_tilde) * sigma_data * gap / norm


def _distances(x: Tensor, y: Tensor) -> Tensor:
    """Pairwise L2 distances [G, M, M] in float32, floored at 1e-8.

    cdist's exact (non-matmul) path: the matmul form loses precision exactly where IMM needs it,
    when y_{s,t} and y_{s,r} are close (small t - r).
    """
    x = x.flatten(2).float()
    y = y.flatten(2).float()
    d = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")
    return d.clamp(min=DIST_FLOOR)


def kernel_matrix(
    x: Tensor, y: Tensor, w_tilde: Tensor, kernel: str = "laplace", *, ref_dim: int | None = None, width=None
) -> Tensor:
    """k(x_j, y_k) for every pair within each group: [G, M, M].

    Laplace (default): exp(-u) with u = w~ max(||x - y||, 1e-8) / N, N = kernel_norm(D, ref_dim) (the
    paper: N = D, not sqrt(D); App. C.8). With a cusp width h > 0 per group (`width`, see cusp_width)
    the smoothed Laplace exp(-(sqrt(u^2 + h^2) - h)): the pseudo-Huber of u, ~ u^2 / (2h) for u << h
    (a squared loss, whose minimiser is the mean) and u - h for u >> h (the Laplace kernel times e^h).
    It is positive definite in every dimension (exp(-sqrt(c + ||.||^2)) is completely monotone in
    ||.||^2), has k(x, x) = 1 and a zero gradient at zero distance; h = 0 is the Laplace kernel.
    RBF: exp(-1/2 w~ ||x - y||^2 / D) (its exponent already scales with D as the data do).
    """
    D = math.prod(x.shape[2:])
    d = _distances(x, y)
    w = w_tilde.to(device=d.device, dtype=d.dtype).reshape(-1, 1, 1)
    if kernel == "laplace":
        u = w * d / kernel_norm(D, ref_dim)
        if width is None:
            return torch.exp(-u)
        h = torch.as_tensor(width).to(device=d.device, dtype=d.dtype).reshape(-1, 1, 1)
        return torch.exp(h - torch.sqrt(u.square() + h.square()))
    if kernel == "rbf":
        return torch.exp(-0.5 * w * d.square() / D)
    raise ValueError(f"unknown kernel {kernel!r}; choose one of {list(KERNELS)}")


def mmd_terms(y_st: Tensor, y_sr: Tensor, w_tilde: Tensor, kernel: str = "laplace", **options):
    """Per-group V-statistic MMD^2 [G] (Eq. 67) and the mean of each kernel matrix [G] x 3.

    MMD^2_i = 1/M^2 sum_{j,k} [k(y_st^j, y_st^k) + k(y_sr^j, y_sr^k) - 2 k(y_st^j, y_sr^k)], the
    diagonals included; `options` (ref_dim, width) go to kernel_matrix, one kernel for all three.
    """
    K_tt = kernel_matrix(y_st, y_st, w_tilde, kernel, **options).mean((1, 2))
    K_rr = kernel_matrix(y_sr, y_sr, w_tilde, kernel, **options).mean((1, 2))
    K_tr = kernel_matrix(y_st, y_sr, w_tilde, kernel, **options).mean((1, 2))
    return K_tt + K_rr - 2.0 * K_tr, (K_tt, K_rr, K_tr)


def imm_loss_from_outputs(
    y_st: Tensor,
    y_sr: Tensor,
    s,
    t,
    *,
    r=None,
    schedule="fm",
    param="euler_fm",
    kernel: str = "laplace",
    weighting: str = "paper",
    ref_dim: int | None = None,
    kappa: float = 0.0,
    a: float = 1.0,
    b: float = 4.0,
    sigma_data: float = 0.5,
) -> Tensor:
    """L = mean_i w(s_i, t_i) MMD^2_i for outputs already computed (y [G, M, ...], s, t and, with
    kappa > 0, r [G]): what IMMObjective.loss computes after its two passes."""
    sch = schedules.get(schedule)
    par = parameterization_mod.get(param, schedule=sch, sigma_data=sigma_data)
    return weighted_mmd(y_st, y_sr, par, s, t, r, kernel, weighting, ref_dim, kappa, a, b)[0]


def weighted_mmd(y_st, y_sr, param, s, t, r, kernel, weighting, ref_dim, kappa, a, b):
    """(L = mean_i w(s_i, t_i) MMD^2_i, MMD^2 [G], w [G], w~ [G], the kernel matrices' means) for particles
    y [G, M, ...] of the parameterization `param` at times s, t (and r, for the cusp width)."""
    sch = param.schedule
    w_tilde = kernel_weight(weighting, param, s, t)
    w = time_weight(sch, t, a, b).to(device=y_st.device, dtype=torch.float32)
    options = kernel_options(sch, w_tilde, r, t, math.prod(y_st.shape[2:]), ref_dim, kappa, param.sigma_data)
    mmd, terms = mmd_terms(y_st, y_sr, w_tilde, kernel, **options)
    return (w * mmd).mean(), mmd, w, w_tilde, terms


def kernel_options(schedule, w_tilde, r, t, D: int, ref_dim: int | None, kappa: float, sigma_data: float) -> dict:
    """kernel_matrix's ref_dim and width (the cusp width per group, None for kappa = 0)."""
    if not kappa:
        return {"ref_dim": ref_dim}
    width = cusp_width(kappa, schedule, w_tilde, r, t, D, kernel_norm(D, ref_dim), sigma_data)
    return {"ref_dim": ref_dim, "width": width}


def check_kernel(kernel: str, ref_dim: int | None, kappa: float) -> None:
    """The kernel options: a listed function, ref_dim a positive dimension, kappa >= 0, and both only
    with the Laplace kernel (the RBF's exponent already scales with D, and it has no cusp)."""
    check_choice("kernel", kernel, KERNELS, "kernel")
    if ref_dim is not None and ref_dim < 1:
        raise ArgumentError(f"{{ref_dim}}={ref_dim} must be a positive dimension (null: the paper's /D)", "ref_dim")
    if not kappa >= 0:
        raise ArgumentError(f"{{kappa}}={kappa} must be >= 0 (0: the paper's Laplace kernel)", "kappa")
    for arg, value, off in (("ref_dim", ref_dim, None), ("kappa", kappa, 0.0)):
        if value != off and kernel != "laplace":
            message = f"{{{arg}}}={value} applies to the Laplace kernel, not {{kernel}}={kernel}"
            raise ArgumentError(message, arg, "kernel")


# --------------------------------------------------------------------------------------------
# the objectives
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Draws:
    """One step's random draws for this rank's share of the global batch (`draw`), consumed by `loss`.

    `times` hold one entry per group of `group` particles (IMM: (t, s, r) per group of M; FM: (t, s)
    per sample), `noise`, the labels and the augmentation parameters one entry per sample (the
    augmentation is drawn once per group and repeated for its particles). `draws[a:b]` are the draws of
    samples a..b-1 (a micro-batch; a and b multiples of `group`, so a group is never split).
    """

    times: tuple[Tensor, ...]
    noise: Tensor
    labels_student: Tensor | None
    labels_target: Tensor | None
    group: int = 1
    augment: Tensor | None = None  # parameter rows for the objective's `augment`; None: no augmentation
    # the augmentation's reflection margin, one for the global batch (so micro-batches and ranks agree)
    augment_margin: tuple[int, int, int, int] | None = None

    def __len__(self) -> int:
        return self.noise.shape[0]

    def __getitem__(self, samples: slice) -> Draws:
        a, b, step = samples.indices(len(self))
        if step != 1 or a % self.group or b % self.group:
            raise ValueError(f"a micro-batch [{a}:{b}] must hold whole groups of {self.group} samples")

        def cut(v):
            return None if v is None else v[a:b]

        g = slice(a // self.group, b // self.group)
        times = tuple(v[g] for v in self.times)
        labels = cut(self.labels_student), cut(self.labels_target)
        return Draws(times, self.noise[a:b], *labels, self.group, cut(self.augment), self.augment_margin)


class _Objective:
    """Random draws shared by both objectives.

    Every draw is made for the GLOBAL batch (world_size ranks x local batch) from `generator` and
    this rank keeps its contiguous slice, so a DDP run and a single-process run with the same
    global batch and seed see identical noise, times and label drops.

    `draw(x, labels, generator)` makes one step's draws for this rank's share x; `loss(net, x, draws)`
    evaluates the loss on the share or on a micro-batch of it (`draws[a:b]`, gradient accumulation);
    calling the objective does both on the whole share.

    `augment` (optional, imm.data.augment.Augment): `augment.draw(n, generator, device)` gives n parameter
    rows, `augment(x, rows)` the transformed clean samples and the labels the network is conditioned on.
    Drawn last, so a run without it draws exactly what it drew before augmentation existed.
    """

    def __init__(
        self,
        param,
        *,
        eps: float,
        T: float,
        label_dropout: float = 0.0,
        num_classes: int = 0,
        augment=None,
        rank: int = 0,
        world_size: int = 1,
    ):
        check_time_range(eps, T)
        if not 0.0 <= label_dropout < 1.0:
            raise ArgumentError(f"{{label_dropout}}={label_dropout} must be in [0, 1)", "label_dropout")
        if label_dropout > 0 and num_classes == 0:
            raise ValueError("label_dropout > 0 needs class-conditional data (num_classes > 0)")
        if param.name == "identity" and eps <= 0.0:
            raise ArgumentError(
                f"{{eps}}={eps} must be > 0 with {{param}}=identity (it divides by sigma_t)", "eps", "param"
            )
        self.param, self.schedule, self.sigma_data = param, param.schedule, param.sigma_data
        self.eps, self.T = float(eps), float(T)
        self.label_dropout, self.num_classes = float(label_dropout), int(num_classes)
        self.augment = augment
        self.rank, self.world_size = rank, world_size

    def _local(self, draw: Tensor) -> Tensor:
        n = draw.shape[0] // self.world_size
        return draw[self.rank * n : (self.rank + 1) * n]

    def _rand(self, n_local: int, generator, device) -> Tensor:
        u = torch.rand(n_local * self.world_size, generator=generator, device=device, dtype=torch.float64)
        return self._local(u)

    def _noise(self, x: Tensor, generator) -> Tensor:
        """eps ~ N(0, sigma_d^2 I): the prior is NOT unit variance (Sec. 4.1)."""
        shape = (x.shape[0] * self.world_size, *x.shape[1:])
        n = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
        return self._local(n) * self.sigma_data

    def _drop_labels(self, labels, generator):
        """Labels with a fraction label_dropout replaced by the null index num_classes (CFG training)."""
        if labels is None or self.label_dropout == 0.0:
            return labels
        drop = self._rand(labels.shape[0], generator, labels.device) < self.label_dropout
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def _draw_augment(self, x: Tensor, group: int, generator):
        """(augmentation parameters for the n_local samples of x, drawn once per group of `group` samples for
        the global batch, this rank keeping its slice and repeating each row for the samples of its group;
        the reflection margin of the global batch's transforms), or (None, None) without augmentation."""
        if self.augment is None:
            return None, None
        rows = self.augment.draw(x.shape[0] // group * self.world_size, generator, x.device)
        return self._local(rows).repeat_interleave(group, dim=0), self.augment.margin(rows, *x.shape[-2:])

    def _augmented(self, x: Tensor, draws: Draws) -> tuple[Tensor, Tensor | None]:
        """(the clean samples as the network learns them, their augmentation labels or None)."""
        if draws.augment is None:
            return x, None
        return self.augment(x, draws.augment, draws.augment_margin)

    def _interpolate(self, x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = alpha_t x + sigma_t eps (the same eps gives x_r = DDIM(x_t, x, r, t), App. C.2)."""
        return bcast(self.schedule.alpha(t), x) * x + bcast(self.schedule.sigma(t), x) * noise

    def __call__(self, net, x: Tensor, labels: Tensor | None = None, *, target=None, generator=None, **draw_options):
        """(loss, diagnostics) for a local batch x [B, ...]: this step's draws (`draw_options`: IMM's
        `times`), then the loss on all of x."""
        return self.loss(net, x, self.draw(x, labels, generator, **draw_options), target=target)

    @staticmethod
    def _check_draws(x: Tensor, draws: Draws) -> None:
        if x.shape[0] != len(draws):
            raise ValueError(f"{x.shape[0]} samples but draws for {len(draws)}; slice the draws like the batch")


class IMMObjective(_Objective):
    """One IMM training loss (Algorithm 3 with the paper's practical choices, spec section 1.6).

    Per group i: t_i ~ U(eps, T), s_i ~ U(eps, t_i), r_i = r(s_i, t_i), shared by its M particles;
    x_t = alpha_t x + sigma_t eps and x_r = alpha_r x + sigma_r eps with the same eps;
    y_st = f_{s,t}(x_t) with gradient; y_sr = f_{s,r}(x_r) under no_grad through `target` (the
    online network by default: theta^- = the current weights, Sec. 4.1);
    loss = mean_i w(s_i, t_i) MMD^2_i with kernel weight w~(s_i, t_i).

    Options the paper leaves open (spec section 7), with the spec's recommended defaults:
    `target_fp32` runs the target pass outside autocast; `share_dropout` replays the student's
    RNG state so both passes use the same dropout masks; `drop_target_labels` feeds the target the
    same dropped labels as the student (default: the undropped labels, as in OS-code).

    With `augment`, one transform per group, applied to its M clean samples; x_t and x_r come from the
    transformed x and both passes get its labels. Each group's MMD then compares distributions given one
    augmentation, so the loss vanishes only if the model is self-consistent for each, the un-augmented one
    that sampling uses included (per particle it would compare mixtures; docs/images.md, EDM augmentation).
    """

    def __init__(
        self,
        param,
        mapping: Mapping,
        *,
        M: int = 4,
        a: float = 1.0,
        b: float = 4.0,
        kernel: str = "laplace",
        weighting: str = "paper",
        ref_dim: int | None = None,
        kappa: float = 0.0,
        label_dropout: float = 0.0,
        num_classes: int = 0,
        drop_target_labels: bool = False,
        target_fp32: bool = True,
        share_dropout: bool = True,
        augment=None,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(
            param,
            eps=mapping.eps,
            T=mapping.T,
            label_dropout=label_dropout,
            num_classes=num_classes,
            augment=augment,
            rank=rank,
            world_size=world_size,
        )
        if mapping.schedule.name != param.schedule.name:
            raise ValueError("the mapping and the parameterization must use the same schedule")
        if M < 1:
            raise ArgumentError(f"{{M}}={M} must be positive (particles per group)", "M")
        check_kernel(kernel, ref_dim, kappa)
        check_choice("weighting", weighting, WEIGHTINGS, "kernel weighting")
        self.mapping, self.M, self.a, self.b = mapping, int(M), float(a), float(b)
        self.kernel, self.weighting, self.ref_dim, self.kappa = kernel, weighting, ref_dim, float(kappa)
        self.drop_target_labels, self.target_fp32 = drop_target_labels, target_fp32
        self.share_dropout = share_dropout

    def sample_times(self, n_groups: int, generator=None, device=None):
        """(t, s, r) per group, float64 [n_groups]: t ~ U(eps, T), s ~ U(eps, t), r = r(s, t)."""
        t = self.eps + (self.T - self.eps) * self._rand(n_groups, generator, device)
        s = self.eps + (t - self.eps) * self._rand(n_groups, generator, device)
        return t, s, self.mapping(s, t)

    def draw(self, x: Tensor, labels: Tensor | None = None, generator=None, times=None) -> Draws:
        """This step's draws for the local batch x [B, ...], B divisible by M: (t, s, r) per group, then
        noise, then label drops, then the augmentation per group, each for the global batch (the order
        fixes every result).

        `times` = (t, s, r), each [B / M], evaluates the loss at chosen times instead of drawing them.
        """
        B, M = x.shape[0], self.M
        if B % M:
            raise ValueError(f"the batch ({B}) must be divisible by M ({M})")
        t, s, r = (
            (f64(v).to(x.device) for v in times)
            if times is not None
            else self.sample_times(B // M, generator, x.device)
        )
        noise = self._noise(x, generator)
        labels_student = self._drop_labels(labels, generator)
        labels_target = labels_student if self.drop_target_labels else labels
        augment, margin = self._draw_augment(x, M, generator)
        return Draws((t, s, r), noise, labels_student, labels_target, M, augment, margin)

    def loss(self, net, x: Tensor, draws: Draws, *, target=None):
        """(loss, diagnostics) for samples x [B, ...] (the share or a micro-batch of whole groups) and
        their draws: the mean over its groups of w(s, t) MMD^2."""
        self._check_draws(x, draws)
        M = self.M
        G = x.shape[0] // M
        t, s, r = draws.times
        noise, labels_student, labels_target = draws.noise, draws.labels_student, draws.labels_target
        t_b, s_b, r_b = (v.repeat_interleave(M) for v in (t, s, r))  # every particle of a group shares them
        x, augment_labels = self._augmented(x, draws)  # one x for both passes (x_r reuses x_t's x and eps)
        x_t = self._interpolate(x, noise, t_b)
        x_r = self._interpolate(x, noise, r_b)

        # Target first: its activations are freed before the student's are stored (lower peak memory).
        rng = _rng_state(x.device) if self.share_dropout else None
        with torch.no_grad(), _replay_rng(rng, x.device), _fp32(x.device, self.target_fp32):
            y_sr = self.param.f(
                target if target is not None else net, x_r, s_b, r_b, labels_target, augment_labels=augment_labels
            )
        y_st = self.param.f(net, x_t, s_b, t_b, labels_student, augment_labels=augment_labels)

        shape = (G, M, *x.shape[1:])
        loss, mmd, w, w_tilde, (K_tt, K_rr, K_tr) = weighted_mmd(
            y_st.reshape(shape),
            y_sr.detach().reshape(shape),
            self.param,
            s,
            t,
            r,
            self.kernel,
            self.weighting,
            self.ref_dim,
            self.kappa,
            self.a,
            self.b,
        )
        diagnostics = {
            "t": t.mean(),
            "t_minus_s": (t - s).mean(),
            "t_minus_r": (t - r).mean(),
            "r_equals_s": (r == s).double().mean(),
            "w": w.mean(),
            "log_w_tilde": w_tilde.log().mean(),
            "mmd": mmd.mean(),
            "K_tt": K_tt.mean(),
            "K_rr": K_rr.mean(),
            "K_tr": K_tr.mean(),
        }
        return loss, {k: v.detach() for k, v in diagnostics.items()}


class FMObjective(_Objective):
    """The flow-matching baseline: regress the raw output G onto its conditional target.

    With g = g_c_skip(t) x_t + g_c_out(t) G and the optimal g = E[x | x_t], the target is
    G* = (x - g_c_skip(t) x_t) / g_c_out(t) (independent of s). For euler_fm this is the FM
    velocity: sigma_d G* = eps - x, so loss = mean ||sigma_d G - (eps - x)||^2 and the pushforward
    sampler with euler_fm is exactly Euler integration of the FM ODE. s ~ U(eps, t) is still fed as
    the second time input so the same network and sampler serve both objectives.
    """

    def __init__(self, param, *, eps: float = 0.0, T: float = 0.994, **kw):
        super().__init__(param, eps=eps, T=T, **kw)

    def draw(self, x: Tensor, labels: Tensor | None = None, generator=None) -> Draws:
        """This step's draws for the local batch x: (t, s) per sample, then noise, then label drops, then
        the augmentation per sample (regression needs no groups)."""
        B = x.shape[0]
        t = self.eps + (self.T - self.eps) * self._rand(B, generator, x.device)
        s = self.eps + (t - self.eps) * self._rand(B, generator, x.device)
        noise = self._noise(x, generator)
        labels = self._drop_labels(labels, generator)
        augment, margin = self._draw_augment(x, 1, generator)
        return Draws((t, s), noise, labels, labels, 1, augment, margin)

    def loss(self, net, x: Tensor, draws: Draws, *, target=None):
        """(loss, diagnostics) for samples x (the share or a micro-batch) and their draws."""
        self._check_draws(x, draws)
        (t, s), noise, labels = draws.times, draws.noise, draws.labels_student
        x, augment_labels = self._augmented(x, draws)
        x_t = self._interpolate(x, noise, t)
        G = self.param.net_output(net, x_t, s, t, labels, augment_labels=augment_labels)
        # G* = A x + B_noise eps with float64 coefficients (t floored: euler_fm's g_c_out(0) = 0).
        t_safe = t.clamp(min=C_OUT_FLOOR)
        c_skip, c_out = self.param.g_c_skip(t_safe), self.param.g_c_out(t_safe)
        A = (1.0 - c_skip * self.schedule.alpha(t_safe)) / c_out
        B_noise = -c_skip * self.schedule.sigma(t_safe) / c_out
        G_target = bcast(A, x) * x + bcast(B_noise, x) * noise
        loss = self.sigma_data**2 * (G.float() - G_target.float()).square().mean()
        return loss, {"t": t.mean().detach(), "t_minus_s": (t - s).mean().detach()}


# loss.objective's registry, with the methods of other modules: imm/core/methods.py


# --------------------------------------------------------------------------------------------
def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replay_rng(state, device: torch.device):
    """Run the block with the RNG set to `state`, then restore the RNG as it was before the block."""
    if state is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def _fp32(device: torch.device, enabled: bool):
    """Disable autocast for the block (the target pass in full precision)."""
    return torch.autocast(device.type, enabled=False) if enabled else contextlib.nullcontext()
