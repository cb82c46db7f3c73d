"""Image datasets: sklearn digits, MNIST, CIFAR-10 and any folder of images.

All return ``(x, label)`` with ``x`` float32 ``[C, H, W]`` in [-1, 1] and ``label``
an int (-1 when unconditional), and support deterministic horizontal flips
through ``get(index, flip)`` (see :class:`imm.data.loader.BaseDataset`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imm.data.loader import BaseDataset, HeldTensors, InMemoryDataset
from imm.data.points import split_points
from imm.errors import DataError, DataNotFoundError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FILES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]
# torchvision checks for all four MNIST files, test split included.
MNIST_FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]


class UInt8Images(HeldTensors):
    """Images kept as uint8 ``[N, C, H, W]`` (4x smaller than float) and scaled per access."""

    def get(self, index: int, flip: bool) -> tuple[torch.Tensor, int]:
        x = self.data[index].float() / 127.5 - 1.0
        return (x.flip(-1) if flip else x), int(self.labels[index])


def digits(resolution: int | None = None, hflip: bool = False) -> InMemoryDataset:
    """scikit-learn's 1797 8x8 digits, bilinearly upscaled (default 16x16), 1 channel, 10 classes."""
    resolution = 16 if resolution is None else _positive_resolution(resolution)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("The digits dataset needs scikit-learn; install it with `pip install scikit-learn`.") from None
    bunch = load_digits()
    # Pixel values are 0..16, so /8 - 1 maps them to [-1, 1].
    x = torch.from_numpy(bunch.images).float()[:, None] / 8.0 - 1.0
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return InMemoryDataset(x.clamp(-1.0, 1.0).contiguous(), torch.from_numpy(bunch.target), num_classes=10, hflip=hflip)


def training_set(name: str, root, *, resolution=None, hflip=False, download=False, class_subfolders=None):
    """The training images of the image dataset `name` (digits, mnist, cifar10, folder)."""
    if name == "digits":
        return digits(resolution=resolution, hflip=hflip)
    if name == "mnist":
        return mnist(root, download=download, resolution=resolution, hflip=hflip)
    if name == "cifar10":
        return cifar10(root, download=download, resolution=resolution, hflip=hflip)
    return ImageFolder(root, resolution, hflip=hflip, class_subfolders=class_subfolders)


def split_heldout(dataset: InMemoryDataset, fraction: float, seed: int) -> tuple[InMemoryDataset, InMemoryDataset]:
    """(train, held-out): the rows of an in-memory image set shuffled with `seed`, `fraction` of them held out."""
    train, heldout = split_points(torch.arange(len(dataset)), fraction, seed)
    return tuple(
        InMemoryDataset(dataset.data[rows], dataset.labels[rows], dataset.num_classes, dataset.hflip)
        for rows in (train, heldout)
    )


def cifar10(
    root: str | Path | None, *, download: bool = False, resolution: int | None = None, hflip: bool = False
) -> UInt8Images:
    """The 50,000 CIFAR-10 training images via torchvision, 3x32x32 (or ``resolution``), 10 classes."""
    root = _dataset_root(root, "cifar10")
    resolution = 32 if resolution is None else _positive_resolution(resolution)
    files = ", ".join(CIFAR10_FILES)
    where = (
        f"put the folder {root / CIFAR10_FOLDER}/ (containing {files}) or the archive {root / CIFAR10_ARCHIVE} in place"
    )
    archive = root / CIFAR10_ARCHIVE
    if not (root / CIFAR10_FOLDER).is_dir() and archive.is_file():
        # torchvision only unpacks an archive as part of download=True; do it locally instead.
        _extract(archive, root)
    from torchvision.datasets import CIFAR10

    try:
        dataset = CIFAR10(str(root), train=True, download=download)
    except (RuntimeError, OSError, ValueError) as err:
        raise DataNotFoundError(_missing_message("CIFAR-10", root, where, download, err)) from None
    data = torch.from_numpy(np.asarray(dataset.data, dtype=np.uint8)).permute(0, 3, 1, 2)
    labels = torch.as_tensor(dataset.targets)
    return UInt8Images(_resize_uint8(data, resolution), labels, num_classes=10, hflip=hflip)


def mnist(
    root: str | Path | None,
    *,
    download: bool = False,
    resolution: int | None = None,
    hflip: bool = False,
    train: bool = True,
) -> UInt8Images:
    """The 60,000 MNIST training images (train=False: the 10,000 test images) via torchvision, 1x28x28
    (or ``resolution``), 10 classes."""
    root = _dataset_root(root, "mnist")
    resolution = 28 if resolution is None else _positive_resolution(resolution)
    raw = root / "MNIST" / "raw"
    where = f"put {', '.join(MNIST_FILES)} (or the same names ending in .gz) in {raw}/"
    for name in MNIST_FILES:
        if not (raw / name).is_file() and (raw / f"{name}.gz").is_file():
            _extract(raw / f"{name}.gz", raw)
    from torchvision.datasets import MNIST

    try:
        dataset = MNIST(str(root), train=train, download=download)
    except (RuntimeError, OSError, ValueError) as err:
        raise DataNotFoundError(_missing_message("MNIST", root, where, download, err)) from None
    data = torch.as_tensor(dataset.data, dtype=torch.uint8)[:, None]
    labels = torch.as_tensor(dataset.targets)
    return UInt8Images(_resize_uint8(data, resolution), labels, num_classes=10, hflip=hflip)


