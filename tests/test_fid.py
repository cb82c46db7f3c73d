import math
import urllib.error

import pytest
import torch
from torch import nn

from imm.evaluation import fid as fid_module
from imm.evaluation.fid import (
    FIDEvaluator,
    MissingInceptionWeights,
    default_inception_weights_path,
    to_uint8,
)


class CountingConvNet(nn.Module):
    """Small random feature net (uint8 input) that records how many images it has seen."""

    def __init__(self, num_features: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, num_features, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.images_seen = 0

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        self.images_seen += x.shape[0]
        return self.body(x.float() / 127.5 - 1)


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 16, 16, generator=g) * 1.6 - 0.8).clamp(-1, 1)


@pytest.fixture
def reference():
    return _images(400)


def test_to_uint8_endpoints():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.999, 1.0, 7.0, -7.0])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255, 255, 0]
    u = torch.tensor([3, 250], dtype=torch.uint8)
    assert to_uint8(u) is u


def test_fid_against_itself_is_zero_and_grows_with_shift(reference):
    ev = FIDEvaluator(feature_net=CountingConvNet(), device="cpu", batch_size=64)
    ev.prepare_reference(reference, dataset_key="toy")
    shifted = [ev.fid((reference + s).clamp(-1, 1)) for s in (0.05, 0.1, 0.2, 0.4)]
    assert shifted == sorted(shifted) and shifted[0] > 0
    self_fid = ev.fid(reference)
    assert abs(self_fid) < 1e-3 * shifted[0]
    # Same images presented in a different batching (iterable of batches) give the same FID.
    assert ev.fid(list(reference.split(33))) == pytest.approx(self_fid, abs=1e-3 * shifted[0])


def test_noise_and_independent_sample(reference):
    ev = FIDEvaluator(feature_net=CountingConvNet(), device="cpu")
    ev.prepare_reference(reference, dataset_key="toy")
    independent = ev.fid(_images(400, seed=1))
    noisy = ev.fid((reference + 0.3 * torch.randn_like(reference)).clamp(-1, 1))
    assert noisy > 5 * independent


def test_reference_cache_written_and_reused(tmp_path, reference):
    cache = tmp_path / "ref" / "toy_stats.pt"
    net1 = CountingConvNet()
    ev1 = FIDEvaluator(feature_net=net1, reference_cache=cache, device="cpu")
    seen = net1.images_seen
    ev1.prepare_reference(reference, dataset_key="toy")
    assert ev1.reference_source == "computed" and cache.is_file()
    assert net1.images_seen - seen == len(reference)
    fake = _images(100, seed=2)
    expected = ev1.fid(fake)

    net2 = CountingConvNet()  # same weights, new instance
    ev2 = FIDEvaluator(feature_net=net2, reference_cache=cache, device="cpu")
    seen = net2.images_seen

    def unusable():
        raise AssertionError("reference data must not be read on a cache hit")
        yield  # pragma: no cover

    ev2.prepare_reference(unusable(), dataset_key="toy")
    assert ev2.reference_source == "cache"
    assert net2.images_seen == seen
    assert ev2.fid(fake) == pytest.approx(expected, rel=1e-6)


def test_cache_invalidated_by_dataset_key_or_weights(tmp_path, reference):
    cache = tmp_path / "stats.pt"
    FIDEvaluator(feature_net=CountingConvNet(), reference_cache=cache, device="cpu").prepare_reference(
        reference, dataset_key="toy"
    )
    ev = FIDEvaluator(feature_net=CountingConvNet(), reference_cache=cache, device="cpu")
    with pytest.warns(UserWarning, match="recomputing"):
        ev.prepare_reference(reference[:200], dataset_key="toy-half")
    assert ev.reference_source == "computed"

    other = CountingConvNet()
    with torch.no_grad():
        other.body[0].weight.add_(0.01)
    ev = FIDEvaluator(feature_net=other, reference_cache=cache, device="cpu")
    with pytest.warns(UserWarning, match="recomputing"):
        ev.prepare_reference(reference[:200], dataset_key="toy-half")
    assert ev.reference_source == "computed"


