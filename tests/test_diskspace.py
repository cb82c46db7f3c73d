"""A full disk, a used-up quota, a read-only file system (issue 31), write by write, on a real small tmpfs.

Every write a run makes either stops it with one sentence (DiskFullError: the file, what it needs, what is free,
what to do) and leaves what was there, or, when the work does not depend on it (a figure, an MLflow metric or
artifact, the status file), is one warning line and the work goes on. The end-to-end stops and resumes of a
training through launch.py are in tests/test_reliability.py, the encode's in tests/test_latents.py.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re

import pytest
import torch
from helpers.tmpfs import fill, tmpfs

from imm import diskspace
from imm.diskspace import DiskFullError, disk_errno
from imm.evaluation import figures
from imm.tracking.mlflow_run import Tracker

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors (conftest.py)


@pytest.fixture(autouse=True)
def fresh_warnings():
    """Each test sees its own first warning (they are rate-limited per process)."""
    diskspace._warned.clear()
    yield
    diskspace._warned.clear()


def state(n: int, step: int) -> dict:
    return {"step": step, "model": {"w": torch.arange(n, dtype=torch.float32)}}


def exact_size(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return len(buf.getvalue())


def files(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


# -- what a full disk is ---------------------------------------------------------------------------------------
def test_torchs_zip_writer_error_without_an_errno_counts_as_a_full_disk_only_when_space_is_short(tmp_path):
    """torch's `unexpected pos` carries no errno (the OSError it came from is not always chained): the free space
    decides, against what the file needs."""
    zip_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 282112 vs 282000")
    with tmpfs(tmp_path / "small", "100k") as mnt:
        assert disk_errno(zip_error, mnt, needed=200_000) == errno.ENOSPC
        assert disk_errno(zip_error, mnt, needed=50_000) is None  # room enough: something else, its traceback
        assert disk_errno(RuntimeError("shape mismatch"), mnt, needed=200_000) is None
    assert disk_errno(OSError(errno.EDQUOT, "Disk quota exceeded")) == errno.EDQUOT
    chained = RuntimeError("writer failed")
    chained.__context__ = OSError(errno.ENOSPC, "No space left on device")
    assert disk_errno(chained) == errno.ENOSPC
    quota = DiskFullError(tmp_path / "x.pt", errno.EDQUOT, needed=2_000_000, free=5_000_000)
    assert str(quota).startswith(f"disk quota exceeded writing {tmp_path / 'x.pt'} (it needs 2.00 MB, 5.00 MB is")
    assert str(quota).endswith(
        "but your quota is used up); free some of your quota (or ask for more), then run the same command again"
    )


# -- what does not stop the work: MLflow, a figure of the training -------------------------------------------
def test_mlflow_writes_on_a_full_disk_are_one_warning_line_each_and_the_run_goes_on(tmp_path, caplog):
    artifact = tmp_path / "steps.png"
    artifact.write_bytes(os.urandom(100_000))
    with tmpfs(tmp_path / "small", "3m") as mnt:
        uri = f"sqlite:///{mnt / 'mlflow.db'}"
        tracker = Tracker.open(uri, "imm", run_name="full", params={"a": "1"}, tags={})
        fill(mnt)
        with caplog.at_level(logging.WARNING):
            for step in (1, 2):  # the second failure of a kind is not said again
                tracker.log_metrics({f"m{i}": 1.0 for i in range(500)}, step)
                tracker.log_artifact(artifact, "figures")
            tracker.set_tags({f"t{i}": "v" * 200 for i in range(100)})
            tracker.end("FAILED", note="stopped")
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert lines == [
            "no space left on device; MLflow metrics not logged",
            "no space left on device; MLflow artifacts not logged",
            "no space left on device; MLflow tags not logged",
            f"no space left on device; the MLflow run {tracker.run_id} stays RUNNING until the same command runs again",
        ], lines  # and no MLflow traceback (its own ERROR record of the SQLite error is filtered)


def test_a_skipped_figure_leaves_no_partial_file(tmp_path, caplog):
    """The training's figures (imm.training.loop._evaluate) go through `skipped`: one line, no half a PNG."""
    with tmpfs(tmp_path / "small", "100k") as mnt:
        fill(mnt)
        fig = figures.Figure(figsize=(8, 8))
        fig.add_subplot().imshow(torch.rand(256, 256, 3).numpy())
        path = mnt / "figures" / "step00000100-steps.png"
        with caplog.at_level(logging.WARNING, logger="imm.disk"):
            with diskspace.skipped("figure not saved; training goes on", path, partial=path):
                path.parent.mkdir()
                fig.savefig(path, dpi=110)
        assert not path.exists()
        (line,) = [r.getMessage() for r in caplog.records]
        assert re.fullmatch(
            rf"no space left on device for {re.escape(str(path))} \(.* is free on .*\); figure not saved; training goes"
            " on",
            line,
        ), line
