import numpy as np
import pytest
import torch

from imm import metrics
from imm.metrics import (
    energy_distance,
    knn_precision_recall,
    noise_floor,
    point_metrics,
    sliced_wasserstein2,
)


def _gaussian(n, d=2, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift


def _pdist(a, b):
    return np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Forces many row chunks so the chunking logic is exercised on small inputs."""
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 37)


def test_energy_matches_bruteforce(tiny_blocks):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(23, 3)), rng.normal(size=(17, 3)) + 0.5
    expected = 2 * _pdist(x, y).mean() - _pdist(x, x).mean() - _pdist(y, y).mean()  # V-statistics
    assert energy_distance(x, y) == pytest.approx(expected, rel=1e-10)


def test_energy_near_zero_for_same_distribution_and_grows_with_shift():
    a, b = _gaussian(2000, seed=1), _gaussian(2000, seed=2)
    same = energy_distance(a, b)
    assert 0.0 < same < 5e-3  # the positive noise floor of two independent samples
    assert energy_distance(a, a) == pytest.approx(0.0, abs=1e-12)  # identical sets: exactly 0
    shifts = [energy_distance(a, b + torch.tensor([s, 0.0], dtype=torch.float64)) for s in (0.25, 0.5, 1.0)]
    assert shifts[0] > 10 * abs(same)
    assert shifts == sorted(shifts)


def test_sw2_of_translation_is_projected_shift_norm():
    x = _gaussian(1000)
    shift = torch.tensor([3.0, 4.0], dtype=torch.float64)
    # Projections of a translated copy differ by theta . shift, so SW2^2 = mean (theta . shift)^2
    # which is |shift|^2 / D = 12.5 in expectation over directions.
    value = sliced_wasserstein2(x, x + shift, n_projections=4096)
    assert value == pytest.approx(np.sqrt(12.5), rel=0.03)
    assert sliced_wasserstein2(x, x) == 0.0


def test_sw2_in_1d_equals_exact_w2_also_for_unequal_sizes():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(7, 1)), rng.normal(size=(5, 1)) + 1.0
    # In 1-D every unit direction is +-1, so SW2 is exactly W2 between the quantile functions.
    t = (np.arange(700_000) + 0.5) / 700_000  # fine grid; breakpoints i/7 and j/5 fall between points
    qx = np.sort(x[:, 0])[np.floor(t * 7).astype(int)]
    qy = np.sort(y[:, 0])[np.floor(t * 5).astype(int)]
    expected = np.sqrt(np.mean((qx - qy) ** 2))
    assert sliced_wasserstein2(x, y, n_projections=8) == pytest.approx(expected, rel=1e-6)


def test_sw2_unequal_sizes_duplicated_set_is_same_measure():
    x, y = _gaussian(300, seed=4), _gaussian(200, seed=5, scale=1.5)
    doubled = torch.cat([x, x])
    assert sliced_wasserstein2(doubled, y) == pytest.approx(sliced_wasserstein2(x, y), rel=1e-9)


def test_sw2_is_deterministic_per_seed():
    x, y = _gaussian(200, seed=6), _gaussian(200, seed=7, shift=0.3)
    assert sliced_wasserstein2(x, y, seed=1) == sliced_wasserstein2(x, y, seed=1)
    assert sliced_wasserstein2(x, y, seed=1) != sliced_wasserstein2(x, y, seed=2)


def _reference_precision_recall(real, fake, k):
    def radii(a):
        return np.sort(_pdist(a, a), axis=1)[:, k]  # column 0 is the self-distance

    precision = (_pdist(fake, real) <= radii(real)[None, :]).any(axis=1).mean()
    recall = (_pdist(real, fake) <= radii(fake)[None, :]).any(axis=1).mean()
    return precision, recall


def test_knn_precision_recall_matches_reference(tiny_blocks):
    rng = np.random.default_rng(8)
    real, fake = rng.normal(size=(60, 2)), rng.normal(size=(45, 2)) * 0.7 + 0.3
    p, r = knn_precision_recall(real, fake, k=3)
    p_ref, r_ref = _reference_precision_recall(real, fake, k=3)
    assert (p, r) == pytest.approx((p_ref, r_ref), abs=1e-12)


def test_knn_detects_under_and_over_dispersion():
    real = _gaussian(2000, seed=9)
    p_same, r_same = knn_precision_recall(real, _gaussian(2000, seed=10))
    assert p_same > 0.95 and r_same > 0.95
    # Shrunk samples all lie inside the data support but cover only its core.
    p_shrunk, r_shrunk = knn_precision_recall(real, _gaussian(2000, seed=10, scale=0.3))
    assert p_shrunk > 0.95 and r_shrunk < 0.6
    # Spread-out samples cover the data but many fall outside its support.
    p_wide, r_wide = knn_precision_recall(real, _gaussian(2000, seed=10, scale=3.0))
    assert p_wide < 0.6 and r_wide > 0.9


def test_point_metrics_and_noise_floor():
    data_a, data_b = _gaussian(1000, seed=11), _gaussian(1000, seed=12)
    floor = noise_floor(data_a, data_b)
    assert set(floor) == {"energy", "sw2", "precision", "recall"}
    assert floor == point_metrics(data_a, data_b)
    bad = point_metrics(_gaussian(1000, seed=13, scale=0.3), data_b)
    assert bad["energy"] > floor["energy"] + 0.05
    assert bad["sw2"] > 3 * floor["sw2"]
    assert bad["recall"] < floor["recall"] - 0.3


def test_point_metrics_are_the_same_to_the_last_bit_whatever_the_thread_count():
    # the trainer changes its torch thread count with the idle cores (imm/training/threads.py), so an
    # evaluation must not depend on it; 5000 points make blocks that torch splits among threads
    samples, heldout = _gaussian(5000, seed=14, scale=1.1), _gaussian(5000, seed=15)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append((point_metrics(samples, heldout), energy_distance(heldout, heldout[:2500])))
    finally:
        torch.set_num_threads(before)
    assert results[0] == results[1]


def test_input_validation():
    with pytest.raises(ValueError, match="dimension mismatch"):
        energy_distance(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"shape \[N, D\]"):
        sliced_wasserstein2(np.zeros(5), np.zeros((5, 1)))
    with pytest.raises(ValueError, match="k=5"):
        knn_precision_recall(np.random.rand(5, 2), np.random.rand(10, 2), k=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, y = _gaussian(500, seed=14), _gaussian(400, seed=15, scale=0.8)
    cpu = point_metrics(x, y)
    gpu = point_metrics(x.cuda(), y.cuda())
    for key in cpu:
        assert gpu[key] == pytest.approx(cpu[key], rel=1e-6, abs=1e-9)


def test_find_metric_takes_a_ratio_named_without_its_n():
    results = {"final/energy_ratio5k_1step": 1.0, "final/energy_ratio5k_2step": 2.0, "final/fid5k_2step_w1.5": 3.0}
    assert metrics.find_metric("final/energy_ratio_1step", results) == "final/energy_ratio5k_1step"
    assert metrics.find_metric("final/energy_ratio5k_2step", results) == "final/energy_ratio5k_2step"
    assert metrics.find_metric("final/fid_2step_w1.5", results) == "final/fid5k_2step_w1.5"
    assert metrics.find_metric("final/energy_ratio_4step", results) is None  # no such step count
    two = {"final/energy_ratio5k_1step": 1.0, "final/energy_ratio500_1step": 2.0}
    assert metrics.find_metric("final/energy_ratio_1step", two) is None  # ambiguous: say so rather than pick
