"""The errors a user can cause and fix, and how they reach the terminal.

Every such error is a `UserError`: its message is one sentence that names the value and the fix. It is
raised before any work starts where it can be, and rendered in one place: a launch prints the sentence
and exits with status 2 (imm/launch/job.py; `exit_on_user_error` for Hydra callbacks in the launching
process). Anything else that escapes is a bug, and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys

USER_EXIT_STATUS = 2  # a condition the user can fix, not a bug (which exits 1 with its traceback)


class UserError(Exception):
    """An error a user can fix; the message is one sentence naming the value and the fix."""


class ConfigError(UserError, ValueError):
    """A configuration value that cannot run (a key, a range, a combination of options)."""


class DataError(UserError, ValueError):
    """A problem with the data the user asked for (bad path, bad file, bad setting)."""


class DataNotFoundError(DataError, FileNotFoundError):
    """Files or directories the user pointed at do not exist (also a FileNotFoundError)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message says which file and why."""


class TrackingError(UserError, RuntimeError):
    """The tracking store cannot be used; the message says which URI and what to do."""


class RunDirError(ConfigError):
    """A run directory that cannot be used: held by another live process, or not writable."""


def error_line(e: BaseException) -> str:
    """An exception as `Type: its first line`, for a one-sentence error about something that is not a
    UserError (a store's driver, a failed sweep job)."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first.rstrip('.')}" if first else type(e).__name__


@contextlib.contextmanager
def exit_on_user_error():
    """A UserError raised in the block is its sentence on stderr and exit status 2 (for Hydra callbacks in the
    launching process, before any job runs)."""
    try:
        yield
    except UserError as e:
        sys.stderr.write(f"{e}\n")
        sys.exit(USER_EXIT_STATUS)
