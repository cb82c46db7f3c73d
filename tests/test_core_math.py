"""imm/core against imm_spec.md: reference values, boundary conditions and invariances."""

import math

import pytest
import torch

from imm.core import mapping, objective, parameterization, sampling, schedules

SCHEDULES = ["fm", "cosine"]
PARAMS = [
    ("euler_fm", "fm"),
    ("simple_edm", "fm"),
    ("simple_edm", "cosine"),
    ("identity", "fm"),
    ("identity", "cosine"),
]


def f64(*v):
    return torch.tensor(v, dtype=torch.float64)


# -- schedules (spec 1.1) ---------------------------------------------------------------------
@pytest.mark.parametrize("name", SCHEDULES)
def test_eta_inverse_and_logsnr(name):
    sch = schedules.get(name)
    t = torch.linspace(1e-4, 0.999, 501, dtype=torch.float64)
    assert torch.allclose(sch.t_from_eta(sch.eta(t)), t, rtol=1e-10, atol=1e-12)
    assert torch.allclose(sch.t_from_logsnr(sch.logsnr(t)), t, rtol=1e-9, atol=1e-12)
    assert torch.allclose(sch.eta(t), torch.exp(-sch.logsnr(t) / 2), rtol=1e-10)
    # -dlambda/dt against a central finite difference
    h = 1e-5 * t * (1 - t)  # relative step: the derivative blows up at both ends
    fd = -(sch.logsnr(t + h) - sch.logsnr(t - h)) / (2 * h)
    assert torch.allclose(sch.neg_dlogsnr_dt(t), fd, rtol=1e-5)
    assert sch.alpha(t).dtype == torch.float64


def test_schedule_closed_forms():
    fm, cos = schedules.get("fm"), schedules.get("cosine")
    assert float(fm.eta(0.994)) == pytest.approx(165.67, abs=0.01)  # spec 1.5: eta(T) = 165.7
    assert float(cos.eta(0.996)) == pytest.approx(159.15, abs=0.01)  # eta(T) = 159.2
    assert float(fm.t_from_eta(math.inf)) == 1.0  # no NaN at the prior end
    assert float(fm.t_from_eta(-2.0)) == 0.0  # negative eta clamped (spec 6), not r = 2 > t


def test_ddim_self_consistency_and_endpoints():
    """DDIM(DDIM(x_t, x, r, t), x, s, r) = DDIM(x_t, x, s, t); DDIM(eps, x, t, 1) = alpha_t x + sigma_t eps."""
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    for name in SCHEDULES:
        sch = schedules.get(name)
        t = f64(0.9, 0.7, 0.5, 0.99, 0.3, 0.2)
        r = t * 0.8
        s = t * 0.3
        x_t = sch.alpha(t)[:, None] * x + sch.sigma(t)[:, None] * eps
        two = schedules.ddim(schedules.ddim(x_t, x, r, t, sch), x, s, r, sch)
        assert torch.allclose(two, schedules.ddim(x_t, x, s, t, sch), atol=1e-12)
        assert torch.allclose(schedules.ddim(eps, x, t, torch.ones(6, dtype=torch.float64), sch), x_t, atol=1e-12)
        # the paper's order: the TARGET time first; the result is the interpolant at s with the same eps
        assert torch.allclose(
            schedules.ddim(x_t, x, s, t, sch), sch.alpha(s)[:, None] * x + sch.sigma(s)[:, None] * eps, atol=1e-12
        )


# -- parameterisations (spec 1.3) -----------------------------------------------------------------
@pytest.mark.parametrize("pname,sname", PARAMS)
def test_boundary_condition_f_ss_is_identity(pname, sname):
    par = parameterization.get(pname, schedule=sname)
    s = torch.linspace(0.01 if pname == "identity" else 0.0, 0.994, 50, dtype=torch.float64)
    assert torch.allclose(par.c_skip(s, s), torch.ones_like(s), atol=1e-12)
    assert torch.allclose(par.c_out(s, s), torch.zeros_like(s), atol=1e-12)
    x = torch.randn(50, 4, dtype=torch.float64)
    G = torch.randn(50, 4, dtype=torch.float64)
    assert torch.allclose(par.apply(G, x, s, s), x, atol=1e-12)


