"""FID with cached reference statistics, on top of torchmetrics' FrechetInceptionDistance.

torchmetrics supplies the Inception-v3 network (through torch-fidelity), the feature
accumulation and the Fréchet distance. What it lacks, and what lives here, is
(1) turning model outputs in [-1, 1] into the uint8 images FID is defined on,
(2) a reference-statistics cache on disk so the training set is featurised once,
(3) offline-friendly weight loading with one actionable error when the file is missing.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from imm.diskspace import skipped
from imm.nets import module_fingerprint

# Official TF Inception weights converted by torch-fidelity; this is the URL the library
# downloads from (torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3). It is
# repeated here so the error message can be built without importing the library.
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FEATURES = 2048
_CACHE_FORMAT = 1

ImageBatches = torch.Tensor | Iterable


class MissingInceptionWeights(FileNotFoundError):
    """The Inception-v3 weights file is not available and cannot be downloaded."""


def default_inception_weights_path() -> Path:
    """Where torch.hub (and hence torch-fidelity / torchmetrics) caches the Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[-1]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Maps float images in [-1, 1] to uint8 [0, 255]; uint8 input is returned unchanged.

    Same rounding as EDM/IMM when saving samples (x * 127.5 + 128, clip, truncate), so FID
    numbers are comparable with the reference implementations.
    """
    if images.dtype == torch.uint8:
        return images
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def _missing_weights_error(path: Path, reason: str) -> MissingInceptionWeights:
    """One sentence: where the weights were looked for, why they are not there, and the two fixes."""
    cache = default_inception_weights_path()
    where = "there" if path == cache else f"at {cache}"
    return MissingInceptionWeights(
        f"Inception-v3 weights for FID not found: {path} ({reason}); download {INCEPTION_URL} on a machine with"
        f" internet access and put it {where} (the torch.hub cache that torch-fidelity/torchmetrics look in; it"
        f" moves with $TORCH_HOME) or set eval.inception_weights=/path/to/{cache.name}."
    )


def _download_failure(exc: Exception) -> str:
    """For a URLError(gaierror(...)), "download failed: Name or service not known"; else the error's text."""
    reason = getattr(exc, "reason", exc)  # urllib wraps the socket's error
    return f"download failed: {getattr(reason, 'strerror', None) or reason}"


def resolve_inception_weights(inception_weights: str | os.PathLike | None, allow_download: bool = True) -> Path:
    """Returns a local path to the Inception weights, downloading into the hub cache if allowed."""
    if inception_weights is not None:
        path = Path(inception_weights).expanduser()
        if not path.is_file():
            raise _missing_weights_error(path, "eval.inception_weights points to a file that does not exist")
        return path

    path = default_inception_weights_path()
    if path.is_file():
        return path
    if not allow_download:
        raise _missing_weights_error(path, "not in the torch.hub cache and downloading is disabled")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The hash prefix in the file name is the sha256 prefix torch.hub verifies.
        torch.hub.download_url_to_file(INCEPTION_URL, str(path), hash_prefix="6726825d", progress=False)
    except Exception as exc:  # network errors come in many types (URLError, OSError, SSL, ...)
        raise _missing_weights_error(path, _download_failure(exc)) from exc
    return path


def load_inception(inception_weights: str | os.PathLike | None = None, allow_download: bool = True) -> nn.Module:
    """The FID Inception-v3 (pool3, 2048 features) as used by torchmetrics, from a local file.

    Expects uint8 images [N, 3, H, W]; resizes to 299 internally.
    """
    path = resolve_inception_weights(inception_weights, allow_download)
    from torchmetrics.image.fid import NoTrainInceptionV3

    # antialias=False selects torch-fidelity's TF1-compatible resize, as in the original FID
    # code; torchmetrics >= 1.5 defaults to antialiased resizing, which shifts the numbers.
    net = NoTrainInceptionV3(
        name="inception-v3-compat",
        features_list=[str(INCEPTION_FEATURES)],
        feature_extractor_weights_path=str(path),
        antialias=False,
    )
    net.num_features = INCEPTION_FEATURES
    return net


