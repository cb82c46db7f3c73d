"""Sample-based distances for low-dimensional (e.g. 2-D toy) distributions.

Every number here is noisy at finite n, so it is only meaningful next to
:func:`noise_floor`: the same metric between two independent samples of the data.

All functions accept numpy arrays or torch tensors of shape [N, D], run on the device
of the first argument (CPU or CUDA) in float64, and process pairwise distances in row
chunks so that a 5000 x 5000 comparison needs only a few tens of MB.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

# Pairwise-distance blocks hold at most this many entries (32 MB in float64).
_BLOCK_ELEMENTS = 1 << 22
# The k of the k-NN precision/recall, and so the fewest points a set may hold (a point's k-th nearest
# neighbour among the others): the held-out data and the samples of every point-data evaluation.
KNN_K = 5
MIN_POINTS = KNN_K + 1

ArrayLike = np.ndarray | torch.Tensor

# Metric families (the part of "eval/<family>_<N>step[_w<scale>]" before the step count) where lower
# is better: the training run tracks their best value per step count. A family may carry the sample
# count it was measured at (fid5k, energy_ratio5k, fd_ratio1438). Precision, recall and accuracy (higher
# is better), the floors, the energy's sd and the NFE are not tracked.
_LOWER_IS_BETTER = re.compile(r"(energy|sw2|fd)|(energy_ratio|fd_ratio|fid)\d+k?")
# The metric that picks a step count's best checkpoint, by preference: the one each kind of data has.
PRIMARY = ("energy_ratio", "fd_ratio", "fid")
_METRIC_NAME = re.compile(r"^[^/]+/(?P<family>.+?)_(?P<steps>\d+)step(?:_w(?P<guidance>[^_/]+))?$")
# Point data: below this many samples per evaluation the ED floor (about E|X - X'| (1/n + 1/m)) swamps
# a model's distance: its ratio keeps less than half of its excess over 1 at n = m = 5000
# (docs/results.md#how-many-samples).
MIN_POINT_SAMPLES = 2000


def metric_parts(name: str) -> tuple[str, int, str | None] | None:
    """("energy_ratio5k", 2, None) for eval/energy_ratio5k_2step, ("fid5k", 2, "1.5") for eval/fid5k_2step_w1.5;
    None for a name without a step count (eval/energy_floor, train/loss)."""
    m = _METRIC_NAME.match(name)
    return (m["family"], int(m["steps"]), m["guidance"]) if m else None


def lower_is_better(name: str) -> bool:
    """True for eval/energy_ratio5k_2step, eval/fid5k_2step_w1.5; False for eval/recall_1step, eval/energy_floor."""
    parts = metric_parts(name)
    return parts is not None and _LOWER_IS_BETTER.fullmatch(parts[0]) is not None


def find_metric(name: str, results) -> str | None:
    """`name` if `results` has it, else the one name of `results` that is `name` labelled with its n: the
    search's final/energy_ratio_1step finds final/energy_ratio5k_1step (None: absent or ambiguous)."""
    if name in results:
        return name
    m = re.fullmatch(r"(?P<head>.+?)_(?P<rest>\d+step(?:_w[^_/]+)?)", name)
    if m is None:
        return None
    pattern = re.compile(rf"{re.escape(m['head'])}\d+k?_{re.escape(m['rest'])}")
    found = [r for r in results if pattern.fullmatch(r)]
    return found[0] if len(found) == 1 else None


def primary_metrics(results: dict) -> dict[str, str]:
    """{"<N>step[_w<g>]": the name of its PRIMARY metric} for the step counts (and scales) in `results`."""
    found = {}
    for name in results:
        if (parts := metric_parts(name)) is None:
            continue
        family, steps, guidance = parts
        rank = next((i for i, p in enumerate(PRIMARY) if re.fullmatch(rf"{p}\d+k?", family)), None)
        key = f"{steps}step" + (f"_w{guidance}" if guidance else "")
        if rank is not None and (key not in found or rank < found[key][0]):
            found[key] = (rank, name)
    return {key: name for key, (_, name) in found.items()}


