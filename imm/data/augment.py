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
- rotation: with probability p, rotate by theta ~ U(-pi, pi), counterclockwise as displayed (EDM's sign).
- anisotropic scaling: with probability p, stretch by 2^(0.2 w) along an axis at angle r (counterclockwise
  from the x axis as displayed) and by 2^(-0.2 w) across it, w ~ N(0, 1); r ~ U(-pi, pi) with
  probability 1/2, else 0.
- translation: with probability p, shift by (0.125 W tx, 0.125 H ty) pixels, tx, ty ~ N(0, 1).

Given the same draws, images and labels are EDM's AugmentPipe's to float precision (tests/test_augment.py
replays draws EDM made). Flips are exact pixel permutations. The four geometric transforms are composed
into one affine map (scale, then rotation, then anisotropic scaling, then translation, about the image
centre) and applied in one resampling, EDM's: the image is reflected beyond its border (one margin for all
the images resampled together, a single reflection at most, zeros beyond), upsampled 2x with the sym6
wavelet filter, sampled bilinearly at the mapped positions and filtered back down with sym6. Up- and
downsampling with an orthogonal wavelet filter are a perfect-reconstruction pair, so the identity and
integer translations are exact to float precision, and an image whose geometric transforms were all
switched off is simply not resampled (it stays bit-exact). Fractional positions do blur: the bilinear step
on the 2x grid and sym6's transition band lower the gain of a quarter-pixel translation to 0.97 at
1 rad/px and 0.86 at 2 rad/px, and a quarter turn or a mirror is not an exact pixel permutation (sym6 is
not symmetric); docs/images.md has the measurements.
"""

from __future__ import annotations

import functools
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

# The low-pass decomposition filter of the sym6 wavelet (Daubechies' least-asymmetric wavelet with 6
# vanishing moments; PyWavelets' `pywt.Wavelet("sym6").dec_lo`, the filter EDM resamples with). Orthonormal:
# sum h[k] h[k + 2m] is 1 for m = 0 and 0 otherwise, which makes 2x up- then downsampling with it exact.
SYM6 = (
    0.015404109327027373,
    0.0034907120842174702,
    -0.11799011114819057,
    -0.048311742585633,
    0.4910559419267466,
    0.787641141030194,
    0.3379294217276218,
    -0.07263752278646252,
    -0.021060292512300564,
    0.04472490177066578,
    0.0017677118642428036,
    -0.007800708325034148,
)
SYM6_REACH = len(SYM6) // 4  # EDM's Hz_pad: 3 pixels; the reflection margin keeps twice that in hand
LAG = len(SYM6) // 2 - 1  # 5: input pixel a is spread over 2x positions a + (t - LAG) / 2, t = 0..11 (EDM's)

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

    def __call__(self, x: Tensor, params: Tensor, margin=None) -> tuple[Tensor, Tensor]:
        """(x transformed by `params`, labels): x [n, C, H, W], params [n, 8] from `draw`; `margin`: the
        reflection margin (default: these n images' own, `margin(params, H, W)`)."""
        return apply(x, params, margin), labels(params)

    @staticmethod
    def margin(params: Tensor, H: int, W: int) -> tuple[int, int, int, int]:
        """EDM's one reflection margin for H x W images transformed by the rows `params`: the objective takes
        it from the global batch, so that every micro-batch and every process resamples with the same one."""
        return padding(torch.linalg.inv(geometric_matrix(params.double(), H, W)), H, W)


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


def apply(x: Tensor, params: Tensor, margin: tuple[int, int, int, int] | None = None) -> Tensor:
    """x [n, C, H, W] with each image's flips, then its geometric transform, in x's dtype whatever the
    autocast around it (the clean data are not rounded to bf16).

    Only images that have a geometric transform are resampled: resampling returns the others unchanged
    to float precision, so skipping them only saves time. The reflection margin is EDM's one margin for
    all n images, the untransformed ones included, as EDM resamples the whole batch; `margin` gives it
    instead (the training objective's: that of the global batch).
    """
    with torch.autocast(x.device.type, enabled=False):
        p = params.to(x.device)
        flip = p[:, [XFLIP, YFLIP]].bool()
        out = torch.where(flip[:, 0, None, None, None], x.flip(-1), x)
        out = torch.where(flip[:, 1, None, None, None], out.flip(-2), out)
        moved = (p[:, [SCALE, ROTATE, ANISO, TX, TY]] != 0).any(1).nonzero().flatten()
        if moved.numel():
            H, W = x.shape[-2:]
            inverse = torch.linalg.inv(geometric_matrix(p, H, W))
            margin = padding(inverse, H, W) if margin is None else margin
            out = out.index_copy(0, moved, resample(out[moved], inverse[moved], margin))
    return out


def geometric_matrix(params: Tensor, H: int, W: int) -> Tensor:
    """The affine maps [n, 3, 3] (float64) that take a pixel position (column, row) measured from the image
    centre to where its content lands: translation . anisotropic scaling . rotation . scaling.

    Angles turn counterclockwise as the image is displayed (rows going down), EDM's convention: EDM
    composes the inverse of rotation(-theta), and its stretch axis is rotation(-r) applied to the x axis,
    so its labels (cos theta - 1, sin theta, w cos r, w sin r) describe these same transforms.
    """
    p = params.double()
    zero, one = torch.zeros_like(p[:, 0]), torch.ones_like(p[:, 0])

    def affine(a, b, c, d, e=zero, f=zero):  # [[a, b, e], [c, d, f], [0, 0, 1]] per image
        return torch.stack([a, b, e, c, d, f, zero, zero, one], 1).view(-1, 3, 3)

    def rotation(angle):  # turns the x axis towards +y, which is clockwise on screen (rows go down)
        return affine(angle.cos(), -angle.sin(), angle.sin(), angle.cos())

    s = torch.exp2(SCALE_STD * p[:, SCALE])
    a = torch.exp2(ANISO_STD * p[:, ANISO])
    r = p[:, ANISO_ANGLE]
    scale = affine(s, zero, zero, s)
    aniso = rotation(-r) @ affine(a, zero, zero, 1 / a) @ rotation(r)
    shift = affine(one, zero, zero, one, TRANSLATE_STD * W * p[:, TX], TRANSLATE_STD * H * p[:, TY])
    return shift @ aniso @ rotation(-p[:, ROTATE]) @ scale


def padding(inverse: Tensor, H: int, W: int) -> tuple[int, int, int, int]:
    """EDM's reflection margins (left, top, right, bottom) in pixels for H x W images resampled with the
    maps `inverse` [n, 3, 3]: one margin for all n, how far the farthest image corner maps outside the
    image plus twice the filter's reach (6 pixels), at most H - 1 or W - 1 (a single reflection).

    EDM's choice, kept so our pixels are its pixels: an image's border values depend (slightly, through
    the zeros beyond the margin) on the largest margin among the images resampled with it.
    """
    cx, cy = (W - 1) / 2, (H - 1) / 2
    corners = torch.tensor([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], dtype=torch.float64)
    src = inverse.double().cpu() @ corners.T  # [n, 3, 4]: where the output's corners are taken from
    xy = src[:, :2].transpose(0, 1).flatten(1)  # [2, 4n]
    far = torch.cat([-xy, xy]).amax(1)  # how far left, up, right, down of the centre
    slack = 2 * SYM6_REACH
    margin = far + torch.tensor([slack - cx, slack - cy] * 2, dtype=torch.float64)
    margin = margin.clamp(min=0).minimum(torch.tensor([W - 1, H - 1] * 2, dtype=torch.float64))
    left, top, right, bottom = (int(m) for m in margin.ceil().tolist())
    return left, top, right, bottom


def resample(x: Tensor, inverse: Tensor, margin: tuple[int, int, int, int] | None = None) -> Tensor:
    """out(q) = x(inverse . q) for every pixel q of x [n, C, H, W]; `inverse` [n, 3, 3] maps output positions
    (column, row from the image centre) to input positions. EDM's resampling, in our own code:

    x is reflected beyond its border by `margin` (default `padding(inverse, H, W)`; zeros beyond),
    upsampled 2x with the sym6 wavelet filter, sampled bilinearly at the mapped positions of a 2x output
    grid and filtered back down with the same filter. sym6 is orthogonal, so up- and downsampling are a
    perfect-reconstruction pair: the identity and integer translations return x to float precision, and
    any blur comes only from the fractional part of the sampling positions (docs/images.md measures it).
    """
    n, C, H, W = x.shape
    left, top, right, bottom = padding(inverse, H, W) if margin is None else margin
    padded = F.pad(x, (left, right, top, bottom), mode="reflect")
    Hp, Wp = padded.shape[-2:]
    # [..., 1 + i, 1 + j] at padded position (i / 2, j / 2), in a frame of zeros (see _synthesis)
    dense = _synthesis(Hp, x) @ (padded @ _synthesis(Wp, x).T)

    # The 2x output grid: what the decimation of output pixels 0 .. size - 1 reads, positions j + (t - LAG)/2
    # for taps t = 0..11, the offsets at which the upsampling put the input pixels (so the pair cancels).
    def grid(size):
        return (torch.arange(2 * size + 2 * LAG, dtype=torch.float64, device=x.device) - LAG) / 2 - (size - 1) / 2

    m = inverse.to(x.device, torch.float64).expand(n, 3, 3)[:, :2, :, None, None]
    v, u = grid(H)[:, None], grid(W)
    src_x, src_y = (m[:, :, 0] * u + m[:, :, 1] * v + m[:, :, 2]).unbind(1)  # [n, 2H + 10, 2W + 10] each
    sampled = _bilinear(dense, 1 + 2 * (src_x + (W - 1) / 2 + left), 1 + 2 * (src_y + (H - 1) / 2 + top))
    return _analysis(H, x) @ sampled @ _analysis(W, x).T


def _synthesis(size: int, like: Tensor) -> Tensor:
    """[2 size + 3, size]: the synthesis half of sym6's filter bank along one axis, out[1 + m] = sum_a x[a]
    h[LAG + m - 2a] for m = 0 .. 2 size - 1 (EDM's zero-stuffing and convolution as a banded matrix: one
    matrix product beats a depthwise convolution on the CPU), between a zero row before and two after: the
    frame _bilinear reads where a position falls outside."""
    return _bank("synthesis", size).to(like.device, like.dtype)


def _analysis(size: int, like: Tensor) -> Tensor:
    """[size, 2 size + 2 LAG]: the analysis half, out[j] = sum_t h[t] x[2j + t]."""
    return _bank("analysis", size).to(like.device, like.dtype)


@functools.lru_cache(maxsize=64)
def _bank(half: str, size: int) -> Tensor:
    """The matrix of `_synthesis` or `_analysis` (float64, CPU; shared between calls, so read-only)."""
    h = torch.tensor(SYM6, dtype=torch.float64)
    if half == "synthesis":
        m, a = torch.arange(-1, 2 * size + 2)[:, None], torch.arange(size)[None, :]
        index = torch.where((m >= 0) & (m < 2 * size), LAG + m - 2 * a, -1)
    else:
        j, k = torch.arange(size)[:, None], torch.arange(2 * size + 2 * LAG)[None, :]
        index = k - 2 * j
    return torch.where((index >= 0) & (index < len(h)), h[index.clamp(0, len(h) - 1)], 0.0)


def _bilinear(x: Tensor, col: Tensor, row: Tensor) -> Tensor:
    """x [n, C, H, W] at fractional (column, row) indices [n, P, Q] (float64): [n, C, P, Q]. x's outer rows
    and columns must be zero (one before, two after): positions are clamped into that frame, so every
    corner is an element and one outside the image reads a zero.

    grid_sample would round the positions to x's dtype after normalising them by the image size (errors of
    a few 1e-6 pixels in float32, up to 3e-5 on white noise, as in EDM); here they stay float64 down to the
    weights, so a position on the grid takes that pixel exactly."""
    n, C, H, W = x.shape
    col, row = col.clamp(0, W - 2), row.clamp(0, H - 2)
    c0, r0 = col.floor(), row.floor()
    fc, fr = (col - c0).to(x.dtype)[:, None], (row - r0).to(x.dtype)[:, None]
    corner = (r0.long() * W + c0.long()).flatten(1)[:, None].expand(n, C, -1)
    flat = x.flatten(2)

    def at(offset):  # the corner `offset` elements on, read through a view that starts there
        return flat[..., offset:].gather(2, corner).view(n, C, *col.shape[1:])

    top, bottom = at(0).lerp(at(1), fc), at(W).lerp(at(W + 1), fc)
    return top.lerp(bottom, fr)
