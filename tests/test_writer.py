"""The background writer keeps order, bounds memory and surfaces writer errors; a batch written
at once equals its samples written one by one."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from specdm_cli.pipeline.synthesize.writer import BackgroundWriter
from specdm_cli.stores import create_store, open_store, open_writer
from specdm_cli.stores.base import SampleMeta, StoreWriter
from specdm_cli.stores.zarr_store import ZarrReader


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


@pytest.mark.parametrize("store_format", ["zarr", "geotiff"])
def test_a_batch_written_at_once_reads_back_as_samples_written_one_by_one(
    demo_cd_store: Path, tmp_path: Path, store_format: str
) -> None:
    real = open_store(demo_cd_store)
    manifest = real.manifest.model_copy(update={"format": store_format})
    samples = [real.read(index) for index in range(5)]
    batch = {name: np.stack([s[name] for s in samples]) for name in samples[0]}
    metas = [SampleMeta("train", np.full(len(manifest.classes), 0.5)) for _ in samples]
    one_by_one, at_once = tmp_path / "one-by-one", tmp_path / "at-once"
    for path in (one_by_one, at_once):
        create_store(path, manifest, 8, georeferenced=False)
    writer = open_writer(one_by_one, manifest)
    StoreWriter.write_batch(writer, 2, batch)  # the per-sample loop every format has
    writer.mark_written(2, metas)
    writer = open_writer(at_once, manifest)
    writer.write_batch(2, batch)  # Zarr's override: one slab per array
    writer.mark_written(2, metas)
    stores = [open_store(path) for path in (one_by_one, at_once)]
    for store in stores:
        assert np.flatnonzero(store.written()).tolist() == [2, 3, 4, 5, 6]
        for offset, sample in enumerate(samples):
            read = store.read(2 + offset)
            assert all(np.array_equal(read[name], sample[name]) for name in sample)
            if isinstance(store, ZarrReader):  # Zarr keeps a checksum per sample and array
                assert store.damage(2 + offset, read) is None