class _FeatureAdapter(nn.Module):
    """Feeds images of either convention to a feature net in the format it expects.

    Input: float images in [-1, 1] or uint8 in [0, 255], 1 or 3 channels. Images are always
    quantised to uint8 first (FID is defined on 8-bit images, as if saved to PNG); nets
    with ``input_format="float"`` then receive float32 in [0, 1].
    """

    def __init__(self, net: nn.Module, input_format: str):
        super().__init__()
        if input_format not in ("uint8", "float"):
            raise ValueError(f"feature_input must be 'uint8' or 'float', got {input_format!r}")
        self.net = net
        self.input_format = input_format
        if hasattr(net, "num_features"):
            self.num_features = net.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = to_uint8(images)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if self.input_format == "float":
            images = images.float() / 255.0
        return self.net(images)


def _iter_batches(images: ImageBatches, batch_size: int):
    """Yields image tensors from a tensor (split into batches) or an iterable of batches.

    Iterable items may be tensors or (images, labels, ...) tuples as DataLoaders yield.
    """
    if isinstance(images, torch.Tensor):
        yield from images.split(batch_size)
        return
    for item in images:
        yield item[0] if isinstance(item, (tuple, list)) else item


class FIDEvaluator:
    """FID of generated images against reference statistics that are computed once and cached.

    Args:
        feature_net: module mapping images [N, 3, H, W] to features [N, F]. None loads the
            FID Inception-v3 (2048-d pool features).
        inception_weights: local Inception weights file (config ``eval.inception_weights``);
            None uses the torch.hub cache, downloading there if ``allow_download``.
        reference_cache: file for the reference statistics (.pt). None keeps them in memory.
        device: where features are computed; None or "auto": CUDA if available.
        batch_size: images per feature-net call when a single tensor is passed.
        feature_input: what ``feature_net`` expects: "uint8" ([0, 255]) or "float" ([0, 1]).
            Inception always uses "uint8".
        probe_shape: image shape used once to infer F for a custom net without a
            ``num_features`` attribute.

    Note: statistics are not synchronised across processes (``sync_on_compute=False``);
    under DDP gather the images on one rank and evaluate there.
    """

    def __init__(
        self,
        feature_net: nn.Module | None = None,
        inception_weights: str | os.PathLike | None = None,
        reference_cache: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 250,
        feature_input: str = "uint8",
        allow_download: bool = True,
        probe_shape: tuple[int, int, int] = (3, 32, 32),
    ):
        from torchmetrics.image.fid import FrechetInceptionDistance

        if feature_net is None:
            feature_net = load_inception(inception_weights, allow_download)
            feature_input = "uint8"
        if device is None or device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.reference_cache = Path(reference_cache) if reference_cache is not None else None
        self.reference_source: str | None = None  # "cache" or "computed" once prepared

        feature_net.eval()
        self._feature_key = {
            "net": type(feature_net).__qualname__,
            "weights_sha256": module_fingerprint(feature_net),
            "feature_input": feature_input,
        }
        adapter = _FeatureAdapter(feature_net, feature_input)
        with torch.no_grad():
            # With normalize=True torchmetrics probes custom nets with float images (which
            # the adapter reads as [-1, 1]); it never rescales inputs to custom nets.
            self.metric = FrechetInceptionDistance(
                feature=adapter,
                reset_real_features=False,
                normalize=True,
                input_img_size=probe_shape,
                sync_on_compute=False,
            ).to(self.device)

    # ------------------------------------------------------------------ reference statistics
    def _cache_key(self, dataset_key: str) -> str:
        fields = {"format": _CACHE_FORMAT, "dataset": dataset_key, **self._feature_key}
        return json.dumps(fields, sort_keys=True)

    def _load_cache(self, key: str) -> bool:
        if self.reference_cache is None or not self.reference_cache.is_file():
            return False
        cached = torch.load(self.reference_cache, map_location="cpu", weights_only=True)
        if cached.get("key") != key:
            warnings.warn(
                f"FID reference cache {self.reference_cache} was built for {cached.get('key')}, "
                f"not {key}; recomputing and overwriting it.",
                stacklevel=3,
            )
            return False
        m = self.metric
        m.real_features_sum = cached["features_sum"].to(m.real_features_sum)
        m.real_features_cov_sum = cached["features_cov_sum"].to(m.real_features_cov_sum)
        m.real_features_num_samples = torch.tensor(cached["num_samples"], device=self.device)
        return True

    def _save_cache(self, key: str) -> None:
        m = self.metric
        payload = {
            "key": key,
            "features_sum": m.real_features_sum.cpu(),
            "features_cov_sum": m.real_features_cov_sum.cpu(),
            "num_samples": int(m.real_features_num_samples),
        }
        self.reference_cache.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename so concurrent jobs never read a half-written file.
        tmp = self.reference_cache.with_name(f"{self.reference_cache.name}.{os.getpid()}.tmp")
        with skipped("not cached, computed again next time", self.reference_cache, partial=tmp):  # a full disk
            torch.save(payload, tmp)
            os.replace(tmp, self.reference_cache)

    def prepare_reference(self, real_images: ImageBatches, dataset_key: str) -> None:
        """Loads the reference statistics from the cache, or computes and caches them.

        ``real_images``: a tensor [N, C, H, W] or an iterable of batches (e.g. a DataLoader,
        only iterated on a cache miss); float images are read as [-1, 1], uint8 as [0, 255].
        ``dataset_key`` must identify the data (name, split, size, resolution); together
        with the feature net's weights hash it decides whether the cache is valid.
        """
        key = self._cache_key(dataset_key)
        if self._load_cache(key):
            self.reference_source = "cache"
            return
        m = self.metric
        m.real_features_sum.zero_()
        m.real_features_cov_sum.zero_()
        m.real_features_num_samples.zero_()
        with torch.no_grad():
            for batch in _iter_batches(real_images, self.batch_size):
                m.update(batch.to(self.device), real=True)
        if int(m.real_features_num_samples) < 2:
            raise ValueError("the reference set needs at least 2 images")
        if self.reference_cache is not None:
            self._save_cache(key)
        self.reference_source = "computed"

    def load_reference(self, path: str | os.PathLike) -> None:
        """Reference statistics from a file instead of real images: the `mu` [F] and `sigma` [F, F] a .npz holds
        (EDM's fid-refs/cifar10-32x32.npz, ADM's VIRTUAL_imagenet256_labeled.npz), as papers measure FID. Raises
        ValueError (one sentence) for a file that holds no such statistics or another feature size."""
        import numpy as np

        path = Path(path).expanduser()
        try:
            with np.load(path, allow_pickle=False) as f:
                if "mu" not in f or "sigma" not in f:
                    raise ValueError(f"holds {', '.join(f.files) or 'nothing'}, not the arrays mu and sigma")
                mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
        except (OSError, ValueError) as e:
            raise ValueError(f"eval.fid_ref={path} cannot be used as FID reference statistics ({e}).") from None
        m = self.metric
        dim = m.real_features_sum.shape[0]
        if mu.shape != (dim,) or sigma.shape != (dim, dim):
            raise ValueError(
                f"eval.fid_ref={path} holds statistics of {list(mu.shape)} features (sigma {list(sigma.shape)}), but"
                f" the feature network gives {dim}; use reference statistics of the same network (Inception-v3: 2048)."
            )
        # torchmetrics keeps sums: with n = 2 its mean is sum / 2 and its covariance (cov_sum - 2 mu mu^T) / 1
        mu_t, sigma_t = torch.from_numpy(mu), torch.from_numpy(sigma)
        m.real_features_sum = (2 * mu_t).to(m.real_features_sum)
        m.real_features_cov_sum = (sigma_t + 2 * torch.outer(mu_t, mu_t)).to(m.real_features_cov_sum)
        m.real_features_num_samples = torch.tensor(2, device=self.device)
        self.reference_source = f"the file {path.resolve()}"

    # ------------------------------------------------------------------ evaluation
    def fid(self, generated_images: ImageBatches) -> float:
        """FID of images in [-1, 1] (a tensor [N, C, H, W] or an iterable of batches).

        Returns NaN (with a warning) if any image is non-finite, e.g. from a diverged model,
        rather than silently quantising NaNs to black pixels.
        """
        if self.reference_source is None:
            raise RuntimeError("call prepare_reference(real_images, dataset_key) before fid()")
        self.metric.reset()  # clears only the generated-image statistics
        with torch.no_grad():
            for batch in _iter_batches(generated_images, self.batch_size):
                if batch.is_floating_point() and not torch.isfinite(batch).all():
                    warnings.warn("non-finite values in generated images; FID is NaN", stacklevel=2)
                    return math.nan
                self.metric.update(batch.to(self.device), real=False)
            if int(self.metric.fake_features_num_samples) < 2:
                raise ValueError("FID needs at least 2 generated images")
            return float(self.metric.compute())
