"""MeanFlow (imm/core/meanflow.py) against the paper: the target at r = t is the instantaneous velocity, the JVP
target equals a finite-difference estimate of the MeanFlow identity, one step of the exact average velocity of a
known flow is exact, the time sampler and guidance follow their formulas; micro-batches equal one batch; and through
launch.py, 2 gloo processes equal one process and a run killed with SIGKILL resumes bit for bit."""

import pytest
import torch
from helpers import launch
from test_accumulation import TINY as ACC_TINY
from test_accumulation import assert_same_weights, final_model, loss_and_grads, torchrun
from test_core_objective import DiracOracle
from toynets import TinyNet

from imm.core import meanflow, parameterization, sampling
from imm.core.util import ArgumentError


def make(**kw):
    par = parameterization.get("euler_fm", schedule="fm", second_time=kw.pop("second_time", "s"))
    return meanflow.MeanFlowObjective(par, **{"eps": 0.0, "T": 0.994, **kw})


def u_of(obj, net, **net_kw):
    """u(z, r, t) = sigma_d G as the objective computes it, with the network's dtype chosen."""

    def u(z, r, t, labels=None):
        return obj.sigma_data * obj.param.net_output(net, z, r, t, labels, **net_kw)

    return u


# -- the identity and its target -------------------------------------------------------------------
def test_at_r_equal_t_the_target_is_the_instantaneous_velocity():
    """(t - r) = 0 makes u_tgt = v exactly, and the whole loss is then the adaptive-weighted FM regression onto
    v = eps - x (the objective's v and its weighting, computed here independently)."""
    torch.manual_seed(0)
    obj, net = make(ratio=0.0, norm_p=1.0, norm_eps=1e-3), TinyNet()
    x = torch.randn(32, 2)
    draws = obj.draw(x, generator=torch.Generator().manual_seed(1))
    t, r = draws.times
    assert torch.equal(t, r)
    z = (1 - t[:, None]) * x + t[:, None] * draws.noise
    v = draws.noise - x
    _, u_tgt = meanflow.mean_flow_target(lambda zz, tt: u_of(obj, net)(zz, r, tt), z, v, t.float(), r.float())
    assert torch.equal(u_tgt, v)
    loss, _ = obj.loss(net, x, draws)
    sq = (u_of(obj, net)(z, r, t).float() - v).square().sum(1)
    assert loss.item() == pytest.approx((sq / (sq + 1e-3)).mean().item(), rel=1e-5)


@pytest.mark.parametrize("second_time", ["s", "stride"])
def test_jvp_target_equals_finite_differences(second_time):
    """u_tgt = v - (t - r) (v . grad_z u + du/dt): the JVP against a central difference along (z + h v, r, t + h), in
    float64 through the platform's own network call (c_in(t), 1000 t and the second time input r or t - r)."""
    torch.manual_seed(0)
    obj, net = make(second_time=second_time), TinyNet(width=64).double()
    u = u_of(obj, net, net_dtype=torch.float64)
    z, v = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    t = torch.rand(8, dtype=torch.float64) * 0.8 + 0.1
    r = t * torch.rand(8, dtype=torch.float64)
    _, u_tgt = meanflow.mean_flow_target(lambda zz, tt: u(zz, r, tt), z, v, t, r)
    # h = 1e-3: the network's time inputs are float32 (net_output), whose rounding swamps smaller steps; the
    # central difference's O(h^2) error is then ~5e-7 against a derivative term of ~0.1
    h = 1e-3
    dudt = (u(z + h * v, r, t + h) - u(z - h * v, r, t - h)) / (2 * h)
    expected = v - (t - r)[:, None] * dudt
    assert torch.allclose(u_tgt, expected, rtol=0, atol=5e-6)
    assert not torch.allclose(u_tgt, v, atol=1e-3)  # the derivative term is really there


