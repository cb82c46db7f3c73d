"""An infinite, deterministic, resumable stream of training batches.

The order depends only on ``(seed, epoch)``: epoch ``e`` is the permutation drawn
from a generator seeded by ``(seed, e)``, cut into ``global_batch``-sized steps
(the remainder of each epoch is dropped), and rank ``r`` gets the contiguous
slice ``[r*b, (r+1)*b)`` of every step with ``b = global_batch // world_size``.
Because the state (``epoch``, ``position``) counts *global* batches consumed,
a run can resume exactly where it stopped, even with a different world size.

Horizontal flips are decided per sample from the same generator (one coin per
permutation slot), so augmentation is reproduced on resume too.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from imm.errors import DataError

SIGMA_DATA = 0.5  # the data's standard deviation in model space (imm.data's conventions)


class BaseDataset(Dataset):
    """A dataset of ``(x, label)`` whose only augmentation is an optional horizontal flip.

    Subclasses implement ``get(index, flip)``.  ``dataset[i]`` flips at random
    (when ``hflip`` is on); :class:`ResumableBatches` instead calls ``get`` with
    flips it chose deterministically.  ``label`` is an int, -1 for unconditional data.
    """

    hflip: bool = False
    num_classes: int = 0

    def get(self, index: int, flip: bool) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        flip = self.hflip and bool(torch.rand(()) < 0.5)
        return self.get(int(index), flip)


class HeldTensors(BaseDataset):
    """Samples held in memory as one tensor ``data [N, ...]`` with optional int labels ``[N]`` (-1 each when
    None); subclasses say in ``get`` how a stored sample becomes a model-space one."""

    def __init__(
        self, data: torch.Tensor, labels: torch.Tensor | None = None, num_classes: int = 0, hflip: bool = False
    ):
        self.data = data
        if labels is None:
            labels = torch.full((len(data),), -1, dtype=torch.long)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        if len(self.labels) != len(data):
            raise DataError(f"Got {len(self.labels)} labels for {len(data)} samples; they must match.")
        self.num_classes = int(num_classes)
        self.hflip = bool(hflip)
        self.shape = tuple(data.shape[1:])

    def __len__(self) -> int:
        return len(self.data)


class InMemoryDataset(HeldTensors):
    """Samples held as one tensor ``data [N, ...]`` in model space, with optional int labels ``[N]``.

    :class:`ResumableBatches` indexes these tensors directly instead of going
    through a DataLoader (toy, point and digits data are small).
    """

    def get(self, index: int, flip: bool) -> tuple[torch.Tensor, int]:
        x = self.data[index]
        return (x.flip(-1) if flip else x), int(self.labels[index])


class ResumableBatches:
    """Infinite iterator of ``(x, labels)`` batches for one rank, resumable via ``state_dict``.

    ``x`` is ``[b, *shape]`` with ``b = global_batch // world_size``.  ``labels`` is
    a LongTensor ``[b]`` for conditional data and **None for unconditional data**
    (``dataset.num_classes == 0``; for datasets without that attribute, a batch whose
    labels are all negative).  Batches are moved to ``device`` when given.

    :class:`InMemoryDataset` is indexed directly (moved to ``device`` once);
    other datasets go through a DataLoader whose batch sampler starts at the saved
    position.  Datasets that implement ``get(index, flip)`` (see :class:`BaseDataset`)
    get deterministic flips; for any other dataset, its own ``__getitem__`` randomness
    is not reproduced on resume.
    """

    def __init__(
        self,
        dataset: Dataset,
        global_batch: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        device: torch.device | str | None = None,
    ):
        global_batch = _positive_int(global_batch, "global batch size", "data.batch_size")
        world_size = _positive_int(world_size, "world_size", "the number of processes")
        if global_batch % world_size:
            raise DataError(
                f"Global batch size {global_batch} is not divisible by world_size {world_size}; "
                f"set the batch size to a multiple of {world_size}."
            )
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside [0, {world_size}) for world_size {world_size}.")
        self.dataset = dataset
        self.n = len(dataset)
        if self.n < global_batch:
            raise DataError(
                f"The dataset has {self.n} samples, fewer than the global batch size {global_batch}; "
                f"lower the batch size to at most {self.n} or use more data."
            )
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank, self.world_size = rank, world_size
        self.seed = int(seed)
        self.batches_per_epoch = self.n // global_batch
        self.device = torch.device(device) if device is not None else None
        # Batches consumed by the caller; the DataLoader's sampler may run ahead of this.
        self.epoch = 0
        self.position = 0

        num_classes = getattr(dataset, "num_classes", None)
        self._conditional = None if num_classes is None else num_classes > 0
        uses_get = hasattr(dataset, "get")
        # The sampler gets this plain description instead of a reference to self:
        # a reference cycle would leave worker shutdown to the garbage collector,
        # which closes the worker queues first and then waits 5 s per worker.
        self._plan = _Plan(
            n=self.n,
            global_batch=global_batch,
            local_batch=self.local_batch,
            rank=rank,
            seed=self.seed,
            batches_per_epoch=self.batches_per_epoch,
            uses_get=uses_get,
            flips=uses_get and bool(getattr(dataset, "hflip", False)),
        )
        self._order = _EpochOrder(self._plan)
        self._pin = bool(pin_memory)
        self._iter = None
        if isinstance(dataset, InMemoryDataset):
            self._loader = None
            self._data = dataset.data.to(self.device) if self.device is not None else dataset.data
            self._labels = dataset.labels.to(self._data.device)
        else:
            self._sampler = _RankBatchSampler(self._plan)
            self._loader = DataLoader(
                _ItemsWithFlips(dataset) if uses_get else dataset,
                batch_sampler=self._sampler,
                num_workers=num_workers,
                pin_memory=pin_memory,
                persistent_workers=persistent_workers and num_workers > 0,
                # Seeds the workers' own RNGs, for datasets that draw randomness themselves.
                generator=torch.Generator().manual_seed(_epoch_seed(self.seed, -1)),
            )

    def __iter__(self) -> "ResumableBatches":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._loader is None:
            x, labels = self._next_in_memory()
        else:
            if self._iter is None:
                self._sampler.start = (self.epoch, self.position)
                self._iter = iter(self._loader)
            try:
                batch = next(self._iter)
            except DataError as e:
                raise _own_sentence(e) from None
            x, labels = _split_batch(batch)
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return self._finish(x, labels)

    def _next_in_memory(self) -> tuple[torch.Tensor, torch.Tensor]:
        indices, flips = self._order.rank_slice(self.epoch, self.position)
        indices = indices.to(self._data.device)
        x = self._data[indices]
        if flips is not None:
            flips = flips.to(x.device).view(-1, *[1] * (x.dim() - 1))
            x = torch.where(flips, x.flip(-1), x)
        return x, self._labels[indices]

    def _finish(self, x, labels):
        if labels is not None:
            conditional = self._conditional if self._conditional is not None else bool((labels >= 0).any())
            labels = labels.long() if conditional else None
        if self.device is not None:
            non_blocking = self._pin and self.device.type == "cuda"
            x = x.to(self.device, non_blocking=non_blocking)
            labels = labels.to(self.device, non_blocking=non_blocking) if labels is not None else None
        return x, labels

    def state_dict(self) -> dict:
        """Batches consumed so far: ``{"epoch", "position"}`` (position = batches into the epoch)."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Continue so that the next batch is the one that followed when ``state`` was saved."""
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise DataError(
                f"Batch iterator state {state!r} is not of the form {{'epoch': int, 'position': int}}."
            ) from None
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise DataError(
                f"Saved data position (epoch {epoch}, batch {position}) does not fit this run's "
                f"{self.batches_per_epoch} batches per epoch; resume with the same dataset and global batch size."
            )
        self.epoch, self.position = epoch, position
        # Prefetched batches belong to the old position; a fresh iterator restarts the
        # sampler here (persistent workers are reused, non-persistent ones shut down).
        self._iter = None


