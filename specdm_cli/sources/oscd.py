"""OSCD reader: the three Onera folders (or their zips) in, bi-temporal uint16 patches out."""

from __future__ import annotations

import functools
import io
import re
import threading
import warnings
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import rasterio
from PIL import Image, UnidentifiedImageError
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import MemoryFile

from specdm_cli.errors import InputDataError
from specdm_cli.manifest import IGNORE_INDEX, ClassInfo
from specdm_cli.sources.base import (
    Candidate,
    PrepareOptions,
    RawSample,
    SourcePlan,
    SourceSpec,
    apply_nodata,
    pad_image_as_nodata,
    pad_to,
    patch_bounds,
    patch_windows,
    remap_labels,
    require_dir,
)
from specdm_cli.sources.sentinel2 import S2_ALL_BANDS, S2_RGB_BANDS, S2_TEN_BANDS, s2_bands

# The archives' stems; each zip holds one top folder of the same name (datasets.md 2.1).
IMAGES = "Onera Satellite Change Detection dataset - Images"
LABELS = {
    "train": "Onera Satellite Change Detection dataset - Train Labels",
    "test": "Onera Satellite Change Detection dataset - Test Labels",
}
# Only the co-registered `_rect` folders: `imgs_1/`, `imgs_2/` hold raw native-resolution crops.
PHASES = ("imgs_1_rect", "imgs_2_rect")
GRID_BAND = "B02"  # a 10 m band: its H x W is the grid every other band is put on
# `code` is the class's value in cm.png terms (0 = no change, non-zero = change); the
# `<city>-cm.tif` files say 1 and 2 instead (datasets.md 2.3).
OSCD_CLASSES = [
    ClassInfo(index=0, name="no change", colour=(0, 0, 0), code=0),
    ClassInfo(index=1, name="change", colour=(255, 255, 255), code=1),
]
_TIF_LABEL_CODES = (1, 2)  # <city>-cm.tif: 1 = no change, 2 = change
_COARSE_FACTORS = (2, 6)  # 20 m and 60 m bands against the 10 m grid
_CACHED_CITIES = 2  # a thread pool crossing a city boundary needs the old and the new city
SPLIT_ORDER = ("train", "val", "test")
_FIX_ARCHIVE = "re-extract it from the OSCD archive or re-download the archive"


class _Tree(Protocol):
    """One OSCD top folder, extracted or inside its zip; `rel` paths are '/'-joined."""

    def where(self, rel: str) -> Path: ...
    def has(self, rel: str) -> bool: ...
    def has_dir(self, rel: str) -> bool: ...
    def subdirs(self) -> list[str]: ...
    def source(self, rel: str) -> Path | bytes: ...


