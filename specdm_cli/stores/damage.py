"""A store's damage: its layout against the manifest, unreadable samples, lost table rows.

`inspect --verify` names it (`verify_store`); a resume rewrites it (`forget_damaged`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from pathlib import Path

import numpy as np

from specdm_cli.config import Progress
from specdm_cli.errors import InputDataError
from specdm_cli.faults import fault_point
from specdm_cli.manifest import IMAGE_ARRAYS, LABEL_ARRAY, Manifest, load_manifest
from specdm_cli.stores.base import MANIFEST_NAME, StoreReader
from specdm_cli.stores.geotiff_store import GeoTiffReader, GeoTiffWriter
from specdm_cli.stores.hints import repair_hint
from specdm_cli.stores.tables import shown_samples, table_damaged
from specdm_cli.stores.zarr_store import QUALITY_ARRAY, ZarrReader, ZarrWriter, _array

# Notes for the user: the CLI prints them (stages and stores print nothing themselves).
log = logging.getLogger(__name__)


def find_damaged(reader: StoreReader, indices: Iterable[int] | None = None) -> list[int]:
    """The written samples (of `indices`, default all) whose arrays do not read back intact,
    or whose rows of a per-sample table (split, class fractions, ...) are lost."""
    lost = _table_damage(reader, scores=False)  # a resume rewrites samples, not scores
    in_tables = set(np.concatenate(list(lost.values())).tolist()) if lost else set()
    return _unreadable_samples(reader, indices, in_tables)


def _unreadable_samples(
    reader: StoreReader,
    indices: Iterable[int] | None = None,
    known: AbstractSet[int] = frozenset(),
    progress: Progress | None = None,
) -> list[int]:
    """The written samples (of `indices`, default all) in `known`, or whose arrays do not read
    back intact; each read told to `progress` as "reading samples"."""
    written = reader.written()
    chosen = range(len(written)) if indices is None else indices
    todo = [int(i) for i in chosen if i < len(written) and written[i]]
    damaged = []
    for done, index in enumerate(todo, start=1):
        if index in known or not _reads_back(reader, index):
            damaged.append(index)
        if progress is not None:
            progress("reading samples", done, len(todo))
    return damaged


def _reads_back(reader: StoreReader, index: int) -> bool:
    try:
        reader.read(index)
    except InputDataError:
        return False
    return True


def _table_damage(reader: StoreReader, scores: bool = True) -> dict[str, np.ndarray]:
    """Zarr stores: the written samples each damaged per-sample table lost, the quality scores'
    too if `scores` (GeoTIFF stores keep those facts in sample records, which load whole or fail)."""
    if not isinstance(reader, ZarrReader):
        return {}
    return reader.damaged_tables(scores)


def _tables_damaged(reader: StoreReader, tables: dict[str, np.ndarray]) -> InputDataError:
    """One line naming every damaged table; a table of samples first (its writer's --resume
    mends it; the scores' hint only where they alone are damaged)."""
    # By name, not by the group's listing, whose order the file system chooses.
    names = sorted(tables, key=lambda name: (name == QUALITY_ARRAY, name))
    error = table_damaged(names[0], tables[names[0]], reader.root, _table_hint(reader, names[0]))
    also = [f"{name!r} ({shown_samples(tables[name])})" for name in names[1:]]
    if also:
        error.message += f"; also the tables {', '.join(also)}"
    return error


def _table_hint(reader: StoreReader, name: str) -> str:
    """Samples are rewritten by their writer's --resume; scores by scoring the store again."""
    if name == QUALITY_ARRAY:
        return "rerun `specdm benchmark --write-scores` on it"
    return repair_hint(reader.manifest)


def forget_damaged(path: Path, indices: Iterable[int] | None = None) -> list[int]:
    """Clear the written flags of damaged samples so a resume rewrites them; a complete store
    becomes incomplete first. Returns the damaged indices (one note on stderr if any)."""
    manifest = load_manifest(path / MANIFEST_NAME)
    reader: ZarrReader | GeoTiffReader = (
        ZarrReader(path, manifest) if manifest.format == "zarr" else GeoTiffReader(path, manifest)
    )
    if isinstance(reader, ZarrReader):
        lost = reader.lost_written().tolist()
        if lost:  # read as unwritten once the store is incomplete: the resume writes them
            reader = ZarrReader(path, manifest.model_copy(update={"complete": False}))
    else:
        lost = reader.damaged_markers  # left out of its records: read as unwritten already
    damaged = sorted({*find_damaged(reader, indices), *lost})
    if damaged:
        writer = (
            ZarrWriter(path, manifest)
            if manifest.format == "zarr"
            else GeoTiffWriter(path, manifest)
        )
        if manifest.complete:
            # Incomplete again: a GeoTIFF store's readers then go by its markers, not `files`.
            writer.save_manifest(manifest.model_copy(update={"complete": False, "files": None}))
        writer.forget(damaged)
        shown = ", ".join(map(str, damaged[:5])) + (", ..." if len(damaged) > 5 else "")
        log.warning("note: rewriting %d damaged samples (%s) (%s)", len(damaged), shown, path)
    return damaged


def check_layout(reader: StoreReader) -> None:
    """Arrays (Zarr) or tiles (GeoTIFF) agree with the manifest; else the store is damaged."""
    manifest = reader.manifest
    if isinstance(reader, ZarrReader):
        for name, (shape, dtype) in _expected_arrays(manifest).items():
            array = _array(reader.group, name)
            if array.shape != shape:
                raise InputDataError(
                    f"array {name} has shape {array.shape}, manifest says {manifest.count} samples "
                    f"of {shape[1:]}",
                    reader.root,
                    "re-create the store",
                )
            if array.dtype != dtype:
                raise InputDataError(
                    f"array {name} holds {array.dtype}, manifest says {dtype}",
                    reader.root,
                    "re-create the store",
                )
    elif isinstance(reader, GeoTiffReader):
        root = reader.root.resolve()
        for record in reader.records:
            for relative in record.files.values():
                tile = (root / relative).resolve()
                if not tile.is_relative_to(root):
                    raise InputDataError(
                        "manifest points outside the store", tile, "re-create the store"
                    )
                if not tile.is_file():
                    raise InputDataError(
                        "tile listed in the manifest is missing", tile, "re-create the store"
                    )


def _expected_arrays(manifest: Manifest) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each raster array's shape and dtype as the manifest describes them."""
    pixels = (manifest.height, manifest.width)
    image = ((manifest.count, len(manifest.bands), *pixels), np.dtype(manifest.dtype))
    label = ((manifest.count, *pixels), np.dtype("uint8"))
    return {**dict.fromkeys(IMAGE_ARRAYS[manifest.task], image), LABEL_ARRAY[manifest.task]: label}


def verify_store(reader: StoreReader, progress: Progress | None = None) -> str:
    """`inspect --verify`: read every per-sample table and written sample (told to `progress`);
    damage is an input error naming the table or the samples (exit 3)."""
    fault_point("inspect.verify")
    tables = _table_damage(reader)
    if tables:
        raise _tables_damaged(reader, tables)
    damaged = _unreadable_samples(reader, progress=progress)  # tables were read whole above
    if damaged:
        raise InputDataError(
            f"{len(damaged)} damaged samples (missing or corrupt chunks): "
            f"{shown_samples(np.array(damaged))}",
            reader.root,
            repair_hint(reader.manifest),
        )
    if isinstance(reader, ZarrReader):
        unchecked = not reader.has_checksums
    else:
        unchecked = isinstance(reader, GeoTiffReader) and any(
            r.crc32 is None for r in reader.records
        )
    if unchecked:
        return "readable (store has no checksums: written before they existed)"
    return "all samples match their checksums"
