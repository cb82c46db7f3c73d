"""Diffusion Transformer (DiT; Peebles & Xie 2023) with IMM's second time input.

Follows facebookresearch/DiT models.py: conv patch embedding, fixed 2-D sin-cos position
embedding, adaLN-Zero blocks, zero-initialised final layer. IMM changes (official lumalabs/imm
DiT, spec §1.3): a second TimestepEmbedder for s whose output is added to the t and label
embeddings, and no learned sigma (the output has the input's channels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imm.nets.embeddings import LabelEmbedder, TimeEmbedder, augment_embedding, check_inputs, time_features_dtype

# Sizes of the DiT paper (Table 1); the suffix is the patch size.
DIT_PRESETS: dict[str, dict[str, int]] = {
    "dit_s_2": dict(hidden_size=384, depth=12, num_heads=6, patch_size=2),
    "dit_s_4": dict(hidden_size=384, depth=12, num_heads=6, patch_size=4),
    "dit_b_2": dict(hidden_size=768, depth=12, num_heads=12, patch_size=2),
    "dit_b_4": dict(hidden_size=768, depth=12, num_heads=12, patch_size=4),
    "dit_l_2": dict(hidden_size=1024, depth=24, num_heads=16, patch_size=2),
    "dit_l_4": dict(hidden_size=1024, depth=24, num_heads=16, patch_size=4),
    "dit_xl_2": dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2),
}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed [grid_size**2, dim] position table, as DiT/MAE's get_2d_sincos_pos_embed.

    Half of the channels encode the column index and half the row index (MAE's meshgrid puts
    the width coordinate first), each as [sin | cos] with frequencies 1/10000^(k/(dim/4)).
    Formed in float64 and rounded to float32, as MAE's NumPy code (and so the official IMM DiT's table) does.
    """
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        quarter = dim // 4
        omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
        args = pos.reshape(-1, 1) * omega[None, :]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    return torch.cat([one_axis(cols), one_axis(rows)], dim=1).to(torch.float32)


class PatchEmbed(nn.Module):
    """[B, C, H, W] -> [B, (H/p)*(W/p), hidden] with one strided convolution."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # DiT uses the tanh approximation of GELU.
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x), approximate="tanh"))))


class DiTBlock(nn.Module):
    """Transformer block whose LayerNorm shift/scale and residual gates come from c (adaLN-Zero)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, dropout)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(hidden_size, int(hidden_size * mlp_ratio), dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """DiT G(x, noise_t, noise_s, labels) -> [B, C, H, W] for square inputs of side input_size."""

    def __init__(
        self,
        input_size: int,
        in_channels: int,
        patch_size: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        dropout: float = 0.0,
        augment_dim: int = 0,
        time_features: str = "float32",
    ):
        super().__init__()
        features_dtype = time_features_dtype(time_features)
        if input_size % patch_size:
            raise ValueError(f"DiT input size {input_size} is not divisible by the patch size {patch_size}.")
        if hidden_size % num_heads:
            raise ValueError(f"DiT hidden_size {hidden_size} is not divisible by num_heads {num_heads}.")
        if hidden_size % 4:
            raise ValueError(
                f"DiT hidden_size must be a multiple of 4 for the 2-D sin-cos position embedding, got {hidden_size}."
            )
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.augment_dim = augment_dim

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        # time_features="float64": the sin/cos features in float64 (then float32 for the MLP), as the official IMM DiT
        self.t_embedder = TimeEmbedder(hidden_size, freq_dim=256, features_dtype=features_dtype)
        self.s_embedder = TimeEmbedder(hidden_size, freq_dim=256, features_dtype=features_dtype)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes > 0 else None
        self.augment_embedder = augment_embedding(augment_dim, hidden_size)
        grid = input_size // patch_size
        # A buffer, not a parameter: DiT keeps the position table fixed.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, grid).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation; the zeroed modulations make every block start as the identity."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:  # the augmentation embedding has none
                    nn.init.zeros_(module.bias)
        # Patch embedding initialised like a Linear layer over the flattened patch.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        for embedder in (self.t_embedder, self.s_embedder):
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, p*p*C] -> [B, C, H, W]."""
        p, c = self.patch_size, self.out_channels
        h = w = int(math.isqrt(x.shape[1]))
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(
        self,
        x: torch.Tensor,
        noise_t: torch.Tensor,
        noise_s: torch.Tensor,
        labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shape = (self.in_channels, self.input_size, self.input_size)
        labels = check_inputs(
            "DiT", x, shape, noise_t, noise_s, labels, self.num_classes, augment_labels, self.augment_dim
        )

        tokens = self.x_embedder(x)
        tokens = tokens + self.pos_embed.to(tokens.dtype)
        c = self.t_embedder(noise_t) + self.s_embedder(noise_s)
        if labels is not None:
            c = c + self.y_embedder(labels)
        if augment_labels is not None:
            c = c + self.augment_embedder(augment_labels.to(c.dtype))
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))