class ImageFolder(BaseDataset):
    """Every image under ``root`` (recursively), RGB, shorter side resized and center-cropped.

    Classes: with ``class_subfolders=None`` the top-level subfolders are the classes
    (sorted by name) when every image sits in one and there are at least two;
    otherwise the data are unconditional.  ``False`` forces unconditional (useful when
    subfolders are mere shards, as in FFHQ); ``True`` requires class subfolders.
    Every file is decoded once up front so a corrupt or truncated image fails now, not mid-epoch.
    """

    def __init__(
        self,
        root: str | Path | None,
        resolution: int | None,
        *,
        hflip: bool = False,
        class_subfolders: bool | None = None,
    ):
        if root is None or str(root).strip() == "":
            raise DataError("No image directory given; set data.root to a folder of images.")
        root = Path(root).expanduser()
        if not root.is_dir():
            what = "is not a directory" if root.exists() else "does not exist"
            raise DataNotFoundError(f"Image directory {str(root)!r} {what}; set data.root to a folder of images.")
        if resolution is None:
            raise DataError("The folder dataset needs an image size; set data.resolution (e.g. 64).")
        self.resolution = _positive_resolution(resolution)
        self.root = root
        self.files = _find_images(root)
        if not self.files:
            raise DataError(
                f"No images found under {str(root)!r} (looked for {', '.join(IMAGE_EXTENSIONS)} in it and "
                "its subfolders); point data.root at a folder containing images."
            )
        self.classes, labels = _folder_labels(root, self.files, class_subfolders)
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.num_classes = len(self.classes)
        self.hflip = bool(hflip)
        self.shape = (3, self.resolution, self.resolution)
        for file in self.files:
            _check_image(file, self.resolution)

    def __len__(self) -> int:
        return len(self.files)

    def file_listing(self) -> str:
        """Each image's path relative to the root and its size, one per line (imm.data.digest)."""
        return "".join(f"{f.relative_to(self.root)}\0{f.stat().st_size}\n" for f in self.files)

    def get(self, index: int, flip: bool) -> tuple[torch.Tensor, int]:
        from PIL import Image

        file = self.files[index]
        try:
            with Image.open(file) as image:
                image = _resize_center_crop(image.convert("RGB"), self.resolution)
        except Exception as err:  # any decoder failure; name the file instead of a PIL traceback
            raise DataError(f"Image {str(file)!r} cannot be decoded ({err}); delete or replace it.") from None
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1.0
        return (x.flip(-1) if flip else x), int(self.labels[index])


def _find_images(root: Path) -> list[Path]:
    # Hidden files and folders (.ipynb_checkpoints, .DS_Store, ...) are never data.
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _folder_labels(root: Path, files: list[Path], class_subfolders: bool | None) -> tuple[list[str], list[int]]:
    top = [f.relative_to(root).parts[0] if len(f.relative_to(root).parts) > 1 else None for f in files]
    loose = [f for f, t in zip(files, top) if t is None]
    if class_subfolders and loose:
        raise DataError(
            f"data.class_subfolders=true but {str(loose[0])!r} sits directly in {str(root)!r}; move every "
            "image into a class subfolder or set data.class_subfolders=null."
        )
    classes = sorted(set(top)) if not loose else []
    if class_subfolders is False or (class_subfolders is None and len(classes) < 2):
        return [], [-1] * len(files)
    index = {name: i for i, name in enumerate(classes)}
    return classes, [index[t] for t in top]


def _check_image(file: Path, resolution: int) -> None:
    """Read and decode `file` once, so a damaged or truncated image fails before training, naming the file, not
    in a DataLoader worker hours in (JPEGs decode at a reduced scale near `resolution`: the pass stays cheap)."""
    from PIL import Image

    try:
        with Image.open(file) as image:
            image.verify()  # the container's checksums
        with Image.open(file) as image:
            image.draft("RGB", (resolution, resolution))
            image.load()  # the pixels: a truncated file fails here
    except Exception as err:  # PIL raises several unrelated types for bad files
        raise DataError(f"Image {str(file)!r} cannot be read ({err}); delete or replace it.") from None


def _resize_center_crop(image, size: int):
    from PIL import Image

    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.LANCZOS)
    left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def _dataset_root(root, name: str) -> Path:
    if root is None or str(root).strip() == "":
        raise DataError(
            f"The {name} dataset needs a directory for its files; set data.root (e.g. data.root=./datasets)."
        )
    return Path(root).expanduser()


def _resize_uint8(data: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bilinearly resize uint8 images ``[N, C, H, W]`` once at load time (e.g. MNIST 28 -> 32 for a UNet)."""
    if data.shape[-2:] == (resolution, resolution):
        return data.contiguous()
    # In chunks, so the float copy of 60,000 images never exists all at once.
    chunks = [
        F.interpolate(
            chunk.float(), size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True
        )
        .round()
        .clamp(0, 255)
        .to(torch.uint8)
        for chunk in data.split(4096)
    ]
    return torch.cat(chunks)


def _positive_resolution(resolution) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise DataError(f"data.resolution must be a positive integer, got {resolution!r}.")
    return int(resolution)


def _extract(archive: Path, into: Path) -> None:
    from torchvision.datasets.utils import extract_archive

    try:
        extract_archive(str(archive), str(into))
    except Exception as err:  # tarfile/gzip errors for truncated downloads
        raise DataError(f"Could not unpack {str(archive)!r} ({err}); delete it and download it again.") from None


def _missing_message(title: str, root: Path, where: str, download: bool, err: Exception) -> str:
    if download:
        reason = " ".join(str(err).split())  # torchvision's errors span several lines
        return f"Downloading {title} into {root} failed ({reason}); without internet, {where} by hand and run again."
    return (
        f"{title} was not found (or is corrupt) in {root}: {where}, or set data.download=true to fetch it when online."
    )
