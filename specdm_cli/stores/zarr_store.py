"""Zarr v3 stores: one sample per chunk for rasters, per-sample tables chunked on the batch grid."""

from __future__ import annotations

import json
import warnings
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs
from zarr.core.array_spec import ArrayConfigParams

from specdm_cli.errors import InputDataError, reason_of
from specdm_cli.fs.atomic import atomic_write_text
from specdm_cli.manifest import IMAGE_ARRAYS, LABEL_ARRAY, SPLITS, Manifest
from specdm_cli.stores.base import (
    MANIFEST_NAME,
    Bounds,
    SampleMeta,
    StoreReader,
    StoreWriter,
    split_code,
)
from specdm_cli.stores.cf import (
    X_COORDINATE,
    Y_COORDINATE,
    consolidate,
    create_spatial_coordinates,
    image_attributes,
    label_attributes,
    pixel_centres,
)
from specdm_cli.stores.hints import repair_hint
from specdm_cli.stores.tables import (
    EVERY_CHUNK_STORED,
    damaged_rows,
    missing_rows,
    table_damaged,
)

ATTR_KEY = "specdm"
# Per-sample crc32 of each raster array, beside `written`: a missing chunk reads as the fill
# value (a valid class-0 mask) and a garbled one may still decompress, so only a checksum tells.
CHECKSUM_ARRAY = "checksum"
# Per-sample scores (benchmark --write-scores, synthesize --min-quality): see stores/quality.py.
QUALITY_ARRAY = "quality"
# Tables are written with their all-fill chunks too (zarr skips those by default): then a
# chunk missing where samples are written is damage, never a chunk of legitimate fill values
# (an all-NaN score, a batch of wholly unlabelled patches with class fractions 0).
TABLE_CONFIG: ArrayConfigParams = {"write_empty_chunks": True}
# The lock, manifest.json and the progress record live beside the arrays on purpose.
warnings.filterwarnings("ignore", message="Object at .* is not recognized as a component")


def _compressor() -> zarr.codecs.BloscCodec:
    # zstd with bit-shuffle: the best size/speed trade-off we measured on reflectance and masks.
    return zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


def table_codecs() -> tuple[zarr.codecs.BloscCodec, zarr.codecs.Crc32cCodec]:
    # A table chunk cut past blosc's header, or garbled, decompresses into other values with no
    # error (class fractions of 7e9); its crc32c makes zarr refuse it. The raster arrays need
    # none: the per-sample `checksum` table covers them.
    return _compressor(), zarr.codecs.Crc32cCodec()


def create_zarr(root: Path, manifest: Manifest, capacity: int, georeferenced: bool) -> None:
    """Lay out an empty store with room for `capacity` samples (shrunk when finished)."""
    group = zarr.open_group(root, mode="w", zarr_format=3)
    bands, height, width = len(manifest.bands), manifest.height, manifest.width
    grid = manifest.batch_grid
    for name in IMAGE_ARRAYS[manifest.task]:
        image = group.create_array(
            name,
            shape=(capacity, bands, height, width),
            chunks=(1, bands, height, width),
            dtype=manifest.dtype,
            dimension_names=("sample", "band", "y", "x"),
            compressors=_compressor(),
            fill_value=0,
        )
        image.attrs.update(image_attributes(manifest, georeferenced))
    label = group.create_array(
        LABEL_ARRAY[manifest.task],
        shape=(capacity, height, width),
        chunks=(1, height, width),
        dtype="uint8",
        dimension_names=("sample", "y", "x"),
        compressors=_compressor(),
        fill_value=0,
    )
    label.attrs.update(label_attributes(manifest, georeferenced))
    _create_tables(group, manifest, capacity, grid, georeferenced)
    _create_coordinates(group, manifest)
    if georeferenced:
        create_spatial_coordinates(group, manifest, capacity)
    _write_manifest(root, group, manifest)


