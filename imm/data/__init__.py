"""Datasets for IMM training and the resumable batch iterator.

Everything a training run needs from its data comes out of :func:`build_dataset`
as a :class:`DataBundle`.  Conventions shared by every dataset:

* ``SIGMA_DATA = 0.5``: point data are standardised per dimension to std 0.5
  (statistics from the train split), images are scaled to [-1, 1].
* ``bundle.train[i]`` returns ``(x, label)`` with ``label`` a plain ``int``;
  **-1 means "no label"** (unconditional data).  -1 rather than 0 so that an
  unconditional sample can never be mistaken for class 0.  The batch iterator
  :class:`~imm.data.loader.ResumableBatches` turns this into ``labels=None``
  for unconditional datasets and a LongTensor ``[b]`` otherwise.
* ``bundle.unscale(x)`` maps model-space samples back to data space: the
  original coordinates for points, pixel values in [0, 255] for images.
* ``bundle.to_images(x)``: image samples in [-1, 1]; for ``latents`` (VAE latents of images,
  :mod:`imm.data.latents`) the VAE decodes them, everywhere else they already are images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from imm.data import images, latents, points, toy
from imm.data.latents import LatentCodec
from imm.data.loader import SIGMA_DATA, InMemoryDataset, ResumableBatches
from imm.data.points import Standardizer, load_points
from imm.errors import DataError, DataNotFoundError

IMAGE_NAMES = ["digits", "mnist", "cifar10", "folder", "latents"]
DATASET_NAMES = [*toy.NAMES, "points", *IMAGE_NAMES]
# The library's defaults, which the config schema (imm.config.DataConfig) takes as its own.
DEFAULT_TOY_TRAIN = 100_000
DEFAULT_TOY_HELDOUT = 5000
DEFAULT_HELDOUT_FRACTION = 0.1


@dataclass
class DataBundle:
    """Everything a run needs to know about its dataset.

    Attributes:
        name: dataset name as given to :func:`build_dataset`.
        kind: ``"points"`` or ``"images"``.
        train: torch Dataset of ``(x, label)``; label -1 when unconditional.
        heldout: points: scaled held-out points ``[n, D]``; images: the held-out split (a Dataset
            the run never trains on: a ``heldout_fraction`` of ``digits``, MNIST's test set) where
            the data have one, else ``None``.
        shape: shape of one sample, e.g. ``(2,)`` or ``(3, 32, 32)``.
        num_classes: 0 for unconditional data.
        standardizer: point data only, else ``None``; save ``standardizer.state_dict()``
            in checkpoints to undo the scaling later.
        latents: ``latents`` only, else ``None``: the normalisation and the VAE that decodes
            (:class:`imm.data.latents.LatentCodec`); checkpoints save ``latents.state_dict()``.
    """

    name: str
    kind: str
    train: torch.utils.data.Dataset
    heldout: torch.Tensor | torch.utils.data.Dataset | None
    shape: tuple[int, ...]
    num_classes: int
    standardizer: Standardizer | None = None
    latents: LatentCodec | None = None

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Image samples [N, C, H, W] in [-1, 1]: decoded by the VAE for latents, else x itself."""
        return x if self.latents is None else self.latents.decode(x)

    def unscale(self, x: torch.Tensor) -> torch.Tensor:
        """Map model-space samples to data space (points: original units; images: [0, 255] floats)."""
        if self.kind == "points":
            return self.standardizer.unscale(x)
        return ((x + 1.0) * 127.5).clamp(0.0, 255.0)


def build_dataset(
    name: str,
    *,
    root: str | None = None,
    path: str | None = None,
    n_train: int = DEFAULT_TOY_TRAIN,
    n_heldout: int = DEFAULT_TOY_HELDOUT,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    seed: int = 0,
    resolution: int | None = None,
    download: bool = False,
    hflip: bool = False,
    class_subfolders: bool | None = None,
    vae: str | None = None,
    latent_mean=None,
    latent_std=None,
    source_root: str | None = None,
) -> DataBundle:
    """Build the dataset called ``name`` (one of :data:`DATASET_NAMES`).

    Args:
        name: a toy set (``checkerboard``, ``eight_gaussians``, ``moons``, ``rings``),
            ``points`` (a ``.npy`` file at ``path``), ``digits``, ``mnist``, ``cifar10``
            or ``folder`` (a directory of images at ``root``).
        root: directory for ``mnist``/``cifar10`` files or the ``folder`` images.
        path: the ``.npy`` file for ``points``.
        n_train: toy sets only: number of training points.
            Other datasets use all their training data.
        n_heldout: toy sets only: number of held-out points, drawn with a different seed.
        heldout_fraction: ``points`` and ``digits``: fraction of rows held out (deterministic given seed).
        seed: seed for toy sampling and the ``points`` and ``digits`` train/held-out splits.
        resolution: image side length; required for ``folder``; optional elsewhere
            (``digits`` 16, ``mnist`` 28, ``cifar10`` 32 by default; other sizes are resized
            bilinearly once at load time).
        download: let torchvision fetch ``mnist``/``cifar10`` when the files are missing.
        hflip: random horizontal flips for image data (deterministic inside ResumableBatches).
        class_subfolders: ``folder`` only: ``None`` = use subfolders as classes when every
            image sits in one; ``False`` = always unconditional (e.g. FFHQ's numbered
            shard folders); ``True`` = require class subfolders.
    """
    key = str(name).lower().replace("-", "_")
    if key in toy.NAMES:
        train = toy.make(key, n_train, seed)
        heldout = toy.make(key, n_heldout, _derived_seed(seed, 1))
        return _points_bundle(key, train, heldout)
    if key in ("points", "npy"):
        train, heldout = points.split_points(load_points(path), heldout_fraction, seed)
        return _points_bundle("points", train, heldout)
    if key == "latents":
        dataset, codec = latents.load(
            root,
            resolution=resolution,
            hflip=hflip,
            vae=vae,
            latent_mean=latent_mean,
            latent_std=latent_std,
            source_root=source_root,
        )
        return DataBundle(key, "images", dataset, None, dataset.shape, dataset.num_classes, latents=codec)
    if key in IMAGE_NAMES:
        dataset = images.training_set(
            key, root, resolution=resolution, hflip=hflip, download=download, class_subfolders=class_subfolders
        )
        heldout = None
        if key == "digits":
            dataset, heldout = images.split_heldout(dataset, heldout_fraction, seed)
        if key == "mnist":  # the test set: read with the training files (MNIST_FILES)
            heldout = images.mnist(root, download=download, resolution=resolution, train=False)
        return DataBundle(
            name=key,
            kind="images",
            train=dataset,
            heldout=heldout,
            shape=tuple(dataset.shape),
            num_classes=dataset.num_classes,
        )
    raise DataError(f"Unknown dataset {name!r}; set data.name to one of {DATASET_NAMES}.")


def _points_bundle(name: str, train: torch.Tensor, heldout: torch.Tensor) -> DataBundle:
    # Statistics come from the train split only, so held-out points are scaled
    # exactly as unseen data would be.
    standardizer = Standardizer.fit(train, target_std=SIGMA_DATA)
    return DataBundle(
        name=name,
        kind="points",
        train=InMemoryDataset(standardizer.scale(train)),
        heldout=standardizer.scale(heldout),
        shape=(train.shape[1],),
        num_classes=0,
        standardizer=standardizer,
    )


def digest(bundle: DataBundle) -> str:
    """8 hex digits of sha256 over the training samples and labels as loaded (files on disk: their relative
    paths and sizes): two runs on the same data share it (MLflow's dataset digest)."""
    h = hashlib.sha256()
    train = bundle.train
    if hasattr(train, "file_listing"):  # files on disk (image folder, latent shards): reading them all costs minutes
        h.update(train.file_listing().encode())
    else:
        h.update(train.data.contiguous().view(torch.uint8).numpy())
    h.update(train.labels.contiguous().view(torch.uint8).numpy())
    return h.hexdigest()[:8]


def _derived_seed(seed: int, stream: int) -> int:
    """An independent seed for a second random stream (e.g. held-out data) from one user seed."""
    return int(np.random.SeedSequence([seed % 2**64, stream]).generate_state(1)[0])


__all__ = [
    "SIGMA_DATA",
    "DATASET_NAMES",
    "DataError",
    "DataNotFoundError",
    "DataBundle",
    "build_dataset",
    "digest",
    "InMemoryDataset",
    "ResumableBatches",
    "Standardizer",
    "load_points",
]