@dataclass(frozen=True)
class _DirTree:
    root: Path

    def where(self, rel: str) -> Path:
        return self.root / rel

    def has(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def has_dir(self, rel: str) -> bool:
        return (self.root / rel).is_dir()

    def subdirs(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def source(self, rel: str) -> Path:
        # A path, not bytes: rasterio then reads headers without reading the pixels.
        return self.root / rel


class _ZipTree:
    """A top folder read in place from its zip; each read opens the zip anew (thread-safe)."""

    def __init__(self, archive: Path, stem: str):
        self.archive = archive
        try:
            with zipfile.ZipFile(archive) as zf:
                names = [n for n in zf.namelist() if not n.endswith("/")]
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise InputDataError(
                f"corrupt or unreadable zip ({exc})", archive, _FIX_ARCHIVE
            ) from None
        # Tolerate a re-zipped archive without the top folder.
        self.prefix = f"{stem}/" if any(n.startswith(f"{stem}/") for n in names) else ""
        self.files = {n[len(self.prefix) :] for n in names if n.startswith(self.prefix)}

    def where(self, rel: str) -> Path:
        return self.archive / f"{self.prefix}{rel}"

    def has(self, rel: str) -> bool:
        return rel in self.files

    def has_dir(self, rel: str) -> bool:
        return any(n.startswith(f"{rel}/") for n in self.files)

    def subdirs(self) -> list[str]:
        return sorted({n.split("/")[0] for n in self.files if "/" in n})

    def source(self, rel: str) -> bytes:
        try:
            with zipfile.ZipFile(self.archive) as zf:
                return zf.read(f"{self.prefix}{rel}")
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, KeyError) as exc:
            raise InputDataError(
                f"corrupt zip: cannot read {self.prefix}{rel} ({exc})", self.archive, _FIX_ARCHIVE
            ) from None


@dataclass(frozen=True)
class _City:
    """A city's facts from its headers: split, 10 m grid, georeferencing, label file."""

    name: str
    split: str
    labels: _Tree
    label_rel: str
    height: int
    width: int
    crs: str | None
    transform: Any


@dataclass(frozen=True)
class _Stack:
    """One city's pixels on the 10 m grid; read-only, shared by all its patches."""

    images: tuple[np.ndarray, np.ndarray]
    nodata: tuple[float | None, float | None]
    change: np.ndarray
    where: tuple[Path, Path]


@dataclass(frozen=True)
class _Context:
    """What `load` needs; immutable, so threads share it (the city cache has its own lock)."""

    images: _Tree
    cities: dict[str, _City]
    bands: tuple[str, ...]
    size: int
    nodata: float | None
    georeferenced: bool


def read_oscd(raw: Path | None, options: PrepareOptions) -> SourcePlan:
    """Open OSCD: list the cities, split them, read one header per city and phase.

    Args:
        raw: the folder holding the three extracted folders (Images, Train Labels, Test
            Labels) or the three original zips, which are read in place.
        options: bands (default the paper's ten), patch_size, overlap, nodata, val_fraction
            and seed (val is carved from the train cities, by city).

    Returns:
        The plan; its thread-safe `load` returns `image_t1`, `image_t2` (C, H, W) uint16
        reflectance x 10000 and `change` (H, W) uint8 (0, 1, 255 = nodata or padding).

    Raises:
        InputDataError: a missing folder, zip, city, band or label; a corrupt file or zip;
            sizes that disagree; an unknown band name.
    """
    # Plain TIFFs (as OSCD's may be) warn on every open; a missing CRS only disables bounds.
    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
    bands = _select_bands(options.bands)
    images, labels = _open_trees(require_dir(raw, "oscd"))
    listed = _list_cities(images, labels)
    splits = _assign_splits(listed, options)
    cities = {
        name: _open_city(images, labels[origin], name, splits[name], bands)
        for origin, names in listed.items()
        for name in names
    }
    crs_set = {city.crs for city in cities.values()}
    crs = crs_set.pop() if len(crs_set) == 1 else None
    ctx = _Context(images, cities, bands, options.patch_size, options.nodata, crs is not None)
    spec = _spec(ctx, crs, listed, splits)
    load = functools.partial(_load, ctx=ctx, cache=_CityCache(ctx))
    return SourcePlan(spec=spec, candidates=_candidates(ctx, options), load=load)


def _select_bands(requested: tuple[str, ...] | None) -> tuple[str, ...]:
    if requested is None:
        return S2_TEN_BANDS
    bands = tuple(b.strip().upper() for b in requested)
    unknown = [b for b in bands if b not in S2_ALL_BANDS]
    if unknown or not bands or len(set(bands)) != len(bands):
        what = f"unknown band(s) {unknown}" if unknown else f"bad band list {list(requested)}"
        raise InputDataError(
            f"OSCD: {what}", hint=f"choose distinct bands among {', '.join(S2_ALL_BANDS)}"
        )
    return bands


def _open_trees(root: Path) -> tuple[_Tree, dict[str, _Tree]]:
    images = _open_tree(root, IMAGES)
    return images, {split: _open_tree(root, stem) for split, stem in LABELS.items()}


def _open_tree(root: Path, stem: str) -> _Tree:
    # An extracted folder wins over its zip, as in torchgeo.
    if (root / stem).is_dir():
        return _DirTree(root / stem)
    if (root / f"{stem}.zip").is_file():
        return _ZipTree(root / f"{stem}.zip", stem)
    hint = f"put '{stem}' or '{stem}.zip' in {root} (RAW holds the three OSCD folders or zips)"
    if root.name in (IMAGES, *LABELS.values()):
        hint = f"pass {root.parent}, the folder that holds the three OSCD folders, not one of them"
    raise InputDataError("OSCD folder (or its .zip) is missing", root / stem, hint)


def _list_cities(images: _Tree, labels: dict[str, _Tree]) -> dict[str, list[str]]:
    """Cities per original split: Images/<split>.txt, else the label folder's sub-folders."""
    listed: dict[str, list[str]] = {}
    for split, tree in labels.items():
        txt = f"{split}.txt"
        if images.has(txt):
            text = _text(images.source(txt))
            listed[split] = list(dict.fromkeys(n for n in re.split(r"[,\s]+", text) if n))
        else:
            # torchgeo's fixture has no txt files; its cities are the label sub-folders.
            listed[split] = [n for n in tree.subdirs() if not n.startswith((".", "__"))]
    both = sorted(set(listed["train"]) & set(listed["test"]))
    if both:
        raise InputDataError(
            f"cities listed as both train and test: {both}",
            images.where("test.txt"),
            "list each city in only one of train.txt and test.txt",
        )
    if not listed["train"] and not listed["test"]:
        raise InputDataError("no OSCD cities found", images.where("train.txt"), _FIX_ARCHIVE)
    return listed


def _text(source: Path | bytes) -> str:
    data = source.read_bytes() if isinstance(source, Path) else source
    return data.decode("utf-8-sig", errors="replace")


def _assign_splits(listed: dict[str, list[str]], options: PrepareOptions) -> dict[str, str]:
    """Each city's split; val takes whole train cities, so no scene is in two splits."""
    train = sorted(listed["train"])  # sorted: the choice must not depend on the txt order
    n_val = 0
    if options.val_fraction > 0 and len(train) >= 2:
        n_val = min(len(train) - 1, max(1, round(options.val_fraction * len(train))))
    chosen = np.random.default_rng(options.seed).permutation(len(train))[:n_val]
    val = {train[int(i)] for i in chosen}
    splits = {name: "test" for name in listed["test"]}
    splits |= {name: "val" if name in val else "train" for name in listed["train"]}
    return splits


def _open_city(
    images: _Tree, labels: _Tree, name: str, split: str, bands: tuple[str, ...]
) -> _City:
    """Check a city's files exist and read its headers (no pixels)."""
    if not images.has_dir(name):
        raise InputDataError(
            f"city {name!r} is listed but has no image folder",
            images.where(name),
            f"extract the whole Images archive or remove {name} from the city list",
        )
    for phase in PHASES:
        for band in dict.fromkeys((GRID_BAND, *bands)):
            if not images.has(f"{name}/{phase}/{band}.tif"):
                raise InputDataError(
                    "band file is missing", images.where(f"{name}/{phase}/{band}.tif"), _FIX_ARCHIVE
                )
    height, width, crs, transform = _grid(images, name)
    label_rel = _label_rel(labels, name)
    label_hw = _label_size(labels, label_rel)
    if label_hw != (height, width):
        raise InputDataError(
            f"change map is {label_hw[0]}x{label_hw[1]} but the city's images are {height}x{width}",
            labels.where(label_rel),
            "replace it with the change map of this city",
        )
    return _City(name, split, labels, label_rel, height, width, crs, transform)


def _grid(images: _Tree, name: str) -> tuple[int, int, str | None, Any]:
    """(H, W, CRS, transform) of the city's B02 in phase 1, after checking phase 2 agrees."""
    headers = []
    for phase in PHASES:
        with _raster(images, f"{name}/{phase}/{GRID_BAND}.tif") as src:
            georef = src.crs is not None and not src.transform.is_identity
            headers.append(
                (src.height, src.width, _crs_text(src.crs) if georef else None, src.transform)
            )
    if headers[0][:2] != headers[1][:2]:
        raise InputDataError(
            f"{GRID_BAND} is {headers[1][0]}x{headers[1][1]} in {PHASES[1]} but "
            f"{headers[0][0]}x{headers[0][1]} in {PHASES[0]}",
            images.where(f"{name}/{PHASES[1]}/{GRID_BAND}.tif"),
            _FIX_ARCHIVE,
        )
    return headers[0]


def _crs_text(crs: Any) -> str:
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else str(crs.to_wkt())


def _label_rel(labels: _Tree, name: str) -> str:
    # cm.png is what torchgeo reads; the tif (same map, values 1/2) is the fallback.
    for rel in (f"{name}/cm/cm.png", f"{name}/cm/{name}-cm.tif"):
        if labels.has(rel):
            return rel
    raise InputDataError(
        f"no change map for city {name!r} (cm/cm.png or cm/{name}-cm.tif)",
        labels.where(f"{name}/cm"),
        f"extract the whole labels archive or remove {name} from the city list",
    )


def _label_size(labels: _Tree, rel: str) -> tuple[int, int]:
    if rel.endswith(".tif"):
        with _raster(labels, rel) as src:
            return int(src.height), int(src.width)
    with _png(labels, rel) as img:
        return img.height, img.width


@contextmanager
def _raster(tree: _Tree, rel: str) -> Iterator[Any]:
    """An open rasterio dataset of a file or zip member; failures name the file."""
    source = tree.source(rel)
    try:
        if isinstance(source, Path):
            with rasterio.open(source) as src:
                yield src
        else:
            with MemoryFile(source) as memory, memory.open() as src:
                yield src
    except (RasterioError, OSError) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise InputDataError(
            f"corrupt or unreadable TIFF ({reason})", tree.where(rel), _FIX_ARCHIVE
        ) from None


@contextmanager
def _png(tree: _Tree, rel: str) -> Iterator[Image.Image]:
    """An open PIL image of a file or zip member; failures name the file."""
    source = tree.source(rel)
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as img:
            yield img
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputDataError(
            f"corrupt or unreadable PNG ({exc})", tree.where(rel), _FIX_ARCHIVE
        ) from None


def _spec(
    ctx: _Context, crs: str | None, listed: dict[str, list[str]], splits: dict[str, str]
) -> SourceSpec:
    crs_by_city = {name: city.crs for name, city in ctx.cities.items()}
    details: dict[str, Any] = {
        "cities": {
            s: [c for n in listed.values() for c in n if splits[c] == s] for s in SPLIT_ORDER
        },
        "val_from": "train cities, by city",
        "dates": {name: _read_dates(ctx.images, name) for name in ctx.cities},
        "bands": list(ctx.bands),
        "label_source": {
            name: city.label_rel.split("/", 1)[1] for name, city in ctx.cities.items()
        },
        "resampling": f"bands off the {GRID_BAND} 10 m grid: bilinear",
    }
    if crs is None and any(crs_by_city.values()):
        details["crs_by_city"] = crs_by_city  # georeferenced, but not in one CRS: no bounds
    return SourceSpec(
        dataset="oscd",
        task="cd",
        bands=s2_bands(ctx.bands),
        classes=list(OSCD_CLASSES),
        dtype="uint16",
        height=ctx.size,
        width=ctx.size,
        crs=crs,
        rgb_bands=list(S2_RGB_BANDS) if set(S2_RGB_BANDS) <= set(ctx.bands) else None,
        band_order_source="OSCD imgs_*_rect/<band>.tif, one file per band, stacked as requested",
        details=details,
    )


def _read_dates(images: _Tree, name: str) -> dict[str, str] | None:
    """dates.txt ("date_1: 20161130" per line) as strings; None when the file is missing."""
    rel = f"{name}/dates.txt"
    if not images.has(rel):
        return None
    lines = [line for line in _text(images.source(rel)).splitlines() if line.strip()]
    dates: dict[str, str] = {}
    for i, line in enumerate(lines, start=1):
        key, sep, value = line.partition(":")
        dates[key.strip() if sep else f"date_{i}"] = (value if sep else line).strip()
    return dates


def _candidates(ctx: _Context, options: PrepareOptions) -> list[Candidate]:
    """Overlapping windows of every city, train cities first, then val, then test."""
    return [
        Candidate(f"{city.name}/y{y}_x{x}", split, (city.name, y, x))
        for split in SPLIT_ORDER
        for city in ctx.cities.values()
        if city.split == split
        for y, x in patch_windows(city.height, city.width, options.patch_size, options.overlap)
    ]


class _CityCache:
    """The full stacks of the last cities read: a city's patches share one read of its files."""

    def __init__(self, ctx: _Context):
        self._ctx = ctx
        self._lock = threading.Lock()
        self._stacks: OrderedDict[str, _Stack] = OrderedDict()

    def get(self, name: str) -> _Stack:
        # One lock around the read too: two threads never read the same city twice.
        with self._lock:
            if name not in self._stacks:
                self._stacks[name] = _read_city(self._ctx, self._ctx.cities[name])
                while len(self._stacks) > _CACHED_CITIES:
                    self._stacks.popitem(last=False)
            self._stacks.move_to_end(name)
            return self._stacks[name]


def _read_city(ctx: _Context, city: _City) -> _Stack:
    phases = [_read_phase(ctx, city, phase) for phase in PHASES]
    change = _read_change(city.labels, city.label_rel)
    for array in (phases[0][0], phases[1][0], change):
        array.flags.writeable = False  # shared between threads: loads copy their window
    where = (
        ctx.images.where(f"{city.name}/{PHASES[0]}"),
        ctx.images.where(f"{city.name}/{PHASES[1]}"),
    )
    return _Stack((phases[0][0], phases[1][0]), (phases[0][1], phases[1][1]), change, where)


def _read_phase(ctx: _Context, city: _City, phase: str) -> tuple[np.ndarray, float | None]:
    """(C, H, W) uint16 of one phase on the 10 m grid and the nodata value that applies."""
    grid = (city.height, city.width)
    stack = np.empty((len(ctx.bands), *grid), dtype=np.uint16)
    tags: list[float | None] = []
    for i, band in enumerate(ctx.bands):
        stack[i], tag = _read_band(ctx.images, f"{city.name}/{phase}/{band}.tif", grid)
        tags.append(tag)
    # --nodata overrides the files' tag, as GDAL's -srcnodata does.
    if ctx.nodata is not None:
        return stack, ctx.nodata
    return stack, next((t for t in tags if t is not None), None)


def _read_band(tree: _Tree, rel: str, grid: tuple[int, int]) -> tuple[np.ndarray, float | None]:
    with _raster(tree, rel) as src:
        shape = (int(src.height), int(src.width))
        if shape == grid:
            data = src.read(1)
        else:
            _require_coarse_grid(shape, grid, tree.where(rel))
            # Reflectance is continuous, so bilinear, not nearest: no 2x2 or 6x6 blocks.
            data = src.read(1, out_shape=grid, resampling=Resampling.bilinear)
        return _as_uint16(np.asarray(data), tree.where(rel)), src.nodata


def _require_coarse_grid(shape: tuple[int, int], grid: tuple[int, int], where: Path) -> None:
    """A band off the grid must be the same extent at 20 m or 60 m (+- one pixel of rounding)."""
    for factor in _COARSE_FACTORS:
        if abs(shape[0] - grid[0] / factor) <= 1 and abs(shape[1] - grid[1] / factor) <= 1:
            return
    raise InputDataError(
        f"band is {shape[0]}x{shape[1]}: neither the city's {grid[0]}x{grid[1]} 10 m grid "
        f"(of {GRID_BAND}) nor a 20 m or 60 m version of it",
        where,
        _FIX_ARCHIVE,
    )


def _as_uint16(data: np.ndarray, where: Path) -> np.ndarray:
    if data.dtype == np.uint16:
        return data
    finite = np.isfinite(data) if np.issubdtype(data.dtype, np.floating) else True
    if not np.all(finite) or data.min() < 0 or data.max() > np.iinfo(np.uint16).max:
        raise InputDataError(
            f"band values do not fit uint16 reflectance x 10000 (dtype {data.dtype})",
            where,
            "OSCD bands are uint16; replace the file",
        )
    return np.asarray(np.rint(data), dtype=np.uint16)


def _read_change(tree: _Tree, rel: str) -> np.ndarray:
    """The change map as uint8 0/1 (255 where the tif says ignore)."""
    if rel.endswith(".tif"):
        with _raster(tree, rel) as src:
            raw = src.read(1)
        return remap_labels(raw, _TIF_LABEL_CODES, tree.where(rel))
    with _png(tree, rel) as img:
        # A palette image turns into colours first; alpha is dropped: it is not a change.
        rgb = img.convert("RGBA") if img.mode in ("P", "PA") else img
        array = np.asarray(rgb)
        if rgb.mode.endswith(("A", "a")):
            array = array[..., :-1]
    changed = array != 0 if array.ndim == 2 else (array != 0).any(axis=-1)
    return np.asarray(changed, dtype=np.uint8)


def _load(candidate: Candidate, *, ctx: _Context, cache: _CityCache) -> RawSample:
    """Cut one window of both phases and the change map; nodata and padding get label 255."""
    city, y, x = candidate.ref
    stack = cache.get(city)
    rows, cols = slice(y, y + ctx.size), slice(x, x + ctx.size)
    change = stack.change[rows, cols].copy()
    invalid = np.zeros(change.shape, dtype=bool)
    patches = []
    for image, nodata, where in zip(stack.images, stack.nodata, stack.where, strict=True):
        patch = image[:, rows, cols].copy()
        mask, _ = apply_nodata(patch, change, nodata, where)
        invalid |= mask
        patches.append(patch)
    arrays = {
        array: pad_image_as_nodata(patch, invalid, ctx.size, ctx.size)
        for array, patch in zip(("image_t1", "image_t2"), patches, strict=True)
    }
    arrays["change"] = pad_to(change, ctx.size, ctx.size, IGNORE_INDEX)
    padding = ctx.size * ctx.size - change.size
    bounds = (
        patch_bounds(ctx.cities[city].transform, y, x, ctx.size, ctx.size)
        if ctx.georeferenced
        else None
    )
    return RawSample(
        candidate.source_id, candidate.split, arrays, bounds, int(invalid.sum()) + padding
    )
