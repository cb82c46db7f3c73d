"""The image metric that runs on a CPU (imm/evaluation/classifier.py): the Fréchet distance against reference
values, the classifier of digits' training split (trained once, cached), its floors, and the evaluate command."""

import math

import pytest
import torch
from test_evaluate_cmd import evaluate

from imm.errors import ConfigError
from imm.evaluation import classifier as classifier_mod
from imm.evaluation.classifier import ClassifierMetric
from imm.evaluation.evaluator import fid_cache_file, fid_dataset_key
from imm.metrics import frechet_distance, gaussian_stats

pytestmark = pytest.mark.usefixtures("single_thread")


def test_frechet_distance_reference_values():
    # 1-D: (mu1 - mu2)^2 + (s1 - s2)^2 = 1 + 1 for N(0, 1) and N(1, 4)
    assert frechet_distance([0.0], [[1.0]], [1.0], [[4.0]]) == pytest.approx(2.0)
    # diagonal covariances: the sum over dimensions
    assert frechet_distance([0, 0], torch.diag(torch.tensor([1.0, 9.0])), [3, 0], torch.eye(2)) == pytest.approx(
        9 + 0 + 4
    )
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(6, 6, generator=g, dtype=torch.float64)
    c1, c2 = a @ a.T + 0.1 * torch.eye(6), b @ b.T + 0.1 * torch.eye(6)  # not commuting
    mu = torch.randn(6, generator=g, dtype=torch.float64)
    assert frechet_distance(mu, c1, mu, c1) == pytest.approx(0.0, abs=1e-8)
    scipy_linalg = pytest.importorskip("scipy.linalg")
    cross = scipy_linalg.sqrtm((c1 @ c2).numpy()).real.trace()
    expected = float(mu.square().sum() + c1.trace() + c2.trace() - 2 * cross)
    assert frechet_distance(torch.zeros(6), c1, mu, c2) == pytest.approx(expected, rel=1e-8)
    mean, cov = gaussian_stats(torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]))
    assert mean.tolist() == [2.0, 3.0] and cov.tolist() == [[4.0, 4.0], [4.0, 4.0]]


@pytest.fixture(scope="module")
def digits_metric(classifier_cache):
    """digits' classifier metric, cached where the Evaluator looks (eval.fid_cache=cache.parent)."""
    cache_dir, bundle, metric = classifier_cache
    return bundle, metric, fid_cache_file(cache_dir, fid_dataset_key(bundle), "classifier")


def test_the_classifier_and_its_floors(digits_metric):
    bundle, metric, cache = digits_metric
    assert metric.n == len(bundle.train) == 1438 and metric.n_heldout == 359  # n capped at the training split
    assert metric.floor["accuracy"] > 0.9  # on the held-out split it never trained on
    assert metric.floor["fd"] > 0
    x, labels = bundle.train.data, bundle.train.labels
    same = metric.results(x, labels)  # the training split itself: exactly the floor's comparison
    assert same["fd_ratio"] == pytest.approx(1.0, rel=1e-6) and same["accuracy"] > 0.95
    noise = metric.results(0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)), labels)
    assert noise["fd_ratio"] > 20 and noise["accuracy"] < 0.3
    wrong = metric.results(x, (labels + 1) % 10)  # right images, asked for the wrong class
    assert wrong["accuracy"] < 0.1 and wrong["fd_ratio"] == same["fd_ratio"]
    assert "accuracy" not in metric.results(x, torch.full_like(labels, 10))  # the null label: unconditional


def test_the_classifier_is_cached(digits_metric, monkeypatch):
    bundle, metric, cache = digits_metric
    assert cache.is_file()
    train = classifier_mod.train_classifier
    monkeypatch.setattr(classifier_mod, "train_classifier", lambda *a: pytest.fail("retrained despite the cache"))
    again = ClassifierMetric(bundle, 5000, cache, fid_dataset_key(bundle))
    assert again.floor == metric.floor
    calls = []
    monkeypatch.setattr(classifier_mod, "train_classifier", lambda *a: calls.append(1) or train(*a))
    monkeypatch.setattr(classifier_mod, "TRAIN_STEPS", 5)  # another training recipe: the cache no longer fits
    other = ClassifierMetric(bundle, 100, cache.with_name("other.pt"), fid_dataset_key(bundle))
    assert calls == [1] and other.n == 100 and math.isfinite(other.floor["fd"])


def test_evaluate_without_fid_gives_the_classifier_metric(digits, digits_metric, tmp_path):
    cache = digits_metric[2].parent  # the classifier trained above
    results = evaluate(
        digits, tmp_path, "eval.fid=false", "eval.n_samples=40", "eval.steps=[1,2]", f"eval.fid_cache={cache}"
    )
    names = {f"evaluate/{m}_{n}step_w1.5" for m in ("fd", "fd_ratio40", "accuracy") for n in (1, 2)}
    assert set(results) == names | {
        "evaluate/fd_floor",
        "evaluate/accuracy_floor",
        "evaluate/nfe_1step_w1.5",
        "evaluate/nfe_2step_w1.5",
    }
    assert all(results[f"evaluate/fd_ratio40_{n}step_w1.5"] > 1 for n in (1, 2))  # 4 training steps
    assert (tmp_path / "results.txt").read_text().count("fd_ratio40") == 1
    with pytest.raises(ConfigError, match="eval.fid=false leaves nothing to measure"):
        evaluate(digits, tmp_path, "eval.fid=false", "eval.classifier=false")
