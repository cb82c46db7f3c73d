"""Tests for imm.data: toy/point/image datasets and the resumable batch iterator."""

from __future__ import annotations

import gc
import json
import tarfile
import weakref

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from imm.data import (
    DataError,
    DataNotFoundError,
    InMemoryDataset,
    ResumableBatches,
    Standardizer,
    build_dataset,
    images,
    load_points,
    toy,
)
from imm.data.loader import BaseDataset

# ---------------------------------------------------------------- toy data


@pytest.mark.parametrize("name", toy.NAMES)
def test_toy_deterministic_shape_and_dtype(name):
    a = toy.make(name, 1000, seed=3)
    assert a.shape == (1000, 2) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, toy.make(name, 1000, seed=3))
    assert not torch.equal(a, toy.make(name, 1000, seed=4))


@pytest.mark.parametrize("name", toy.NAMES)
def test_toy_bundle_is_standardised_and_invertible(name):
    bundle = build_dataset(name, n_train=20_000, n_heldout=2_000, seed=0)
    assert bundle.kind == "points" and bundle.shape == (2,) and bundle.num_classes == 0
    train = bundle.train.data
    assert train.shape == (20_000, 2) and bundle.heldout.shape == (2_000, 2)
    torch.testing.assert_close(train.std(0, unbiased=False), torch.full((2,), 0.5), atol=1e-4, rtol=0)
    torch.testing.assert_close(train.mean(0), torch.zeros(2), atol=1e-4, rtol=0)
    # Held-out points come from another seed but the same distribution.
    assert (bundle.heldout.std(0) - 0.5).abs().max() < 0.05
    assert not torch.equal(bundle.heldout, train[:2_000])
    raw = toy.make(name, 20_000, seed=0)
    torch.testing.assert_close(bundle.unscale(train), raw, atol=1e-4, rtol=1e-5)
    x, label = bundle.train[0]
    assert x.shape == (2,) and label == -1


def test_checkerboard_fills_alternating_squares():
    points = toy.make("checkerboard", 20_000, seed=0)
    assert points.abs().max() <= 4
    cells = torch.floor(points / 2).long() + 2  # 4x4 grid of 2x2 squares, indices 0..3
    parity = (cells[:, 0] + cells[:, 1]) % 2
    assert parity.unique().numel() == 1  # only one colour of the board is filled
    assert torch.unique(cells, dim=0).shape[0] == 8


def test_standardizer_round_trip_and_plain_state():
    x = torch.randn(500, 3, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1]) + 5
    s = Standardizer.fit(x.float())
    state = json.loads(json.dumps(s.state_dict()))  # plain lists/floats only
    s2 = Standardizer.from_state_dict(state)
    scaled = s2.scale(x.float())
    torch.testing.assert_close(scaled.std(0, unbiased=False), torch.full((3,), 0.5), atol=1e-4, rtol=0)
    torch.testing.assert_close(s2.unscale(scaled), x.float(), atol=1e-4, rtol=1e-5)


def test_unknown_names():
    with pytest.raises(DataError, match="data.name"):
        build_dataset("swissroll")
    with pytest.raises(DataError, match="positive integer"):
        toy.make("moons", 0, seed=0)


# ---------------------------------------------------------------- .npy points


def test_points_missing_path_names_the_key():
    with pytest.raises(DataError, match=r"data\.path"):
        build_dataset("points", path=None)


def test_points_file_not_found(tmp_path):
    missing = tmp_path / "nope.npy"
    with pytest.raises(FileNotFoundError) as info:
        load_points(missing)
    assert isinstance(info.value, DataNotFoundError)
    assert str(missing) in str(info.value) and "data.path" in str(info.value)


def test_points_wrong_rank_names_shape(tmp_path):
    file = tmp_path / "cube.npy"
    np.save(file, np.zeros((20, 3, 4)))
    with pytest.raises(DataError, match=r"\(20, 3, 4\).*\[N, D\]"):
        load_points(file)


def test_points_non_finite_counted_with_first_row(tmp_path):
    array = np.ones((50, 2))
    array[7, 1] = np.nan
    array[30, 0] = np.inf
    file = tmp_path / "nan.npy"
    np.save(file, array)
    with pytest.raises(DataError, match=r"2 non-finite values.*first at row 7"):
        load_points(file)


