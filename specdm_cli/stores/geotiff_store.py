"""GeoTIFF stores: a folder of tiled, deflated tiles per array and a manifest listing every file."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from pydantic import ValidationError
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import MemoryFile
from rasterio.transform import Affine, from_bounds

from specdm_cli.errors import InputDataError
from specdm_cli.fs.atomic import atomic_write_bytes, atomic_write_text, remove_tree
from specdm_cli.manifest import GEOTIFF_FOLDERS, Manifest, SampleFiles, array_names
from specdm_cli.stores.base import MANIFEST_NAME, Bounds, SampleMeta, StoreReader, StoreWriter
from specdm_cli.stores.hints import repair_hint
from specdm_cli.stores.zarr_store import crc32

MARKERS = ".specdm/written"
# Synthetic tiles carry no geolocation on purpose (DESIGN.md); set once, as filters are global.
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)


def create_geotiff(root: Path, manifest: Manifest) -> None:
    """Lay out an empty GeoTIFF store: one folder per array, an incomplete manifest."""
    for name in array_names(manifest.task):
        (root / GEOTIFF_FOLDERS[name]).mkdir(parents=True, exist_ok=True)
    (root / MARKERS).mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / MANIFEST_NAME, manifest.to_json())


def sample_files(manifest: Manifest, index: int) -> dict[str, str]:
    """Relative paths of the files of sample `index`."""
    return {name: f"{GEOTIFF_FOLDERS[name]}/{index:06d}.tif" for name in array_names(manifest.task)}


def _block_size(height: int, width: int) -> int | None:
    # GTiff tiles must be multiples of 16; a tile larger than the raster only wastes space.
    block = min(256, height, width) // 16 * 16
    return block or None


def _profile(manifest: Manifest, array: np.ndarray, bounds: Any) -> dict[str, Any]:
    count = 1 if array.ndim == 2 else array.shape[0]
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "height": manifest.height,
        "width": manifest.width,
        "count": count,
        "dtype": array.dtype.name,
        "compress": "deflate",
        "predictor": 3 if np.issubdtype(array.dtype, np.floating) else 2,
    }
    block = _block_size(manifest.height, manifest.width)
    if block:
        profile.update(tiled=True, blockxsize=block, blockysize=block)
    if bounds is not None and manifest.crs:
        profile["crs"] = CRS.from_user_input(manifest.crs)
        profile["transform"] = from_bounds(*bounds, manifest.width, manifest.height)
    else:
        # An explicit pixel grid (x = column, y = row) and no CRS: no invented geolocation
        # (DESIGN.md), and GDAL readers open the tile without a "not georeferenced" warning.
        profile["transform"] = Affine.identity()
    return profile


def write_tile(path: Path, manifest: Manifest, array: np.ndarray, bounds: Any = None) -> None:
    """Write one tile atomically: band descriptions with wavelengths, a colour table on masks.

    GDAL encodes into memory and our atomic write puts the bytes on disk, so a full disk is one
    clean OSError (exit 5) rather than libtiff messages and a half-written file.
    """
    try:
        with MemoryFile() as memory, warnings.catch_warnings():
            # Writing a grid without a CRS warns; the tile itself opens quietly.
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with memory.open(**_profile(manifest, array, bounds)) as dst:
                _fill_tile(dst, manifest, array)
            encoded = memory.read()
    except RasterioError as exc:
        raise InputDataError(f"cannot encode GeoTIFF ({exc})", path, "report this") from None
    atomic_write_bytes(path, encoded)


def _fill_tile(dst: Any, manifest: Manifest, array: np.ndarray) -> None:
    if array.ndim == 2:
        dst.write(array, 1)
        dst.nodata = manifest.ignore_index
        dst.write_colormap(1, {c.index: (*c.colour, 255) for c in manifest.classes})
        dst.set_band_description(1, "label")
        return
    dst.write(array)
    for number, band in enumerate(manifest.bands, start=1):
        wavelength = f" ({band.wavelength_nm:g} nm)" if band.wavelength_nm else ""
        dst.set_band_description(number, f"{band.name}{wavelength}")


class GeoTiffWriter(StoreWriter):
    """Writes tiles; a per-sample marker file is the written flag and holds the tiles' crc32."""

    def __init__(self, root: Path, manifest: Manifest):
        super().__init__(root, manifest)
        self._sums: dict[int, dict[str, int]] = {}  # written, not yet marked

    def write_arrays(
        self, index: int, arrays: dict[str, np.ndarray], bounds: Bounds | None = None
    ) -> None:
        files = sample_files(self.manifest, index)
        for name, values in arrays.items():
            write_tile(self.root / files[name], self.manifest, values, bounds)
        self._sums[index] = {name: crc32(values, values.dtype) for name, values in arrays.items()}

    def mark_written(self, start: int, metas: list[SampleMeta]) -> None:
        for index, meta in enumerate(metas, start=start):
            record = SampleFiles(
                index=index,
                files=sample_files(self.manifest, index),
                split=meta.split,
                class_fraction=[float(v) for v in meta.class_fraction],
                source_id=meta.source_id,
                bounds=meta.bounds,
                candidate=meta.candidate,
                crc32=self._sums.pop(index, None),
            )
            atomic_write_text(self.root / MARKERS / f"{index:06d}.json", record.model_dump_json())

    def written(self) -> np.ndarray:
        flags = np.zeros(self.manifest.count, dtype=bool)
        for index in _marker_indices(self.root):
            if index < flags.size:
                flags[index] = True
        return flags

    def forget(self, indices: list[int]) -> None:
        """Remove the markers of `indices` (damaged samples a resume rewrites)."""
        for index in indices:
            (self.root / MARKERS / f"{index:06d}.json").unlink(missing_ok=True)

    def forget_from(self, index: int) -> None:
        for marked in _marker_indices(self.root):
            if marked >= index:
                (self.root / MARKERS / f"{marked:06d}.json").unlink(missing_ok=True)

    def save_manifest(self, manifest: Manifest) -> None:
        self.manifest = manifest
        if manifest.complete:
            manifest = manifest.model_copy(update={"files": _records(self.root, manifest.count)})
        atomic_write_text(self.root / MANIFEST_NAME, manifest.to_json())

    def truncate(self, count: int) -> None:
        self.forget_from(count)
        for folder in {GEOTIFF_FOLDERS[n] for n in array_names(self.manifest.task)}:
            for tile in (self.root / folder).glob("*.tif"):
                if tile.stem.isdigit() and int(tile.stem) >= count:
                    remove_tree(tile)


