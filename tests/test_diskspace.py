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
import time

import pytest
import torch
from helpers import compose_cfg, compose_task
from helpers.tmpfs import fill, remount, tmpfs

from imm import diskspace
from imm import runs as rundir
from imm.data import latents
from imm.diskspace import DiskFullError, disk_errno, human
from imm.evaluation import figures
from imm.tracking.mlflow_run import Tracker
from imm.training import checkpoint, diskwatch

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


# -- checkpoints ---------------------------------------------------------------------------------------------
def test_a_checkpoint_that_does_not_fit_is_one_sentence_and_the_previous_one_stays(tmp_path):
    with tmpfs(tmp_path / "small", "600k") as mnt:
        run = mnt / "run"
        first = checkpoint.save(state(50_000, 1), run, 1)  # 200 kB
        before = first.read_bytes()
        free = diskspace.free_bytes(mnt)
        big = state(125_000, 2)  # 500 kB: does not fit beside the first
        with pytest.raises(DiskFullError) as e:
            checkpoint.save(big, run, 2)
        target = run / "checkpoints" / "step-00000002.pt"
        assert e.value.needed == exact_size(big) and e.value.free == free  # the failed write's space is back
        assert str(e.value) == (
            f"no space left on device for {target} (it needs {human(exact_size(big))}, {human(free)} is free on"
            f" {mnt}); free some space there, then run the same command again"
        )
        assert files(run) == ["checkpoints/step-00000001.pt"]  # no partial file, no new name
        assert first.read_bytes() == before and checkpoint.load(first, required=("step",))["step"] == 1

        remount(mnt, read_only=True)
        with pytest.raises(DiskFullError) as e:
            checkpoint.save(state(10, 3), run, 3)
        assert e.value.code == errno.EROFS and str(e.value) == (
            f"{mnt} is a read-only file system, so {run / 'checkpoints' / 'step-00000003.pt'} cannot be written;"
            " make it writable (remount it read-write), then run the same command again"
        )
        assert files(run) == ["checkpoints/step-00000001.pt"]


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


# -- the small files: status, best, link, manifest, figure ---------------------------------------------------
def test_small_writes_on_a_full_disk_leave_what_was_there(tmp_path):
    with tmpfs(tmp_path / "small", "200k") as mnt:
        run = mnt / "run"
        rundir.write_status(run, status="KILLED", step=100)
        checkpoint.write_best(run, {"best/energy_1step": 0.5})
        snap = checkpoint.save_snapshot(state(10, 100), run, 100)
        link = checkpoint.link_best(run, "1step", snap)
        (mnt / "lat").mkdir()
        latents.write_manifest(mnt / "lat", {"shards": [1]})
        fig = figures.Figure(figsize=(2, 2))
        fig.add_subplot().plot([0, 1], [1, 0])
        figures.save_png(fig, mnt / "steps.png")
        before = {name: (mnt / name).read_bytes() for name in files(mnt)}
        fill(mnt)

        big = {"summary": {f"m{i}": i for i in range(2000)}}  # more than the last page holds
        with pytest.raises(DiskFullError, match=r"^no space left on device for .*/run/status\.json \(it needs"):
            rundir.write_status(run, status="FINISHED", step=200, **big)
        with pytest.raises(DiskFullError, match=r"/run/snapshots/best\.json"):
            checkpoint.write_best(run, big["summary"])
        with pytest.raises(DiskFullError, match=r"/lat/manifest\.json"):
            latents.write_manifest(mnt / "lat", {"shards": list(range(5000))})
        big_fig = figures.Figure(figsize=(8, 8))
        big_fig.add_subplot().imshow(torch.rand(256, 256, 3).numpy())
        with pytest.raises(DiskFullError, match=r"/steps\.png"):
            figures.save_png(big_fig, mnt / "steps.png")
        (mnt / "filler").unlink()

        assert files(mnt) == sorted(before)  # no temporary file left behind
        assert {name: (mnt / name).read_bytes() for name in before} == before
        assert rundir.read_status(run)["status"] == "KILLED" and checkpoint.read_best(run) == {"best/energy_1step": 0.5}

        remount(mnt, read_only=True)  # a symlink fits in a full tmpfs's inode: the link is tried read-only
        with pytest.raises(DiskFullError, match=r"is a read-only file system, so .*/snapshots/best-1step\.pt cannot"):
            checkpoint.link_best(run, "1step", checkpoint.snapshot_path(run, 200))
        assert os.readlink(link) == snap.name


