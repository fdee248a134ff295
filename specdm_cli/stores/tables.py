"""Per-sample tables of a Zarr store (split, class fractions, scores, ...): finding the rows a
lost or garbled chunk took from written samples, which zarr would read as the fill value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from specdm_cli.errors import InputDataError

# The attribute of a table written with every chunk stored (`zarr_store.TABLE_CONFIG`). Tables
# of earlier stores lack it: zarr skipped their all-fill chunks (a batch of wholly unlabelled
# patches has class fractions 0), so a chunk missing there may be data, and is not judged.
EVERY_CHUNK_STORED = "every_chunk_stored"


def _stored_keys(array: zarr.Array[Any]) -> set[str]:
    """The chunk keys of `array` present in the store (one listing, not one look-up a chunk)."""
    prefix = f"{array.store_path.path}/"

    async def listing() -> list[str]:
        return [key async for key in array.store_path.store.list_prefix(prefix)]

    return {key.removeprefix(prefix) for key in sync(listing())}


def _chunks_of_written(array: zarr.Array[Any], written: np.ndarray) -> list[slice]:
    """The row ranges of the table's chunks that hold at least one written sample."""
    rows = array.chunks[0]
    starts = range(0, min(len(written), array.shape[0]), rows)
    return [slice(s, s + rows) for s in starts if written[s : s + rows].any()]


def _written_rows(written: np.ndarray, rows: list[slice]) -> np.ndarray:
    flags = np.zeros_like(written)
    for chunk in rows:
        flags[chunk] = written[chunk]
    return np.flatnonzero(flags)


def missing_rows(array: zarr.Array[Any], written: np.ndarray) -> np.ndarray:
    """Written samples whose chunk of the per-sample table `array` is not in the store: zarr
    reads it as the fill value (split 255, fraction 0, score NaN), which is not their data."""
    if not array.attrs.get(EVERY_CHUNK_STORED):
        return np.array([], dtype=np.int64)
    stored = _stored_keys(array)
    others = (0,) * (array.ndim - 1)  # a table is chunked on its sample axis only
    lost = [
        chunk
        for chunk in _chunks_of_written(array, written)
        if array.metadata.encode_chunk_key((chunk.start // array.chunks[0], *others)) not in stored
    ]
    return _written_rows(written, lost)


def damaged_rows(array: zarr.Array[Any], written: np.ndarray) -> np.ndarray:
    """Written samples whose table chunk is missing or unreadable (each chunk read: verify)."""
    unreadable = []
    for chunk in _chunks_of_written(array, written):
        try:
            array[chunk]
        except (RuntimeError, ValueError, OSError):  # blosc: RuntimeError; crc32c: ValueError
            unreadable.append(chunk)
    rows = np.union1d(missing_rows(array, written), _written_rows(written, unreadable))
    return rows.astype(np.int64)


def shown_samples(indices: np.ndarray, limit: int = 10) -> str:
    """`3, 4, 5` (and `...` past `limit`) for one line of an error."""
    listed = ", ".join(str(int(i)) for i in indices[:limit])
    return listed + (", ..." if len(indices) > limit else "")


def table_damaged(name: str, samples: np.ndarray, root: Path, hint: str) -> InputDataError:
    """The one-line error for a per-sample table that lost or garbled written samples' rows."""
    return InputDataError(
        f"the per-sample table {name!r} is damaged (missing or unreadable chunk) for "
        f"{len(samples)} written samples: {shown_samples(samples)}",
        root,
        hint,
    )
