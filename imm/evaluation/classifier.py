"""An image metric that runs on a CPU: a small classifier trained on the dataset's own training split.

For labelled image sets with a held-out split (digits, MNIST: imm.data's DataBundle.heldout):

- the Fréchet distance (FD) between the classifier's features of n samples and of the held-out
  split, read against its noise floor, the FD of n training images to the same held-out split (what
  a model that reproduced the training data would score), as the ratio fd_ratio<n> like the point
  metrics' energy_ratio;
- the class accuracy of class-conditional samples: the fraction the classifier assigns the class
  they were asked for, beside the classifier's own accuracy on the held-out split (its "floor").

The classifier (two conv layers, 64 features) trains in seconds with a fixed seed and is cached next
to the FID statistics (eval.fid_cache), keyed by the dataset and CLASSIFIER_VERSION.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from imm.diskspace import skipped
from imm.metrics import frechet_distance, gaussian_stats

log = logging.getLogger("imm.evaluation")

CLASSIFIER_VERSION = 1  # bump when the network or its training changes: cached classifiers are then retrained
FEATURES = 64
TRAIN_STEPS, BATCH, LR, SEED = 400, 128, 3e-3, 0


class SmallClassifier(nn.Module):
    """conv 3x3 (16) - ReLU - max-pool 2 - conv 3x3 (32) - ReLU - average-pool to 4x4 - linear (64
    features) - ReLU - linear (classes). Input: images [N, C, H, W] in [-1, 1]."""

    def __init__(self, channels: int, num_classes: int, features: int = FEATURES):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(32 * 16, features),
            nn.ReLU(),
        )
        self.head = nn.Linear(features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.float().clamp(-1.0, 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _images(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of an in-memory image set as float [-1, 1] and their labels."""
    data = dataset.data
    x = data.float() / 127.5 - 1.0 if data.dtype == torch.uint8 else data.float()
    return x, dataset.labels


def train_classifier(x: torch.Tensor, labels: torch.Tensor, num_classes: int) -> SmallClassifier:
    """TRAIN_STEPS Adam steps of batch BATCH from SEED; the global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        net = SmallClassifier(x.shape[1], num_classes)
        g = torch.Generator().manual_seed(SEED)
        opt = torch.optim.Adam(net.parameters(), lr=LR)
        for _ in range(TRAIN_STEPS):
            rows = torch.randint(len(x), (BATCH,), generator=g)
            loss = nn.functional.cross_entropy(net(x[rows]), labels[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval().requires_grad_(False)


@torch.no_grad()
def _batched(fn, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    return torch.cat([fn(chunk) for chunk in x.split(batch)])


class ClassifierMetric:
    """The classifier of a bundle's training split and the floors at n samples (see the module doc).

    `cache_file`: where the classifier's weights are kept (None: trained every time).
    """

    def __init__(self, bundle, n: int, cache_file=None, dataset_key: str = ""):
        if bundle.heldout is None or not bundle.num_classes:
            raise ValueError(f"the classifier metric needs labelled images with a held-out split, not {bundle.name}")
        x_train, y_train = _images(bundle.train)
        x_held, y_held = _images(bundle.heldout)
        self.n = min(int(n), len(x_train))
        self.net = self._load_or_train(x_train, y_train, bundle.num_classes, cache_file, dataset_key)
        features = _batched(self.net.features, x_held)
        self.reference = gaussian_stats(features)
        logits = _batched(self.net.head, features)
        train_rows = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(SEED))[: self.n]
        self.floor = {
            "fd": self.fd(_batched(self.net.features, x_train[train_rows])),
            "accuracy": (logits.argmax(1) == y_held).double().mean().item(),
        }
        self.n_heldout = len(x_held)

    @staticmethod
    def _load_or_train(x, labels, num_classes: int, cache_file, dataset_key: str) -> SmallClassifier:
        key = json.dumps({"version": CLASSIFIER_VERSION, "dataset": dataset_key, "steps": TRAIN_STEPS, "seed": SEED})
        net = SmallClassifier(x.shape[1], num_classes)
        if cache_file is not None and Path(cache_file).is_file():
            cached = torch.load(cache_file, map_location="cpu", weights_only=True)
            if cached.get("key") == key:
                net.load_state_dict(cached["state_dict"])
                return net.eval().requires_grad_(False)
        net = train_classifier(x, labels, num_classes)
        if cache_file is not None:
            path = Path(cache_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # concurrent jobs never read half a file
            with skipped("not cached, trained again next time", path, partial=tmp):  # a full disk
                torch.save({"key": key, "state_dict": net.state_dict()}, tmp)
                os.replace(tmp, path)
                log.info("trained the evaluation classifier (%d steps) and cached it in %s", TRAIN_STEPS, path)
        return net

    def fd(self, features: torch.Tensor) -> float:
        """The Fréchet distance of `features` [n, F] to the held-out split's."""
        return frechet_distance(*gaussian_stats(features), *self.reference)

    @torch.no_grad()
    def results(self, samples: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        """{fd, fd_ratio, accuracy (class-conditional samples only)} of samples [n, C, H, W] in [-1, 1]."""
        features = _batched(self.net.features, samples.float())
        fd = self.fd(features)
        out = {"fd": fd, "fd_ratio": fd / max(self.floor["fd"], 1e-12)}
        if labels is not None and (labels < self.net.head.out_features).all():
            predicted = _batched(self.net.head, features).argmax(1)
            out["accuracy"] = (predicted == labels.to(predicted.device)).double().mean().item()
        return out
