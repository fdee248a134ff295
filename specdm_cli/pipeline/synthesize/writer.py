"""A background writer: compute and I/O overlap, memory bounded by a small queue of batches."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

_DONE = object()


class BackgroundWriter:
    """Runs `write(item)` on a thread for each submitted item, in order.

    `submit` blocks when `depth` items are waiting, so memory stays flat however many batches
    are produced; an error on the writer thread is raised in the caller at the next `submit`
    or at `close`. `busy_seconds` is the time spent writing, `blocked_seconds` the time the
    caller waited for the writer (what writing added to the wall time).
    """

    def __init__(self, write: Callable[[Any], None], depth: int = 2):
        self._write = write
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self.busy_seconds = self.blocked_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="specdm-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if self._error is None:
                started = time.perf_counter()
                try:
                    self._write(item)
                except BaseException as error:  # re-raised in the producing thread
                    self._error = error
                self.busy_seconds += time.perf_counter() - started

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, item: Any) -> None:
        """Queue one item for writing (blocks while the queue is full)."""
        self._raise_pending()
        started = time.perf_counter()
        self._queue.put(item)
        self.blocked_seconds += time.perf_counter() - started

    def close(self) -> None:
        """Write everything queued, stop the thread, raise any writer error."""
        started = time.perf_counter()
        self._queue.put(_DONE)
        self._thread.join()
        self.blocked_seconds += time.perf_counter() - started
        self._raise_pending()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if error is None:
            self.close()
            return
        # The caller failed: still flush what was handed over, then let its error propagate.
        self._queue.put(_DONE)
        self._thread.join()
