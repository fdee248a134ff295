"""OSCD pixels: a city's bands on the 10 m grid, its change map, and one patch of them."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rasterio.enums import Resampling

from specdm_cli.errors import InputDataError
from specdm_cli.manifest import IGNORE_INDEX
from specdm_cli.sources.base import (
    Candidate,
    RawSample,
    apply_nodata,
    label_nodata_mask,
    label_values,
    pad_image_as_nodata,
    pad_to,
    patch_bounds,
    remap_labels,
)
from specdm_cli.sources.oscd.archive import Tree, open_png, open_raster
from specdm_cli.sources.oscd.layout import (
    PHASES,
    City,
    leaving_out,
)

_TIF_LABEL_CODES = (1, 2)  # <city>-cm.tif: 1 = no change, 2 = change
_CACHED_CITIES = 2  # a thread pool crossing a city boundary needs the old and the new city


@dataclass(frozen=True)
class _Stack:
    """One city's pixels on the 10 m grid; read-only, shared by all its patches."""

    images: tuple[np.ndarray, np.ndarray]
    nodata: tuple[float | None, float | None]
    declared_nan: tuple[np.ndarray, np.ndarray]  # (H, W): NaN in a float band, NaN declared nodata
    change: np.ndarray
    where: tuple[Path, Path]


@dataclass(frozen=True)
class Context:
    """What `load` needs; immutable, so threads share it (the city cache has its own lock)."""

    images: Tree
    cities: dict[str, City]
    bands: tuple[str, ...]
    size: int
    nodata: float | None
    georeferenced: bool
    label_nodata: float | None = None  # a `<city>-cm.tif` value meaning no label (-> 255)


class CityCache:
    """The full stacks of the last cities read: a city's patches share one read of its files."""

    def __init__(self, ctx: Context):
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


def _read_city(ctx: Context, city: City) -> _Stack:
    (t1, t1_nodata, t1_nan), (t2, t2_nodata, t2_nan) = (
        _read_phase(ctx, city, index) for index in range(len(PHASES))
    )
    change = _read_change(city.labels, city.label_rel, ctx.label_nodata)
    for array in (t1, t2, t1_nan, t2_nan, change):
        array.flags.writeable = False  # shared between threads: loads copy their window
    where = (
        ctx.images.where(f"{city.name}/{PHASES[0]}"),
        ctx.images.where(f"{city.name}/{PHASES[1]}"),
    )
    return _Stack((t1, t2), (t1_nodata, t2_nodata), (t1_nan, t2_nan), change, where)


def _read_phase(
    ctx: Context, city: City, phase: int
) -> tuple[np.ndarray, float | None, np.ndarray]:
    """(C, H, W) uint16 of one phase on the 10 m grid, the nodata value that applies, and the
    (H, W) pixels that were NaN in a float band where NaN is declared nodata."""
    grid = (city.height, city.width)
    stack = np.empty((len(ctx.bands), *grid), dtype=np.uint16)
    declared_nan = np.zeros(grid, dtype=bool)
    tags: list[float | None] = []
    for i, band in enumerate(ctx.bands):
        stack[i], tag, nan = _read_band(ctx.images, city.band_files[phase, band], city, ctx.nodata)
        declared_nan |= nan
        tags.append(tag)
    # --nodata overrides the files' tag, as GDAL's -srcnodata does.
    if ctx.nodata is not None:
        return stack, ctx.nodata, declared_nan
    return stack, next((t for t in tags if t is not None), None), declared_nan


def _read_band(
    tree: Tree, rel: str, city: City, nodata: float | None
) -> tuple[np.ndarray, float | None, np.ndarray]:
    """One band on the city's grid as uint16, its nodata tag, and its pixels of the declared
    nodata (`nodata`, else the tag) that uint16 cannot hold (NaN, -9999); those hold 0."""
    grid = (city.height, city.width)
    with open_raster(tree, rel) as src:
        # On the city's grid at 10, 20 or 60 m: open_city checked every band's header.
        if (src.height, src.width) == grid:
            data = np.asarray(src.read(1))
        else:
            # Reflectance is continuous, so bilinear, not nearest: no 2x2 or 6x6 blocks.
            data = np.asarray(src.read(1, out_shape=grid, resampling=Resampling.bilinear))
        declared = src.nodata if nodata is None else nodata
        unheld = np.zeros(grid, dtype=bool)
        # A value uint16 holds stays in the band, where apply_nodata finds it.
        held = declared is not None and 0 <= declared <= np.iinfo(np.uint16).max
        if declared is not None and not held and data.dtype != np.uint16:
            unheld = np.isnan(data) if np.isnan(declared) else data == declared
            data = np.where(unheld, 0, data)
        return _as_uint16(data, tree.where(rel)), src.nodata, unheld


