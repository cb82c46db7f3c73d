"""EDM's non-leaking augmentation for CIFAR-10 (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Sec. 5 "Augmentation regularization"), after ADA's geometric pipeline
(Karras et al. 2020, "Training Generative Adversarial Networks with Limited Data"); docs/images.md.

Each training image is transformed before noise is added, and the network is told which transform was
applied through a label vector of AUGMENT_DIM = 9 numbers (docs/images.md has the layout). The labels
of the identity transform are all zero and sampling passes no labels (zero), so the model learns the
data as they are, conditioned on "not augmented": the augmentations do not leak into the samples.

The transforms and their strengths are EDM's CIFAR-10 configuration (its train.py: x-flip with a
probability multiplier of 1e8, y-flip, isotropic scaling, rotation, anisotropic scaling and fractional
translation with multiplier 1, no integer translation, no colour transforms), each switched on
independently per image with probability p (`data.augment_p`; EDM's CIFAR-10 value is 0.12):

- x-flip: mirror left-right with probability 1/2 whenever p > 0 (the multiplier 1e8 makes p * 1e8 >= 1).
- y-flip: with probability p, mirror top-bottom with probability 1/2.
- scale: with probability p, zoom by 2^(0.2 w), w ~ N(0, 1).
- rotation: with probability p, rotate by theta ~ U(-pi, pi).
- anisotropic scaling: with probability p, stretch by 2^(0.2 w) along an axis at angle r and by
  2^(-0.2 w) across it, w ~ N(0, 1); r ~ U(-pi, pi) with probability 1/2, else 0.
- translation: with probability p, shift by (0.125 W tx, 0.125 H ty) pixels, tx, ty ~ N(0, 1).

Flips are exact pixel permutations. The four geometric transforms are composed into one affine map (scale,
then rotation, then anisotropic scaling, then translation, about the image centre) and applied in one
resampling: the image is reflected beyond its border, interpolated at twice its resolution with a
Lanczos-3 half-band filter, sampled bilinearly at the mapped positions and low-pass filtered back down
(EDM/ADA do the same with a sym6 wavelet filter), so the transforms neither blur nor alias much. An image
whose geometric transforms were all switched off is not resampled: it stays bit-exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from imm.core.util import ArgumentError

Tensor = torch.Tensor

# The label vector the network is conditioned on (one row per image; all zero for the identity).
LABELS = (
    "xflip",  # 1 if mirrored left-right
    "yflip",  # 1 if mirrored top-bottom
    "scale",  # w: zoom 2^(0.2 w)
    "rotate_cos",  # cos(theta) - 1
    "rotate_sin",  # sin(theta)
    "aniso_cos",  # w cos(r): stretch 2^(0.2 w) along the axis at angle r
    "aniso_sin",  # w sin(r)
    "translate_x",  # tx: shift 0.125 W tx pixels
    "translate_y",  # ty: shift 0.125 H ty pixels
)
AUGMENT_DIM = len(LABELS)

SCALE_STD = 0.2  # log2 standard deviation of the isotropic scaling
ANISO_STD = 0.2  # log2 standard deviation of the anisotropic scaling
ANISO_ROTATE_PROB = 0.5  # probability that the anisotropic stretch axis is rotated (not horizontal)
TRANSLATE_STD = 0.125  # standard deviation of the translation, relative to the image size
LANCZOS_A = 3  # resampling kernel: Lanczos with 3 lobes

# Columns of the parameter rows that draw() returns and __call__ applies.
XFLIP, YFLIP, SCALE, ROTATE, ANISO, ANISO_ANGLE, TX, TY = range(8)


class Augment:
    """The augmentation at probability p: `draw` the parameters of n transforms, then apply them with
    `augment(x, params)` -> (augmented x, labels [n, AUGMENT_DIM]).

    Drawing and applying are apart so a caller can draw from its own generator (the training objective
    draws from its per-step generator, once per group of particles) and apply the same parameters to a
    slice of the batch later (a micro-batch).
    """

    def __init__(self, p: float):
        if not 0.0 <= p < 1.0:
            raise ArgumentError(
                f"{{augment_p}}={p} must be in [0, 1): at 1 no image keeps the all-zero labels that sampling uses"
                " (EDM uses 0.12 on CIFAR-10; 0 turns the augmentation off)",
                "augment_p",
            )
        self.p = float(p)

    def draw(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """Parameters of n independent transforms, float64 [n, 8] (columns XFLIP ... TY); zero means off, and
        a row of zeros is the identity.

        The draws always come in the same order, so one generator state gives the same transforms.
        """

        def uniform():
            return torch.rand(n, generator=generator, device=device, dtype=torch.float64)

        def normal():
            return torch.randn(n, generator=generator, device=device, dtype=torch.float64)

        def on(prob: float):  # a per-image switch, 1.0 or 0.0
            return (uniform() < prob).double()

        xflip = (uniform() < 0.5).double() * on(min(1.0, 1e8 * self.p))  # EDM's multiplier 1e8
        yflip = (uniform() < 0.5).double() * on(self.p)
        scale = normal() * on(self.p)
        rotate = (2 * uniform() - 1) * math.pi * on(self.p)
        aniso = normal() * on(self.p)
        aniso_angle = (2 * uniform() - 1) * math.pi * on(ANISO_ROTATE_PROB) * (aniso != 0)  # 0: no stretch
        tx, ty = normal(), normal()
        translate = on(self.p)
        return torch.stack([xflip, yflip, scale, rotate, aniso, aniso_angle, tx * translate, ty * translate], 1)

    def __call__(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """(x transformed by `params`, labels): x [n, C, H, W], params [n, 8] from `draw`."""
        return apply(x, params), labels(params)


def labels(params: Tensor) -> Tensor:
    """The network's augmentation labels [n, AUGMENT_DIM] (float32) for parameter rows [n, 8]."""
    p = params.double()
    theta, w, r = p[:, ROTATE], p[:, ANISO], p[:, ANISO_ANGLE]
    columns = [
        p[:, XFLIP],
        p[:, YFLIP],
        p[:, SCALE],
        torch.cos(theta) - 1,
        torch.sin(theta),
        w * torch.cos(r),
        w * torch.sin(r),
        p[:, TX],
        p[:, TY],
    ]
    return torch.stack(columns, 1).float()


