"""Errors of training runs that must say what to do: a full disk names itself and the folder being written."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator


class DiskFullError(OSError):
    """An `OSError` with `errno.ENOSPC` whose message says that the disk is full, where, and what was being written."""


def _free_space(path: str) -> str:
    probe = os.path.abspath(path)
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    try:
        return f"{shutil.disk_usage(probe).free / 2**20:.1f} MiB free"
    except OSError:
        return "free space unknown"


# How writers that do not raise OSError (safetensors' Rust code, torch's zip writer) report ENOSPC.
_ENOSPC_TEXTS = ("No space left on device", "os error 28")


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or an error it was raised from) reports `ENOSPC`."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if any(text in str(error) for text in _ENOSPC_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_error(error: BaseException, folder: str | os.PathLike, what: str) -> DiskFullError:
    """A [`DiskFullError`] explaining an `ENOSPC` `error` raised while writing `what` into `folder`."""
    target = os.fspath(error.filename) if getattr(error, "filename", None) else os.fspath(folder)
    message = (
        f"The disk is full: no space left on the device while writing {what} to {target} "
        f"({_free_space(target)} on that filesystem now). Free some space or write to another folder "
        f"(--output_dir); a partial file may be left at that path."
    )
    return DiskFullError(errno.ENOSPC, message, target)


@contextlib.contextmanager
def explain_disk_full(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Re-raise a full-disk error inside the block (an `OSError` with `errno.ENOSPC`, or a writer's error saying
    "No space left on device") as a [`DiskFullError`] naming the disk and the folder. Other errors pass through.
    """
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if not is_disk_full(error):
            raise
        raise disk_full_error(error, folder, what) from error


__all__ = ["DiskFullError", "disk_full_error", "explain_disk_full", "is_disk_full"]