@pytest.mark.parametrize("pname,sname", PARAMS)
def test_f_level_is_ddim_of_g_level(pname, sname):
    """c_skip(s,t) x_t + c_out(s,t) G == DDIM(x_t, g_c_skip(t) x_t + g_c_out(t) G, s, t)."""
    par = parameterization.get(pname, schedule=sname)
    sch = par.schedule
    t = torch.linspace(0.05, 0.99, 40, dtype=torch.float64)
    s = t * torch.linspace(0.0, 0.95, 40, dtype=torch.float64) + 0.01
    x_t, G = torch.randn(40, 3, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    g = par.g_c_skip(t)[:, None] * x_t + par.g_c_out(t)[:, None] * G
    assert torch.allclose(par.apply(G, x_t, s, t), schedules.ddim(x_t, g, s, t, sch), atol=1e-10)


def test_parameterization_coefficients_from_the_table():
    sd = 0.5
    t, s = f64(0.7), f64(0.2)
    efm = parameterization.get("euler_fm", sigma_data=sd)
    assert float(efm.c_out(s, t)) == pytest.approx(-(0.7 - 0.2) * sd)
    sedm = parameterization.get("simple_edm", schedule="cosine", sigma_data=sd)
    # on cosine Simple-EDM is f = cos(pi (t-s)/2) x_t - sin(pi (t-s)/2) sigma_d G (spec 1.3)
    assert float(sedm.c_skip(s, t)) == pytest.approx(math.cos(math.pi * 0.25))
    assert float(sedm.c_out(s, t)) == pytest.approx(-math.sin(math.pi * 0.25) * sd)
    # c_in(t) = 1 / (sigma_d sqrt(alpha^2 + sigma^2))
    assert float(efm.c_in(t)) == pytest.approx(1 / (sd * math.sqrt(0.3**2 + 0.7**2)))


def test_noise_conditioning_and_second_time_input():
    par = parameterization.get("euler_fm")
    nt, ns = par.noise_inputs(f64(0.2), f64(0.7))
    assert float(nt) == pytest.approx(700.0) and float(ns) == pytest.approx(200.0)
    stride = parameterization.get("euler_fm", second_time="stride", time_scale=500)
    nt, ns = stride.noise_inputs(f64(0.2), f64(0.7))
    assert float(nt) == pytest.approx(350.0) and float(ns) == pytest.approx(250.0)


def test_euler_fm_rejects_cosine():
    with pytest.raises(ValueError, match="euler_fm.*OT-FM"):
        parameterization.get("euler_fm", schedule="cosine")


# -- mappings (spec 1.5) ----------------------------------------------------------------------------
MAPPING_RANGES = {
    "eta_decrement": (0.0, 0.994),
    "t_decrement": (0.0, 1.0),
    "lambda_decrement": (0.001, 0.994),
    "inv_eta_increment": (0.005, 1.0),
}


@pytest.mark.parametrize("name", mapping.MAPPINGS)
@pytest.mark.parametrize("sname", SCHEDULES)
@pytest.mark.parametrize("k", range(10, 16))
def test_mapping_stays_between_s_and_t(name, sname, k):
    eps, T = MAPPING_RANGES[name]
    if sname == "cosine" and name in ("eta_decrement", "lambda_decrement"):
        T = 0.996
    m = mapping.Mapping(name, schedule=sname, k=k, eps=eps, T=T)
    t = torch.linspace(eps, T, 400, dtype=torch.float64)
    for frac in (0.0, 0.3, 0.9, 0.999, 1.0):
        s = eps + frac * (t - eps)
        r = m(s, t)
        assert torch.isfinite(r).all()
        assert (r >= s).all() and (r <= t).all()
    # strictly below t somewhere in the interior: the mapping does step
    s = torch.full_like(t, eps)
    assert (m(s, t)[1:-1] < t[1:-1]).any()


def test_eta_decrement_gaps_match_the_spec():
    """Spec 1.5: implied t - r for OT-FM, T = 0.994."""
    t = f64(0.994, 0.9, 0.5)
    s = torch.zeros(3, dtype=torch.float64)
    gap15 = t - mapping.Mapping("eta_decrement", k=15, eps=0.0, T=0.994)(s, t)
    gap12 = t - mapping.Mapping("eta_decrement", k=12, eps=0.0, T=0.994)(s, t)
    assert gap15.tolist() == pytest.approx([1.8e-7, 5.1e-5, 1.3e-3], rel=0.05)
    assert gap12.tolist() == pytest.approx([1.5e-6, 4.1e-4, 1.0e-2], rel=0.05)
    # for eta(t) < delta the target is the exact interpolant: r = s (t < 0.0389 when k = 12)
    t_small, s_small = f64(0.03), f64(0.01)
    assert float(mapping.Mapping("eta_decrement", k=12, T=0.994)(s_small, t_small)) == 0.01


def test_eta_range_and_min_gap():
    m = mapping.Mapping("eta_decrement", k=12, T=0.994, eta_max=160.0, eta_min=0.0)
    assert m.delta == pytest.approx(160.0 / 2**12)
    gap = mapping.Mapping("eta_decrement", k=12, T=0.994, min_gap=1e-4)
    t = f64(0.99, 0.993)
    r = gap(torch.zeros(2, dtype=torch.float64), t)
    assert ((t - r) >= 1e-4 - 1e-15).all()  # FP16 variant: never closer than Delta


def test_mapping_config_errors():
    with pytest.raises(ValueError, match="eps"):
        mapping.Mapping("lambda_decrement", eps=0.0, T=0.994)
    with pytest.raises(ValueError, match="eta_min > 0"):
        mapping.Mapping("inv_eta_increment", eps=0.0, T=1.0)
    with pytest.raises(ValueError, match="T < 1"):
        mapping.Mapping("eta_decrement", eps=0.0, T=1.0)
    with pytest.raises(ValueError, match="unknown mapping"):
        mapping.Mapping("nope")


# -- weights (spec 1.4, 5.1) -------------------------------------------------------------------------
REFERENCE_W = {  # spec 1.4, OT-FM, t = 0.01, 0.1, 0.5, 0.9, 0.994
    (1, 5): [1.52, 7.89, 3.97, 1.35, 1.02],
    (1, 4): [0.565, 4.91, 3.93, 1.35, 1.02],
    (2, 4): [0.560, 4.42, 1.96, 0.136, 0.0061],
}


@pytest.mark.parametrize("ab", REFERENCE_W)
def test_time_weight_reference_table(ab):
    t = f64(0.01, 0.1, 0.5, 0.9, 0.994)
    w = objective.time_weight("fm", t, *ab)
    assert w.tolist() == pytest.approx(REFERENCE_W[ab], rel=0.006)


def test_time_weight_finite_at_the_ends():
    for name in SCHEDULES:
        w = objective.time_weight(name, f64(0.0, 1e-7, 1.0), 1, 4)
        assert torch.isfinite(w).all() and float(w[0]) < 1e-6


def test_kernel_weightings_for_euler_fm():
    par = parameterization.get("euler_fm", sigma_data=0.5)
    t, s = f64(0.9, 0.5, 0.2), f64(0.1, 0.45, 0.0)
    assert torch.allclose(objective.kernel_weight("inv_stride", par, s, t), 1 / (t - s))  # the seed code
    assert torch.allclose(objective.kernel_weight("paper", par, s, t), 1 / ((t - s) * 0.5))  # 1/|c_out|
    assert torch.allclose(objective.kernel_weight("unit", par, s, t), torch.ones(3, dtype=torch.float64))
    sedm = parameterization.get("simple_edm", schedule="fm")
    a, sg = sedm.schedule.alpha, sedm.schedule.sigma
    expected = torch.sqrt(a(t) ** 2 + sg(t) ** 2) / (0.5 * (a(s) * sg(t) - sg(s) * a(t)).abs())
    assert torch.allclose(objective.kernel_weight("paper", sedm, s, t), expected)
    assert torch.isfinite(objective.kernel_weight("paper", par, t, t)).all()  # s = t: floored, finite


# -- the MMD estimator (Eq. 67) ----------------------------------------------------------------------
def test_group_mmd_properties():
    g = torch.Generator().manual_seed(1)
    y1, y2 = torch.randn(5, 4, 3, 2, generator=g), torch.randn(5, 4, 3, 2, generator=g)
    w = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    for kernel in objective.KERNELS:
        assert torch.allclose(objective.mmd_terms(y1, y1, w, kernel)[0], torch.zeros(5), atol=1e-6)
        m12 = objective.mmd_terms(y1, y2, w, kernel)[0]
        assert (m12 > 0).all()
        assert torch.allclose(m12, objective.mmd_terms(y2, y1, w, kernel)[0], atol=1e-6)
        perm = torch.randperm(4, generator=g)
        assert torch.allclose(
            m12, objective.mmd_terms(y1[:, perm], y2[:, torch.randperm(4, generator=g)], w, kernel)[0], atol=1e-6
        )


def test_group_mmd_is_the_v_statistic():
    """Brute force over all M x M pairs, diagonals included, distance floored and divided by D."""
    g = torch.Generator().manual_seed(2)
    y1, y2 = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 6, generator=g)
    w = f64(2.0, 0.5, 7.0)
    D = 6
    expected = []
    for i in range(3):
        k = lambda a, b: math.exp(-float(w[i]) * max(float((a - b).norm()), 1e-8) / D)  # noqa: E731
        tot = 0.0
        for j in range(4):
            for m in range(4):
                tot += k(y1[i, j], y1[i, m]) + k(y2[i, j], y2[i, m]) - 2 * k(y1[i, j], y2[i, m])
        expected.append(tot / 16)
    assert objective.mmd_terms(y1, y2, w)[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_imm_loss_from_outputs_weights_each_group():
    g = torch.Generator().manual_seed(3)
    y1, y2 = torch.randn(4, 4, 2, generator=g), torch.randn(4, 4, 2, generator=g)
    t, s = f64(0.9, 0.6, 0.3, 0.1), f64(0.5, 0.1, 0.2, 0.0)
    loss = objective.imm_loss_from_outputs(y1, y2, s, t, schedule="fm", param="euler_fm", a=1, b=4)
    w = objective.time_weight("fm", t, 1, 4)
    wt = 1 / ((t - s) * 0.5)
    assert float(loss) == pytest.approx(float((w * objective.mmd_terms(y1, y2, wt)[0].double()).mean()), rel=1e-5)


# -- time grids (spec 4) -------------------------------------------------------------------------------
def test_time_grids():
    assert sampling.time_grid("uniform", 4, T=0.994, eps=0.0).tolist() == pytest.approx(
        [0.994, 0.7455, 0.497, 0.2485, 0.0]
    )
    assert sampling.time_grid("edm", 8, T=0.994, eps=0.0).tolist() == pytest.approx(
        [0.994, 0.98486, 0.95674, 0.86056, 0.56413, 0.14731, 0.01001, 8e-05, 0.0], abs=1e-5
    )
    two = sampling.time_grid("eta", 2, T=0.994, eps=0.0)
    assert float(two[1]) == pytest.approx(1.4 / 2.4)  # the paper's 2-step eta = 1.4
    assert float(sampling.time_grid("eta", 2, schedule="cosine", T=0.994, eps=0.006)[1]) == pytest.approx(
        0.60514, abs=1e-5
    )
    assert sampling.time_grid("uniform", 1, T=0.994, eps=0.006).tolist() == pytest.approx([0.994, 0.006])
    with pytest.raises(ValueError, match="eta points"):
        sampling.time_grid("eta", 3, etas=[0.5, 1.0])
    with pytest.raises(ValueError, match="positive integer"):
        sampling.time_grid("uniform", 0)