def apply(x: Tensor, params: Tensor) -> Tensor:
    """x [n, C, H, W] with each image's flips, then its geometric transform (only images that have one are
    resampled), in x's dtype whatever the autocast around it (the clean data are not rounded to bf16)."""
    with torch.autocast(x.device.type, enabled=False):
        p = params.to(x.device)
        flip = p[:, [XFLIP, YFLIP]].bool()
        out = torch.where(flip[:, 0, None, None, None], x.flip(-1), x)
        out = torch.where(flip[:, 1, None, None, None], out.flip(-2), out)
        moved = (p[:, [SCALE, ROTATE, ANISO, TX, TY]] != 0).any(1).nonzero().flatten()
        if moved.numel():
            H, W = x.shape[-2:]
            inverse = torch.linalg.inv(geometric_matrix(p[moved], H, W))
            out = out.index_copy(0, moved, resample(out[moved], inverse))
    return out


def geometric_matrix(params: Tensor, H: int, W: int) -> Tensor:
    """The affine maps [n, 3, 3] (float64) that take a pixel position (column, row) measured from the image
    centre to where its content lands: translation . anisotropic scaling . rotation . scaling."""
    p = params.double()
    zero, one = torch.zeros_like(p[:, 0]), torch.ones_like(p[:, 0])

    def affine(a, b, c, d, e=zero, f=zero):  # [[a, b, e], [c, d, f], [0, 0, 1]] per image
        return torch.stack([a, b, e, c, d, f, zero, zero, one], 1).view(-1, 3, 3)

    def rotation(angle):
        return affine(angle.cos(), -angle.sin(), angle.sin(), angle.cos())

    s = torch.exp2(SCALE_STD * p[:, SCALE])
    a = torch.exp2(ANISO_STD * p[:, ANISO])
    r = p[:, ANISO_ANGLE]
    scale = affine(s, zero, zero, s)
    aniso = rotation(r) @ affine(a, zero, zero, 1 / a) @ rotation(-r)
    shift = affine(one, zero, zero, one, TRANSLATE_STD * W * p[:, TX], TRANSLATE_STD * H * p[:, TY])
    return shift @ aniso @ rotation(p[:, ROTATE]) @ scale


