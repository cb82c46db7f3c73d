"""The IMM and FM objectives and the samplers, end to end on small networks."""

import copy

import pytest
import torch
from torch import nn
from toynets import CountingNet, TinyNet

from imm.core import mapping, objective, parameterization, sampling, schedules

PARAMS = [("euler_fm", "fm"), ("simple_edm", "fm"), ("simple_edm", "cosine"), ("identity", "fm")]


def make_objective(pname="euler_fm", sname="fm", *, eps=0.01, T=0.994, k=12, M=4, **kw):
    par = parameterization.get(pname, schedule=sname)
    m = mapping.Mapping("eta_decrement", schedule=sname, k=k, eps=eps, T=T)
    return objective.IMMObjective(par, m, M=M, a=1, b=4, **kw)


class DiracOracle(nn.Module):
    """The exact network for data = a single point x0: G = (x0 - g_c_skip(t) x_t) / g_c_out(t).

    Its g is E[x | x_t] = x0 for every t, so f_{s,t}(x_t) is the true flow map: the IMM loss is 0
    and every sampler lands on x0 (at eps = 0).
    """

    def __init__(self, param, x0):
        super().__init__()
        self.param, self.x0, self.num_classes = param, x0, 0

    def forward(self, x_in, noise_t, noise_s, labels=None):
        t = noise_t.double() / self.param.time_scale
        x_t = x_in.double() / self.param.c_in(t)[:, None]
        G = (self.x0.double() - self.param.g_c_skip(t)[:, None] * x_t) / self.param.g_c_out(t)[:, None]
        return G.to(x_in.dtype)


def test_objective_draws_one_time_triple_per_group():
    obj = make_objective(M=4)
    seen = {}

    class Recorder(TinyNet):
        def forward(self, x, noise_t, noise_s, labels=None):
            seen.setdefault("calls", []).append((noise_t.clone(), noise_s.clone()))
            return super().forward(x, noise_t, noise_s, labels)

    net = Recorder()
    obj(net, torch.randn(16, 2), generator=torch.Generator().manual_seed(0))
    (nr, ns_r), (nt, ns_t) = seen["calls"]  # target pass first, then the student
    for v in (nr, ns_r, nt, ns_t):
        groups = v.reshape(4, 4)
        assert (groups == groups[:, :1]).all()  # all particles of a group share (t, s, r)
        assert groups[:, 0].unique().numel() == 4  # groups differ
    assert torch.equal(ns_r, ns_t)  # both passes see the same s
    assert (nr <= nt).all() and (ns_t <= nr).all()  # s <= r <= t


def test_x_r_is_the_interpolant_with_the_same_noise():
    obj = make_objective()
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(8, 3, dtype=torch.float64, generator=g), torch.randn(8, 3, dtype=torch.float64, generator=g)
    t = torch.rand(8, dtype=torch.float64, generator=g) * 0.9 + 0.05
    r = t * 0.7
    x_t, x_r = obj._interpolate(x, eps, t), obj._interpolate(x, eps, r)
    assert torch.allclose(x_r, schedules.ddim(x_t, x, r, t, obj.schedule), atol=1e-12)
    assert torch.allclose(x_r, (1 - r)[:, None] * x + r[:, None] * eps, atol=1e-12)


def test_gradient_flows_only_through_the_student():
    torch.manual_seed(0)
    net = TinyNet()
    frozen = copy.deepcopy(net)
    x = torch.randn(16, 2)
    obj = make_objective()
    obj(net, x, generator=torch.Generator().manual_seed(5))[0].backward()
    online = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    obj(net, x, target=frozen, generator=torch.Generator().manual_seed(5))[0].backward()
    assert all(p.grad is None for p in frozen.parameters())
    for g1, p in zip(online, net.parameters()):
        assert torch.allclose(g1, p.grad, atol=1e-7)  # an online target adds no gradient of its own
    assert any(g.abs().sum() > 0 for g in online)


@pytest.mark.parametrize("pname,sname", PARAMS)
def test_loss_vanishes_at_the_true_flow_map(pname, sname):
    x0 = torch.tensor([0.3, -0.2])
    obj = make_objective(pname, sname, eps=0.01)
    oracle = DiracOracle(obj.param, x0)
    loss, diag = obj(oracle, x0.expand(32, 2).clone(), generator=torch.Generator().manual_seed(0))
    assert float(loss) < 1e-5
    wrong = DiracOracle(obj.param, x0 + 0.5)
    assert float(obj(wrong, x0.expand(32, 2).clone(), generator=torch.Generator().manual_seed(0))[0]) > 1e-3