def test_the_objectives_float32_target_matches_finite_differences():
    """The loss's own target pass (float32 network, draws from the sampler) against the float64 central difference."""
    torch.manual_seed(0)
    obj, net = make(ratio=1.0), TinyNet(width=64)
    x = torch.randn(16, 2)
    draws = obj.draw(x, generator=torch.Generator().manual_seed(3))
    t, r = draws.times
    z = (1 - t[:, None]) * x + t[:, None] * draws.noise
    v = draws.noise - x
    got = obj.target_velocity(net, z.float(), v, t, r, None, None)
    u = u_of(obj, net.double(), net_dtype=torch.float64)
    h = 1e-3
    fd = (u(z.double() + h * v.double(), r, t + h) - u(z.double() - h * v.double(), r, t - h)) / (2 * h)
    expected = v.double() - (t - r)[:, None] * fd
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_one_step_of_the_exact_average_velocity_of_a_linear_flow_is_exact():
    """Data = one point x0: z_t = (1 - t) x0 + t eps moves on straight lines and u(z, r, t) = (z - x0)/t for every r.
    For that network (DiracOracle with Euler-FM: sigma_d G = (z - x0)/t) the MeanFlow target is u itself (the JVP's
    two terms cancel), one step z_r = z_t - (t - r) u lands on the flow, and the platform's pushforward sampler (1
    and 3 steps) ends exactly at x0."""
    obj = make(eps=0.0, T=0.994, norm_p=0.0, ratio=1.0)
    x0 = torch.tensor([0.3, -0.2], dtype=torch.float64)
    net = DiracOracle(obj.param, x0)
    eps = torch.randn(6, 2, dtype=torch.float64) * 0.5
    t = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.2, 0.05], dtype=torch.float64)
    r = t * torch.tensor([0.0, 0.2, 0.5, 0.9, 0.99, 0.3], dtype=torch.float64)
    z_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    u = u_of(obj, net, net_dtype=torch.float64)
    u_t, u_tgt = meanflow.mean_flow_target(lambda zz, tt: u(zz, r, tt), z_t, eps - x0, t, r)
    assert torch.allclose(u_tgt, u_t, atol=1e-12)
    z_r = meanflow.average_velocity_step(u_t, z_t, r, t)
    assert torch.allclose(z_r, (1 - r[:, None]) * x0 + r[:, None] * eps, atol=1e-12)
    noise = torch.randn(5, 2, dtype=torch.float64) * 0.5
    for N in (1, 3):
        grid = sampling.time_grid("uniform", N, T=0.994, eps=0.0)
        out = sampling.sample(net, obj.param, noise, grid)
        assert torch.allclose(out, x0.expand_as(out), atol=1e-6)


# -- times, weights, guidance ------------------------------------------------------------------------
def test_time_sampler_orders_ties_and_follows_the_logit_normal():
    obj = make(P_mean=-0.4, P_std=1.0, ratio=0.25, T=1.0)
    t, r = obj.sample_times(200_000, torch.Generator().manual_seed(0))
    assert bool((t >= r).all())
    assert (t != r).double().mean().item() == pytest.approx(0.25, abs=0.005)
    # t = max of two logit-normal draws: P(t <= x) = Phi((logit x - mean)/std)^2
    q = torch.tensor(0.4, dtype=torch.float64)
    phi = 0.5 * (1 + torch.erf((torch.logit(q) + 0.4) / 2**0.5))
    assert (t <= q).double().mean().item() == pytest.approx((phi**2).item(), abs=0.005)


def test_adaptive_weight():
    sq = torch.tensor([0.0, 1.0, 10.0])
    assert torch.equal(meanflow.adaptive_weight(sq, 0.0, 1e-3), torch.ones(3))  # p = 0: the plain squared loss
    assert torch.allclose(meanflow.adaptive_weight(sq, 1.0, 1e-3), 1 / (sq + 1e-3))
    assert torch.allclose(meanflow.adaptive_weight(sq, 0.75, 1e-2), (sq + 1e-2) ** -0.75)