def resample(x: Tensor, inverse: Tensor) -> Tensor:
    """out(q) = x(inverse . q) for every pixel q of x [n, C, H, W]; `inverse` [n, 3, 3] maps output positions
    (column, row from the image centre) to input positions, beyond the border the image is mirrored.

    x is interpolated at twice its resolution (Lanczos-3, exact at the original pixels), sampled bilinearly
    at the mapped positions of a twice-as-dense output grid, and that grid is low-pass filtered and decimated
    to the output pixels (the same half-band filter), which keeps shrinking from aliasing.
    """
    n, C, H, W = x.shape
    if min(H, W) <= LANCZOS_A:
        raise ValueError(f"augmentation needs images larger than {LANCZOS_A}x{LANCZOS_A} pixels, got {H}x{W}")
    h = _half_band(x.device)
    dense = _upsample2(x, h)  # [n, C, 2H - 1, 2W - 1]: positions 0, 1/2, ..., H - 1

    # Output positions at half-pixel spacing, with the filter's reach (2A - 1 half-pixels) on each side.
    reach = 2 * LANCZOS_A - 1
    rows = torch.arange(-reach, 2 * (H - 1) + reach + 1, device=x.device, dtype=torch.float64) / 2
    cols = torch.arange(-reach, 2 * (W - 1) + reach + 1, device=x.device, dtype=torch.float64) / 2
    cy, cx = (H - 1) / 2, (W - 1) / 2
    v, u = torch.meshgrid(rows - cy, cols - cx, indexing="ij")
    q = torch.stack([u, v, torch.ones_like(u)], -1).reshape(-1, 3)  # [P, 3]
    src = torch.einsum("nij,pj->npi", inverse.to(x.device, torch.float64).expand(n, 3, 3), q)[..., :2]
    src_x = _reflect(src[..., 0] + cx, W)
    src_y = _reflect(src[..., 1] + cy, H)
    grid = torch.stack([src_x / (W - 1) * 2 - 1, src_y / (H - 1) * 2 - 1], -1)
    grid = grid.reshape(n, rows.numel(), cols.numel(), 2).to(x.dtype)
    sampled = F.grid_sample(dense, grid, mode="bilinear", padding_mode="border", align_corners=True)
    g = h / 2  # the decimation low-pass: unit gain
    return _filter(_filter(sampled, g, -1, stride=2), g, -2, stride=2)


def _half_band(device) -> Tensor:
    """Lanczos-3 taps at half-pixel offsets n/2, n = -5..5: sinc(n/2) sinc(n/6), 1 at n = 0 and 0 at the other
    even n (so interpolation keeps the original pixels), the odd taps normalised to sum to 1."""
    n = torch.arange(-(2 * LANCZOS_A - 1), 2 * LANCZOS_A, dtype=torch.float64)
    h = torch.sinc(n / 2) * torch.sinc(n / (2 * LANCZOS_A))
    odd = n.remainder(2) == 1
    h = torch.where(odd, h / h[odd].sum(), (n == 0).double())
    return h.to(device)


def _upsample2(x: Tensor, h: Tensor) -> Tensor:
    """x [n, C, H, W] interpolated at half-pixel spacing: [n, C, 2H - 1, 2W - 1], exact at the pixels."""
    margin = LANCZOS_A  # the half-band filter reaches 2.5 pixels; mirror 3 beyond each border
    padded = F.pad(x, (margin,) * 4, mode="reflect")
    n, C, Hp, Wp = padded.shape
    stuffed = padded.new_zeros(n, C, 2 * Hp - 1, 2 * Wp - 1)
    stuffed[..., ::2, ::2] = padded
    reach = h.numel() // 2
    dense = _filter(_filter(stuffed, h, -1, padding=reach), h, -2, padding=reach)
    H, W = x.shape[-2:]
    return dense[..., 2 * margin : 2 * (margin + H) - 1, 2 * margin : 2 * (margin + W) - 1]


def _filter(x: Tensor, taps: Tensor, dim: int, stride: int = 1, padding: int = 0) -> Tensor:
    """A symmetric 1-D filter along dim -1 (columns) or -2 (rows) of every channel."""
    C = x.shape[1]
    shape = (C, 1, 1, -1) if dim == -1 else (C, 1, -1, 1)
    kernel = taps.to(x.dtype).reshape(1, 1, -1).expand(C, 1, -1).reshape(shape)
    strides = (1, stride) if dim == -1 else (stride, 1)
    pads = (0, padding) if dim == -1 else (padding, 0)
    return F.conv2d(x, kernel, stride=strides, padding=pads, groups=C)


def _reflect(c: Tensor, size: int) -> Tensor:
    """Positions mirrored into [0, size - 1] about the first and last pixel (period 2 (size - 1))."""
    period = 2 * (size - 1)
    c = c.remainder(period)
    return torch.where(c > size - 1, period - c, c)