def test_dataloader_batches_grayscale_and_float_input():
    class FloatNet(nn.Module):
        def forward(self, x):
            assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and x.shape[1] == 3
            return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, 0, 0, 0]], dim=1)

    gray = _images(64)[:, :1]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(gray, torch.zeros(64)), batch_size=10)
    ev = FIDEvaluator(feature_net=FloatNet(), feature_input="float", device="cpu")
    ev.prepare_reference(loader, dataset_key="gray")
    assert int(ev.metric.real_features_num_samples) == 64
    assert abs(ev.fid(gray)) < 1e-6
    assert ev.fid(gray * 0.5) > 1e-3


def test_nan_images_give_nan_and_usage_errors(reference):
    ev = FIDEvaluator(feature_net=CountingConvNet(), device="cpu")
    with pytest.raises(RuntimeError, match="prepare_reference"):
        ev.fid(reference)
    ev.prepare_reference(reference, dataset_key="toy")
    bad = reference.clone()
    bad[3, 0, 0, 0] = float("nan")
    with pytest.warns(UserWarning, match="non-finite"):
        assert math.isnan(ev.fid(bad))
    with pytest.raises(ValueError, match="at least 2"):
        ev.fid(reference[:1])


# ---------------------------------------------------------------- missing Inception weights


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """Empty hub cache, and any download attempt fails as it would offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # a set_dir() elsewhere would bypass TORCH_HOME
    attempts = []

    def offline(url, dst, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch_home", attempts


def _assert_actionable(message):
    assert "eval.inception_weights" in message
    assert str(default_inception_weights_path()) in message
    assert fid_module.INCEPTION_URL in message


def test_missing_weights_explicit_path(empty_torch_home, tmp_path):
    missing = tmp_path / "nowhere" / "inception.pth"
    with pytest.raises(MissingInceptionWeights) as info:
        FIDEvaluator(inception_weights=str(missing), device="cpu")
    assert str(missing) in str(info.value)
    _assert_actionable(str(info.value))
    assert empty_torch_home[1] == []  # an explicit path never triggers a download


def test_missing_weights_default_location(empty_torch_home):
    torch_home, attempts = empty_torch_home
    expected = torch_home / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert default_inception_weights_path() == expected

    with pytest.raises(MissingInceptionWeights, match="downloading is disabled") as info:
        FIDEvaluator(device="cpu", allow_download=False)
    _assert_actionable(str(info.value))
    assert attempts == []

    with pytest.raises(MissingInceptionWeights, match="download failed") as info:
        FIDEvaluator(device="cpu")
    _assert_actionable(str(info.value))
    assert attempts == [fid_module.INCEPTION_URL]
    assert isinstance(info.value.__cause__, urllib.error.URLError)
    assert issubclass(MissingInceptionWeights, FileNotFoundError)


def _random_inception_weights(path):
    """A weights file with the real Inception-v3 layout but random values (no download)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path.parent.mkdir(parents=True, exist_ok=True)
    empty = path.with_name("empty.pt")
    torch.save({}, empty)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nn.Module, "load_state_dict", lambda self, state_dict, *a, **k: None)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    torch.save(net.state_dict(), path)


def test_inception_loads_from_local_file_without_download(empty_torch_home, tmp_path):
    _, attempts = empty_torch_home
    local = tmp_path / "weights" / "inception.pth"
    _random_inception_weights(local)
    ev = FIDEvaluator(inception_weights=str(local), device="cpu")
    with torch.no_grad():
        features = ev.metric.inception(_images(2))  # [-1, 1] floats, 16x16, resized internally
    assert features.shape == (2, fid_module.INCEPTION_FEATURES)

    # The same file in the torch.hub cache is found when no path is configured.
    _random_inception_weights(default_inception_weights_path())
    net = fid_module.load_inception(None, allow_download=False)
    assert net.num_features == fid_module.INCEPTION_FEATURES
    assert attempts == []
