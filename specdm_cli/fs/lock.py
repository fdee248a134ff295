"""Writer locks of stores and run dirs: an OS-level `flock` on a lock file kept open by its holder.

The kernel drops a `flock` when its holder dies, however it dies, so a lock is held exactly
while its process lives: no pid is ever trusted to decide that (pids are reused, and pid 1 is
alive in every container). The holder's identity (pid, host, start time) is written into the
lock file for messages only. A lock file left by a killed holder is taken over with one note.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

from specdm_cli.errors import LockHeldError

LOCK_NAME = ".specdm.lock"
# One file per reader (a reader holds its own file's flock): overwriters see every live one.
READ_LOCK_PREFIX = ".specdm.read-"
# A live holder is reported at once; this only rides out a probe of `is_held` by another
# process, which holds the lock for microseconds.
_PROBE_GRACE_S = 0.5

# Notes for the user: the CLI prints them (stages and stores print nothing themselves).
log = logging.getLogger(__name__)


def _try_flock(handle: int, shared: bool = False) -> bool:
    """Take the flock without blocking; False when another open file holds it."""
    try:
        fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _identity(lock_path: Path) -> dict[str, object]:
    """The holder's record (for messages); empty while it is being written or if garbled."""
    try:
        record = json.loads(lock_path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def describe(record: dict[str, object]) -> str:
    """`process 123 on host (since 12:00:01)`, or what is known of it."""
    if "pid" not in record:
        return "another process"
    text = f"process {record.get('pid')} on {record.get('host')}"
    started = record.get("started")
    if isinstance(started, int | float):
        text += f" (since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))})"
    return text


def is_held(lock_path: Path) -> bool:
    """Does a live process hold this lock file? (A shared probe, released at once.)"""
    try:
        handle = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        return not _try_flock(handle, shared=True)
    finally:
        os.close(handle)


def live_locks(folder: Path, readers: bool = False) -> Iterator[Path]:
    """The specdm writer lock files in `folder` (and readers' too) that a live process holds."""
    patterns = [f"{LOCK_NAME}*", *([f"{READ_LOCK_PREFIX}*"] if readers else [])]
    for lock_path in sorted(p for pattern in patterns for p in folder.glob(pattern)):
        if is_held(lock_path):
            yield lock_path


def live_writer(folder: Path) -> str | None:
    """Who writes `folder` now ("process 12 on host (since ...)"), or None: no live writer."""
    held = next(live_locks(folder), None)
    return None if held is None else describe(_identity(held))


def refuse_if_locked(folder: Path, mine: Path | None = None) -> None:
    """Raise LockHeldError (exit 6) if a live process other than the holder of `mine` holds a
    writer's or a reader's lock on `folder`: it writes or reads it, so it is not to be removed."""
    for lock_path in live_locks(folder, readers=True):
        if lock_path == mine:
            continue
        doing = "read" if lock_path.name.startswith(READ_LOCK_PREFIX) else "locked"
        raise LockHeldError(
            f"in use: {doing} by {describe(_identity(lock_path))}",
            folder,
            "wait for it to finish; never replace a folder a live process reads or writes",
        )


class _Held:
    """A lock held for a `with` block: `acquire` on entry, `release` on exit, however it ends."""

    def acquire(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.release()


class DirLock(_Held):
    """Exclusive lock on a folder, held by one live process at a time.

    `wait` seconds: how long to wait for a live holder before refusing (exit 6); locks held
    for a moment (the run registry) wait, writers' locks refuse at once.
    """

    announce_takeover = True

    def __init__(
        self, folder: Path, name: str = LOCK_NAME, wait: float = 0.0, subject: Path | None = None
    ):
        self.path = folder / name
        self.wait = wait
        self.subject = subject or folder  # what a refusal names
        self.handle: int | None = None

    @property
    def held(self) -> bool:
        return self.handle is not None

    def acquire(self) -> None:
        """Take the lock (taking over one a dead holder left); a live holder raises exit 6."""
        deadline = time.monotonic() + max(self.wait, _PROBE_GRACE_S)
        while True:
            handle = self._open_locked()
            if handle is not None:
                break
            if time.monotonic() >= deadline:
                raise LockHeldError(
                    f"locked by {describe(_identity(self.path))}",
                    self.subject,
                    "wait for it to finish (a lock whose process died is taken over by itself)",
                )
            time.sleep(0.02)
        self.handle = handle
        self._claim()

    def _open_locked(self) -> int | None:
        """An open, flocked handle on the file now at `path`, or None if a live process holds it."""
        handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if not _try_flock(handle):
                os.close(handle)
                return None
            # The holder we waited for may have unlinked the file before closing it: a lock on
            # a name nobody else can open is no lock. Only the file the path names counts.
            if not self._names(handle):
                os.close(handle)
                return None
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(handle)
            raise
        return handle

    def _names(self, handle: int) -> bool:
        try:
            current = self.path.stat()
        except FileNotFoundError:
            return False
        opened = os.fstat(handle)
        return (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino)

    def _claim(self) -> None:
        """Write our identity, saying so when we took over a lock a dead holder left."""
        assert self.handle is not None
        previous = _identity(self.path)
        if previous and self.announce_takeover:
            log.warning("note: took over a stale lock of %s (%s)", describe(previous), self.path)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(self.handle, 0)
        os.pwrite(self.handle, json.dumps(record).encode("utf-8"), 0)

    def release(self) -> None:
        """Drop the lock if this process holds it (unlinked first, so no one waits on a ghost)."""
        if self.handle is None:
            return
        handle, self.handle = self.handle, None
        try:
            if self._names(handle):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(handle)


def claim_output(path: Path) -> DirLock:
    """A writer's claim on an output's name, beside it (`.NAME.specdm.lock`): held while the
    output may not exist (an --overwrite between removing the old store and creating the new),
    so a second writer of the same path is refused (exit 6) then too, not only while the
    store's own lock exists. Folders made for the claim go with it where nothing was written
    into them (a run refused on its input leaves no empty `--out` parent behind)."""
    made = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    return _OutputClaim(path.parent, f".{path.name}{LOCK_NAME}", subject=path, made=made)


class _OutputClaim(DirLock):
    # A claim a killed writer left is taken over without a note: the store's own lock, left
    # beside it, already gives one.
    announce_takeover = False

    def __init__(self, folder: Path, name: str, subject: Path, made: list[Path]):
        super().__init__(folder, name, subject=subject)
        self.made = made  # innermost first

    def acquire(self) -> None:
        try:
            super().acquire()
        except OSError as error:  # the claim file is ours to name: the user named the output
            raise OSError(error.errno, error.strerror, str(self.subject)) from None

    def release(self) -> None:
        super().release()
        for folder in self.made:
            try:
                folder.rmdir()  # only an empty one: the output, or anyone else's file, keeps it
            except OSError:
                break


class ReadLock(_Held):
    """A reader's claim on a folder, held while it reads: `--overwrite` refuses (exit 6) to
    remove the folder meanwhile. With `refuse_writer`, a folder whose writer lock is held (being
    repaired or replaced) is refused instead of read. A folder we may not write to cannot be
    claimed, nor overwritten by us: it is read unclaimed, as is a missing one.
    """

    def __init__(self, folder: Path, refuse_writer: bool = True):
        self.folder = folder
        self.refuse_writer = refuse_writer
        self.path = folder / f"{READ_LOCK_PREFIX}{os.getpid()}-{os.urandom(4).hex()}.lock"
        self.handle: int | None = None

    def acquire(self) -> None:
        try:
            handle = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as exc:
            # Missing (the reader's own open says so) or not ours to write: read it unclaimed.
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.EROFS):
                return
            raise
        fcntl.flock(handle, fcntl.LOCK_EX)  # our own file: never contended
        _remove_dead_claims(self.folder, self.path)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.pwrite(handle, json.dumps(record).encode("utf-8"), 0)
        self.handle = handle
        writer = self.folder / LOCK_NAME
        # Claimed before looking: of a reader and an overwriter starting together, one sees
        # the other (the overwriter takes the writer lock before it looks for readers).
        if self.refuse_writer and is_held(writer):
            self.release()
            raise LockHeldError(
                f"being written by {describe(_identity(writer))}",
                self.folder,
                "wait for it to finish, then rerun",
            )

    def release(self) -> None:
        if self.handle is None:
            return
        handle, self.handle = self.handle, None
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(handle)


# A claim file younger than this may be one a reader has created but not yet locked.
_CLAIM_SETTLE_S = 10.0


def _remove_dead_claims(folder: Path, mine: Path) -> None:
    """Claim files of readers that died (no live flock), so they do not pile up."""
    for claim in folder.glob(f"{READ_LOCK_PREFIX}*"):
        with contextlib.suppress(FileNotFoundError):
            settled = time.time() - claim.stat().st_mtime > _CLAIM_SETTLE_S
            if claim != mine and settled and not is_held(claim):
                claim.unlink()
