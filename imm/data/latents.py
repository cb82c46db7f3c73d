"""data=latents: VAE latents of an image dataset, as `--config-name encode` writes them (imm/tasks/encode.py).

On disk, in one folder (`out` of encode, `data.root` here):

- `latents-KKKKK.npy` [n, C, h, w]: the raw posterior means of the VAE (imm.data.vae), float32 or float16;
  `flipped-KKKKK.npy` the same of the horizontally flipped images (encode with data.hflip=true);
  `labels-KKKKK.npy` [n] int64 (-1: unconditional). All shards but the last hold `shard_size` images.
- `manifest.json`: the VAE (id and weight hash), the image resolution, the source dataset, the counts, the
  complete shards, and the raw latents' per-channel mean and std (measured over the whole set, unflipped).

Training reads the shards memory-mapped (never loaded whole) and normalises every latent per channel,
x = (z - mean) / std * SIGMA_DATA (App. I.1: channel mean/std, then x 0.5, so the data std is about
sigma_d = 0.5 as everywhere else). mean and std are the manifest's measured ones unless data.latent_mean
and data.latent_std give others (experiment=imagenet256_paper gives the paper's). The LatentCodec holds
that normalisation and the VAE that decodes samples to images; a checkpoint stores it, so sampling needs no
latents, and the FID reference images are those the latents were encoded from.
"""

from __future__ import annotations

import bisect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imm.data import images
from imm.data import vae as vae_mod
from imm.data.loader import SIGMA_DATA, BaseDataset
from imm.diskspace import replacing
from imm.errors import DataError, DataNotFoundError

log = logging.getLogger("imm.data")
MANIFEST = "manifest.json"
FORMAT = 1
DECODE_BATCH = 32  # latents per VAE decoder call: at 256 x 256 its activations take ~0.2 GB per image


def shard_files(k: int) -> dict[str, str]:
    """The file names of shard k (flipped only exists when the encode made flipped copies)."""
    return {"latents": f"latents-{k:05d}.npy", "flipped": f"flipped-{k:05d}.npy", "labels": f"labels-{k:05d}.npy"}


def read_manifest(root) -> dict:
    path = Path(root).expanduser() / MANIFEST
    if not path.is_file():
        what = "does not exist" if not path.parent.is_dir() else f"holds no {MANIFEST}"
        raise DataNotFoundError(
            f"data.root={str(root)!r} {what}; point data.root at the out= folder of"
            " `python launch.py --config-name encode`."
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path} cannot be read ({e}); encode the latents again.") from None
    if manifest.get("format") != FORMAT:
        raise DataError(
            f"{path} has format {manifest.get('format')!r}, this version reads {FORMAT}; encode the latents again."
        )
    return manifest


def write_manifest(root: Path, manifest: dict) -> None:
    """Write-then-rename: a killed encode, or one that fills the disk (DiskFullError), leaves the previous
    manifest, never half of one."""
    text = json.dumps(manifest, indent=1) + "\n"
    with replacing(root / MANIFEST, needed=len(text)) as tmp:
        tmp.write_text(text)


def merge_channel_stats(stats: dict, z: np.ndarray) -> dict:
    """Per-channel {count, mean, m2} of the latents seen so far, merged with the batch z [n, C, h, w]
    (Chan et al.'s pairwise update, in float64, one channel at a time to bound the memory)."""
    n_b = z.shape[0] * z.shape[2] * z.shape[3]
    mean_b = np.array([z[:, c].mean(dtype=np.float64) for c in range(z.shape[1])])
    m2_b = np.array([((z[:, c].astype(np.float64) - mean_b[c]) ** 2).sum() for c in range(z.shape[1])])
    n_a = stats["count"]
    if n_a == 0:
        return {"count": n_b, "mean": mean_b.tolist(), "m2": m2_b.tolist()}
    mean_a, m2_a, n = np.array(stats["mean"]), np.array(stats["m2"]), n_a + n_b
    delta = mean_b - mean_a
    return {
        "count": n,
        "mean": (mean_a + delta * n_b / n).tolist(),
        "m2": (m2_a + m2_b + delta**2 * n_a * n_b / n).tolist(),
    }