def test_points_too_few_rows_and_not_npy(tmp_path):
    file = tmp_path / "tiny.npy"
    np.save(file, np.zeros((3, 2)))
    with pytest.raises(DataError, match="at least"):
        load_points(file)
    text = tmp_path / "points.npy"
    text.write_text("1,2\n3,4\n")
    with pytest.raises(DataError, match="numpy.save"):
        load_points(text)


def test_a_points_file_that_is_no_npy_array_is_said_for_what_it_is(tmp_path):
    """numpy.load calls a CSV "pickled data" (allow_pickle): the error says what the file really is instead."""
    import pickle

    files = {
        "csv.npy": ("1.0,2.0\n3.0,4.0\n" * 20).encode(),
        "empty.npy": b"",
        "pickle.npy": pickle.dumps([[1.0, 2.0]] * 20),
        "garbage.npy": bytes(range(256)),
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    with open(tmp_path / "archive.npy", "wb") as f:  # an .npz under a .npy name
        np.savez(f, a=np.zeros((20, 2)))
    np.save(tmp_path / "objects.npy", np.array([{"x": 1}] * 20, dtype=object), allow_pickle=True)
    expected = {
        "csv.npy": "is a text file (CSV or similar), not a .npy array; convert it once: numpy.save('points.npy',"
        f" numpy.loadtxt({str(tmp_path / 'csv.npy')!r}, delimiter=','))",
        "empty.npy": "is empty",
        "pickle.npy": "is a Python pickle, not a .npy array",
        "garbage.npy": "is not a .npy array (it lacks numpy's header)",
        "archive.npy": "is an .npz archive (or another zip file), not a .npy array",
        "objects.npy": "holds Python objects (dtype=object), not numbers",
    }
    for name, what in expected.items():
        with pytest.raises(DataError) as e:
            load_points(tmp_path / name)
        assert str(e.value).startswith(f"Points file {str(tmp_path / name)!r} {what}"), str(e.value)
        assert "pickle" not in str(e.value) or name == "pickle.npy", str(e.value)


def test_points_split_deterministic_disjoint_and_scaled(tmp_path):
    array = np.random.default_rng(0).normal(3.0, 2.0, size=(200, 5))
    file = tmp_path / "pts.npy"
    np.save(file, array)
    a = build_dataset("points", path=str(file), heldout_fraction=0.1, seed=1)
    b = build_dataset("points", path=str(file), heldout_fraction=0.1, seed=1)
    assert a.shape == (5,) and len(a.train) == 180 and a.heldout.shape == (20, 5)
    assert torch.equal(a.train.data, b.train.data) and torch.equal(a.heldout, b.heldout)
    torch.testing.assert_close(a.train.data.std(0, unbiased=False), torch.full((5,), 0.5), atol=1e-4, rtol=0)
    rows = torch.cat([a.unscale(a.train.data), a.unscale(a.heldout)]).double()
    rows = rows[np.lexsort(rows.T.numpy()[::-1])]
    expected = torch.from_numpy(array[np.lexsort(array.T[::-1])])
    torch.testing.assert_close(rows, expected, atol=1e-4, rtol=1e-5)
    c = build_dataset("points", path=str(file), heldout_fraction=0.1, seed=2)
    assert not torch.equal(a.heldout, c.heldout)


# ---------------------------------------------------------------- images


def _png(path, size=(24, 20), color=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_folder_unconditional_resize_and_crop(tmp_path):
    # Wide image: red left/right quarters, green centre; the centre crop keeps only green.
    wide = np.zeros((10, 20, 3), dtype=np.uint8)
    wide[:, :5] = wide[:, 15:] = (255, 0, 0)
    wide[:, 5:15] = (0, 255, 0)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    _png(tmp_path / "big.jpg", size=(64, 48), color=(0, 0, 255))
    _png(tmp_path / "nested" / "c.bmp", size=(30, 40))  # mixed layout: unconditional
    (tmp_path / "notes.txt").write_text("ignored")
    bundle = build_dataset("folder", root=str(tmp_path), resolution=10)
    assert bundle.kind == "images" and bundle.shape == (3, 10, 10) and bundle.num_classes == 0
    assert bundle.heldout is None and len(bundle.train) == 3
    for i in range(3):
        x, label = bundle.train[i]
        assert x.shape == (3, 10, 10) and x.dtype == torch.float32 and label == -1
        assert x.min() >= -1 and x.max() <= 1
    wide_x = bundle.train.get(bundle.train.files.index(tmp_path / "wide.png"), flip=False)[0]
    assert torch.equal(wide_x[1], torch.ones(10, 10)) and torch.equal(wide_x[0], -torch.ones(10, 10))
    assert torch.equal(bundle.unscale(wide_x)[1], torch.full((10, 10), 255.0))


def test_folder_class_subfolders(tmp_path):
    for cls, n in [("dogs", 2), ("cats", 3)]:
        for i in range(n):
            _png(tmp_path / cls / f"{i}.png")
    bundle = build_dataset("folder", root=tmp_path, resolution=8)
    assert bundle.num_classes == 2 and bundle.train.classes == ["cats", "dogs"]
    labels = sorted(bundle.train[i][1] for i in range(5))
    assert labels == [0, 0, 0, 1, 1]
    forced = build_dataset("folder", root=tmp_path, resolution=8, class_subfolders=False)
    assert forced.num_classes == 0 and forced.train[0][1] == -1


def test_folder_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        build_dataset("folder", root=tmp_path / "missing", resolution=8)
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"No images.*\.png.*\.webp"):
        build_dataset("folder", root=tmp_path, resolution=8)
    _png(tmp_path / "ok.png")
    with pytest.raises(DataError, match="data.resolution"):
        build_dataset("folder", root=tmp_path, resolution=None)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(DataError, match="broken.png"):
        build_dataset("folder", root=tmp_path, resolution=8)


def test_a_truncated_jpeg_fails_when_the_folder_is_read_naming_it(tmp_path):
    """PIL's verify() passes a JPEG cut in half; the up-front decode does not, so it fails before training."""
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=90)
    whole = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "b.jpg").write_bytes(whole[: len(whole) // 2])
    with Image.open(tmp_path / "b.jpg") as image:
        image.verify()  # the check the folder did before: it passes
    with pytest.raises(DataError, match=r"^Image '.*b\.jpg' cannot be read \(image file is truncated"):
        build_dataset("folder", root=tmp_path, resolution=8)


def test_cifar10_offline_error_names_directory_and_files(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        build_dataset("cifar10", root=str(tmp_path), download=False)
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    for name in [
        "data_batch_1",
        "data_batch_5",
        "test_batch",
        "batches.meta",
        "cifar-10-python.tar.gz",
        "data.download=true",
    ]:
        assert name in message
    assert "\n" not in message


def test_mnist_offline_error_names_directory_and_files(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        build_dataset("mnist", root=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "data.download=true" in message


def test_cifar10_archive_is_unpacked_and_converted(tmp_path, monkeypatch):
    # torchvision verifies md5 sums, so stand in for its class and check our side:
    # the archive is unpacked without download=True and the data are converted.
    folder = tmp_path / "src" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "data_batch_1").write_bytes(b"x")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            assert (tmp_path / "cifar-10-batches-py" / "data_batch_1").is_file() and not download
            self.data = np.full((6, 32, 32, 3), 255, dtype=np.uint8)
            self.data[:, :, :16, 0] = 0
            self.targets = [0, 1, 2, 3, 4, 5]

    monkeypatch.setattr("torchvision.datasets.CIFAR10", FakeCIFAR10)
    bundle = build_dataset("cifar10", root=tmp_path, hflip=True)
    assert bundle.shape == (3, 32, 32) and bundle.num_classes == 10 and len(bundle.train) == 6
    x, label = bundle.train.get(4, flip=False)
    assert label == 4 and x[0, 0, 0] == -1 and x[0, 0, 31] == 1 and x[1].eq(1).all()
    assert torch.equal(bundle.train.get(4, flip=True)[0], x.flip(-1))
    big = build_dataset("cifar10", root=tmp_path, resolution=48)
    assert big.shape == (3, 48, 48) and big.train.data.dtype == torch.uint8
    assert big.train.get(0, flip=False)[0][1].eq(1).all()  # a constant channel stays constant
    with pytest.raises(DataError, match="data.resolution"):
        build_dataset("cifar10", root=tmp_path, resolution=0)


def test_mnist_conversion_and_resize(tmp_path, monkeypatch):
    class FakeMNIST:  # torchvision's reader without the files: 5 training images, 3 test images
        def __init__(self, root, train, download):
            n = 5 if train else 3
            self.data = torch.zeros(n, 28, 28, dtype=torch.uint8)
            self.targets = torch.arange(n)

    monkeypatch.setattr("torchvision.datasets.MNIST", FakeMNIST)
    assert build_dataset("mnist", root=tmp_path).shape == (1, 28, 28)
    bundle = build_dataset("mnist", root=tmp_path, resolution=32)
    x, label = bundle.train[3]
    assert bundle.shape == (1, 32, 32) and x.shape == (1, 32, 32) and label == 3 and x.eq(-1).all()
    assert len(bundle.train) == 5 and len(bundle.heldout) == 3  # the test set: the classifier metric's held-out split
    assert bundle.heldout.shape == (1, 32, 32)


def test_digits():
    bundle = build_dataset("digits", heldout_fraction=0.2, seed=0)
    assert bundle.shape == (1, 16, 16) and bundle.num_classes == 10
    assert (len(bundle.train), len(bundle.heldout)) == (1438, 359)  # 20% of the 1797 held out
    both = torch.cat([bundle.train.data, bundle.heldout.data]).flatten(1)
    assert len(both.unique(dim=0)) == len(images.digits().data.flatten(1).unique(dim=0))  # a partition
    again = build_dataset("digits", heldout_fraction=0.2, seed=0)
    assert torch.equal(again.heldout.data, bundle.heldout.data)  # deterministic given data.seed
    data = bundle.train.data
    assert data.dtype == torch.float32 and data.min() >= -1 and data.max() <= 1
    assert data.min() == -1 and data.max() > 0.9
    assert sorted(bundle.train.labels.unique().tolist()) == list(range(10))


# ---------------------------------------------------------------- ResumableBatches


class IndexImages(BaseDataset):
    """Not an InMemoryDataset, so it goes through the DataLoader path.

    Sample i is a 1x2x3 "image" whose pixels encode i, so flips and order are visible.
    """

    def __init__(self, n, num_classes=0, hflip=False):
        self.data = torch.arange(n, dtype=torch.float32)[:, None, None, None] * 10 + torch.arange(3.0)
        self.data = self.data.expand(n, 1, 2, 3).contiguous()
        self.num_classes, self.hflip = num_classes, hflip

    def __len__(self):
        return len(self.data)

    def get(self, index, flip):
        x = self.data[index]
        return (x.flip(-1) if flip else x), (index % self.num_classes if self.num_classes else -1)


def _take(batches, k):
    return [next(batches) for _ in range(k)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb)
        assert (ya is None and yb is None) or torch.equal(ya, yb)


def test_same_seed_same_order_and_epochs_are_permutations():
    data = InMemoryDataset(torch.arange(50.0)[:, None])
    a, b = ResumableBatches(data, 8, seed=1), ResumableBatches(data, 8, seed=1)
    first = _take(a, 12)
    _assert_same(first, _take(b, 12))
    assert a.batches_per_epoch == 6
    epoch0 = torch.cat([x for x, _ in first[:6]]).flatten()
    assert epoch0.unique().numel() == 48  # no repeats; the remainder of 2 is dropped
    assert not torch.equal(epoch0, torch.cat([x for x, _ in first[6:]]).flatten())
    other = _take(ResumableBatches(data, 8, seed=2), 6)
    assert not torch.equal(epoch0, torch.cat([x for x, _ in other]).flatten())
    assert a.state_dict() == {"epoch": 2, "position": 0}


def test_resume_fast_path_across_epoch_boundary():
    data = InMemoryDataset(torch.randn(40, 1, 2, 2), torch.arange(40) % 4, num_classes=4, hflip=True)
    straight = ResumableBatches(data, 6, seed=5)
    reference = _take(straight, 14)  # 6 batches per epoch: crosses two epoch boundaries
    for k in [0, 3, 6, 9]:
        first = ResumableBatches(data, 6, seed=5)
        _take(first, k)
        resumed = ResumableBatches(data, 6, seed=5)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        _assert_same(_take(resumed, 14 - k), reference[k:])
    x, labels = reference[0]
    assert labels.dtype == torch.long and labels.shape == (6,)


@pytest.mark.parametrize("num_workers,persistent", [(0, False), (2, False), (2, True)])
def test_resume_dataloader_path(num_workers, persistent):
    data = IndexImages(30, num_classes=3, hflip=True)
    kwargs = dict(seed=7, num_workers=num_workers, persistent_workers=persistent)
    reference = _take(ResumableBatches(data, 4, **kwargs), 12)
    first = ResumableBatches(data, 4, **kwargs)
    _take(first, 5)
    # Workers have prefetched ahead; the state still counts consumed batches only.
    assert first.state_dict() == {"epoch": 0, "position": 5}
    resumed = ResumableBatches(data, 4, **kwargs)
    resumed.load_state_dict(first.state_dict())
    _assert_same(_take(resumed, 7), reference[5:])
    # Rewinding a running iterator discards its prefetched batches.
    first.load_state_dict({"epoch": 1, "position": 2})
    _assert_same(_take(first, 3), reference[9:12])


def test_iterator_is_freed_without_the_garbage_collector():
    # A reference cycle would leave worker shutdown to the GC, which then stalls 5 s per worker.
    batches = ResumableBatches(IndexImages(30), 4, seed=0, num_workers=2)
    _take(batches, 2)
    ref = weakref.ref(batches)
    gc.disable()
    try:
        del batches
        assert ref() is None
    finally:
        gc.enable()


def test_dataloader_and_fast_path_agree_including_flips():
    images = IndexImages(30, num_classes=3, hflip=True)
    in_memory = InMemoryDataset(images.data, torch.arange(30) % 3, num_classes=3, hflip=True)
    slow = _take(ResumableBatches(images, 5, seed=3), 8)
    _assert_same(_take(ResumableBatches(in_memory, 5, seed=3), 8), slow)
    # Some samples are flipped, some are not.
    flipped = [bool((x[0, 0, 0] > x[0, 0, -1]).item()) for batch, _ in slow for x in batch]
    assert any(flipped) and not all(flipped)


def test_rank_slices_partition_the_global_batch():
    data = InMemoryDataset(torch.arange(64.0)[:, None], torch.arange(64) % 2, num_classes=2)
    whole = _take(ResumableBatches(data, 8, seed=0), 10)
    ranks = [_take(ResumableBatches(data, 8, seed=0, rank=r, world_size=2), 10) for r in range(2)]
    for step, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([ranks[0][step][0], ranks[1][step][0]]), x)
        assert torch.equal(torch.cat([ranks[0][step][1], ranks[1][step][1]]), y)
    assert ranks[0][0][0].shape == (4, 1)
    # The same through the DataLoader path.
    images = IndexImages(20)
    whole = _take(ResumableBatches(images, 4, seed=0), 3)
    rank1 = _take(ResumableBatches(images, 4, seed=0, rank=1, world_size=2), 3)
    for (x, _), (x1, _) in zip(whole, rank1):
        assert torch.equal(x[2:], x1)


def test_labels_none_for_unconditional_data():
    x, labels = next(ResumableBatches(InMemoryDataset(torch.zeros(10, 2)), 5, seed=0))
    assert labels is None and x.shape == (5, 2)
    x, labels = next(ResumableBatches(IndexImages(10), 5, seed=0))
    assert labels is None
    # Plain torch datasets: a label tensor when there is one.
    x, labels = next(ResumableBatches(TensorDataset(torch.zeros(10, 2)), 5, seed=0))
    assert labels is None
    x, labels = next(ResumableBatches(TensorDataset(torch.zeros(10, 2), torch.arange(10)), 5, seed=0))
    assert labels.dtype == torch.long and labels.shape == (5,)


def test_batch_errors():
    data = InMemoryDataset(torch.zeros(10, 2))
    with pytest.raises(DataError, match="not divisible by world_size 4"):
        ResumableBatches(data, 6, seed=0, world_size=4)
    with pytest.raises(DataError, match="10 samples, fewer than the global batch size 16"):
        ResumableBatches(IndexImages(10), 16, seed=0)
    with pytest.raises(DataError, match="positive integer"):
        ResumableBatches(data, 0, seed=0)
    with pytest.raises(DataError, match="same dataset and global batch size"):
        ResumableBatches(data, 5, seed=0).load_state_dict({"epoch": 0, "position": 2})


class BrokenAt(IndexImages):
    """Sample `bad` cannot be read (as an image file that changed after the up-front check)."""

    def __init__(self, n, bad):
        super().__init__(n)
        self.bad = bad

    def get(self, index, flip):
        if index == self.bad:
            raise DataError(f"Image 'img{index}.png' cannot be decoded (truncated); delete or replace it.")
        return super().get(index, flip)


def test_a_data_error_in_a_dataloader_worker_is_its_own_sentence():
    """torch re-raises a worker's exception with the worker's traceback in its message; the iterator says the
    worker's one sentence instead."""
    batches = ResumableBatches(BrokenAt(8, bad=3), 8, seed=0, num_workers=1)
    with pytest.raises(DataError) as e:
        next(batches)
    assert str(e.value) == "Image 'img3.png' cannot be decoded (truncated); delete or replace it."
