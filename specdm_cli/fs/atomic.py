"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from specdm_cli.errors import resource_error_from
from specdm_cli.faults import fault_point


def _umask() -> int:
    """The process umask (read by setting it, then restoring it: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once at import, before any thread exists: os.umask is process-wide.
_FILE_MODE = 0o666 & ~_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary sibling, fsync it, then rename it over `path`.

    The file gets the mode any other file would (the umask), not mkstemp's 0600; the temporary
    is flocked while written, so a clean-up of strays never removes one in use.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        os.fchmod(handle, _FILE_MODE)
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        fault_point("atomic.before_replace")  # a kill here leaves the old file and a stray temp
        Path(temp).replace(path)
    except OSError as exc:
        Path(temp).unlink(missing_ok=True)
        raise as_resource_error(exc, path) from None
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically write UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def as_resource_error(exc: OSError, path: Path) -> Exception:
    """Disk full and unwritable paths become one-line resource errors (exit 5)."""
    return resource_error_from(exc, path) or exc


def remove_tree(path: Path) -> None:
    """Remove a folder (or file) if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _in_use(path: Path) -> bool:
    """Does a live process hold a flock on `path` (a temporary being written, a store being
    created)? The kernel drops it when that process dies."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(handle)
    return False


def remove_stray_temporaries(root: Path) -> int:
    """Delete temporary files a killed writer left under `root`; returns how many."""
    strays = [p for p in root.rglob(".*.tmp") if p.is_file() and not _in_use(p)]
    for stray in strays:
        stray.unlink(missing_ok=True)
    return len(strays)


def remove_abandoned_creations(path: Path) -> None:
    """Remove `.NAME.creating-PID` siblings of `path` that no live process holds (a store whose
    creator was killed before it renamed the store into place), and `.NAME.removing-PID` ones
    whose remover died before it finished (an --overwrite killed mid-removal)."""
    for leftover in path.parent.glob(f".{path.name}.creating-*"):
        if leftover.is_dir() and not _in_use(leftover):
            remove_tree(leftover)
    for leftover in path.parent.glob(f".{path.name}.removing-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if leftover.is_dir() and not (pid.isdigit() and _alive(int(pid))):
            remove_tree(leftover)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
