"""Networks G_θ for IMM, all with one call signature.

    net(x, noise_t, noise_s, labels=None, augment_labels=None) -> tensor with x's shape

- ``x``: the network input, already multiplied by c_in(t) by the caller (spec §1.3). Shape
  [B, D] for point data (``mlp``) or [B, C, H, W] for images (DiT presets, ``ddpmpp``).
- ``noise_t``, ``noise_s``: float tensors of shape [B], already scaled by the caller, e.g.
  1000*t and 1000*s, or 1000*t and 1000*(t - s) for the "stride" variant (spec §1.3, App. I.1).
  Each goes through its own sinusoidal embedding and 2-layer MLP; the two results are added.
- ``labels``: LongTensor [B] with values in [0, num_classes]. Index ``num_classes`` is the null
  label used for classifier-free guidance, so label tables have num_classes + 1 rows. The nets
  never drop labels themselves: the objective passes the null index for dropped labels.
  An unconditional net (num_classes == 0) requires labels=None and raises ValueError otherwise;
  a conditional net given labels=None uses the null label for the whole batch.
- ``augment_labels``: float tensor [B, augment_dim], the labels of EDM's augmentation
  (imm.data.augment; all zero for an un-augmented image), mapped by a linear layer without bias into
  the conditioning. A net built with augment_dim == 0 requires None; for the others None is the same
  as zeros, which is what sampling passes.

Every net has the attribute ``num_classes``. The output is in the computation dtype (under
``torch.autocast`` that is the autocast dtype), so the caller casts it back as needed.

Build nets with :func:`build`, which checks that the architecture fits the data shape.
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any

import torch
from torch import nn

from imm.nets.ddpmpp import DDPMpp
from imm.nets.dit import DIT_PRESETS, DiT
from imm.nets.embeddings import TIME_FEATURES
from imm.nets.mlp import MLP

__all__ = [
    "ARCHS",
    "DDPMpp",
    "DiT",
    "DIT_PRESETS",
    "IMAGE_ARCHS",
    "MLP",
    "POINT_ARCHS",
    "TIME_FEATURES",
    "build",
    "count_parameters",
    "count_parameters_of",
    "module_fingerprint",
]

POINT_ARCHS = ["mlp"]
IMAGE_ARCHS = [*DIT_PRESETS, "ddpmpp"]
ARCHS = [*POINT_ARCHS, *IMAGE_ARCHS]


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters (works on the meta device)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def _check_overrides(cls: type, name: str, fixed: set[str], overrides: dict[str, Any]) -> None:
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"} - fixed
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(
            f"Architecture '{name}' has no setting(s) {unknown}; the settings it accepts are {sorted(allowed)}."
        )


def build(name: str, shape: tuple[int, ...], num_classes: int = 0, augment_dim: int = 0, **overrides: Any) -> nn.Module:
    """Build network ``name`` for samples of shape ``shape``.

    Args:
        name: one of ``ARCHS``: "mlp", a DiT preset ("dit_s_2", ..., "dit_xl_2") or "ddpmpp".
        shape: one sample's shape, (D,) for point data or (C, H, W) for square images.
        num_classes: 0 for unconditional; otherwise the number of real classes (the null
            label, index num_classes, is added on top).
        augment_dim: the size of the augmentation labels the net takes (imm.data.augment.AUGMENT_DIM
            when training with augmentation), 0 for none.
        overrides: constructor arguments that replace the preset's fields, e.g.
            hidden_size=64, depth=2 for a tiny DiT, or model_channels=32 for a small DDPM++.

    Raises:
        ValueError: unknown name or setting, point data for an image net (or vice versa), or an
            image size the architecture cannot divide.
    """
    if name not in ARCHS:
        raise ValueError(f"Unknown architecture '{name}'; choose one of {ARCHS}.")
    shape = tuple(int(n) for n in shape)
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}.")
    if augment_dim < 0:
        raise ValueError(f"augment_dim must be >= 0, got {augment_dim}.")
    fixed = dict(num_classes=num_classes, augment_dim=augment_dim)

    if name == "mlp":
        if len(shape) != 1:
            raise ValueError(
                f"Architecture 'mlp' takes point data of shape (D,), but the samples have "
                f"shape {shape}; use a DiT preset or 'ddpmpp' for images."
            )
        _check_overrides(MLP, name, {"dim", *fixed}, overrides)
        return MLP(dim=shape[0], **fixed, **overrides)

    if len(shape) != 3:
        raise ValueError(
            f"Architecture '{name}' takes images of shape (C, H, W), but the samples have "
            f"shape {shape}; use 'mlp' for point data."
        )
    channels, height, width = shape
    if height != width:
        raise ValueError(f"Architecture '{name}' needs square images, but the samples are {height}x{width}.")

    if name == "ddpmpp":
        _check_overrides(DDPMpp, name, {"img_resolution", "in_channels", *fixed}, overrides)
        # DDPMpp itself rejects sizes its down-sampling cannot divide.
        return DDPMpp(img_resolution=height, in_channels=channels, **fixed, **overrides)

    _check_overrides(DiT, name, {"input_size", "in_channels", *fixed}, overrides)
    config = {**DIT_PRESETS[name], **overrides}
    if height % config["patch_size"]:
        raise ValueError(
            f"Architecture '{name}' uses {config['patch_size']}x{config['patch_size']} patches, "
            f"so the image size must be divisible by {config['patch_size']}, but the images "
            f"are {height}x{width}."
        )
    return DiT(input_size=height, in_channels=channels, **fixed, **config)


def count_parameters_of(name: str, shape: tuple[int, ...], **kwargs: Any) -> int:
    """Parameter count of an architecture without allocating it (built on the meta device)."""
    with torch.device("meta"):
        return count_parameters(build(name, shape, **kwargs))


def module_fingerprint(net: nn.Module) -> str:
    """Hash of the architecture name and all weights (a changed net invalidates what was keyed by it)."""
    h = hashlib.sha256(type(net).__qualname__.encode())
    for name, tensor in net.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
