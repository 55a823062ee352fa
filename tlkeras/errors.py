"""Errors a user can fix, and the one place that turns them into a one-line exit."""

from __future__ import annotations

import argparse
import errno
import logging
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input; the message names the value and the fix."""

    exit_code = 1
    label = "error"  # the word that starts the line on the console


class ConfigError(UserError):
    exit_code = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (argparse prints the whole usage first) and exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


# What the OS and the libraries above it (h5py, TensorFlow's file system) say when a
# write fails for want of space or a failing device; h5py and TF keep only the text.
DISK_PROBLEMS = {
    errno.ENOSPC: ("No space left on device", "no space left on the device"),
    errno.EDQUOT: ("Disk quota exceeded", "the disk quota is exceeded"),
    errno.EIO: ("Input/output error", "an I/O error (EIO) on the device"),
}


def disk_problem(e: BaseException) -> str | None:
    """'no space left on the device' etc. when `e` is a full disk or a failing device."""
    if isinstance(e, OSError) and e.errno in DISK_PROBLEMS:
        return DISK_PROBLEMS[e.errno][1]
    text = str(e)
    return next((plain for marker, plain in DISK_PROBLEMS.values() if marker in text), None)


@contextmanager
def writing(path: Path, what: str, needed_bytes: int = 0) -> Iterator[None]:
    """Turns a full disk or an I/O error while writing `what` to `path` into one UserError
    line with the free space and roughly what is needed. Every writer below is atomic
    (temporary file or folder, then a rename), so the previous version stays intact and
    the same command resumes once space is freed."""
    # Checked first when the size is known: HDF5 (h5py) may crash the process rather than
    # raise when the disk fills in the middle of a file (a segfault on a full tmpfs).
    if needed_bytes and _free_bytes(path) < needed_bytes * 1.01 + 2**20:
        raise _full(DISK_PROBLEMS[errno.ENOSPC][1], path, what, needed_bytes)
    try:
        yield
    except Exception as e:
        problem = disk_problem(e)
        if problem is None:
            raise
        raise _full(problem, Path(getattr(e, "filename", None) or path), what, needed_bytes) from None


def _free_bytes(path: Path) -> int:
    folder = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    return shutil.disk_usage(folder).free


def _full(problem: str, path: Path, what: str, needed_bytes: int) -> UserError:
    need = f", about {needed_bytes / 1e6:.0f} MB needed" if needed_bytes else ""
    return UserError(
        f"{problem} while writing {what} to '{path}' ({_free_bytes(path) / 1e6:.0f} MB free{need}); "
        f"nothing earlier was lost: free some space and rerun the same command to resume"
    )


def run_cli(main: Callable[[], int | None], debug: bool) -> int:
    """Runs `main`, printing a UserError as one line (no traceback unless --debug)."""
    try:
        return main() or 0
    except UserError as e:
        if debug:
            raise
        logging.getLogger("tlkeras").debug("user error", exc_info=True)
        print(f"{e.label}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
