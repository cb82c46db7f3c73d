"""Point-cloud data from ``.npy`` files, the train/held-out split and the standardiser."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from imm.errors import DataError, DataNotFoundError
from imm.metrics import MIN_POINTS

# The evaluation's metrics need this many held-out points (and the noise floor as many training
# points), so a file smaller than twice it cannot give both splits that many rows.
MIN_HELDOUT_ROWS = MIN_POINTS
MIN_ROWS = 2 * MIN_HELDOUT_ROWS


def load_points(path: str | Path | None, min_rows: int = MIN_ROWS) -> torch.Tensor:
    """Load an ``[N, D]`` array of points from a ``.npy`` file as float32."""
    if path is None or str(path).strip() == "":
        raise DataError("No points file given; set data.path to a .npy file holding an [N, D] array.")
    file = Path(path).expanduser()
    if not file.is_file():
        what = "is a directory, not a file" if file.is_dir() else "does not exist"
        raise DataNotFoundError(
            f"Points file {str(file)!r} {what}; set data.path to a .npy file holding an [N, D] array."
        )
    _check_npy(file)
    try:
        array = np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        what = (
            "holds Python objects (dtype=object), not numbers" if "Object arrays" in str(err) else f"is damaged ({err})"
        )
        raise DataError(
            f"Points file {str(file)!r} {what}; save a numeric [N, D] array with numpy.save(path, array)."
        ) from None
    if array.ndim != 2:
        raise DataError(
            f"Points file {str(file)!r} holds an array of shape {tuple(array.shape)}; "
            "an [N, D] array (one point per row) is expected, e.g. reshape it with array.reshape(len(array), -1)."
        )
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise DataError(f"Points file {str(file)!r} has dtype {array.dtype}; a numeric [N, D] array is expected.")
    if array.shape[0] < min_rows or array.shape[1] < 1:
        raise DataError(
            f"Points file {str(file)!r} has shape {tuple(array.shape)}; at least {min_rows} rows "
            "and 1 column are needed for a train and a held-out split."
        )
    with np.errstate(over="ignore"):  # values too large for float32 become inf and are reported below
        array = array.astype(np.float32)
    bad_rows = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if bad_rows.size:
        n_bad = int((~np.isfinite(array)).sum())
        raise DataError(
            f"Points file {str(file)!r} has {n_bad} non-finite values (NaN/inf or beyond float32 range) "
            f"in {bad_rows.size} rows, the first at row {int(bad_rows[0])}; remove or fix those rows."
        )
    return torch.from_numpy(array)


NPY_MAGIC, NPZ_MAGIC, PICKLE = b"\x93NUMPY", b"PK\x03\x04", b"\x80"


def _check_npy(file: Path) -> None:
    """A DataError that says what `file` is when it is not a .npy array (numpy would call a CSV "pickled data")."""
    try:
        with open(file, "rb") as f:
            head = f.read(4096)
    except OSError as err:
        raise DataError(f"Points file {str(file)!r} cannot be read ({err.strerror}); check its permissions.") from None
    if head.startswith(NPY_MAGIC):
        return
    fix = "save an [N, D] array with numpy.save(path, array)"
    if not head:
        what = "is empty"
    elif head.startswith(NPZ_MAGIC):
        what, fix = (
            "is an .npz archive (or another zip file), not a .npy array",
            "save a single [N, D] array with numpy.save",
        )
    elif head.startswith(PICKLE):
        what = "is a Python pickle, not a .npy array"
    elif _is_text(head):
        what = "is a text file (CSV or similar), not a .npy array"
        fix = f"convert it once: numpy.save('points.npy', numpy.loadtxt({str(file)!r}, delimiter=','))"
    else:
        what = "is not a .npy array (it lacks numpy's header)"
    raise DataError(f"Points file {str(file)!r} {what}; {fix}.")


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:  # a multi-byte character cut at the end of the 4 kB is still text
        return err.start >= len(head) - 3 and b"\x00" not in head
    return b"\x00" not in head


def split_points(points: torch.Tensor, heldout_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle rows with ``seed`` and split off ``heldout_fraction`` of them (at least a few rows)."""
    if not 0.0 < float(heldout_fraction) < 1.0:
        raise DataError(f"data.heldout_fraction must be between 0 and 1 (exclusive), got {heldout_fraction!r}.")
    n = points.shape[0]
    n_heldout = max(MIN_HELDOUT_ROWS, round(n * float(heldout_fraction)))
    if n - n_heldout < MIN_HELDOUT_ROWS:
        raise DataError(
            f"data.heldout_fraction={heldout_fraction} leaves only {n - n_heldout} of {n} rows for training; "
            "lower it or provide more points."
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) % 2**63))
    return points[order[n_heldout:]], points[order[:n_heldout]]


class Standardizer:
    """Per-dimension affine map from data space to model space with std ``target_std``.

    ``scale(x) = (x - mean) / std * target_std``.  The state is plain lists/floats
    so it can be stored in a checkpoint (or JSON) and used to undo the scaling
    when samples are shown.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], target_std: float = 0.5):
        self.mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if self.mean.shape != std.shape:
            raise DataError(f"Standardizer mean and std differ in length ({self.mean.numel()} vs {std.numel()}).")
        # A constant column has std 0; leave it unscaled instead of dividing by zero.
        self.std = torch.where(std > 0, std, torch.ones_like(std))
        self.target_std = float(target_std)

    @classmethod
    def fit(cls, x: torch.Tensor, target_std: float = 0.5) -> "Standardizer":
        """Standardiser from the per-dimension mean and std of ``x`` ``[N, D]``."""
        x = x.to(torch.float64)  # float32 sums over 1e5+ rows lose digits
        return cls(x.mean(dim=0).tolist(), x.std(dim=0, unbiased=False).tolist(), target_std)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats_like(x)
        return (x - mean) / std * self.target_std

    def unscale(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats_like(x)
        return x / self.target_std * std + mean

    def _stats_like(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-1] != self.mean.numel():
            raise DataError(
                f"Points have {x.shape[-1]} dimensions but the standardizer was fitted on {self.mean.numel()}."
            )
        dtype = x.dtype if x.is_floating_point() else torch.float32
        return self.mean.to(x.device, dtype), self.std.to(x.device, dtype)

    def state_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "target_std": self.target_std}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Standardizer":
        return cls(state["mean"], state["std"], state.get("target_std", 0.5))

    def __repr__(self) -> str:
        return f"Standardizer(dims={self.mean.numel()}, target_std={self.target_std})"