def test_guided_velocity_and_which_samples_are_guided():
    v, vu, vc = torch.ones(3, 2), torch.zeros(3, 2), torch.full((3, 2), 2.0)
    omega, kappa = torch.tensor([2.0, 1.0, 2.0]), torch.tensor([0.5, 0.0, 0.0])
    g = meanflow.guided_velocity(v, vu, vc, omega, kappa)
    # omega v + kappa v_c + (1 - omega - kappa) v_u: 2 + 1 - 0 = 3, 1, 2
    assert torch.equal(g[:, 0], torch.tensor([3.0, 1.0, 2.0]))
    # in the objective: samples whose label was dropped (the null index) keep v
    obj = make(omega=3.0, label_dropout=0.5, num_classes=3)
    net = TinyNet(num_classes=3)
    x, labels = torch.randn(64, 2), torch.randint(0, 3, (64,))
    draws = obj.draw(x, labels, torch.Generator().manual_seed(0))
    t = draws.times[0]
    z = (1 - t[:, None]) * x + t[:, None] * draws.noise
    v = draws.noise - x
    with torch.no_grad():
        v_g = obj._guidance(net, z, v, t, draws, None)
    dropped = draws.labels_student == 3
    assert 0 < int(dropped.sum()) < 64
    assert torch.equal(v_g[dropped], v[dropped]) and not torch.allclose(v_g[~dropped], v[~dropped])


def test_impossible_options_are_refused():
    with pytest.raises(ArgumentError, match="unconditional"):
        make(omega=2.0)
    with pytest.raises(ArgumentError, match="Euler-FM"):
        meanflow.MeanFlowObjective(parameterization.get("simple_edm", schedule="fm"), eps=0.0, T=0.994)
    with pytest.raises(ArgumentError, match="ratio"):
        make(ratio=1.5)


# -- gradient accumulation ---------------------------------------------------------------------------
@pytest.mark.parametrize("micro", [4, 8, 16])
def test_micro_batches_give_the_loss_and_gradients_of_one_batch(micro):
    torch.manual_seed(0)
    net = TinyNet(num_classes=3)
    x, labels = torch.randn(32, 2), torch.randint(0, 3, (32,))
    obj = make(rank=1, world_size=2, label_dropout=0.3, num_classes=3, omega=1.5, kappa=0.3, ratio=0.5)
    full_loss, full_grads = loss_and_grads(net, obj, x, labels, None)
    loss, grads = loss_and_grads(net, obj, x, labels, micro)
    assert torch.allclose(loss, full_loss, rtol=1e-6, atol=0)
    for g, g_full in zip(grads, full_grads, strict=True):
        assert torch.allclose(g, g_full, rtol=1e-5, atol=1e-7)


# -- through launch.py ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    """The JVP runs on the un-wrapped network; the gradient must still be all-reduced by DDP: 2 processes x 32
    samples train the weights that 1 process x 64 trains (dropout off: each rank draws its own masks)."""
    args = [*ACC_TINY, "loss=meanflow"]
    launch(tmp_path, *args, f"hydra.run.dir={tmp_path / 'one'}", check=True)
    two = torchrun(tmp_path, *args, f"hydra.run.dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_weights(final_model(tmp_path / "one"), final_model(tmp_path / "two"))


@pytest.mark.parametrize("arch, kw", [("dit_s_4", dict(hidden_size=32, depth=1, num_heads=2)), ("ddpmpp", {})])
def test_the_jvp_runs_through_the_image_networks_attention(arch, kw):
    """Forward-mode AD has no rule for the fused attention kernels the DiT and DDPM++ call: the target pass must
    run on the math kernel (this failed with NotImplementedError before), and its JVP matches a central difference."""
    from imm import nets

    if arch == "ddpmpp":
        kw = dict(model_channels=16, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[8])
    torch.manual_seed(0)
    net = nets.build(arch, (1, 16, 16), 3, 0, **kw)
    obj = make(ratio=1.0, label_dropout=0.1, num_classes=3)
    x, labels = torch.randn(4, 1, 16, 16) * 0.5, torch.randint(0, 3, (4,))
    draws = obj.draw(x, labels, torch.Generator().manual_seed(0))
    loss, _ = obj.loss(net, x, draws)
    loss.backward()
    assert torch.isfinite(loss)
    t, r = draws.times
    z = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * draws.noise
    v = draws.noise - x
    got = obj.target_velocity(net, z, v, t, r, draws.labels_student, None)
    u = u_of(obj, net.double(), net_dtype=torch.float64)
    h, lab = 1e-3, draws.labels_student
    tb = (t - r)[:, None, None, None]
    fd = (u(z.double() + h * v, r, t + h, labels=lab) - u(z.double() - h * v, r, t - h, labels=lab)) / (2 * h)
    assert torch.allclose(got.double(), v - tb * fd, rtol=1e-3, atol=1e-4)
