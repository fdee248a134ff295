"""Stop cleanly on SIGINT/SIGTERM: the stage finishes the batch in hand, then raises Interrupted."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from specdm_cli.config import Progress
from specdm_cli.errors import Interrupted


class StopFlag:
    """Set by a signal; the stage polls it between batches."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.at_once = False

    def check(self) -> None:
        """Raise Interrupted if a stop was asked for."""
        if self.signum is not None:
            raise Interrupted(self.signum)

    @contextmanager
    def while_planning(self) -> Iterator[None]:
        """Before a stage writes anything there is no batch to finish: a signal stops it at
        once (scanning a huge raster's classes can take minutes and polls nothing)."""
        self.at_once = True
        try:
            yield
        finally:
            self.at_once = False


def stoppable(progress: Progress | None, stop: StopFlag) -> Progress:
    """`progress` that also stops after each report: for work that runs minutes before a
    stage's first batch (a segmenter, a cache, a bank) and would not hear Ctrl-C otherwise.
    (One rank only: ranks agree on stopping in the training loop.)"""

    def report(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(stage, done, total)
        stop.check()

    return report


@contextmanager
def graceful_stop() -> Iterator[StopFlag]:
    """Install SIGINT/SIGTERM handlers that only set a flag (main thread only)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        flag.signum = signum
        if flag.at_once:
            raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextmanager
def stop_at_once() -> Iterator[None]:
    """For a command with no batch to finish and no resume (benchmark, filter, inspect): SIGTERM
    (and Ctrl-C) raise Interrupted where they land, so the command releases its locks and says
    it stopped, rather than dying where SIGTERM found it."""
    with graceful_stop() as flag:
        flag.at_once = True
        yield