EDGE_TIMES = {  # (t, s, r) per group: s -> t, t = eps, t = T, r = s
    "s_equals_t": ([0.5, 0.9], [0.5, 0.9], [0.5, 0.9]),
    "s_just_below_t": ([0.5, 0.9], [0.5 - 1e-12, 0.9 - 1e-12], [0.5 - 1e-13, 0.9 - 1e-13]),
    "t_at_eps": ([0.0, 0.0], [0.0, 0.0], [0.0, 0.0]),
    "t_at_T": ([0.994, 0.994], [0.1, 0.994], [0.9939999, 0.994]),
    "r_equals_s": ([0.03, 0.6], [0.01, 0.2], [0.01, 0.2]),
}


@pytest.mark.parametrize("case", EDGE_TIMES)
@pytest.mark.parametrize("pname,sname", [("euler_fm", "fm"), ("simple_edm", "fm"), ("simple_edm", "cosine")])
@pytest.mark.parametrize("weighting", objective.WEIGHTINGS)
def test_loss_and_gradients_finite_at_the_edges(case, pname, sname, weighting):
    torch.manual_seed(0)
    net = TinyNet()
    obj = make_objective(pname, sname, eps=0.0, weighting=weighting)
    loss, diag = obj(net, torch.randn(8, 2), times=[torch.tensor(v, dtype=torch.float64) for v in EDGE_TIMES[case]])
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    assert all(torch.isfinite(v) for v in diag.values())


def test_duplicate_particles_have_finite_gradients():
    y = torch.randn(1, 1, 5).repeat(3, 4, 1).requires_grad_()
    w = torch.tensor([1.0, 1e8, 3.0], dtype=torch.float64)
    for kernel in objective.KERNELS:
        (
            objective.mmd_terms(y, y.detach() + 0.1, w, kernel)[0].sum() + objective.mmd_terms(y, y, w, kernel)[0].sum()
        ).backward()
        assert torch.isfinite(y.grad).all()
        y.grad = None


def test_shared_dropout_masks():
    torch.manual_seed(0)
    net = TinyNet(dropout=0.5).train()
    x = torch.randn(16, 2)
    t = torch.tensor([0.5, 0.6, 0.7, 0.8], dtype=torch.float64)
    times = (t, t * 0.5, t)  # r = t: student and target see the same input
    shared = make_objective(share_dropout=True)
    assert float(shared(net, x, times=times)[0].detach()) == pytest.approx(0.0, abs=1e-6)
    independent = make_objective(share_dropout=False)
    assert float(independent(net, x, times=times)[0].detach()) > 1e-4


@pytest.mark.parametrize("target_fp32", [True, False])
def test_target_pass_precision(target_fp32):
    seen = []

    class Recorder(TinyNet):
        def forward(self, x, noise_t, noise_s, labels=None):
            seen.append(torch.is_autocast_enabled("cpu"))
            return super().forward(x, noise_t, noise_s, labels)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = make_objective(target_fp32=target_fp32)(Recorder(), torch.randn(8, 2))
    assert seen == [not target_fp32, True]  # [target, student]
    assert torch.isfinite(loss)


def test_label_dropout_student_only_by_default():
    calls = []

    class Recorder(TinyNet):
        def forward(self, x, noise_t, noise_s, labels=None):
            calls.append(labels.clone())
            return super().forward(x, noise_t, noise_s, labels)

    net = Recorder(num_classes=3)
    labels = torch.arange(64) % 3
    for drop_target, expect_target_dropped in ((False, False), (True, True)):
        calls.clear()
        obj = make_objective(label_dropout=0.3, num_classes=3, drop_target_labels=drop_target)
        obj(net, torch.randn(64, 2), labels, generator=torch.Generator().manual_seed(1))
        target_labels, student_labels = calls
        n_null = int((student_labels == 3).sum())
        assert 5 < n_null < 40  # about 30% of 64 dropped to the null index
        assert torch.equal(student_labels[student_labels != 3], labels[student_labels != 3])
        assert torch.equal(target_labels, student_labels) == expect_target_dropped
    with pytest.raises(ValueError, match="num_classes"):
        make_objective(label_dropout=0.1, num_classes=0)


def test_global_draws_make_sharded_ranks_match_one_process():
    torch.manual_seed(0)
    net = TinyNet()
    x = torch.randn(32, 2)
    single = make_objective()(net, x, generator=torch.Generator().manual_seed(7))[0].detach()
    halves = [
        make_objective(rank=r, world_size=2)(net, x[16 * r : 16 * (r + 1)], generator=torch.Generator().manual_seed(7))[
            0
        ].detach()
        for r in (0, 1)
    ]
    assert float(single) == pytest.approx(float(sum(halves) / 2), rel=1e-6)


