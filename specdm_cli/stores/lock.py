"""Writer lock of a store or run dir: pid, host, start time; stale locks are taken over."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from specdm_cli.errors import LockHeldError

LOCK_NAME = ".specdm.lock"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(lock_path: Path) -> dict[str, object] | None:
    """The lock's record, or None when it is stale (dead process, unreadable record)."""
    try:
        record = json.loads(lock_path.read_text(encoding="utf-8"))
        pid = int(record["pid"])
        host = str(record["host"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        # A writer killed while writing its lock leaves a garbled record: nobody holds it.
        return None
    if host == socket.gethostname() and not _process_alive(pid):
        return None
    return dict(record)


def refuse_if_locked(folder: Path) -> None:
    """Raise LockHeldError (exit 6) if a live process holds any specdm lock in `folder`."""
    for lock_path in sorted(folder.glob(f"{LOCK_NAME}*")):
        holder = _holder(lock_path)
        if holder is not None:
            raise LockHeldError(
                f"in use: locked by process {holder.get('pid')} on {holder.get('host')}",
                folder,
                "wait for it to finish; never remove a folder a live process writes",
            )


class DirLock:
    """Exclusive lock on a folder, held by one live process at a time."""

    def __init__(self, folder: Path, name: str = LOCK_NAME):
        self.path = folder / name
        self.held = False

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; a live holder raises LockHeldError (exit 6)."""
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(3):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _holder(self.path)
                if holder is not None:
                    raise LockHeldError(
                        f"locked by process {holder.get('pid')} on {holder.get('host')}",
                        self.path.parent,
                        "wait for it to finish, or remove the lock file if that process is gone",
                    ) from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                json.dump(record, stream)
            self.held = True
            return
        raise LockHeldError("could not take the lock", self.path, "retry")

    def release(self) -> None:
        """Drop the lock if this process holds it."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> DirLock:
        self.acquire()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.release()
