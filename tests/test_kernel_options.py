"""The kernel options (imm/core/objective.py): the bandwidth normaliser kernel.ref_dim and the smoothed cusp
kernel.kappa, against hand-computed values, their limits (the paper's Laplace kernel) and the MMD's properties."""

import math

import pytest
import torch
from helpers import compose_cfg
from test_core_objective import DiracOracle, make_objective
from toynets import TinyNet

from imm.core import objective, schedules
from imm.core.util import ArgumentError
from imm.errors import ConfigError
from imm.validation import validate


def f64(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_reference_values():
    """x = (0, 0), y = (3, 4): ||x - y|| = 5, D = 2, w~ = 2."""
    x, y = torch.zeros(1, 1, 2), torch.tensor([[[3.0, 4.0]]])
    w = f64(2.0)
    laplace = math.exp(-2 * 5 / 2)  # the paper: exp(-w~ ||x - y|| / D)
    wide = math.exp(-2 * 5 / math.sqrt(2 * 3072))  # N = sqrt(D ref_dim) = 78.38
    smooth = math.exp(1.0 - math.sqrt(5.0**2 + 1.0))  # u = 5, h = 1: exp(h - sqrt(u^2 + h^2))
    assert float(objective.kernel_matrix(x, y, w)) == pytest.approx(laplace, rel=1e-6)
    assert float(objective.kernel_matrix(x, y, w, ref_dim=3072)) == pytest.approx(wide, rel=1e-6)
    assert wide == pytest.approx(0.88022, abs=1e-5)
    assert float(objective.kernel_matrix(x, y, w, width=f64(1.0))) == pytest.approx(smooth, rel=1e-6)
    assert smooth == pytest.approx(0.016589, abs=1e-6)
    assert objective.kernel_norm(2) == 2.0 and objective.kernel_norm(2, 3072) == pytest.approx(78.384, abs=1e-3)


def test_ref_dim_at_the_data_dimension_is_the_paper_kernel():
    g = torch.Generator().manual_seed(0)
    y1, y2 = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 6, generator=g)
    w = f64(2.0, 0.5, 7.0)
    assert torch.equal(objective.kernel_matrix(y1, y2, w, ref_dim=6), objective.kernel_matrix(y1, y2, w))
    # a wider kernel at D = 6 < ref_dim: every off-diagonal value grows toward 1
    assert (objective.kernel_matrix(y1, y2, w, ref_dim=3072) > objective.kernel_matrix(y1, y2, w)).all()


def test_smoothed_kernel_tends_to_the_laplace_kernel_as_the_width_vanishes():
    g = torch.Generator().manual_seed(1)
    y1, y2 = torch.randn(3, 4, 2, generator=g), torch.randn(3, 4, 2, generator=g)
    w = f64(2.0, 0.5, 7.0)
    laplace = objective.kernel_matrix(y1, y2, w)
    errors = [
        (objective.kernel_matrix(y1, y2, w, width=torch.full((3,), h, dtype=torch.float64)) - laplace).abs().max()
        for h in (1e-1, 1e-2, 1e-3)
    ]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3
    assert torch.equal(objective.kernel_matrix(y1, y2, w, width=torch.zeros(3, dtype=torch.float64)), laplace)


def test_cusp_width_for_euler_fm_and_its_general_form():
    t, s, r = f64(0.9, 0.5, 0.03), f64(0.1, 0.2, 0.01), f64(0.899, 0.49, 0.01)
    w = 1 / ((t - s) * 0.5)  # the paper's w~ for Euler-FM
    h = objective.cusp_width(2.0, "fm", w, r, t, D=2, norm=2.0)
    assert torch.allclose(h, 2.0 * (t - r) / (t - s))  # kappa (t - r)/(t - s) at D = N = 2
    assert float(h[2]) == pytest.approx(2.0)  # r = s (t small): the gap is x_t - x_s, h = kappa
    h8 = objective.cusp_width(2.0, "fm", w, r, t, D=8, norm=math.sqrt(8 * 3072))
    assert torch.allclose(h8, 2.0 * (t - r) / (t - s) * math.sqrt(2 * 8) / math.sqrt(8 * 3072))
    cos = schedules.get("cosine")
    gap = torch.sqrt(4 * ((cos.alpha(t) - cos.alpha(r)) ** 2 + (cos.sigma(t) - cos.sigma(r)) ** 2))
    assert torch.allclose(objective.cusp_width(1.5, "cosine", w, r, t, D=4, norm=4.0), 1.5 * w * 0.5 * gap / 4)
    assert (objective.cusp_width(0.0, "fm", w, r, t, D=2, norm=2.0) == 0).all()