class LatentShards(BaseDataset):
    """The latents of a complete encode, memory-mapped shard by shard, normalised per access.

    The memory maps are opened lazily in each process (DataLoader workers open their own), so the
    dataset pickles as a few paths and arrays, never as the data.
    """

    def __init__(self, root, manifest: dict, mean, std, hflip: bool = False):
        self.root = Path(root).expanduser()
        self.hflip = bool(hflip)
        self.shape = tuple(manifest["latent_shape"])
        self.num_classes = int(manifest["num_classes"])
        shards = manifest["shards"]
        for shard in shards:
            for name in ("latents", "labels") + (("flipped",) if manifest["hflip"] else ()):
                if not (self.root / shard[name]).is_file():
                    raise DataNotFoundError(
                        f"{self.root / shard[name]} (listed in {MANIFEST}) is missing; encode the latents again."
                    )
        self.offsets = np.cumsum([0] + [s["count"] for s in shards]).tolist()
        self.files = [
            (self.root / s["latents"], self.root / s["flipped"] if manifest["hflip"] else None) for s in shards
        ]
        self.labels = torch.from_numpy(np.concatenate([np.load(self.root / s["labels"]) for s in shards])).long()
        C = self.shape[0]
        self.mean = np.asarray(mean, dtype=np.float32).reshape(C, 1, 1)
        self.gain = (SIGMA_DATA / np.asarray(std, dtype=np.float32)).reshape(C, 1, 1)
        self._maps = None

    def __len__(self) -> int:
        return self.offsets[-1]

    def file_listing(self) -> str:
        """Each shard file's name and size, one per line (imm.data.digest)."""
        paths = [p for pair in self.files for p in pair if p is not None]
        return "".join(f"{p.relative_to(self.root)}\0{p.stat().st_size}\n" for p in paths)

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}

    def _map(self, shard: int, flip: bool) -> np.ndarray:
        if self._maps is None:
            self._maps = {}
        if (shard, flip) not in self._maps:
            self._maps[shard, flip] = np.load(self.files[shard][flip], mmap_mode="r")
        return self._maps[shard, flip]

    def get(self, index: int, flip: bool) -> tuple[torch.Tensor, int]:
        shard = bisect.bisect_right(self.offsets, index) - 1
        z = np.asarray(self._map(shard, flip)[index - self.offsets[shard]], dtype=np.float32)
        return torch.from_numpy((z - self.mean) * self.gain), int(self.labels[index])