def _create_tables(
    group: zarr.Group, manifest: Manifest, capacity: int, grid: int, georeferenced: bool
) -> None:
    # Written later through the writer's handles, which carry TABLE_CONFIG (`_optional`).
    common: dict[str, Any] = {
        "compressors": table_codecs(),
        "attributes": {EVERY_CHUNK_STORED: True},
    }
    group.create_array(
        "written", shape=(capacity,), chunks=(grid,), dtype=bool, fill_value=False,
        dimension_names=("sample",), **common,
    )  # fmt: skip
    split = group.create_array(
        "split", shape=(capacity,), chunks=(grid,), dtype="uint8", fill_value=255,
        dimension_names=("sample",), **common,
    )  # fmt: skip
    split.attrs.update({"flag_values": list(range(len(SPLITS))), "flag_meanings": " ".join(SPLITS)})
    group.create_array(
        "class_fraction", shape=(capacity, len(manifest.classes)),
        chunks=(grid, len(manifest.classes)), dtype="float32", fill_value=0.0,
        dimension_names=("sample", "class"), **common,
    )  # fmt: skip
    if manifest.source is not None:
        group.create_array(
            "source_id", shape=(capacity,), chunks=(grid,), dtype=str,
            dimension_names=("sample",), **common,
        )  # fmt: skip
    if manifest.model is not None:
        group.create_array(
            "candidate", shape=(capacity,), chunks=(grid,), dtype="int64", fill_value=-1,
            dimension_names=("sample",), **common,
        )  # fmt: skip
    checksum = group.create_array(
        CHECKSUM_ARRAY, shape=(capacity, len(manifest.arrays)),
        chunks=(grid, len(manifest.arrays)), dtype="uint32", fill_value=0,
        dimension_names=("sample", "array"), **common,
    )  # fmt: skip
    checksum.attrs.update({"algorithm": "crc32", "arrays": list(manifest.arrays)})
    if georeferenced:
        group.create_array(
            "bounds", shape=(capacity, 4), chunks=(grid, 4), dtype="float64",
            fill_value=np.nan, dimension_names=("sample", "bound"), **common,
        )  # fmt: skip


def _create_coordinates(group: zarr.Group, manifest: Manifest) -> None:
    """Band and class coordinates, so xarray shows names rather than numbers."""
    band = group.create_array(
        "band", shape=(len(manifest.bands),), dtype=str, dimension_names=("band",)
    )
    band[:] = np.array([b.name for b in manifest.bands])
    wavelengths = [np.nan if b.wavelength_nm is None else b.wavelength_nm for b in manifest.bands]
    wavelength = group.create_array(
        "wavelength", shape=(len(manifest.bands),), dtype="float32", dimension_names=("band",)
    )
    wavelength[:] = np.array(wavelengths, dtype=np.float32)
    wavelength.attrs.update({"units": "nm"})
    names = group.create_array(
        "class", shape=(len(manifest.classes),), dtype=str, dimension_names=("class",)
    )
    names[:] = np.array([c.name for c in manifest.classes])


def _write_manifest(root: Path, group: zarr.Group, manifest: Manifest) -> None:
    payload = json.loads(manifest.to_json())
    # Rewriting the root zarr.json drops any consolidated metadata: only complete stores keep it,
    # so it never describes arrays that change later.
    group.attrs.update({ATTR_KEY: payload})
    if manifest.complete:
        consolidate(root)
    atomic_write_text(root / MANIFEST_NAME, manifest.to_json())


def crc32(values: np.ndarray, dtype: np.dtype[Any]) -> int:
    """crc32 of the C-order bytes of `values` as stored (in the array's dtype)."""
    return zlib.crc32(np.ascontiguousarray(values, dtype=dtype).tobytes())


def _checksum_names(table: zarr.Array[Any]) -> list[str]:
    """The arrays whose checksums the table's columns hold, in order."""
    names = table.attrs.get("arrays")
    return [str(n) for n in names] if isinstance(names, list) else []


def read_table(
    array: zarr.Array[Any], name: str, root: Path, rows: int | None = None
) -> np.ndarray:
    """A per-sample table's first `rows` (all: None); a short or garbled chunk is exit 3 naming
    the table, never a crash (blosc and zstd raise RuntimeError) nor values read as data."""
    try:
        return np.asarray(array[:rows])
    except (RuntimeError, ValueError, OSError) as exc:
        raise InputDataError(
            f"the per-sample table {name!r} is damaged (unreadable chunk, {exc})".splitlines()[0],
            root,
            "re-create the store: its record of what was written cannot be trusted",
        ) from None