@pytest.mark.parametrize("options", [{"ref_dim": 3072}, {"width": f64(0.3, 2.0)}, {"ref_dim": 50, "width": f64(1, 1)}])
def test_the_mmd_stays_an_mmd(options):
    """Zero for identical sets, positive, symmetric, and a positive semi-definite Gram matrix."""
    g = torch.Generator().manual_seed(2)
    y1, y2 = torch.randn(2, 4, 2, generator=g), torch.randn(2, 4, 2, generator=g) + 0.3
    w = f64(2.0, 5.0)
    assert torch.allclose(objective.mmd_terms(y1, y1, w, **options)[0], torch.zeros(2), atol=1e-6)
    m12 = objective.mmd_terms(y1, y2, w, **options)[0]
    assert (m12 > 0).all() and torch.allclose(m12, objective.mmd_terms(y2, y1, w, **options)[0], atol=1e-6)
    pts = torch.randn(1, 64, 2, generator=g)
    gram = objective.kernel_matrix(pts, pts, w[:1], **{k: v[:1] if k == "width" else v for k, v in options.items()})
    assert torch.linalg.eigvalsh(gram[0].double()).min() > -1e-6
    assert torch.allclose(torch.diagonal(gram[0]), torch.ones(64))  # k(x, x) = 1


def test_smoothed_cusp_has_a_gradient_that_vanishes_at_zero_distance():
    """Laplace: |dk/dy| = w~/N however close the pair (an unsquared L2 loss, whose minimiser is the
    geometric median); smoothed: ~ w~ u / (N h), a squared loss near zero (whose minimiser is the mean)."""
    w, h = f64(2.0), f64(0.5)
    for d in (1e-2, 1e-4):
        y = torch.tensor([[[d, 0.0]]], requires_grad=True)
        objective.kernel_matrix(y, torch.zeros(1, 1, 2), w).sum().backward()
        assert float(y.grad.norm()) == pytest.approx(2.0 / 2 * math.exp(-d), rel=1e-3)
        y.grad = None
        objective.kernel_matrix(y, torch.zeros(1, 1, 2), w, width=h).sum().backward()
        assert float(y.grad.norm()) == pytest.approx((2.0 / 2) * (d / 0.5), rel=1e-2)
    y = torch.zeros(3, 4, 2).requires_grad_()  # every particle identical: distances at the floor
    (objective.mmd_terms(y, y.detach(), f64(1, 1e8, 3), width=f64(0.1, 1, 0))[0].sum()).backward()
    assert torch.isfinite(y.grad).all()


@pytest.mark.parametrize("kernel", [{"kappa": 1.0}, {"ref_dim": 3072}, {"kappa": 4.0, "ref_dim": 3072}])
def test_the_objective_with_kernel_options(kernel):
    """The loss still vanishes at the true flow map, and its gradients are finite at the edge times."""
    x0 = torch.tensor([0.3, -0.2])
    obj = make_objective(eps=0.01, **kernel)
    loss, _ = obj(DiracOracle(obj.param, x0), x0.expand(32, 2).clone(), generator=torch.Generator().manual_seed(0))
    assert float(loss) < 1e-5
    wrong = DiracOracle(obj.param, x0 + 0.5)
    assert float(obj(wrong, x0.expand(32, 2).clone(), generator=torch.Generator().manual_seed(0))[0]) > 1e-4
    torch.manual_seed(0)
    net = TinyNet()
    times = [f64(0.5, 0.994), f64(0.5 - 1e-12, 0.1), f64(0.5 - 1e-13, 0.9939999)]  # s -> t; t = T
    loss, diag = obj(net, torch.randn(8, 2), times=times)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_paper_kernel_is_the_default_and_loss_unchanged_at_the_limits():
    """kernel.kappa=0 and kernel.ref_dim=D give the paper's loss bit for bit."""
    g = torch.Generator().manual_seed(3)
    y1, y2 = torch.randn(4, 4, 2, generator=g), torch.randn(4, 4, 2, generator=g)
    t, s, r = f64(0.9, 0.6, 0.3, 0.1), f64(0.5, 0.1, 0.2, 0.0), f64(0.89, 0.59, 0.29, 0.09)
    common = dict(schedule="fm", param="euler_fm", a=1, b=4)
    paper = objective.imm_loss_from_outputs(y1, y2, s, t, **common)
    assert torch.equal(objective.imm_loss_from_outputs(y1, y2, s, t, r=r, ref_dim=2, kappa=0.0, **common), paper)
    smooth = objective.imm_loss_from_outputs(y1, y2, s, t, r=r, kappa=1.0, **common)
    assert smooth != paper and torch.isfinite(smooth)


def test_kernel_option_errors():
    with pytest.raises(ArgumentError, match="applies to the Laplace kernel"):
        make_objective(kernel="rbf", kappa=1.0)
    with pytest.raises(ArgumentError, match="must be >= 0"):
        make_objective(kappa=-1.0)
    with pytest.raises(ArgumentError, match="positive dimension"):
        make_objective(ref_dim=0)
    for override, message in [
        ("kernel.kappa=-0.5", "kernel.kappa=-0.5 is out of range; kernel.kappa must be >= 0"),
        ("kernel.ref_dim=0", "kernel.ref_dim=0 is out of range; kernel.ref_dim must be >= 1"),
        ("kernel.function=rbf kernel.ref_dim=3072", "kernel.ref_dim=3072 applies to the Laplace kernel, not"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate(compose_cfg(*override.split()))
