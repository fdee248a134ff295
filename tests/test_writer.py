"""The background writer keeps order, bounds memory and surfaces writer errors."""

from __future__ import annotations

import threading
import time

import pytest

from specdm_cli.pipeline.synthesize.writer import BackgroundWriter


def test_items_are_written_in_order_on_another_thread() -> None:
    written: list[int] = []
    threads: set[str] = set()

    def write(item: int) -> None:
        threads.add(threading.current_thread().name)
        written.append(item)

    with BackgroundWriter(write) as writer:
        for item in range(50):
            writer.submit(item)
    assert written == list(range(50))
    assert threads == {"specdm-writer"}


def test_submit_blocks_while_the_queue_is_full() -> None:
    release = threading.Event()
    started = threading.Event()

    def slow(item: int) -> None:
        started.set()
        release.wait(5)

    writer = BackgroundWriter(slow, depth=1)
    writer.submit(0)
    started.wait(5)
    writer.submit(1)  # fills the queue while item 0 is being written
    blocked = threading.Thread(target=writer.submit, args=(2,))
    blocked.start()
    time.sleep(0.2)
    assert blocked.is_alive(), "a third batch must wait for room in the queue"
    release.set()
    blocked.join(5)
    writer.close()


def test_a_writer_error_reaches_the_producer() -> None:
    def fail(item: int) -> None:
        if item == 1:
            raise OSError(28, "No space left on device")

    writer = BackgroundWriter(fail)
    writer.submit(0)
    writer.submit(1)
    with pytest.raises(OSError, match="No space"):
        for item in range(2, 100):
            writer.submit(item)
            time.sleep(0.01)
        writer.close()