def _array(group: zarr.Group, name: str) -> zarr.Array[Any]:
    """The array `name` of `group`; a missing, misshapen or unreadable one is a damaged store."""
    try:
        node = group[name]
    except KeyError:
        node = None
    except (ValueError, TypeError) as exc:  # its zarr.json garbled (JSON or metadata errors)
        reason = reason_of(exc)
        raise InputDataError(
            f"store's array {name!r} has unreadable metadata ({reason})",
            _store_root(group),
            "re-create the store",
        ) from None
    if not isinstance(node, zarr.Array):
        raise InputDataError(
            f"store has no array {name!r}", _store_root(group), "re-create the store"
        )
    return node


def _store_root(group: zarr.Group) -> Path:
    """The store's folder, as users gave it (store_path reads "file:/path")."""
    root = getattr(group.store, "root", None)
    return Path(root) if root is not None else Path(str(group.store_path))


class ZarrWriter(StoreWriter):
    """Writes into an existing Zarr store."""

    def __init__(self, root: Path, manifest: Manifest):
        super().__init__(root, manifest)
        self.group = zarr.open_group(root, mode="r+", zarr_format=3, use_consolidated=False)
        # Checksums wait here until `mark_written` writes them with the rest of the batch's
        # table rows: one chunk of the table spans a batch, written by one thread.
        self._checksums: dict[int, dict[str, int]] = {}
        # Opening an array (or asking whether one exists) reads the store: a third of the
        # writer's time when done per sample. None: an optional array this store lacks.
        self._arrays: dict[str, zarr.Array[Any] | None] = {}

    def _optional(self, name: str) -> zarr.Array[Any] | None:
        if name not in self._arrays:
            array = _array(self.group, name) if name in self.group else None
            if array is not None and name not in self.manifest.arrays:  # a table, not a raster
                array = array.with_config(TABLE_CONFIG)
            self._arrays[name] = array
        return self._arrays[name]

    def _handle(self, name: str) -> zarr.Array[Any]:
        array = self._optional(name)
        return _array(self.group, name) if array is None else array  # _array names what is missing

    def _remember_sums(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        self._checksums[index] = {
            name: crc32(values, self._handle(name).dtype) for name, values in arrays.items()
        }

    def write_arrays(
        self, index: int, arrays: dict[str, np.ndarray], bounds: Bounds | None = None
    ) -> None:
        # Bounds go into the `bounds` table with the rest of the sample's metadata.
        for name, values in arrays.items():
            self._handle(name)[index] = values
        self._remember_sums(index, arrays)

    def write_batch(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        # One slab per array: zarr encodes and stores its one-sample chunks concurrently.
        count = len(next(iter(arrays.values())))
        for name, values in arrays.items():
            self._handle(name)[start : start + count] = values
        for offset in range(count):
            self._remember_sums(start + offset, {name: v[offset] for name, v in arrays.items()})

    def _write_checksums(self, start: int, stop: int) -> None:
        table = self._optional(CHECKSUM_ARRAY)
        if table is None:
            return  # a store made before checksums existed
        names = _checksum_names(table)
        rows = np.zeros((stop - start, len(names)), dtype=np.uint32)
        for row, index in enumerate(range(start, stop)):
            sums = self._checksums.pop(index, None) or self._read_back(index, names)
            rows[row] = [sums[name] for name in names]
        table[start:stop] = rows

    def checksum_again(self, indices: Iterable[int]) -> None:
        """Checksum samples anew from what is on disk: samples edited through the Zarr API,
        which readers would otherwise refuse as damaged."""
        for index in indices:
            self._write_checksums(index, index + 1)

    def _read_back(self, index: int, names: list[str]) -> dict[str, int]:
        """Checksums of a sample written by another writer object (read from disk)."""
        arrays = {n: self._handle(n) for n in names}
        return {n: crc32(np.asarray(a[index]), a.dtype) for n, a in arrays.items()}

    def forget(self, indices: list[int]) -> None:
        """Clear the written flags of `indices` (damaged samples a resume rewrites)."""
        flags = self._handle("written")
        for index in indices:
            flags[index] = False

    def mark_written(self, start: int, metas: list[SampleMeta]) -> None:
        stop = start + len(metas)
        self._handle("split")[start:stop] = np.array([split_code(m.split) for m in metas], np.uint8)
        self._handle("class_fraction")[start:stop] = np.stack([m.class_fraction for m in metas])
        if (source_ids := self._optional("source_id")) is not None:
            source_ids[start:stop] = np.array([m.source_id or "" for m in metas])
        if (candidates := self._optional("candidate")) is not None:
            drawn = [m.candidate if m.candidate is not None else -1 for m in metas]
            candidates[start:stop] = np.array(drawn, dtype=np.int64)
        if (bounds_table := self._optional("bounds")) is not None:
            bounds = [m.bounds if m.bounds is not None else (np.nan,) * 4 for m in metas]
            bounds_table[start:stop] = np.array(bounds, dtype=np.float64)
        if self._optional(X_COORDINATE) is not None:
            self._write_pixel_centres(start, metas)
        self._write_checksums(start, stop)
        self._handle("written")[start:stop] = True

    def _write_pixel_centres(self, start: int, metas: list[SampleMeta]) -> None:
        height, width = self.manifest.height, self.manifest.width
        xs = np.full((len(metas), width), np.nan)
        ys = np.full((len(metas), height), np.nan)
        for row, meta in enumerate(metas):
            if meta.bounds is not None:
                xs[row], ys[row] = pixel_centres(meta.bounds, height, width)
        self._handle(X_COORDINATE)[start : start + len(metas)] = xs
        self._handle(Y_COORDINATE)[start : start + len(metas)] = ys

    def written(self) -> np.ndarray:
        return read_table(self._handle("written"), "written", self.root)

    def forget_from(self, index: int) -> None:
        flags = self._handle("written")
        if index < flags.shape[0]:
            flags[index:] = False

    def save_manifest(self, manifest: Manifest) -> None:
        self.manifest = manifest
        _write_manifest(self.root, self.group, manifest)

    def truncate(self, count: int) -> None:
        for _, array in self.group.arrays():
            dimensions = getattr(array.metadata, "dimension_names", None)
            if dimensions and dimensions[0] == "sample":
                array.resize((count, *array.shape[1:]))
        self._arrays.clear()  # the cached handles hold the old shapes


class ZarrReader(StoreReader):
    """Reads a Zarr store; opens the group lazily so DataLoader workers each get their own."""

    def __init__(self, root: Path, manifest: Manifest):
        super().__init__(root, manifest)
        self._group: zarr.Group | None = None
        self._sums: tuple[np.ndarray, np.ndarray, list[str]] | None = None

    @property
    def group(self) -> zarr.Group:
        if self._group is None:
            try:
                self._group = zarr.open_group(
                    self.root, mode="r", zarr_format=3, use_consolidated=False
                )
            except (OSError, ValueError, FileNotFoundError) as exc:
                raise InputDataError(
                    f"unreadable Zarr store ({exc})", self.root, "re-create it"
                ) from None
        return self._group

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "manifest": self.manifest, "_group": None, "_sums": None}

    def read(self, index: int) -> dict[str, np.ndarray]:
        """The sample's arrays, checked against its checksums (exit 3 naming it if damaged)."""
        names = (*IMAGE_ARRAYS[self.manifest.task], LABEL_ARRAY[self.manifest.task])
        arrays = {name: self._read_one(name, index) for name in names}
        damaged = self.damage(index, arrays)
        if damaged:
            raise InputDataError(
                f"sample {index} is damaged ({damaged})", self.root, repair_hint(self.manifest)
            )
        return arrays

    def _read_one(self, name: str, index: int) -> np.ndarray:
        try:
            return np.asarray(_array(self.group, name)[index])
        except (RuntimeError, ValueError, OSError) as exc:  # blosc: RuntimeError
            raise InputDataError(
                f"sample {index} is damaged ({name}: unreadable chunk, {exc})",
                self.root,
                repair_hint(self.manifest),
            ) from None

    def damage(self, index: int, arrays: dict[str, np.ndarray]) -> str | None:
        """What is wrong with a written sample's arrays, or None (also for stores without
        checksums, which only unreadable chunks betray)."""
        if self._sums is None:
            self._sums = self._load_sums()
        written, sums, names = self._sums
        if index >= len(written) or not written[index]:
            return None
        for column, name in enumerate(names):
            array = _array(self.group, name)
            if name in arrays and crc32(arrays[name], array.dtype) != int(sums[index, column]):
                return f"{name}: checksum mismatch, a chunk is missing or corrupt"
        return None

    def _load_sums(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        if CHECKSUM_ARRAY not in self.group:
            return np.zeros(0, dtype=bool), np.zeros((0, 0), np.uint32), []
        table = _array(self.group, CHECKSUM_ARRAY)
        names = _checksum_names(table)
        return self._table("written"), self._table(CHECKSUM_ARRAY), names

    @property
    def has_checksums(self) -> bool:
        return CHECKSUM_ARRAY in self.group

    def _table(self, name: str) -> np.ndarray:
        """A per-sample table; a written sample whose chunk is lost is exit 3 naming the table,
        not its fill value read as data. A lost chunk of `written` itself reads as unwritten
        in a store still being written (a resume writes those samples again), and is exit 3 in
        a complete one, whose samples are all written: else readers would skip them silently."""
        array = _array(self.group, name)
        values = read_table(array, name, self.root, len(self))
        lost = missing_rows(array, self.written()) if name != "written" else self.lost_written()
        if lost.size:
            raise table_damaged(name, lost, self.root, repair_hint(self.manifest))
        return values

    def lost_written(self) -> np.ndarray:
        """Samples of a complete store whose chunk of `written` is lost (they read as unwritten)."""
        if not self.manifest.complete:
            return np.zeros(0, dtype=np.int64)
        return missing_rows(_array(self.group, "written"), np.ones(len(self), dtype=bool))

    def damaged_tables(self, scores: bool = True) -> dict[str, np.ndarray]:
        """`inspect --verify`: each per-sample table with chunks missing or unreadable where
        samples are written, and those samples; the quality scores too if `scores` (and the
        manifest names them)."""
        written = self.written()
        found = {}
        for name, array in self.group.arrays():
            dimensions = getattr(array.metadata, "dimension_names", None) or ()
            if dimensions[:1] != ("sample",) or name in (*self.manifest.arrays, "written"):
                continue
            if name == QUALITY_ARRAY and (not scores or self.manifest.quality_scores is None):
                continue  # unasked, or a killed --write-scores: the manifest says there are none
            rows = damaged_rows(array, written)
            if rows.size:
                found[name] = rows
        return found

    def splits(self) -> np.ndarray:
        codes = self._table("split")
        names = np.array([*SPLITS, ""], dtype=object)
        split_names: np.ndarray = names[np.minimum(codes, len(SPLITS))]
        return split_names

    def class_fractions(self) -> np.ndarray:
        return self._table("class_fraction")

    def written(self) -> np.ndarray:
        return self._table("written")

    def candidates(self) -> np.ndarray | None:
        return self._table("candidate") if "candidate" in self.group else None

    def sample_checksums(self) -> np.ndarray | None:
        if not self.has_checksums:
            return None
        table = _array(self.group, CHECKSUM_ARRAY)
        columns = [_checksum_names(table).index(name) for name in self.manifest.arrays]
        sums: np.ndarray = self._table(CHECKSUM_ARRAY)[:, columns] * self.written()[:, None]
        return sums

    def source_ids(self) -> list[str] | None:
        if "source_id" not in self.group:
            return None
        return [str(s) for s in self._table("source_id")]

    def bounds(self) -> np.ndarray | None:
        return self._table("bounds") if "bounds" in self.group else None
