"""A write that fails because the disk is full, the quota is used up or the file system is read-only.

Such a write is the user's machine, not a bug: it becomes DiskFullError, one sentence naming the file, what it
needed and what is free, and what to do (free some space, then run the command again). Libraries hide the
cause in different ways, so `disk_errno` looks for it along the exception's chain: an OSError with errno
ENOSPC, EDQUOT or EROFS; SQLite's "database or disk is full" (MLflow's store); a short write said without its
errno (torch's zip writer: `RuntimeError: [enforce fail at inline_container.cc] . unexpected pos ...`, numpy's
`OSError: 40000 requested and 25568 written`), which counts as a full disk when less space is free than the file
needs.

On the ground floor (stdlib and imm.errors only): every floor above (data, training, tracking, tasks) uses it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

from imm.errors import UserError

CODES = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
# Messages that name the cause without an errno along the chain (SQLite through SQLAlchemy and MLflow, or an
# OSError re-raised as text by a library).
MESSAGES = {
    "no space left on device": errno.ENOSPC,
    "database or disk is full": errno.ENOSPC,
    "disk quota exceeded": errno.EDQUOT,
    "read-only file system": errno.EROFS,
    "attempt to write a readonly database": errno.EROFS,
}
# A short write said without its errno: torch's zip writer (PyTorchStreamWriter: `unexpected pos 282112 vs 282000`,
# `file write failed`) and numpy's tofile (`OSError: 40000 requested and 25568 written`).
SHORT_WRITE = re.compile(r"unexpected pos|file write failed|failed writing|\d+ requested and \d+ written")
UNKNOWN_NEED = 1 << 20  # without a known size, a short write with less than this free is a full disk
MIN_FREE = 64 * 1000  # what a command writes before its own checks: Hydra's config files, the first log lines
WARN_EVERY_S = 600.0  # one warning line per kind at most this often (a full store fails at every metric)
FIX = {
    errno.ENOSPC: "free some space there",
    errno.EDQUOT: "free some of your quota (or ask for more)",
    errno.EROFS: "make it writable (remount it read-write)",
}

log = logging.getLogger("imm.disk")


class DiskFullError(UserError, RuntimeError):
    """A write found no space (ENOSPC), no quota left (EDQUOT) or a read-only file system (EROFS). Its message
    is one sentence: the file, what it needed and what is free, then `after` (what to do; `then` sets it)."""

    def __init__(self, path, code: int = errno.ENOSPC, *, needed: int | None = None, free=None, after=None):
        self.path, self.code, self.needed, self.after = Path(path), code, needed, after
        self.free = free_bytes(self.path) if free is None else free
        super().__init__(self.sentence())

    def what(self) -> str:
        """The failure without what to do: `no space left on device for F (it needs X, Y is free on M)`."""
        where = mount_point(self.path)
        size = human if human(self.needed) != human(self.free) else "{:,} bytes".format  # never "1.2 MB, 1.2 MB"
        need = f"it needs {size(self.needed)}, " if self.needed is not None else ""
        free = f"{size(self.free)} is free on {where}" if self.free is not None else f"on {where}"
        if self.code == errno.EROFS:
            return f"{where} is a read-only file system, so {self.path} cannot be written"
        if self.code == errno.EDQUOT:
            return f"disk quota exceeded writing {self.path} ({need}{free}, but your quota is used up)"
        return f"no space left on device for {self.path} ({need}{free})"

    def fix(self) -> str:
        return FIX.get(self.code, FIX[errno.ENOSPC])

    def sentence(self) -> str:
        return f"{self.what()}; {self.after or self.fix() + ', then run the same command again'}"

    def then(self, after: str) -> "DiskFullError":
        """The same failure (the free space as it was then), followed by `after` (what was kept, and the command
        that continues)."""
        return DiskFullError(self.path, self.code, needed=self.needed, free=self.free, after=after)


def human(n: int | None) -> str:
    """A byte count as people read it, to 3 digits: 512 B, 12.3 kB, 1.19 MB, 3.40 GB (powers of 1000, as df -H)."""
    if n is None:
        return "an unknown amount"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 999.5 or unit == "TB":
            break
        n /= 1000
    if unit == "B":
        return f"{n:.0f} B"
    return f"{n:#.3g}".rstrip(".") + f" {unit}"  # 3 digits, trailing zeros kept (64.0 kB), never "100."


def _existing(path) -> Path:
    p = Path(path).absolute()
    return next((q for q in (p, *p.parents) if q.exists()), Path("/"))


def free_bytes(path) -> int | None:
    """Bytes an ordinary user may still write on the file system of `path` (or of its nearest existing parent):
    statvfs's f_bavail, without the blocks ext4 reserves for root; None when it cannot be read."""
    try:
        return shutil.disk_usage(_existing(path)).free
    except OSError:
        return None