@dataclass(frozen=True)
class _Plan:
    """What fixes the batch order: dataset size, batch geometry, seed and whether to flip."""

    n: int
    global_batch: int
    local_batch: int
    rank: int
    seed: int
    batches_per_epoch: int
    uses_get: bool  # items are (index, flip) pairs for dataset.get
    flips: bool


class _EpochOrder:
    """Permutation (and flip coins) of one epoch, cached because every step of an epoch needs it."""

    def __init__(self, plan: _Plan):
        self.plan = plan
        self._epoch = None
        self._perm = self._coins = None

    def rank_slice(self, epoch: int, position: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if epoch != self._epoch:
            plan = self.plan
            gen = torch.Generator().manual_seed(_epoch_seed(plan.seed, epoch))
            self._perm = torch.randperm(plan.n, generator=gen)
            self._coins = torch.rand(plan.n, generator=gen) < 0.5 if plan.flips else None
            self._epoch = epoch
        start = position * self.plan.global_batch + self.plan.rank * self.plan.local_batch
        window = slice(start, start + self.plan.local_batch)
        return self._perm[window], (self._coins[window] if self._coins is not None else None)


class _RankBatchSampler:
    """Batch sampler for the DataLoader: this rank's items from ``start`` onwards, forever.

    Items are ``(index, flip)`` pairs when the dataset supports deterministic flips.
    """

    def __init__(self, plan: _Plan):
        self.plan = plan
        self.start = (0, 0)
        # Its own cache: prefetching runs this sampler ahead of the consumed position.
        self.order = _EpochOrder(plan)

    def __iter__(self):
        epoch, position = self.start
        while True:
            for pos in range(position, self.plan.batches_per_epoch):
                indices, flips = self.order.rank_slice(epoch, pos)
                if not self.plan.uses_get:
                    yield indices.tolist()
                elif flips is None:
                    yield [(i, False) for i in indices.tolist()]
                else:
                    yield list(zip(indices.tolist(), flips.tolist()))
            epoch, position = epoch + 1, 0


class _ItemsWithFlips(Dataset):
    """Lets the DataLoader pass ``(index, flip)`` items to ``dataset.get``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, flip = item
        return self.dataset.get(index, flip)


def _own_sentence(e: DataError) -> DataError:
    """A DataError raised in a DataLoader worker, which torch re-raises here with the worker's traceback in its
    message ("Caught DataError in DataLoader worker ..."), as the worker's one sentence."""
    lines = str(e).strip().splitlines()
    prefix = f"{DataError.__module__}.{DataError.__name__}: "
    return DataError(lines[-1][len(prefix) :]) if len(lines) > 1 and lines[-1].startswith(prefix) else e


def _split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if len(batch) == 1:
        return batch[0], None
    return batch[0], torch.as_tensor(batch[1])


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed that mixes (seed, epoch) so nearby pairs give unrelated orders."""
    state = np.random.SeedSequence([seed % 2**64, epoch % 2**64]).generate_state(2)
    return (int(state[0]) << 31 ^ int(state[1])) & (2**63 - 1)


def _positive_int(value, what: str, key: str) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        number = 0
    if number < 1:
        raise DataError(f"The {what} must be a positive integer, got {value!r}; check {key}.")
    return number
