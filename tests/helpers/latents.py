"""What the latent tests share: a tiny randomly initialised AutoencoderKL saved as a real diffusers folder
(the VAE weights cannot be downloaded here, the loading code is the real one), and a folder of class-labelled
images to encode."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ("cat", "dog")


def tiny_vae(folder, seed: int = 0) -> Path:
    """A 3-level AutoencoderKL (32x32 images -> 4x8x8 latents, 5,599 parameters) written by save_pretrained."""
    import torch
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(4, 4, 4),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=2,
            sample_size=32,
        )
    vae.save_pretrained(folder)
    return Path(folder)


def class_folder(root, per_class: int = 12, seed: int = 0) -> Path:
    """Two class subfolders of 40x36 PNGs (a square on a plain background; cats coloured, dogs white), which the
    folder dataset resizes and center-crops to data.resolution."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (Path(root) / c).mkdir(parents=True)
        for i in range(per_class):
            image = np.zeros((40, 36, 3), np.uint8)
            image[...] = rng.integers(0, 80, 3)
            r, k = rng.integers(0, 20, 2)
            image[r : r + 12, k : k + 12] = rng.integers(120, 256, 3) if c == "cat" else 255
            Image.fromarray(image).save(Path(root) / c / f"{i:02d}.png")
    return Path(root)
