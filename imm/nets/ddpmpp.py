"""DDPM++ U-Net (Song et al. 2021) as re-implemented by NVlabs/edm `SongUNet`, plus IMM's s input.

The IMM CIFAR-10 model (spec Table 5 notes) is SongUNet with the DDPM++ settings: 128 base
channels, channel_mult [2,2,2], 4 blocks per resolution, attention at 16x16, dropout 0.2,
positional time embedding, standard encoder/decoder, [1,1] resampling filter. IMM adds a second
time input s with its own 2-layer MLP: the t path (time features + label embedding -> MLP) and
the s path (time features -> MLP) are summed and then passed through SiLU (spec §1.3). With
augment_dim > 0, EDM's augmentation labels enter the t path like the class label (EDM's map_augment).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from imm.nets.embeddings import augment_embedding, check_inputs, sinusoidal_embedding, time_features_dtype


def _init_weight(weight: torch.Tensor, scale: float) -> None:
    # EDM's SongUNet init: xavier-uniform times a per-layer factor. Conv fans include the kernel
    # area, which is exactly what torch's xavier_uniform_ computes.
    nn.init.xavier_uniform_(weight)
    weight.data.mul_(scale)


# EDM scales the layers that end a residual branch by 1e-5 instead of exactly 0 ("init_zero"),
# so every block starts close to its skip path but gradients reach all weights from step one.
INIT_ZERO = 1e-5
INIT_ATTN = math.sqrt(0.2)


def _linear(cin: int, cout: int, scale: float = 1.0) -> nn.Linear:
    layer = nn.Linear(cin, cout)
    _init_weight(layer.weight, scale)
    nn.init.zeros_(layer.bias)
    return layer


def _num_groups(channels: int, max_groups: int = 32, min_channels_per_group: int = 4) -> int:
    """EDM's group count min(32, C/4), lowered until it divides C so tiny widths still work."""
    groups = max(1, min(max_groups, channels // min_channels_per_group))
    while channels % groups:
        groups -= 1
    return groups


def group_norm(channels: int, eps: float = 1e-6) -> nn.GroupNorm:
    return nn.GroupNorm(_num_groups(channels), channels, eps=eps)


class Conv2d(nn.Module):
    """3x3/1x1 convolution with optional 2x up/down-sampling by a fixed FIR filter (EDM)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[int] = (1, 1),
        init_scale: float = 1.0,
    ):
        super().__init__()
        assert not (up and down)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up, self.down = up, down
        if kernel:
            self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel))
            self.bias = nn.Parameter(torch.zeros(out_channels))
            _init_weight(self.weight, init_scale)
        else:  # a pure resampler (EDM allows kernel=0)
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        f = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum().square()
        self.register_buffer("resample_filter", f if (up or down) else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.resample_filter
        if f is not None:
            f = f.to(x.dtype)
            pad = (f.shape[-1] - 1) // 2
            filt = f.tile(x.shape[1], 1, 1, 1)
            if self.up:
                # [1,1] makes this nearest-neighbour upsampling; x4 restores the mean.
                x = F.conv_transpose2d(x, filt * 4, groups=x.shape[1], stride=2, padding=pad)
            else:
                # [1,1] makes this 2x2 average pooling.
                x = F.conv2d(x, filt, groups=x.shape[1], stride=2, padding=pad)
        if self.weight is not None:
            x = F.conv2d(x, self.weight, self.bias, padding=self.weight.shape[-1] // 2)
        return x


class UNetBlock(nn.Module):
    """EDM's UNetBlock as configured for DDPM++ (BigGAN-style residual block, optional attention).

    adaptive_scale=False (DDPM++) adds the embedding to the features before the second norm;
    adaptive_scale=True (ADM style) uses it as a per-channel scale and shift instead.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        dropout: float = 0.0,
        skip_scale: float = math.sqrt(0.5),
        resample_filter: Sequence[int] = (1, 1),
        adaptive_scale: bool = False,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale
        self.norm0 = group_norm(in_channels)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = _linear(emb_channels, out_channels * (2 if adaptive_scale else 1))
        self.norm1 = group_norm(out_channels)
        self.conv1 = Conv2d(out_channels, out_channels, 3, init_scale=INIT_ZERO)
        self.skip = None
        if out_channels != in_channels or up or down:
            # DDPM++ uses resample_proj=True: the skip path always has a 1x1 projection.
            self.skip = Conv2d(in_channels, out_channels, 1, up=up, down=down, resample_filter=resample_filter)
        self.attention = attention
        if attention:
            self.norm2 = group_norm(out_channels)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, init_scale=INIT_ATTN)
            self.proj = Conv2d(out_channels, out_channels, 1, init_scale=INIT_ZERO)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        # in the embedding's dtype (float64 with time_features="float64", as EDM's SongUNet), then the features'
        params = F.linear(emb, self.affine.weight.to(emb.dtype), self.affine.bias.to(emb.dtype))
        params = params[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale

        if self.attention:
            B, C, H, W = x.shape
            # One head (DDPM++). EDM's channel layout of qkv: [C, 3] interleaved per channel.
            qkv = self.qkv(self.norm2(x)).reshape(B, 1, C, 3, H * W)
            q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(3))  # each [B, 1, HW, C]
            a = F.scaled_dot_product_attention(q, k, v)
            a = a.transpose(-1, -2).reshape(B, C, H, W)
            x = (self.proj(a) + x) * self.skip_scale
        return x


class DDPMpp(nn.Module):
    """DDPM++ U-Net G(x, noise_t, noise_s, labels) -> [B, C, H, W].

    Defaults are the IMM CIFAR-10 configuration; every field is a keyword so tests and small
    datasets can build reduced versions.

    On the CPU the activations run in channels_last (the input is converted on entry, the output
    returned contiguous): oneDNN's convolutions and GroupNorm are faster in that layout. Measured
    with bench/step_cost.py --compare-channels-last (IMM training step, CPU time, README
    "Performance"): x0.93 for a 32-channel DDPM++ and x0.97 for the CIFAR-10 configuration. CUDA
    inputs keep their layout until it is measured there. Set `channels_last_on_cpu = False` on an
    instance (or the class) for the contiguous layout.
    """

    channels_last_on_cpu: bool = True

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        num_classes: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (2, 2, 2),
        channel_mult_emb: int = 4,
        channel_mult_noise: int = 1,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.2,
        resample_filter: Sequence[int] = (1, 1),
        adaptive_scale: bool = False,
        augment_dim: int = 0,
        time_features: str = "float32",
    ):
        super().__init__()
        # "float64": the time features and the whole mapping network (t and s paths, the label and the blocks'
        # affine layers) in float64, as EDM's SongUNet runs them in the official IMM code
        self.time_dtype = time_features_dtype(time_features)
        levels = len(channel_mult)
        if img_resolution % (2 ** (levels - 1)):
            raise ValueError(
                f"DDPM++ with {levels} resolution levels halves the image {levels - 1} times, "
                f"so the resolution must be divisible by {2 ** (levels - 1)}; "
                f"got {img_resolution}."
            )
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.num_classes = num_classes
        self.augment_dim = augment_dim
        emb_channels = model_channels * channel_mult_emb
        self.noise_channels = model_channels * channel_mult_noise
        block_kwargs = dict(
            emb_channels=emb_channels,
            dropout=dropout,
            skip_scale=math.sqrt(0.5),
            resample_filter=resample_filter,
            adaptive_scale=adaptive_scale,
        )

        # Mapping network: the t path carries the label; the s path is IMM's addition.
        self.map_label = None
        if num_classes > 0:
            self.map_label = nn.Embedding(num_classes + 1, self.noise_channels)
            # Unit-scale rows, like the sin/cos features they are added to.
            nn.init.normal_(self.map_label.weight)
        self.map_augment = augment_embedding(augment_dim, self.noise_channels)
        self.map_layer0 = _linear(self.noise_channels, emb_channels)
        self.map_layer1 = _linear(emb_channels, emb_channels)
        self.map_layer0_s = _linear(self.noise_channels, emb_channels)
        self.map_layer1_s = _linear(emb_channels, emb_channels)

        # Encoder (EDM's 'standard' encoder); every module's output is kept as a skip.
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels, 3)
                cout = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=res in attn_resolutions, **block_kwargs
                )
        skips = [module.out_channels for module in self.enc.values()]

        # Decoder (EDM's 'standard' decoder): one more block per level to consume all skips.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == levels - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin,
                    cout,
                    attention=(idx == num_blocks and res in attn_resolutions),
                    **block_kwargs,
                )
        self.out_norm = group_norm(cout)
        self.out_conv = Conv2d(cout, self.out_channels, 3, init_scale=INIT_ZERO)

    def _time_features(self, noise: torch.Tensor) -> torch.Tensor:
        emb = sinusoidal_embedding(noise, self.noise_channels, endpoint=True, dtype=self.time_dtype)
        # EDM's SongUNet swaps the halves to [sin | cos]; kept for fidelity with its layout.
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)
        return emb.to(self._mapping_dtype())

    def _mapping_dtype(self) -> torch.dtype:
        """The mapping network's dtype: the weights', or float64 with time_features="float64"."""
        return torch.float64 if self.time_dtype == torch.float64 else self.map_layer0.weight.dtype

    def _mlp(self, layer0: nn.Linear, layer1: nn.Linear, emb: torch.Tensor) -> torch.Tensor:
        def linear(layer, v):
            return F.linear(v, layer.weight.to(v.dtype), layer.bias.to(v.dtype))

        return linear(layer1, F.silu(linear(layer0, emb)))

    def forward(
        self,
        x: torch.Tensor,
        noise_t: torch.Tensor,
        noise_s: torch.Tensor,
        labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shape = (self.in_channels, self.img_resolution, self.img_resolution)
        labels = check_inputs(
            "DDPM++", x, shape, noise_t, noise_s, labels, self.num_classes, augment_labels, self.augment_dim
        )

        channels_last = self.channels_last_on_cpu and x.device.type == "cpu"
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        emb_t = self._time_features(noise_t)
        if labels is not None:
            emb_t = emb_t + self.map_label(labels).to(emb_t.dtype)
        if augment_labels is not None:
            emb_t = emb_t + F.linear(augment_labels.to(emb_t.dtype), self.map_augment.weight.to(emb_t.dtype))
        emb_t = self._mlp(self.map_layer0, self.map_layer1, emb_t)
        emb_s = self._mlp(self.map_layer0_s, self.map_layer1_s, self._time_features(noise_s))
        emb = F.silu(emb_t + emb_s)

        skips = []
        for module in self.enc.values():
            x = module(x, emb) if isinstance(module, UNetBlock) else module(x)
            skips.append(x)
        for block in self.dec.values():
            # Blocks that consume a skip were built with the concatenated width.
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        out = self.out_conv(F.silu(self.out_norm(x)))
        return out.contiguous() if channels_last else out
