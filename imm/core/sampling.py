"""Few-step samplers and their time grids (spec section 4; paper Alg. 2, 4, 5; App. I.2).

A grid is a float64 tensor [N + 1] running from T (prior) down to eps (data): grid[0] = T,
grid[N] = eps. The sampler state x is float64; the network sees float32 (the official code).
"""

from __future__ import annotations

import torch

from imm.core import schedules
from imm.core.util import f64

Tensor = torch.Tensor

GRIDS = ("uniform", "edm", "eta")
SAMPLERS = ("pushforward", "restart")
TWO_STEP_ETA = 1.4  # App. I.2: eta(t_1) = 1.4 "for all 2-step methods"; t_1 = 1.4/2.4 for OT-FM


def uniform_grid(N: int, T: float, eps: float) -> Tensor:
    """t_i = T + (i / N)(eps - T), i = 0..N (the spec's index runs the other way)."""
    _check_steps(N)
    return torch.linspace(T, eps, N + 1, dtype=torch.float64)


def edm_grid(N: int, schedule, T: float, eps: float, rho: float = 7.0) -> Tensor:
    """EDM's rho-schedule in eta space: eta_i = (eta_max^(1/rho) + (i/N)(eta_min^(1/rho) - eta_max^(1/rho)))^rho.

    eta_max = eta(T), eta_min = eta(eps) (eta_min = 0 allowed); endpoints are exactly T and eps.
    """
    _check_steps(N)
    sch = schedules.get(schedule)
    hi, lo = float(sch.eta(T)) ** (1 / rho), float(sch.eta(eps)) ** (1 / rho)
    frac = torch.arange(N + 1, dtype=torch.float64) / N
    grid = sch.t_from_eta((hi + frac * (lo - hi)) ** rho)
    grid[0], grid[-1] = T, eps
    return grid


def eta_grid(etas, schedule, T: float, eps: float, *, float32_points: bool = False) -> Tensor:
    """[T, t(eta_1), ..., eps] for explicit intermediate eta points (e.g. (1.4,) for 2 steps).

    float32_points: each eta and each t(eta) rounded to float32, as the official generator forms its `mid_nt`
    points (torch.as_tensor(1.4) is float32; nt_to_t returns its input's dtype); T and eps stay float64."""
    sch = schedules.get(schedule)
    if float32_points:
        etas32 = torch.tensor(list(etas), dtype=torch.float32).to(torch.float64)
        mids = sch.t_from_eta(etas32).to(torch.float32).to(torch.float64)
    else:
        mids = sch.t_from_eta(torch.tensor(list(etas), dtype=torch.float64))
    grid = torch.cat([f64([T]), mids, f64([eps])])
    if not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError(
            f"eta points {list(etas)} must be decreasing and lie strictly between"
            f" eta(eps)={float(sch.eta(eps)):.4g} and eta(T)={float(sch.eta(T)):.4g}"
        )
    return grid


def grid_spec(grid: str, N: int, *, etas=None, two_step_eta: float | None = None) -> tuple[str, list[float] | None]:
    """Which N-step grid the options give; every grid rule lives here (time_grid draws it):

    - `etas` holding N - 1 intermediate eta points: ("eta", etas), an explicit eta grid; a list of
      another length is ignored, so one `etas` can sit beside other step counts (a step comparison);
    - N = 1: ("endpoints", None), i.e. [T, eps] on every grid;
    - N = 2 with `two_step_eta` set (the commands pass TWO_STEP_ETA, App. I.2): ("eta", [two_step_eta]);
    - else the named `grid`: ("uniform", None), ("edm", None) (rho in eta space) or, for 2 steps only,
      ("eta", None): the paper's eta = 1.4. More steps on the eta grid need `etas` (ValueError).
    """
    if etas is not None and len(etas) == N - 1 > 0:
        return "eta", [float(e) for e in etas]
    if grid not in GRIDS:
        raise ValueError(f"unknown time grid {grid!r}; choose one of {list(GRIDS)}")
    _check_steps(N)
    if N == 1:
        return "endpoints", None
    if N == 2 and two_step_eta is not None:
        return "eta", [float(two_step_eta)]
    if grid == "eta" and N != 2:
        given = "" if etas is None else f", got {len(etas)}: {list(etas)}"
        raise ValueError(
            f"the eta grid needs N - 1 = {N - 1} explicit eta points for N={N} steps (only N=2 has a default,"
            f" eta={TWO_STEP_ETA:g}){given}"
        )
    return grid, None


def time_grid(
    grid: str,
    N: int,
    *,
    schedule="fm",
    T: float = 0.994,
    eps: float = 0.0,
    etas=None,
    two_step_eta: float | None = None,
    rho: float = 7.0,
    float32_points: bool = False,
) -> Tensor:
    """The N-step sampling grid from T down to eps that grid_spec names (float64 [N + 1]); float32_points: the
    eta grid's intermediate points rounded as the official generator's (eta_grid)."""
    kind, points = grid_spec(grid, N, etas=etas, two_step_eta=two_step_eta)
    if kind == "endpoints":
        return f64([T, eps])
    if kind == "eta":
        etas = points if points is not None else [TWO_STEP_ETA]
        return eta_grid(etas, schedule, T, eps, float32_points=float32_points)
    if kind == "uniform":
        return uniform_grid(N, T, eps)
    return edm_grid(N, schedule, T, eps, rho)


def nfe(N: int, guidance: float = 1.0) -> int:
    """Network function evaluations of an N-step sample: one network call per step with either sampler;
    with guidance w != 1 each call runs on a doubled batch (conditional and null label, Eq. 14), which
    counts as 2, as the paper counts it (Table 2's footnote: NFE is twice the number of steps)."""
    _check_steps(N)
    return int(N) * (1 if float(guidance) == 1.0 else 2)


def _check_steps(N: int) -> None:
    if int(N) != N or N < 1:
        raise ValueError(f"the number of sampling steps must be a positive integer, got {N}")


@torch.no_grad()
def sample(
    net,
    param,
    noise: Tensor,
    grid: Tensor,
    *,
    sampler: str = "pushforward",
    labels=None,
    guidance: float = 1.0,
    null_label: int | None = None,
    generator=None,
) -> Tensor:
    """Generate from prior noise x_T ~ N(0, sigma_d^2 I) along `grid` (float64 result).

    - pushforward (Alg. 2/4): x <- f_{t_{i+1}, t_i}(x), i.e. the net is called with t = t_i and
      s = t_{i+1}: one DDIM step per grid interval using g as its x-prediction.
    - restart (Alg. 5): x~ = f_{eps, t_i}(x) jumps to the end; unless last, re-noise to t_{i+1}
      with FRESH noise: x = alpha x~ + sigma eps~, eps~ ~ N(0, sigma_d^2 I).
    Classifier-free guidance (Eq. 14) mixes the raw outputs: one network call on a doubled batch.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
    grid = f64(grid)
    x = noise.to(torch.float64)
    sch = param.schedule

    def f(x, s, t):
        return param.f(net, x, s, t, labels, guidance=guidance, null_label=null_label)

    N = grid.shape[0] - 1
    for i in range(N):
        t, s_next = grid[i], grid[i + 1]
        if sampler == "pushforward":
            x = f(x, s_next, t)
            continue
        x0 = f(x, grid[-1], t)
        if i == N - 1:
            return x0
        fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float64)
        x = sch.alpha(s_next) * x0 + sch.sigma(s_next) * param.sigma_data * fresh
    return x
