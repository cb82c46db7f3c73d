"""2-D toy distributions (unscaled; build_dataset standardises them).

Each sampler draws from its own ``torch.Generator`` so a (name, n, seed) triple
always gives the same points, independent of the global RNG state.
"""

from __future__ import annotations

import math
import operator

import torch

from imm.errors import DataError

NAMES = ["checkerboard", "eight_gaussians", "moons", "rings"]


def make(name: str, n: int, seed: int) -> torch.Tensor:
    """Sample ``n`` points of toy distribution ``name``: float32 tensor ``[n, 2]``."""
    if name not in _SAMPLERS:
        raise DataError(f"Unknown toy dataset {name!r}; set data.name to one of {NAMES}.")
    if not _is_positive_int(n):
        raise DataError(
            f"Number of toy points must be a positive integer, got {n!r}; set data.n_train / data.n_heldout."
        )
    gen = torch.Generator().manual_seed(int(seed) % 2**63)
    return _SAMPLERS[name](int(n), gen).to(torch.float32).contiguous()


def _is_positive_int(n) -> bool:
    try:
        return operator.index(n) >= 1
    except TypeError:
        return False


def _checkerboard(n: int, gen: torch.Generator) -> torch.Tensor:
    # FFJORD's checkerboard: a 4x4 board on [-4, 4]^2 with 8 filled squares.
    # x picks a column; y picks one of the two squares of that column whose
    # colour matches, via the column's parity.
    x = torch.rand(n, generator=gen) * 4 - 2
    y = torch.rand(n, generator=gen) - torch.randint(0, 2, (n,), generator=gen) * 2
    y = y + torch.floor(x) % 2
    return torch.stack([x, y], dim=1) * 2


def _eight_gaussians(n: int, gen: torch.Generator) -> torch.Tensor:
    # FFJORD's 8 gaussians: centres on a circle of radius 4, std 0.5, then / sqrt(2).
    angles = torch.arange(8) * (2 * math.pi / 8)
    centres = 4 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    which = torch.randint(0, 8, (n,), generator=gen)
    points = centres[which] + 0.5 * torch.randn(n, 2, generator=gen)
    return points / math.sqrt(2)


def _moons(n: int, gen: torch.Generator, noise: float = 0.05) -> torch.Tensor:
    # Same geometry as sklearn.datasets.make_moons: an upper half circle and a
    # lower one shifted to interlock, equal halves, then shuffled.
    n_upper = n - n // 2
    t = torch.rand(n, generator=gen) * math.pi
    upper = torch.stack([torch.cos(t[:n_upper]), torch.sin(t[:n_upper])], dim=1)
    lower = torch.stack([1 - torch.cos(t[n_upper:]), 0.5 - torch.sin(t[n_upper:])], dim=1)
    points = torch.cat([upper, lower]) + noise * torch.randn(n, 2, generator=gen)
    return points[torch.randperm(n, generator=gen)]


def _rings(n: int, gen: torch.Generator, radii=(1.0, 2.0, 3.0), noise: float = 0.08) -> torch.Tensor:
    # Concentric circles; each point picks a ring with probability proportional
    # to its circumference so the density along every ring is the same.
    radii_t = torch.tensor(radii)
    ring = torch.multinomial(radii_t / radii_t.sum(), n, replacement=True, generator=gen)
    angle = torch.rand(n, generator=gen) * 2 * math.pi
    r = radii_t[ring] + noise * torch.randn(n, generator=gen)
    return torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1)


_SAMPLERS = {
    "checkerboard": _checkerboard,
    "eight_gaussians": _eight_gaussians,
    "moons": _moons,
    "rings": _rings,
}