def mount_point(path) -> Path:
    """The mount point of the file system `path` is on, the folder a user frees space in."""
    p = _existing(path)
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def check_free(path, needed: int = MIN_FREE) -> None:
    """DiskFullError when less than `needed` bytes are free on the file system of `path`."""
    free = free_bytes(path)
    if free is not None and free < needed:
        raise DiskFullError(path, errno.ENOSPC, needed=needed, free=free)


def _read_only(path) -> bool:
    try:
        return bool(os.statvfs(_existing(path)).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def disk_errno(e: BaseException, path=None, needed: int | None = None) -> int | None:
    """ENOSPC, EDQUOT or EROFS when `e` (or an exception it was raised from) is a write that failed for lack of
    space or quota or on a read-only file system, else None. `path`, `needed`: the file being written and its
    size, to recognise a short write said without an errno (torch's, numpy's) by the free space."""
    for x in _chain(e):
        if isinstance(x, DiskFullError):
            return x.code
        if isinstance(x, OSError) and x.errno in CODES:
            return x.errno
    for x in _chain(e):
        text = str(x).lower()
        for needle, code in MESSAGES.items():
            if needle in text:
                return code
        if path is not None and isinstance(x, (RuntimeError, OSError)) and SHORT_WRITE.search(text):
            if _read_only(path):
                return errno.EROFS
            free = free_bytes(path)
            if free is not None and free < (needed if needed is not None else UNKNOWN_NEED):
                return errno.ENOSPC
    return None


@contextlib.contextmanager
def writing(path, *, needed: int | None = None, partial=None):
    """Writes to `path` in the block: a full disk, quota or read-only file system raises DiskFullError (after
    removing `partial`, the temporary file the block was writing, so that the space it took is free again);
    any other error passes unchanged. What was at `path` before is the caller's to keep (write a temporary
    file, then rename)."""
    try:
        yield
    except Exception as e:
        if (code := disk_errno(e, path, needed)) is None:  # before `partial` goes: torch's error needs the free space
            raise
        if partial is not None:
            with contextlib.suppress(OSError):
                Path(partial).unlink(missing_ok=True)
        if isinstance(e, DiskFullError):
            raise
        raise DiskFullError(path, code, needed=needed) from None


@contextlib.contextmanager
def replacing(path, *, needed: int | None = None):
    """Yields a temporary path beside `path` (same suffix, so writers that pick a format or add an extension by
    it keep it) and renames it over `path` when the block ends: a write that fails, for any reason, leaves what
    was at `path`, never half a file. A full disk, quota or read-only file system raises DiskFullError."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        with writing(path, needed=needed, partial=tmp):
            yield tmp
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


_warned: dict[str, float] = {}


@contextlib.contextmanager
def skipped(consequence: str, path=None, *, logger: logging.Logger = log, partial=None):
    """For a write the work does not depend on (a figure, an MLflow metric or artifact, the status file): a full
    disk, quota or read-only file system is one warning line, `<what failed>; <consequence>` (at most once per
    WARN_EVERY_S for each consequence), and the work goes on. `partial`: a file the failed write left, removed.
    Any other error passes unchanged."""
    try:
        yield
    except Exception as e:
        if (code := disk_errno(e, path)) is None:
            raise
        if partial is not None:
            with contextlib.suppress(OSError):
                Path(partial).unlink(missing_ok=True)
        now = time.monotonic()
        if now - _warned.get(consequence, -WARN_EVERY_S) >= WARN_EVERY_S:
            _warned[consequence] = now
            what = DiskFullError(path, code).what() if path is not None else _reason(code)
            logger.warning("%s; %s", what, consequence)


def _reason(code: int) -> str:
    return {errno.EROFS: "read-only file system", errno.EDQUOT: "disk quota exceeded"}.get(
        code, "no space left on device"
    )


def quiet_log_files(logger: logging.Logger | None = None) -> None:
    """A log file (launch.log) on a full disk: one line on stderr, once, instead of logging's `--- Logging error
    ---` and a traceback at every line; the lines still reach the terminal. Other errors are logging's as before."""
    for handler in (logger or logging.getLogger()).handlers:
        if isinstance(handler, logging.FileHandler) and not getattr(handler, "_imm_quiet", False):
            handler.handleError = _quiet(handler, handler.handleError)
            handler._imm_quiet = True


def _quiet(handler: logging.FileHandler, original):
    said = []

    def handle_error(record: logging.LogRecord) -> None:
        e = sys.exc_info()[1]
        if e is None or (code := disk_errno(e, handler.baseFilename)) is None:
            return original(record)
        if not said:
            said.append(True)
            sys.stderr.write(f"{handler.baseFilename}: {_reason(code)}; its log lines go to the terminal only\n")

    return handle_error


def not_disk_full(record: logging.LogRecord) -> bool:
    """A logging filter: drops a library's own report of an error that is a full disk (MLflow logs every
    SQLAlchemy error with its traceback, and its system-metrics thread each failed insert with the SQL, many
    lines each), which this project says in one line of its own."""
    if record.exc_info and record.exc_info[1] is not None and disk_errno(record.exc_info[1]) is not None:
        return False
    text = record.getMessage().lower()
    return not any(needle in text for needle in MESSAGES)