def _marker_indices(root: Path) -> list[int]:
    return sorted(int(p.stem) for p in (root / MARKERS).glob("*.json") if p.stem.isdigit())


def _marker(root: Path, index: int) -> SampleFiles | None:
    """Sample `index`'s record, or None where its marker is damaged (cut short by a disk fault,
    edited, or naming another sample)."""
    try:
        record = SampleFiles.model_validate_json(
            (root / MARKERS / f"{index:06d}.json").read_bytes()
        )
    except (ValidationError, OSError):
        return None
    return record if record.index == index else None


def _records(root: Path, count: int) -> list[SampleFiles]:
    records = []
    for index in range(count):
        marker = root / MARKERS / f"{index:06d}.json"
        records.append(SampleFiles.model_validate_json(marker.read_text(encoding="utf-8")))
    return records


class GeoTiffReader(StoreReader):
    """Reads a GeoTIFF store through its manifest (or its markers while incomplete)."""

    def __init__(self, root: Path, manifest: Manifest):
        super().__init__(root, manifest)
        self.damaged_markers: list[int] = []
        self.records = manifest.files if manifest.files is not None else self._markers()
        self._by_index = {record.index: record for record in self.records}

    def _markers(self) -> list[SampleFiles]:
        """The samples' records; a marker that does not parse is left out (read as unwritten,
        as a Zarr store's lost `written` chunk is) and listed in `damaged_markers`."""
        records = []
        for index in _marker_indices(self.root):
            record = _marker(self.root, index)
            if record is None:
                self.damaged_markers.append(index)
            else:
                records.append(record)
        return records

    def read(self, index: int) -> dict[str, np.ndarray]:
        record = self._by_index.get(index)
        if record is None:
            raise InputDataError(f"sample {index} was never written", self.root, "finish the store")
        arrays = {name: self._read_tile(name, rel) for name, rel in record.files.items()}
        for name, expected in (record.crc32 or {}).items():
            if name in arrays and crc32(arrays[name], arrays[name].dtype) != expected:
                raise InputDataError(
                    f"sample {index}: tile {record.files[name]} does not match its checksum",
                    self.root,
                    repair_hint(self.manifest),
                )
        return arrays

    def _read_tile(self, name: str, relative: str) -> np.ndarray:
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise InputDataError("manifest points outside the store", path, "re-create the store")
        try:
            with rasterio.open(path) as src:
                values = src.read()
        except (RasterioError, OSError) as exc:
            raise InputDataError(f"unreadable tile ({exc})", path, "re-create the store") from None
        tile: np.ndarray = values[0] if name in ("mask", "change") else values
        return tile

    def _column(self, key: str, fill: Any) -> list[Any]:
        values = [fill] * len(self)
        for record in self.records:
            if record.index < len(self):
                values[record.index] = getattr(record, key)
        return values

    def splits(self) -> np.ndarray:
        return np.array(self._column("split", ""), dtype=object)

    def class_fractions(self) -> np.ndarray:
        zeros = [0.0] * len(self.manifest.classes)
        return np.array(self._column("class_fraction", zeros), dtype=np.float32)

    def written(self) -> np.ndarray:
        flags = np.zeros(len(self), dtype=bool)
        flags[[r.index for r in self.records if r.index < len(self)]] = True
        return flags

    def candidates(self) -> np.ndarray | None:
        if self.manifest.model is None:
            return None
        return np.array([-1 if c is None else c for c in self._column("candidate", -1)], np.int64)

    def source_ids(self) -> list[str] | None:
        if self.manifest.source is None:
            return None
        return [str(v) for v in self._column("source_id", "")]

    def bounds(self) -> np.ndarray | None:
        if not self.manifest.crs:
            return None
        unknown = (np.nan,) * 4
        return np.array([unknown if b is None else b for b in self._column("bounds", None)])

    def sample_checksums(self) -> np.ndarray | None:
        names = list(self.manifest.arrays)
        sums = np.zeros((len(self), len(names)), dtype=np.uint32)
        for record in self.records:
            if record.crc32 is None:
                return None  # written before checksums existed
            if record.index < len(self):
                sums[record.index] = [record.crc32[name] for name in names]
        return sums