def test_batch_must_divide_into_groups():
    with pytest.raises(ValueError, match="divisible by M"):
        make_objective(M=4)(TinyNet(), torch.randn(10, 2))


# -- the flow-matching baseline ----------------------------------------------------------------------
@pytest.mark.parametrize("pname,sname", PARAMS)
def test_fm_loss_vanishes_at_the_conditional_target(pname, sname):
    par = parameterization.get(pname, schedule=sname)
    fm = objective.FMObjective(par, eps=0.01, T=0.994)
    x0 = torch.tensor([0.3, -0.2])
    assert float(fm(DiracOracle(par, x0), x0.expand(64, 2).clone())[0]) < 1e-8
    assert float(fm(DiracOracle(par, x0 + 0.3), x0.expand(64, 2).clone())[0]) > 1e-3


def test_fm_loss_is_velocity_regression_for_euler_fm():
    """sigma_d G* = eps - x: a net predicting the constant velocity of a two-point coupling."""
    par = parameterization.get("euler_fm")
    fm = objective.FMObjective(par, eps=0.0, T=0.994)
    zero = lambda x, nt, ns, y=None: torch.zeros_like(x)  # noqa: E731
    x = torch.full((20000, 1), 0.5)
    loss = fm(zero, x, generator=torch.Generator().manual_seed(0))[0]
    # E||eps - x||^2 with eps ~ N(0, 0.25): 0.25 + 0.25
    assert float(loss) == pytest.approx(0.5, rel=0.03)


# -- samplers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("pname,sname", PARAMS)
@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
@pytest.mark.parametrize("grid", ["uniform", "edm"])
def test_samplers_land_on_the_data_with_the_exact_network(pname, sname, sampler, grid):
    par = parameterization.get(pname, schedule=sname)
    x0 = torch.tensor([0.3, -0.2])
    eps = 0.01 if pname == "identity" else 0.0
    noise = 0.5 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    for N in (1, 2, 4, 8):
        times = sampling.time_grid(grid, N, schedule=sname, T=0.994, eps=eps)
        out = sampling.sample(
            DiracOracle(par, x0), par, noise, times, sampler=sampler, generator=torch.Generator().manual_seed(1)
        )
        assert out.dtype == torch.float64
        expected = par.schedule.alpha(eps) * x0.double()
        tol = 1e-4 + 2 * float(par.schedule.sigma(eps))  # eps > 0 leaves sigma_eps of noise
        assert (out - expected).abs().max() < tol


def test_sampler_calls_and_guidance_batching():
    net = CountingNet(TinyNet(num_classes=3))
    par = parameterization.get("euler_fm")
    noise = torch.randn(5, 2)
    labels = torch.tensor([0, 1, 2, 0, 1])
    for sampler in sampling.SAMPLERS:
        for N in (1, 2, 4, 8):
            net.calls.clear()
            sampling.sample(net, par, noise, sampling.time_grid("uniform", N), sampler=sampler, labels=labels)
            assert net.calls == [5] * N
            net.calls.clear()
            sampling.sample(
                net,
                par,
                noise,
                sampling.time_grid("uniform", N),
                sampler=sampler,
                labels=labels,
                guidance=1.5,
                null_label=3,
            )
            assert net.calls == [10] * N  # guidance doubles the batch, not the calls


def test_guidance_mixes_raw_outputs():
    torch.manual_seed(0)
    net = TinyNet(num_classes=3)
    par = parameterization.get("euler_fm")
    x, labels = torch.randn(4, 2), torch.tensor([0, 1, 2, 0])
    s, t = torch.full((4,), 0.2, dtype=torch.float64), torch.full((4,), 0.8, dtype=torch.float64)
    G_c = par.net_output(net, x, s, t, labels)
    G_u = par.net_output(net, x, s, t, torch.full_like(labels, 3))
    G_w = par.net_output(net, x, s, t, labels, guidance=2.0, null_label=3)
    assert torch.allclose(G_w, 2.0 * G_c - G_u, atol=1e-6)


def test_one_step_sampling_is_deterministic_given_the_seed():
    torch.manual_seed(0)
    net, par = TinyNet(), parameterization.get("euler_fm")
    grid = sampling.time_grid("uniform", 1)

    def draw(seed, sampler="pushforward", N=1):
        g = torch.Generator().manual_seed(seed)
        noise = 0.5 * torch.randn(16, 2, generator=g)
        return sampling.sample(net, par, noise, sampling.time_grid("uniform", N), sampler=sampler, generator=g)

    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))
    assert torch.equal(draw(3, "restart", 4), draw(3, "restart", 4))
    assert grid.tolist() == pytest.approx([0.994, 0.0])