@dataclass
class LatentCodec:
    """The normalisation of raw latents and the VAE that maps model samples to images (a checkpoint's
    `latents` entry, from state_dict). The VAE is loaded once, by load(), on the process that decodes."""

    vae: str  # hub id or local folder of the VAE that decodes
    vae_sha256: str  # the weight hash of the VAE the latents were encoded with
    mean: list  # the raw latents' per-channel mean and std the model's data were normalised with
    std: list
    source: dict  # the images they were encoded from: name, root, resolution, class_subfolders, shape, count
    scale: float = SIGMA_DATA
    _model: object = field(default=None, repr=False, compare=False)

    def load(self, device="cpu"):
        """The VAE on `device` (loaded on the first call), refused when its weights are not the encoder's."""
        if self._model is None:
            model = vae_mod.load(self.vae, key="data.vae", device=device)
            # None: an imported model's codec (the official encoder's VAE by name; no weight hash recorded)
            if self.vae_sha256 is not None and (sha := vae_mod.fingerprint(model)) != self.vae_sha256:
                raise vae_mod.VAEError(
                    f"data.vae={self.vae!r} holds other weights than the VAE these latents were encoded with"
                    f" (weight hash {sha}, not {self.vae_sha256}); point data.vae at that VAE."
                )
            self._model = model
            log.info("VAE %s (weights %s) loaded on %s to decode the latents", self.vae, self.vae_sha256, device)
        return self._model.to(device)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space latents back to the VAE's raw latents: z = x / scale * std + mean."""
        shape = (1, -1, 1, 1)
        std, mean = (torch.tensor(v, dtype=x.dtype, device=x.device).view(shape) for v in (self.std, self.mean))
        return x / self.scale * std + mean

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] in [-1, 1] (float32, on x's device) of model-space latents x, in chunks."""
        model = self.load(x.device if self._model is None else next(self._model.parameters()).device)
        return torch.cat([vae_mod.decode(model, self.raw(chunk)) for chunk in x.split(DECODE_BATCH)])

    def check_source(self) -> None:
        """Before any work: the images the latents were encoded from are still where the codec says."""
        root = self.source["root"]
        if root is not None and not Path(root).exists():
            raise DataNotFoundError(
                f"the images these latents were encoded from (the FID reference) are not in {root} any more;"
                " set data.source_root to where they are now."
            )

    def source_images(self) -> torch.utils.data.Dataset:
        """The images the latents were encoded from (the FID reference), at the encode's resolution."""
        self.check_source()
        src = self.source
        try:
            return images.training_set(
                src["name"], src["root"], resolution=src["resolution"], class_subfolders=src["class_subfolders"]
            )
        except DataError as e:
            raise DataError(
                f"the images these latents were encoded from cannot be read ({e}); set data.source_root to"
                " where they are now."
            ) from None

    def state_dict(self) -> dict:
        return {
            "vae": self.vae,
            "vae_sha256": self.vae_sha256,
            "mean": list(self.mean),
            "std": list(self.std),
            "source": dict(self.source),
            "scale": self.scale,
        }

    @classmethod
    def from_state_dict(cls, state: dict, *, vae: str | None = None, source_root: str | None = None) -> "LatentCodec":
        """A checkpoint's codec; `vae`, `source_root`: where the VAE and the source images are now."""
        source = {**state["source"], **({"root": str(Path(source_root).expanduser().resolve())} if source_root else {})}
        return cls(
            str(vae) if vae else state["vae"],
            state["vae_sha256"],
            state["mean"],
            state["std"],
            source,
            state["scale"],
        )


def load(
    root,
    *,
    resolution: int | None = None,
    hflip: bool = False,
    vae: str | None = None,
    latent_mean=None,
    latent_std=None,
    source_root: str | None = None,
) -> tuple[LatentShards, LatentCodec]:
    """The dataset and codec of the complete encode in `root`, checked against the data options."""
    if root is None or str(root).strip() == "":
        raise DataError("data.root is missing; data=latents needs data.root=/path/to/latents (the out= of encode).")
    manifest = read_manifest(root)
    where = f"the latents in {str(root)!r}"
    if not manifest.get("complete"):
        raise DataError(
            f"{where} are incomplete ({len(manifest['shards'])} of {manifest['n_shards']} shards encoded);"
            " run the same encode command again to finish them."
        )
    if resolution is not None and int(resolution) != manifest["resolution"]:
        raise DataError(
            f"data.resolution={resolution} does not match {where}, encoded from {manifest['resolution']}x"
            f"{manifest['resolution']} images; set data.resolution={manifest['resolution']} or null, or encode"
            f" again at {resolution}."
        )
    if hflip and not manifest["hflip"]:
        raise DataError(
            f"data.hflip=true needs flipped copies, but {where} were encoded without them; set data.hflip=false"
            " or encode again with data.hflip=true."
        )
    C = manifest["latent_shape"][0]
    stats = {"data.latent_mean": latent_mean, "data.latent_std": latent_std}
    for key, given in stats.items():
        if given is not None and len(given) != C:
            raise DataError(f"{key}={list(given)} has {len(given)} values, but the latents have {C} channels.")
    mean = list(latent_mean) if latent_mean is not None else manifest["mean"]
    std = list(latent_std) if latent_std is not None else manifest["std"]
    if min(std) <= 0:
        raise DataError(f"data.latent_std={std} must be positive in every channel.")
    dataset = LatentShards(root, manifest, mean, std, hflip)
    encoded = {"vae": manifest["vae"], "vae_sha256": manifest["vae_sha256"], "source": manifest["source"]}
    codec = LatentCodec.from_state_dict(
        {**encoded, "mean": mean, "std": std, "scale": SIGMA_DATA}, vae=vae, source_root=source_root
    )
    return dataset, codec