def _as_pair(x: ArrayLike, y: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Converts both inputs to float64 [N, D] tensors on a common device."""
    x = torch.as_tensor(x)
    device = x.device
    x = x.to(device=device, dtype=torch.float64)
    y = torch.as_tensor(y).to(device=device, dtype=torch.float64)
    for name, t in (("x", x), ("y", y)):
        if t.dim() != 2:
            raise ValueError(f"{name} must have shape [N, D], got {tuple(t.shape)}")
        if t.shape[0] < 2:
            raise ValueError(f"{name} needs at least 2 samples, got {t.shape[0]}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: x has D={x.shape[1]}, y has D={y.shape[1]}")
    return x, y


def _row_chunks(n_rows: int, n_cols: int):
    """Yields row slices whose [rows, n_cols] distance block stays within the budget."""
    step = max(1, _BLOCK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _sum_pairwise_distances(a: torch.Tensor, b: torch.Tensor) -> float:
    """The sum of all |a_i - b_j|, the same to the last bit whatever torch's thread count: each row is summed
    whole (a full-block sum is split among the threads, and the order changes the rounding) and the row sums
    are added exactly (math.fsum)."""
    row_sums = [torch.cdist(a[rows], b).sum(dim=1) for rows in _row_chunks(a.shape[0], b.shape[0])]
    return math.fsum(torch.cat(row_sums).tolist())


@torch.no_grad()
def energy_distance(x: ArrayLike, y: ArrayLike) -> float:
    """Energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'| (Euclidean), returned as D^2, not D.

    All three means are over every pair, diagonals included (V-statistics), so the estimate is
    never negative and identical sets give exactly 0. Two independent samples of one distribution
    give a small positive value, about E|X-X'| (1/n + 1/m): that is the noise floor every model
    score is read against (spec section 8), and it must be positive for the ratio to mean anything.
    """
    x, y = _as_pair(x, y)
    n, m = x.shape[0], y.shape[0]
    xy = _sum_pairwise_distances(x, y) / (n * m)
    xx = _sum_pairwise_distances(x, x) / (n * n)
    yy = _sum_pairwise_distances(y, y) / (m * m)
    return 2.0 * xy - xx - yy


def _w2_squared_1d_sorted(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Squared W2 between empirical 1-D measures, for each column of sorted [N, P], [M, P].

    In 1-D, W2^2 = int_0^1 (Qx(t) - Qy(t))^2 dt with Qx, Qy the (step) quantile functions.
    Both are constant between the merged breakpoints {i/N} U {j/M}, so evaluating them at
    interval midpoints gives the exact integral for any N, M (no interpolation error).
    """
    n, m = xs.shape[0], ys.shape[0]
    if n == m:
        return (xs - ys).pow(2).mean(dim=0)
    device = xs.device
    breaks = (
        torch.cat(
            [
                torch.arange(n + 1, device=device, dtype=torch.float64) / n,
                torch.arange(m + 1, device=device, dtype=torch.float64) / m,
            ]
        )
        .sort()
        .values
    )
    widths = breaks[1:] - breaks[:-1]  # zero-width duplicates contribute nothing
    mids = 0.5 * (breaks[1:] + breaks[:-1])
    ix = (mids * n).floor().long().clamp_(0, n - 1)
    iy = (mids * m).floor().long().clamp_(0, m - 1)
    return (widths[:, None] * (xs[ix] - ys[iy]).pow(2)).sum(dim=0)


@torch.no_grad()
def sliced_wasserstein2(x: ArrayLike, y: ArrayLike, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced W2: sqrt of the mean, over random unit directions, of the squared 1-D W2.

    Unequal sample sizes are handled exactly via the merged quantile grid. The directions
    are drawn from a CPU generator seeded with ``seed`` so results do not depend on the
    device or on the global RNG state.
    """
    x, y = _as_pair(x, y)
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], n_projections, generator=gen, dtype=torch.float64)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(x.device)
    xs = (x @ theta).sort(dim=0).values
    ys = (y @ theta).sort(dim=0).values
    return math.sqrt(_w2_squared_1d_sorted(xs, ys).mean().item())


def _knn_radii(points: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour within the same set."""
    if k >= points.shape[0]:
        raise ValueError(f"k={k} needs more than k samples per set, got {points.shape[0]}")
    radii = torch.empty(points.shape[0], dtype=points.dtype, device=points.device)
    for rows in _row_chunks(points.shape[0], points.shape[0]):
        d = torch.cdist(points[rows], points)
        # k+1 smallest because each point's distance to itself (0) is among them.
        radii[rows] = d.topk(k + 1, dim=1, largest=False).values[:, -1]
    return radii


def _fraction_covered(queries: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of queries inside at least one ball (centers[i], radii[i])."""
    inside = 0
    for rows in _row_chunks(queries.shape[0], centers.shape[0]):
        d = torch.cdist(queries[rows], centers)
        inside += (d <= radii[None, :]).any(dim=1).sum().item()
    return inside / queries.shape[0]


@torch.no_grad()
def knn_precision_recall(real: ArrayLike, fake: ArrayLike, k: int = KNN_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019).

    Each set's support is estimated as the union of balls reaching each sample's k-th
    nearest neighbour in that set. Precision is the fraction of fake samples inside the
    real support (are samples realistic?); recall the fraction of real samples inside the
    fake support (is all of the data covered?). Under-dispersed samples (modes shrunk into
    blobs) keep precision high while recall drops, which energy distance barely shows.
    """
    real, fake = _as_pair(real, fake)
    precision = _fraction_covered(fake, real, _knn_radii(real, k))
    return precision, knn_recall(real, fake, k)


@torch.no_grad()
def knn_recall(real: ArrayLike, fake: ArrayLike, k: int = KNN_K) -> float:
    """The recall of knn_precision_recall alone: the fraction of real samples inside the fake support."""
    real, fake = _as_pair(real, fake)
    return _fraction_covered(real, fake, _knn_radii(fake, k))


def point_metrics(
    samples: ArrayLike,
    heldout: ArrayLike,
    k: int = KNN_K,
    n_projections: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    """All point-cloud metrics of ``samples`` against held-out data.

    Returns {"energy", "sw2", "precision", "recall"}; lower is better for the first two,
    higher for the last two. Read them against :func:`noise_floor` at the same n.
    """
    precision, recall = knn_precision_recall(heldout, samples, k=k)
    return {
        "energy": energy_distance(samples, heldout),
        "sw2": sliced_wasserstein2(samples, heldout, n_projections=n_projections, seed=seed),
        "precision": precision,
        "recall": recall,
    }


def noise_floor(
    data_a: ArrayLike,
    data_b: ArrayLike,
    k: int = KNN_K,
    n_projections: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    """The best scores a perfect model could get: metrics between two independent data samples.

    Use the same sample sizes as for the model evaluation, since all metrics depend on n.
    """
    return point_metrics(data_a, data_b, k=k, n_projections=n_projections, seed=seed)


def gaussian_stats(features: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [F], covariance [F, F]) of features [n, F] in float64 (unbiased covariance, n - 1)."""
    f = torch.as_tensor(features).double()
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"features must have shape [n, F] with n >= 2, got {tuple(f.shape)}")
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)): the Fréchet (W2^2) distance of two Gaussians
    (the formula of FID). tr (cov1 cov2)^(1/2) = sum of sqrt(eigenvalues of cov1^(1/2) cov2 cov1^(1/2)),
    a symmetric PSD matrix, so the square roots are of clipped eigenvalues of symmetric matrices."""
    mu1, mu2, cov1, cov2 = (torch.as_tensor(v).double() for v in (mu1, mu2, cov1, cov2))
    e, v = torch.linalg.eigh(cov1)
    root1 = (v * e.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root1 @ cov2 @ root1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * cross)
