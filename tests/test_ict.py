"""iCT (imm/core/consistency.py) against the paper: the curriculum N(k), the Karras noise levels, the lognormal
index distribution, the pseudo-Huber constant, the boundary condition f(x, sigma_min) = x, the EDM frame on this
platform's interpolant, multistep consistency sampling, shared dropout masks; micro-batches equal one batch; and
2 gloo processes equal one process through launch.py."""

import math

import pytest
import torch
from helpers import launch
from test_accumulation import TINY as ACC_TINY
from test_accumulation import assert_same_weights, final_model, loss_and_grads, torchrun
from toynets import TinyNet

from imm.core import consistency, sampling
from imm.core.util import ArgumentError

EPS, T = consistency.t_range(0.002, 80.0)  # the paper's sigma_min, sigma_max (conf/loss/ict.yaml)


def make(eps=EPS, T=T, schedule="fm", **kw):
    par = consistency.Consistency(schedule, t_min=eps)
    return consistency.ICTObjective(par, eps=eps, T=T, **{"total_steps": 400_000, **kw})


# -- the paper's formulas ------------------------------------------------------------------------------
def test_curriculum_doubles_from_s0_to_s1():
    """N(k) = min(s0 2^floor(k/K'), s1) + 1, K' = floor(K / (log2 floor(s1/s0) + 1)): K = 400,000, s0 = 10,
    s1 = 1280 gives K' = 50,000 and N = 11, 21, ..., 1281 (Eq. 7)."""
    K_prime = math.floor(400_000 / (math.log2(1280 // 10) + 1))
    assert K_prime == 50_000
    for k in (0, 1, 49_999, 50_000, 99_999, 100_000, 200_000, 349_999, 350_000, 399_999, 10**7):
        expected = min(10 * 2 ** (k // K_prime), 1280) + 1
        assert consistency.discretization_steps(k, 400_000, 10, 1280) == expected
    assert [consistency.discretization_steps(50_000 * j, 400_000) for j in range(8)] == [
        11,
        21,
        41,
        81,
        161,
        321,
        641,
        1281,
    ]


def test_karras_sigmas_are_the_papers_noise_levels():
    sig = consistency.karras_sigmas(11, 0.002, 80.0, 7.0)
    for i in range(1, 12):  # the paper's index i = 1..N
        expected = (0.002 ** (1 / 7) + (i - 1) / 10 * (80.0 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
        assert sig[i - 1].item() == pytest.approx(expected, rel=1e-14)
    assert sig[0].item() == pytest.approx(0.002, rel=1e-14) and sig[-1].item() == pytest.approx(80.0, rel=1e-14)


def test_lognormal_index_probabilities():
    sig = consistency.karras_sigmas(21, 0.002, 80.0)
    p = consistency.lognormal_probs(sig, -1.1, 2.0)
    mass = [
        math.erf((math.log(sig[i + 1]) + 1.1) / (math.sqrt(2) * 2.0))
        - math.erf((math.log(sig[i]) + 1.1) / (math.sqrt(2) * 2.0))
        for i in range(20)
    ]
    assert torch.allclose(p, torch.tensor(mass, dtype=torch.float64) / sum(mass), rtol=1e-12, atol=0)
    # the draws follow it
    obj = make(total_steps=10)
    draws = obj.draw(torch.zeros(100_000, 1), generator=torch.Generator().manual_seed(0), step=3)
    sigmas, times, probs = obj.grid(3)
    index = torch.searchsorted(times, draws.times[0])
    freq = torch.bincount(index, minlength=len(probs)).double() / 100_000
    assert torch.allclose(freq, probs, atol=0.005)


def test_pseudo_huber_constant_and_distance():
    assert consistency.huber_c(3 * 32 * 32) == pytest.approx(0.00054 * math.sqrt(3072))
    assert consistency.huber_c(3072) == pytest.approx(0.03, abs=2e-4)  # "c = 0.03 for CIFAR-10"
    x = torch.randn(4, 3, 2)
    assert torch.equal(consistency.pseudo_huber(x, x, 0.03), torch.zeros(4))
    far = x + 100.0
    norm = (100.0**2 * 6) ** 0.5
    assert torch.allclose(consistency.pseudo_huber(far, x, 0.03), torch.full((4,), norm - 0.03), rtol=1e-6)


def test_boundary_condition_f_at_sigma_min_is_the_identity():
    """c_skip(sigma_min) = 1 and c_out(sigma_min) = 0 exactly, so g(x_{t_min}, t_min) = x_sigma_min (the VE sample
    x + sigma_min n) whatever the network: f(x, sigma_min) = x."""
    assert consistency.cm_c_skip(0.002, 0.002, 0.5).item() == 1.0
    assert consistency.cm_c_out(0.002, 0.002, 0.5).item() == 0.0
    par = consistency.Consistency("fm", t_min=EPS)
    assert par.g_c_out(EPS).item() == 0.0 and par.sigma_min == pytest.approx(0.002, rel=1e-12)
    x_ve = torch.randn(5, 3, dtype=torch.float64)
    x_t = par.schedule.alpha(EPS) * x_ve
    outs = [par.g(TinyNet(dim=3), x_t, torch.full((5,), EPS, dtype=torch.float64)) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])  # the network plays no part
    assert torch.allclose(outs[0], x_ve, rtol=1e-15, atol=0)


def test_the_edm_frame_on_the_platforms_interpolant():
    """x_t = alpha_t x_sigma with sigma = sigma_d eta(t): the network input c_in(t) x_t is EDM's x_sigma / sqrt(sigma^2
    + sigma_d^2), the objective's end times are exactly eps and T, and its weights are 1/(sigma_{i+1} - sigma_i)."""
    par = consistency.Consistency("fm", t_min=EPS)
    t = torch.tensor([0.01, 0.3, 0.9], dtype=torch.float64)
    sig = par.sigma_of(t)
    x_sigma = torch.randn(3, 2, dtype=torch.float64)
    x_t = par.schedule.alpha(t)[:, None] * x_sigma
    assert torch.allclose(par.c_in(t)[:, None] * x_t, x_sigma / torch.sqrt(sig**2 + 0.25)[:, None], rtol=1e-13)
    assert torch.allclose(par.t_of(sig), t, rtol=1e-13)
    obj = make()
    sigmas, times, _ = obj.grid(0)
    assert times[0].item() == EPS and times[-1].item() == T and len(times) == 11
    assert torch.allclose(par.sigma_of(times), sigmas, rtol=1e-12)
    draws = obj.draw(torch.zeros(64, 2), generator=torch.Generator().manual_seed(0), step=0)
    t_lo, t_hi, lam = draws.times
    i = torch.searchsorted(times, t_lo)
    assert torch.equal(times[i + 1], t_hi)  # adjacent noise levels
    assert torch.allclose(lam, 1.0 / (sigmas[i + 1] - sigmas[i]), rtol=1e-14)


def test_multistep_consistency_sampling_is_the_restart_sampler():
    """CM's multistep sampling (x = f(x_tau, tau); x_tau' = x + tau' z) is the restart sampler with the consistency
    function (at sigma_min = 0, where the paper's sqrt(tau^2 - sigma_min^2) is tau); 1 step is f(x_T, T)."""
    torch.manual_seed(0)
    par, net = consistency.Consistency("fm", t_min=0.0), TinyNet()
    noise = 0.5 * torch.randn(6, 2, dtype=torch.float64)
    grid = sampling.time_grid("uniform", 1, T=T, eps=0.0)
    one = sampling.sample(net, par, noise, grid, sampler="pushforward")
    assert torch.allclose(one, par.g(net, noise, torch.full((6,), T, dtype=torch.float64)), rtol=1e-12, atol=1e-12)
    grid = sampling.time_grid("uniform", 2, T=T, eps=0.0, two_step_eta=1.642)  # sigma = 0.821, iCT's 2-step level
    got = sampling.sample(net, par, noise, grid, sampler="restart", generator=torch.Generator().manual_seed(3))
    x = par.g(net, noise, torch.full((6,), T, dtype=torch.float64))
    tau = grid[1]
    z = torch.randn(noise.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x_ve = x + par.sigma_of(tau) * z  # the paper's re-noising, in EDM units
    expected = par.g(net, par.schedule.alpha(tau) * x_ve, torch.full((6,), tau.item(), dtype=torch.float64))
    assert par.sigma_of(tau).item() == pytest.approx(0.821)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)


class MaskNet(torch.nn.Module):
    """Outputs its dropout mask and records it."""

    def __init__(self):
        super().__init__()
        self.drop, self.masks = torch.nn.Dropout(0.5), []

    def forward(self, x, noise_t, noise_s, labels=None):
        self.masks.append(self.drop(torch.ones_like(x)))
        return self.masks[-1]


@pytest.mark.parametrize("share", [True, False])
def test_the_two_passes_share_dropout_masks(share):
    net, obj = MaskNet(), make(share_dropout=share)
    x = torch.randn(64, 8)
    obj.loss(net, x, obj.draw(x, generator=torch.Generator().manual_seed(0)))
    assert len(net.masks) == 2 and torch.equal(net.masks[0], net.masks[1]) == share


def test_the_teacher_is_the_online_network_without_gradient():
    torch.manual_seed(0)
    net, obj = TinyNet(), make()
    x = torch.randn(32, 2)
    loss, _ = obj.loss(net, x, obj.draw(x, generator=torch.Generator().manual_seed(0), step=123_456))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    with pytest.raises(ArgumentError, match="total_steps"):
        make(total_steps=0)


# -- gradient accumulation and DDP ---------------------------------------------------------------------
@pytest.mark.parametrize("micro", [4, 8, 16])
def test_micro_batches_give_the_loss_and_gradients_of_one_batch(micro):
    torch.manual_seed(0)
    net = TinyNet(num_classes=3)
    x, labels = torch.randn(32, 2), torch.randint(0, 3, (32,))
    obj = make(rank=1, world_size=2, label_dropout=0.3, num_classes=3)
    full_loss, full_grads = loss_and_grads(net, obj, x, labels, None)
    loss, grads = loss_and_grads(net, obj, x, labels, micro)
    assert torch.allclose(loss, full_loss, rtol=1e-6, atol=0)
    for g, g_full in zip(grads, full_grads, strict=True):
        assert torch.allclose(g, g_full, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    args = [*ACC_TINY, "loss=ict"]
    launch(tmp_path, *args, f"hydra.run.dir={tmp_path / 'one'}", check=True)
    two = torchrun(tmp_path, *args, f"hydra.run.dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_weights(final_model(tmp_path / "one"), final_model(tmp_path / "two"))