# -- what does not stop the work: MLflow, a figure of the training -------------------------------------------
def test_mlflow_writes_on_a_full_disk_are_one_warning_line_each_and_the_run_goes_on(tmp_path, caplog, capfd):
    artifact = tmp_path / "steps.png"
    artifact.write_bytes(os.urandom(100_000))
    with tmpfs(tmp_path / "small", "3m") as mnt:
        uri = f"sqlite:///{mnt / 'mlflow.db'}"
        tracker = Tracker.open(uri, "imm", run_name="full", params={"a": "1"}, tags={})
        tracker.start_system_metrics(uri, 0.2, resume=False)  # its thread's failed writes: no lines of MLflow's
        fill(mnt)
        with caplog.at_level(logging.WARNING):
            time.sleep(1.0)
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
        ], lines
        said = capfd.readouterr().err  # MLflow's own logger (not propagated): its records of the errors are filtered
        assert "disk is full" not in said and "Traceback" not in said, said[-3000:]


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


# -- the early warning and the check before training -----------------------------------------------------------
class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_next_saves_follow_the_loops_order():
    assert diskwatch.next_saves(0, 3000, 100, 100) == [(100, "snapshot"), (100, "checkpoint")]
    assert diskwatch.next_saves(100, 3000, 100, 300) == [(200, "checkpoint"), (300, "snapshot")]
    assert diskwatch.next_saves(250, 300, 100, 0) == [(300, "checkpoint")]
    assert diskwatch.next_saves(290, 300, 100, 1000, n=3) == [(300, "snapshot"), (300, "checkpoint")]
    assert diskwatch.next_saves(300, 300, 100, 100) == []


def test_low_space_is_one_warning_line_per_interval_and_the_check_before_training_refuses(tmp_path, caplog):
    with tmpfs(tmp_path / "small", "1m") as mnt:
        run = mnt / "run"
        cfg = compose_cfg("debug=toy", "train.ckpt_every=100", "train.snapshot_every=100").train
        ckpt = checkpoint.save(state(75_000, 100), run, 100)  # 300 kB
        checkpoint.save_snapshot(state(25_000, 100), run, 100)  # 100 kB
        clock = Clock()
        watch = diskwatch.SpaceWatch(run, cfg, {}, clock=clock)
        with caplog.at_level(logging.WARNING, logger="imm.train"):
            watch.check(100, Tracker.disabled())  # ~600 kB free: the next two saves (400 kB) fit
            assert caplog.records == []
            fill(mnt, leave=350_000)
            watch.check(150, Tracker.disabled())  # between saves, looked at only after CHECK_EVERY_S
            assert caplog.records == []
            clock.t += diskwatch.CHECK_EVERY_S
            watch.check(150, Tracker.disabled())
            watch.check(200, Tracker.disabled())  # a save step: looked at, but said once per WARN_EVERY_S
            clock.t += diskspace.WARN_EVERY_S
            watch.check(300, Tracker.disabled())
        lines = [r.getMessage() for r in caplog.records]
        assert (
            len(lines) == 2
            and lines[0].startswith("low disk space: 3")
            and "the next two saves (snapshot at step 200, checkpoint at step 200) need 4" in lines[0]
        ), lines

        watch.check_room(100, "python launch.py debug=toy")  # the next checkpoint (300 kB) fits in ~350 kB
        fill(mnt, leave=250_000)
        with pytest.raises(DiskFullError) as e:
            watch.check_room(100, "python launch.py debug=toy")
        assert re.fullmatch(
            rf"no space left on device for {re.escape(str(run))}/checkpoints/step-00000200\.pt \(it needs"
            rf" {human(ckpt.stat().st_size)}, .* is free on {re.escape(str(mnt))}\); the last complete checkpoint is"
            rf" step 100 \({re.escape(str(ckpt))}\); free some space there, then resume with: python launch.py"
            r" debug=toy",
            str(e.value),
        ), str(e.value)
        fill(mnt, leave=50_000)
        with pytest.raises(DiskFullError, match=r"it needs 64\.0 kB"):  # before Hydra writes its files (RunDirCheck)
            diskspace.check_free(run)


# -- sample's outputs --------------------------------------------------------------------------------------------
def test_sample_on_a_full_disk_is_one_sentence_and_leaves_no_partial_file(tmp_path):
    from imm.tasks import sample
    from imm.training.loop import train

    no_mlflow = "tracking.enabled=false"
    train(compose_cfg("debug=toy", "train.steps=10", "train.ckpt_every=10", no_mlflow), tmp_path / "run")
    with tmpfs(tmp_path / "small", "100k") as mnt:
        out = mnt / "samples"
        with pytest.raises(DiskFullError) as e:  # 20,000 2-D points in float32: 160 kB
            sample.run(compose_task("sample", f"ckpt={tmp_path / 'run'}", f"out={out}", "n=20000", no_mlflow))
        assert str(e.value) == (
            f"no space left on device for {out / 'samples.npy'} (it needs 160 kB, {human(e.value.free)} is free on"
            f" {mnt}); free some space there, then run the same command again"
        )
        assert files(out) == []
