"""A background writer: compute and I/O overlap, memory bounded by a small queue of batches."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

_DONE = object()


class BackgroundWriter:
    """Runs `write(item)` on a thread for each submitted item, in order.

    `submit` blocks when `depth` items are waiting, so memory stays flat however many batches
    are produced; an error on the writer thread is raised in the caller at the next `submit`
    or at `close`.
    """

    def __init__(self, write: Callable[[Any], None], depth: int = 2):
        self._write = write
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="specdm-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if self._error is None:
                try:
                    self._write(item)
                except BaseException as error:  # re-raised in the producing thread
                    self._error = error

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, item: Any) -> None:
        """Queue one item for writing (blocks while the queue is full)."""
        self._raise_pending()
        self._queue.put(item)

    def close(self) -> None:
        """Write everything queued, stop the thread, raise any writer error."""
        self._queue.put(_DONE)
        self._thread.join()
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