# A float band whose largest value is this small holds reflectance, not reflectance x 10000
# (rounding it to uint16 leaves 0s and 1s: the city read as blank, removed without a word).
_UNIT_REFLECTANCE_MAX = 2.0


def _as_uint16(data: np.ndarray, where: Path) -> np.ndarray:
    if data.dtype == np.uint16:
        return data
    floating = np.issubdtype(data.dtype, np.floating)
    if floating and np.isnan(data).any():
        raise InputDataError(
            "band holds NaN and no nodata says what it means",
            where,
            "if NaN means no data, pass --nodata nan",
        )
    if floating and 0 < data.max() <= _UNIT_REFLECTANCE_MAX:
        raise InputDataError(
            f"band values lie in 0..{data.max():.3g}: reflectance, not reflectance x 10000 as "
            "OSCD's uint16 bands hold it",
            where,
            "scale the bands by 10000 (gdal_calc.py -A FILE --calc='A*10000' --type UInt16)",
        )
    finite = np.isfinite(data) if floating else True
    if not np.all(finite) or data.min() < 0 or data.max() > np.iinfo(np.uint16).max:
        raise InputDataError(
            f"band values do not fit uint16 reflectance x 10000 (dtype {data.dtype})",
            where,
            "OSCD bands are uint16; replace the file",
        )
    return np.asarray(np.rint(data), dtype=np.uint16)


def _read_change(tree: Tree, rel: str, label_nodata: float | None) -> np.ndarray:
    """The change map as uint8 0/1, 255 where it holds --label-nodata (the tif: else its nodata
    tag; cm.png: a grey value, or a colour whose channels all equal it)."""
    if rel.endswith(".tif"):
        with open_raster(tree, rel) as src:
            raw, tag = src.read(1), src.nodata
        nodata = label_nodata if label_nodata is not None else _tag_nodata(tag)
        return remap_labels(label_values(raw, nodata), _TIF_LABEL_CODES, tree.where(rel))
    with open_png(tree, rel) as img:
        # A palette image turns into colours first; alpha is dropped: it is not a change.
        rgb = img.convert("RGBA") if img.mode in ("P", "PA") else img
        array = np.asarray(rgb)
        if rgb.mode.endswith(("A", "a")):
            array = array[..., :-1]
    grey = array if array.ndim == 2 else array[..., 0]
    changed = array != 0 if array.ndim == 2 else (array != 0).any(axis=-1)
    # Not the tag path: a PNG has no nodata tag, so only the option marks no data here.
    unlabelled = label_nodata_mask(grey, label_nodata)
    if array.ndim == 3:
        unlabelled &= (array == array[..., :1]).all(axis=-1)
    return np.where(unlabelled, IGNORE_INDEX, changed).astype(np.uint8)


def _tag_nodata(tag: float | None) -> float | None:
    """A change map's nodata tag, unless it names a code: a tag a tool set never turns every
    "no change" (1) or "change" (2) pixel into 255 (as a geotiff classes file wins over a tag)."""
    return None if tag in _TIF_LABEL_CODES else tag


def load_patch(candidate: Candidate, *, ctx: Context, cache: CityCache) -> RawSample:
    """Cut one window of both phases and the change map; nodata and padding get label 255
    (a bad file's error also says how to leave its city out)."""
    with leaving_out(candidate.ref[0], ctx.cities):
        return _cut_patch(candidate, ctx, cache)


def _cut_patch(candidate: Candidate, ctx: Context, cache: CityCache) -> RawSample:
    """Cut one window of both phases and the change map; nodata and padding get label 255."""
    city, y, x = candidate.ref
    stack = cache.get(city)
    rows, cols = slice(y, y + ctx.size), slice(x, x + ctx.size)
    change = stack.change[rows, cols].copy()
    # The change map's own nodata (--label-nodata, a tif's tag): counted, but the images
    # there are valid (unlabelled is not blank).
    label_invalid = change == IGNORE_INDEX
    invalid = np.zeros(change.shape, dtype=bool)
    patches = []
    for image, nodata, nan, where in zip(
        stack.images, stack.nodata, stack.declared_nan, stack.where, strict=True
    ):
        patch = image[:, rows, cols].copy()
        mask, _ = apply_nodata(patch, change, nodata, where, masked=nan[rows, cols])
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
        candidate.source_id,
        candidate.split,
        arrays,
        bounds,
        int((invalid | label_invalid).sum()) + padding,
        image_nodata=pad_to(invalid, ctx.size, ctx.size, True),
        covered=(change.shape[0], change.shape[1]),
    )
