"""A real small file system for the full-disk tests: a tmpfs of a given size, mounted on a test's folder and
always unmounted after it; grown or shrunk in place with a remount (its files stay). Mounting needs root (CI runs
as root); where it is not allowed, the test is skipped and says why."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def tmpfs(folder, size: str):
    """A tmpfs of `size` (mount's notation: 600k, 3m) on `folder` (created) for the block."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the full-disk tests run where CI runs, as root)")
    try:
        proc = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
    except FileNotFoundError:
        pytest.skip("no mount command on this machine; the full-disk tests need a small tmpfs")
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not allowed here ({proc.stderr.strip()}); the full-disk tests need one")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], capture_output=True, timeout=30)


def remount(folder, size: str | None = None, *, read_only: bool | None = None) -> None:
    """Grow or shrink the tmpfs on `folder` to `size`, or make it read-only or writable again; its files stay."""
    options = ["remount"]
    if size is not None:
        options.append(f"size={size}")
    if read_only is not None:
        options.append("ro" if read_only else "rw")
    proc = _mount("-o", ",".join(options), str(folder))
    assert proc.returncode == 0, proc.stderr


def fill(folder, leave: int = 0) -> Path:
    """A file that takes the file system's free space but `leave` bytes (to the 4 kB page); returns it."""
    path = Path(folder) / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while (free := os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize) > leave:
            os.write(fd, b"\0" * min(4096, free - leave))
    except OSError:  # full to the last page
        pass
    finally:
        os.close(fd)
    return path
