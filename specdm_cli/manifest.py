"""What a store is: the pydantic Manifest kept in `manifest.json` and the Zarr attributes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from specdm_cli.config import StoreFormat as StoreFormat
from specdm_cli.config import Task as Task
from specdm_cli.errors import InputDataError

SCHEMA_VERSION = 1
IGNORE_INDEX = 255
# Bounds on what a manifest may ask a reader to allocate: far above any real dataset, far
# below what a hostile file could make a reader attempt (count 10^30, a 10^6-band header).
MAX_SAMPLES = 10**9
MAX_SIDE = 65536
MAX_BANDS = 4096
SPLITS = ("train", "val", "test", "synthetic")

# Array names: the one vocabulary of Zarr arrays, GeoTIFF folders, Dataset keys and the manifest.
IMAGE_ARRAYS: dict[str, tuple[str, ...]] = {"ss": ("image",), "cd": ("image_t1", "image_t2")}
LABEL_ARRAY: dict[str, str] = {"ss": "mask", "cd": "change"}
GEOTIFF_FOLDERS = {
    "image": "images",
    "mask": "masks",
    "image_t1": "t1",
    "image_t2": "t2",
    "change": "change",
}


def array_names(task: Task) -> tuple[str, ...]:
    """The raster arrays of a sample of `task`, images first."""
    return (*IMAGE_ARRAYS[task], LABEL_ARRAY[task])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Band(_Strict):
    """One spectral band."""

    name: str
    wavelength_nm: float | None = Field(None, description="centre wavelength")
    fwhm_nm: float | None = None


_RGB_NM = (664.6, 559.8, 492.7)  # Sentinel-2 B04, B03, B02 centres: the usual true-colour triple
_RGB_TOLERANCE_NM = 40.0
_RGB_NAMES = ("red", "green", "blue")


def rgb_bands(bands: list[Band]) -> list[str] | None:
    """The bands shown as red, green and blue in previews: those nearest 665/560/490 nm, else
    bands named red, green and blue (any case: an RGB(N) product's descriptions); None when
    the bands say neither."""
    picked: list[str] = []
    for target in _RGB_NM:
        near = [b for b in bands if b.wavelength_nm is not None]
        best = min(near, key=lambda b: abs(float(b.wavelength_nm or 0) - target), default=None)
        if best is None or abs(float(best.wavelength_nm or 0) - target) > _RGB_TOLERANCE_NM:
            picked = []
            break
        picked.append(best.name)
    if len(set(picked)) == 3:
        return picked
    named = {b.name.strip().lower(): b.name for b in bands}
    return [named[name] for name in _RGB_NAMES] if all(n in named for n in _RGB_NAMES) else None


class ClassInfo(_Strict):
    """One label class: its index in the store, name, display colour and code in the raw data."""

    index: int = Field(ge=0, lt=IGNORE_INDEX)
    name: str
    colour: tuple[int, int, int]
    code: int | str | None = Field(None, description="the class's value in the raw label files")


class Normalization(_Strict):
    """Per-band statistics in physical units over the valid pixels of one split."""

    split: str
    mean: list[float]
    std: list[float]
    minimum: list[float]
    maximum: list[float]
    pixels: int

    @model_validator(mode="after")
    def _usable(self) -> Normalization:
        """One finite value per band in every list, and a positive std (training divides by it)."""
        lengths = {len(self.mean), len(self.std), len(self.minimum), len(self.maximum)}
        if len(lengths) != 1:
            raise ValueError("mean, std, minimum and maximum must have one value per band each")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise ValueError("mean and std must be finite")
        if any(v <= 0 for v in self.std):
            raise ValueError("std must be positive for every band (normalisation divides by it)")
        return self


class SourceInfo(_Strict):
    """Where a prepared store came from."""

    dataset: str
    raw_path: str | None = None
    split_counts: dict[str, int] = Field(default_factory=dict)
    candidates: int = 0
    removed: dict[str, int] = Field(default_factory=dict, description="patches dropped, by filter")
    nodata_pixels: int = 0
    details: dict[str, Any] = Field(default_factory=dict)


class ModelInfo(_Strict):
    """Which model made a synthetic store and how."""

    run_id: str
    kind: str
    path: str | None = None
    checkpoint_sha256: dict[str, str] = Field(default_factory=dict)
    sampler: str
    steps: int
    seed: int
    precision: str
    details: dict[str, Any] = Field(default_factory=dict)


class SampleFiles(_Strict):
    """GeoTIFF stores: the files of one sample, relative to the store root, and its facts."""

    index: int
    files: dict[str, str]
    split: str
    class_fraction: list[float]
    source_id: str | None = None
    bounds: tuple[float, float, float, float] | None = None
    candidate: int | None = Field(None, description="synthetic: the sampler draw of this sample")
    crc32: dict[str, int] | None = Field(
        None, description="crc32 of each array's pixel bytes as stored; absent in older stores"
    )


class QualityScores(_Strict):
    """Per-sample quality scores (array `quality`), written by `specdm benchmark --write-scores`."""

    definition: str = Field(description="what a score means (see README, Benchmark)")
    feature_hash: str = Field(description="sha256 of the feature network the scores came from")
    reference: str = Field(description="the real store the scores are calibrated against")
    reference_manifest_sha256: str
    count: int = Field(ge=0, description="samples scored")


class ParentInfo(_Strict):
    """A subset store's origin: `specdm filter` kept the parent's samples scoring >= min_quality."""

    path: str
    manifest_sha256: str
    min_quality: float
    parent_count: int = Field(ge=0)
    kept: int = Field(ge=0)
    parent_index: list[int] = Field(description="for each sample here, its index in the parent")


class Manifest(_Strict):
    """A store's description; `complete` is true only once every sample is written."""

    schema_version: int = SCHEMA_VERSION
    tool_version: str
    format: StoreFormat
    task: Task
    count: int = Field(ge=0)
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    dtype: str
    arrays: list[str]
    bands: list[Band]
    band_order_source: str | None = None
    rgb_bands: list[str] | None = None
    classes: list[ClassInfo]
    ignore_index: int = IGNORE_INDEX
    crs: str | None = None
    batch_grid: int = Field(gt=0, description="B: samples per chunk of per-sample arrays")
    split_counts: dict[str, int] = Field(default_factory=dict)
    class_pixel_fraction: dict[str, list[float]] = Field(
        default_factory=dict, description="per split, the fraction of labelled pixels per class"
    )
    normalization: Normalization | None = None
    source: SourceInfo | None = None
    model: ModelInfo | None = None
    plan: dict[str, Any] = Field(default_factory=dict, description="what resume must match")
    provenance: dict[str, Any] = Field(default_factory=dict, description="command, versions")
    files: list[SampleFiles] | None = None
    # Both absent from stores written before benchmark/filter existed: old manifests still load.
    quality_scores: QualityScores | None = None
    parent: ParentInfo | None = None
    complete: bool = False

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        """Fields that describe the same thing agree, and sizes are ones a reader can hold."""
        bands, classes = len(self.bands), len(self.classes)
        if self.count > MAX_SAMPLES or max(self.height, self.width) > MAX_SIDE:
            raise ValueError(f"count or size beyond what specdm reads ({MAX_SAMPLES} samples "
                             f"of {MAX_SIDE}x{MAX_SIDE})")  # fmt: skip
        if not 1 <= bands <= MAX_BANDS or not 1 <= classes <= IGNORE_INDEX:
            raise ValueError(f"{bands} bands and {classes} classes: need 1-{MAX_BANDS} and 1-255")
        if sorted(c.index for c in self.classes) != list(range(classes)):
            raise ValueError("class indices must be 0..K-1, each once")
        if self.arrays != list(array_names(self.task)):
            raise ValueError(f"arrays must be {list(array_names(self.task))} for task {self.task}")
        if self.normalization is not None and len(self.normalization.mean) != bands:
            raise ValueError(f"normalization has not one value per band ({bands})")
        if any(len(v) != classes for v in self.class_pixel_fraction.values()):
            raise ValueError(f"class_pixel_fraction needs one value per class ({classes})")
        if _dtype_kind(self.dtype) not in ("u", "i", "f"):
            raise ValueError(f"dtype {self.dtype!r} is not a numeric type")
        return self


def _dtype_kind(dtype: str) -> str:
    import numpy as np

    try:
        return str(np.dtype(dtype).kind)
    except TypeError:
        return "?"


def manifest_schema() -> dict[str, Any]:
    """The JSON Schema of the manifest (`specdm inspect --schema`)."""
    return Manifest.model_json_schema()


def load_manifest(path: Path) -> Manifest:
    """Read and validate a `manifest.json`, as an input-data error if it is not one."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputDataError(
            "not a specdm store: no manifest.json", path.parent, "run `specdm prepare` first"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputDataError(f"unreadable manifest ({exc})", path, "re-create the store") from None
    except RecursionError:  # JSON nested deeper than Python's parser goes
        raise InputDataError(
            "unreadable manifest (nested too deeply)", path, "re-create the store"
        ) from None
    try:
        return Manifest.model_validate(raw)
    except RecursionError:
        raise InputDataError(
            "invalid manifest: nested too deeply", path, "re-create the store"
        ) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "manifest"
        raise InputDataError(
            f"invalid manifest: {where}: {first['msg']}", path, "re-create the store"
        ) from None
