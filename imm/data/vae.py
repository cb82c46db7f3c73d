"""The VAE between images and latents (data=latents, `--config-name encode`): diffusers' AutoencoderKL,
loaded with `from_pretrained` from a Hugging Face hub id or a local folder (what `save_pretrained` writes).

Latents here are the VAE's *raw* posterior means, `vae.encode(x).latent_dist.mean`, without the VAE's own
`scaling_factor` (0.18215 for Stable Diffusion's): imm.data.latents normalises them per channel instead,
as the paper does (App. I.1: channel mean and std, then x 0.5; the official code follows EDM2's encoder).
diffusers is imported only here and only when a VAE is loaded (it takes seconds).
"""

from __future__ import annotations

import logging
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import getproxies

import torch

from imm.errors import DataError
from imm.nets import module_fingerprint

# App. I.1's footnote names stabilityai/sd-vae-ft-mse, the official ImageNet config
# (configs/im256_generate_images.yaml) loads sd-vae-ft-ema, and the channel statistics the paper gives
# are those of that setting (imm_spec.md section 2): the official config's VAE is the default.
PAPER_VAE = "stabilityai/sd-vae-ft-ema"


class VAEError(DataError):
    """The VAE cannot be loaded (not downloaded, a wrong folder) or is not the one the latents came from."""


def _save_hint(name: str, key: str) -> str:
    return (
        f'on a machine with internet save it with `python -c "from diffusers import AutoencoderKL;'
        f" AutoencoderKL.from_pretrained('{name}').save_pretrained('vae')\"`, copy the folder vae/ here and set"
        f" {key}=/path/to/vae"
    )


def _is_hub_id(name: str) -> bool:
    """ "org/name" (exactly one slash, not a path that exists or starts like one)."""
    return not Path(name).expanduser().exists() and not name.startswith(("/", ".", "~")) and name.count("/") == 1


def location(name: str) -> str:
    """How a manifest records the VAE: a hub id as it is, a local folder as its absolute path."""
    return name if _is_hub_id(name) else str(Path(name).expanduser().resolve())


def _unreachable(endpoint: str) -> str | None:
    """Why the hub at `endpoint` cannot be reached (its host name does not resolve: no network, or none to it),
    or None. Asked before a download, which would otherwise retry for half a minute and then blame the file.
    Behind an HTTP(S) proxy the host need not resolve here: not asked."""
    url = urlparse(endpoint)
    if getproxies().get(url.scheme or "https"):
        return None
    host = url.hostname or endpoint
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return f"{host} cannot be reached: {e.strerror or e}"
    return None


def load(name: str, *, key: str, device="cpu"):
    """The AutoencoderKL `name` (a hub id or a local folder; the option `key` named it) in eval mode,
    float32, on `device`. A hub id is looked up in the Hugging Face cache first and downloaded only when
    it is not there (and HF_HUB_OFFLINE is unset). Anything missing: VAEError, one sentence with the fix."""
    try:
        import huggingface_hub.constants as hub
        from diffusers import AutoencoderKL
    except ImportError:
        raise VAEError(
            f"{key}={name!r} needs the diffusers package; install it with `pip install diffusers`."
        ) from None

    def from_pretrained(source: str, **kwargs):
        with warnings.catch_warnings():  # deprecation notes of huggingface_hub, not the user's business
            warnings.simplefilter("ignore")
            return AutoencoderKL.from_pretrained(source, low_cpu_mem_usage=False, torch_dtype=torch.float32, **kwargs)

    if not _is_hub_id(name):
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            what = "does not exist" if not path.exists() else "holds no config.json"
            raise VAEError(
                f"{key}={name!r} {what}; point {key} at a folder written by AutoencoderKL.save_pretrained"
                f" (config.json and the weights) or at a hub id such as {PAPER_VAE}."
            )
        try:
            vae = from_pretrained(str(path))
        except Exception as e:  # a folder of another model, truncated weights: diffusers raises many types
            raise VAEError(f"{key}={name!r} cannot be loaded as an AutoencoderKL ({e}); check the folder.") from None
    else:
        try:
            vae = from_pretrained(name, local_files_only=True)
        except OSError:
            hub_log = logging.getLogger("huggingface_hub")
            level = hub_log.level
            hub_log.setLevel(logging.ERROR)  # its retry warnings, twice each; the error below says what failed
            try:
                if hub.HF_HUB_OFFLINE:
                    raise OSError("HF_HUB_OFFLINE is set")
                if reason := _unreachable(hub.ENDPOINT):
                    raise OSError(reason)
                vae = from_pretrained(name)
            except Exception as e:  # no network, no such repository, ...
                reason = " ".join(str(e).split())[:200]
                raise VAEError(
                    f"The VAE {name!r} ({key}) is not in the Hugging Face cache {hub.HF_HUB_CACHE} and cannot be"
                    f" downloaded ({reason}); {_save_hint(name, key)}."
                ) from None
            finally:
                hub_log.setLevel(level)
    return vae.to(device).eval().requires_grad_(False)


def fingerprint(vae) -> str:
    """A hash of the VAE's weights: the manifest records it, so decoding with another VAE is refused."""
    return module_fingerprint(vae)


def downsampling(vae) -> int:
    """The side of the image patch one latent pixel stands for (8 for Stable Diffusion's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode(vae, images: torch.Tensor) -> torch.Tensor:
    """Raw latents (the posterior mean, float32) of images [B, 3, H, W] in [-1, 1]."""
    device = next(vae.parameters()).device
    return vae.encode(images.to(device, torch.float32)).latent_dist.mean.float()


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] (float32, on the latents' device) decoded from raw latents."""
    device = next(vae.parameters()).device
    return vae.decode(latents.to(device, torch.float32)).sample.clamp(-1.0, 1.0).to(latents.device)
