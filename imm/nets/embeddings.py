"""Time and label embeddings shared by the networks.

Every network takes two scalar time inputs per sample (the caller has already scaled them, e.g.
1000*t and 1000*s; spec §1.3) and an optional class label. Each time input gets sinusoidal
features followed by its own 2-layer MLP; the results are summed (IMM paper App. I.1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# The precision the time features are formed in (the nets' `time_features` option): float32, or float64 as the
# official IMM code forms them (its DiT casts the features to float32 for the MLP; its SongUNet, EDM's, runs the
# whole mapping network in float64). Sines of ~1000-valued arguments in float32 are off by up to ~6e-5.
TIME_FEATURES = {"float32": torch.float32, "float64": torch.float64}


def time_features_dtype(name: str) -> torch.dtype:
    if name not in TIME_FEATURES:
        raise ValueError(f"time_features={name!r} is not allowed; choose one of {', '.join(TIME_FEATURES)}.")
    return TIME_FEATURES[name]


def sinusoidal_embedding(
    x: torch.Tensor, dim: int, max_period: float = 10000.0, endpoint: bool = False, dtype=torch.float32
) -> torch.Tensor:
    """Sin/cos features of a batch of scalars: [B] -> [B, dim], laid out as [cos | sin], in `dtype`.

    Frequencies run geometrically from 1 down to 1/max_period. With endpoint=False (DDPM/DiT
    style) the last frequency stops one step short of 1/max_period; endpoint=True (EDM's
    PositionalEmbedding, used by DDPM++) reaches it exactly.
    """
    _check_even(dim)
    half = dim // 2
    # float32 (or float64) regardless of the input: the sampler may hand us float64 times, and under autocast
    # the sines of ~1000-valued arguments must not be taken in bf16/fp16.
    steps = torch.arange(half, dtype=dtype, device=x.device)
    steps = steps / max(half - (1 if endpoint else 0), 1)
    freqs = torch.exp(-math.log(max_period) * steps)
    args = x.to(dtype)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _check_even(dim: int) -> None:
    if dim % 2:
        raise ValueError(f"The sinusoidal embedding size must be even, got {dim}.")


class TimeEmbedder(nn.Module):
    """Scalar -> sinusoidal features -> Linear -> SiLU -> Linear (no activation at the end).

    The missing final activation is deliberate: the t and s embeddings are *added* after their
    MLPs, and the owning network applies its nonlinearity to the sum.
    """

    def __init__(
        self,
        out_dim: int,
        freq_dim: int = 256,
        max_period: float = 10000.0,
        endpoint: bool = False,
        features_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        _check_even(freq_dim)  # when the network is built (before a run starts), not at its first forward
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.endpoint = endpoint
        self.features_dtype = features_dtype
        self.mlp = nn.Sequential(nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        feats = sinusoidal_embedding(noise, self.freq_dim, self.max_period, self.endpoint, self.features_dtype)
        # Match the weights so that .double()/.half() models work without autocast.
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector, with one extra row (index num_classes) for the null label.

    The null row is what classifier-free guidance evaluates for the unconditional branch; the
    training objective trains it by passing index num_classes for dropped labels.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"LabelEmbedder needs num_classes >= 1, got {num_classes}.")
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table(labels)


def resolve_labels(
    labels: torch.Tensor | None, num_classes: int, batch_size: int, device: torch.device
) -> torch.Tensor | None:
    """Apply the label contract shared by all networks.

    Unconditional nets (num_classes == 0) accept only labels=None. Conditional nets treat
    labels=None as "null label for the whole batch", which is the unconditional branch of CFG.
    """
    if num_classes == 0:
        if labels is not None:
            raise ValueError(
                "This network is unconditional (num_classes=0) and cannot take labels; "
                "pass labels=None or build it with num_classes > 0."
            )
        return None
    if labels is None:
        return torch.full((batch_size,), num_classes, dtype=torch.long, device=device)
    if labels.shape != (batch_size,):
        raise ValueError(
            f"labels must have shape [{batch_size}] (one class index per sample), got {tuple(labels.shape)}."
        )
    return labels.long()


def check_time_inputs(noise_t: torch.Tensor, noise_s: torch.Tensor, batch_size: int) -> None:
    """Fail with a readable message when the time inputs are not one scalar per sample."""
    for name, value in (("noise_t", noise_t), ("noise_s", noise_s)):
        if value.shape != (batch_size,):
            raise ValueError(f"{name} must have shape [{batch_size}] (one value per sample), got {tuple(value.shape)}.")


def check_inputs(
    net: str,
    x: torch.Tensor,
    sample_shape: tuple,
    noise_t: torch.Tensor,
    noise_s: torch.Tensor,
    labels: torch.Tensor | None,
    num_classes: int,
    augment_labels: torch.Tensor | None = None,
    augment_dim: int = 0,
) -> torch.Tensor | None:
    """The call contract of every network: x [B, *sample_shape], one time value per sample for each
    time input, augmentation labels [B, augment_dim] or None, and the labels resolved by resolve_labels.
    Returns the labels to embed."""
    if tuple(x.shape[1:]) != tuple(sample_shape) or x.ndim != len(sample_shape) + 1:
        dims = ", ".join(map(str, sample_shape))
        raise ValueError(f"{net} expects x of shape [B, {dims}], got {list(x.shape)}.")
    check_time_inputs(noise_t, noise_s, x.shape[0])
    if augment_labels is not None:
        if augment_dim == 0:
            raise ValueError(
                f"This {net} was built without augmentation labels (augment_dim=0) and cannot take them; pass"
                " augment_labels=None or build it with augment_dim > 0."
            )
        if augment_labels.shape != (x.shape[0], augment_dim):
            raise ValueError(
                f"augment_labels must have shape [{x.shape[0]}, {augment_dim}], got {tuple(augment_labels.shape)}."
            )
    return resolve_labels(labels, num_classes, x.shape[0], x.device)


def augment_embedding(augment_dim: int, dim: int) -> nn.Linear | None:
    """EDM's map_augment: augmentation labels [B, augment_dim] -> [B, dim], added to the conditioning.

    Linear without a bias, so the all-zero labels of an un-augmented image add exactly nothing and
    augment_labels=None (sampling) is the same as zeros. None when augment_dim is 0.
    """
    if augment_dim == 0:
        return None
    layer = nn.Linear(augment_dim, dim, bias=False)
    nn.init.xavier_uniform_(layer.weight)
    return layer


def silu_sum(*parts: torch.Tensor | None) -> torch.Tensor:
    """SiLU of the sum of the non-None embeddings (the conditioning vector of every net)."""
    total = None
    for part in parts:
        if part is not None:
            total = part if total is None else total + part
    return F.silu(total)
