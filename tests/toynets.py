"""Small networks with the project's call signature net(x, noise_t, noise_s, labels) for core tests."""

import torch
from torch import nn


class TinyNet(nn.Module):
    """G(x, t, s, y) = MLP([x, t/1000, s/1000, onehot(y)]): cheap, smooth, depends on every input."""

    def __init__(self, dim=2, num_classes=0, width=32, dropout=0.0):
        super().__init__()
        self.num_classes = num_classes
        self.net = nn.Sequential(
            nn.Linear(dim + 2 + num_classes + 1, width), nn.SiLU(), nn.Dropout(dropout), nn.Linear(width, dim)
        )

    def forward(self, x, noise_t, noise_s, labels=None):
        shape = x.shape
        feats = [x.flatten(1), noise_t[:, None] / 1000, noise_s[:, None] / 1000]
        if self.num_classes:
            if labels is None:
                labels = torch.full((x.shape[0],), self.num_classes, device=x.device)
            feats.append(nn.functional.one_hot(labels, self.num_classes + 1).to(x.dtype))
        else:
            feats.append(torch.zeros(x.shape[0], 1, dtype=x.dtype, device=x.device))
        return self.net(torch.cat(feats, 1)).reshape(shape)


class CountingNet(nn.Module):
    """Wraps a net and records the batch size of every call."""

    def __init__(self, net):
        super().__init__()
        self.inner, self.calls = net, []
        self.num_classes = getattr(net, "num_classes", 0)

    def forward(self, x, noise_t, noise_s, labels=None):
        self.calls.append(x.shape[0])
        return self.inner(x, noise_t, noise_s, labels)


class TinyRandomFeatures(nn.Module):
    """A two-layer conv net with fixed random weights (seed 0) that stands in for Inception-v3 so the FID code
    path runs offline in seconds (`eval.feature_net=toynets:TinyRandomFeatures`); its "FID" is not FID.

    Input uint8 [N, 3, H, W] (any H, W), output 32 features.
    """

    num_features = 32

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.body = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, self.num_features, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )

    def forward(self, x):
        return self.body(x.float() / 127.5 - 1)
