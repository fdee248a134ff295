"""The rasters each loading thread keeps open while `prepare geotiff` reads their windows."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from specdm_cli.sources.geotiff.headers import open_dataset, raster_errors


class OpenRasters:
    """Each thread's last `keep` files, open. A large file's windows are read one after another,
    and a handle kept open keeps GDAL's cache of the blocks it has decompressed: opened once per
    window, every window decoded its whole block again (64 px patches of a tiled 2048 px scene:
    4.5x fewer patches/s, `examples/bench_prepare.py --large 2048`). A dataset is used by one
    thread only, as rasterio requires; `close` closes them all once the reading is done."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._lock = threading.Lock()
        self._by_thread: dict[int, OrderedDict[Path, Any]] = {}

    @contextmanager
    def reading(self, path: Path) -> Iterator[Any]:
        """The open dataset of `path` for this thread; GDAL failures name the file."""
        with raster_errors(path):
            mine = self._mine()
            src = mine.pop(path, None)
            if src is None:
                src = open_dataset(path)
            try:
                yield src
            except BaseException:
                src.close()  # a failed read leaves no handle for the next window to trip on
                raise
            mine[path] = src  # the most recent last
            while len(mine) > self.keep:
                mine.popitem(last=False)[1].close()

    def _mine(self) -> OrderedDict[Path, Any]:
        with self._lock:
            return self._by_thread.setdefault(threading.get_ident(), OrderedDict())

    def close(self) -> None:
        with self._lock:
            for datasets in self._by_thread.values():
                for src in datasets.values():
                    src.close()
            self._by_thread.clear()
