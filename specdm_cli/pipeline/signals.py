"""Stop cleanly on SIGINT/SIGTERM: the stage finishes the batch in hand, then raises Interrupted."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from specdm_cli.errors import Interrupted


class StopFlag:
    """Set by a signal; the stage polls it between batches."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def check(self) -> None:
        """Raise Interrupted if a stop was asked for."""
        if self.signum is not None:
            raise Interrupted(self.signum)


@contextmanager
def graceful_stop() -> Iterator[StopFlag]:
    """Install SIGINT/SIGTERM handlers that only set a flag (main thread only)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        flag.signum = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
