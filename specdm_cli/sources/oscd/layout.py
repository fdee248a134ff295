"""OSCD cities: which exist, their split, and their headers (grid, CRS, change map)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specdm_cli.errors import InputDataError
from specdm_cli.manifest import ClassInfo
from specdm_cli.sources.base import refuse_class_nodata, require_whole_read
from specdm_cli.sources.oscd.archive import Tree, fix_of, open_png, open_raster, read_text
from specdm_cli.sources.sentinel2 import S2_ALL_BANDS, S2_TEN_BANDS, s2_band_name

# Only the co-registered `_rect` folders: `imgs_1/`, `imgs_2/` hold raw native-resolution crops.
PHASES = ("imgs_1_rect", "imgs_2_rect")
# The same scenes at native resolution, named "<S2 product>_B01.tif": read only for bands the
# `_rect` folders lack, with a warning (they are crops of the raw products, not co-registered).
RAW_PHASES = ("imgs_1", "imgs_2")
GRID_BAND = "B02"  # a 10 m band: its H x W is the grid every other band is put on
# `code` is the class's value in the raw files, which say it two ways (datasets.md 2.3): a
# manifest reader must not take change for the value 1 of cm.png, which is never written.
OSCD_CLASSES = [
    ClassInfo(index=0, name="no change", colour=(0, 0, 0), code="0 in cm.png, 1 in <city>-cm.tif"),
    ClassInfo(
        index=1,
        name="change",
        colour=(255, 255, 255),
        code="non-zero in cm.png, 2 in <city>-cm.tif",
    ),
]
SPLIT_ORDER = ("train", "val", "test")


@dataclass(frozen=True)
class City:
    """A city's facts from its headers: split, 10 m grid, georeferencing, label file."""

    name: str
    split: str
    labels: Tree
    label_rel: str
    height: int
    width: int
    crs: str | None
    transform: Any
    band_files: dict[tuple[int, str], str]


@contextmanager
def leaving_out(name: str, names: Iterable[str]) -> Iterator[None]:
    """A bad file of city `name` also says how to leave the city out: --cities with the others
    (removing the file alone makes a rerun say it is missing)."""
    try:
        yield
    except InputDataError as exc:
        others = [other for other in names if other != name]
        if others:
            fix = exc.hint or "fix the file"
            exc.hint = f"{fix}, or leave {name} out: --cities {','.join(others)}"
        raise


def select_bands(requested: tuple[str, ...] | None) -> tuple[str, ...]:
    """The --bands as canonical S2 names (`B2`, `b8a` are fine); default the paper's ten."""
    if requested is None:
        return S2_TEN_BANDS
    bands = tuple(s2_band_name(b) or b.strip().upper() for b in requested)
    unknown = [b for b in bands if b not in S2_ALL_BANDS]
    if unknown or not bands or len(set(bands)) != len(bands):
        what = f"unknown band(s) {unknown}" if unknown else f"bad band list {list(requested)}"
        raise InputDataError(
            f"OSCD: {what}", hint=f"choose distinct bands among {', '.join(S2_ALL_BANDS)}"
        )
    return bands


def open_city(
    images: Tree,
    labels: Tree,
    name: str,
    split: str,
    bands: tuple[str, ...],
    label_nodata: float | None = None,
) -> tuple[City, list[str]]:
    """Check a city's files exist and read its headers (no pixels).

    Returns the city and the band files read from the non-rectified `imgs_N/` folders because
    `imgs_N_rect/` lacks them (a partial or re-packed download).
    """
    band_files, fallbacks = _band_files(images, name, bands)
    height, width, crs, transform = _grid(images, name, band_files)
    # A city is read whole: both phases' 13 uint16 bands plus a float band being resampled.
    require_whole_read(height, width, 2 * 13 * 2 + 8, images.where(name))
    rel = label_rel(labels, name, prefer_tif=label_nodata is not None)
    if rel is None:
        raise InputDataError(
            f"no change map for city {name!r} (cm/cm.png or cm/{name}-cm.tif)",
            labels.where(f"{name}/cm"),
            f"extract the whole labels archive or remove {name} from the city list",
        )
    where = labels.where(rel)
    refuse_class_nodata(label_nodata, _CHANGE_CODES[where.suffix], f"{name}/cm/{where.name}")
    label_hw = _label_size(labels, rel)
    if label_hw != (height, width):
        raise InputDataError(
            f"change map is {label_hw[0]}x{label_hw[1]} but the city's images are {height}x{width}",
            labels.where(rel),
            "replace it with the change map of this city",
        )
    city = City(name, split, labels, rel, height, width, crs, transform, band_files)
    _check_band_headers(images, city)
    return city, fallbacks


_COARSE_FACTORS = (2, 6)  # 20 m and 60 m bands against the 10 m grid


def _check_band_headers(images: Tree, city: City) -> None:
    """Every band file opens and lies on the city's grid (at 10, 20 or 60 m): read from the
    headers while planning, so a broken band of one city is not found after the cities before
    it are written (the pixels' own checks, NaN and 0-1 reflectance, come as they are read).
    A zip's member is inflated whole here, not read header-only through GDAL's /vsizip/ (9x
    faster on the headers, ~8% of a prepare): inflating checks its CRC, so a damaged download
    stops before the first city is written."""
    grid = (city.height, city.width)
    for rel in dict.fromkeys(city.band_files.values()):
        with open_raster(images, rel) as src:
            _require_city_grid(src, city, images.where(rel), fix_of(images))
            shape = (int(src.height), int(src.width))
            if shape != grid:
                _require_coarse_grid(shape, grid, images.where(rel), fix_of(images))


def _require_city_grid(src: Any, city: City, where: Path, fix: str) -> None:
    """A georeferenced band must lie on the city's georeferenced grid (its CRS, and its origin
    within one of its own pixels): a band stacked off its place shifts every pixel silently."""
    if city.crs is None or src.crs is None or src.transform.is_identity:
        return  # not georeferenced (OSCD's _rect files may not be): sizes alone are checked
    same_crs = crs_text(src.crs) == city.crs
    shift = max(abs(src.transform.c - city.transform.c), abs(src.transform.f - city.transform.f))
    if same_crs and shift <= max(abs(src.transform.a), abs(src.transform.e)):
        return
    what = f"origin {shift:g} units from" if same_crs else "another CRS than"
    raise InputDataError(
        f"band lies off its city's grid ({what} its {GRID_BAND})",
        where,
        fix,
    )


def _require_coarse_grid(
    shape: tuple[int, int], grid: tuple[int, int], where: Path, fix: str
) -> None:
    """A band off the grid must be the same extent at 20 m or 60 m (+- one pixel of rounding)."""
    for factor in _COARSE_FACTORS:
        if abs(shape[0] - grid[0] / factor) <= 1 and abs(shape[1] - grid[1] / factor) <= 1:
            return
    raise InputDataError(
        f"band is {shape[0]}x{shape[1]}: neither the city's {grid[0]}x{grid[1]} 10 m grid "
        f"(of {GRID_BAND}) nor a 20 m or 60 m version of it",
        where,
        fix,
    )


def _band_files(
    images: Tree, name: str, bands: tuple[str, ...]
) -> tuple[dict[tuple[int, str], str], list[str]]:
    """(phase index, band) -> file, `imgs_N_rect/Bxx.tif` else `imgs_N/<product>_Bxx.tif`."""
    files: dict[tuple[int, str], str] = {}
    fallbacks: list[str] = []
    for index, phase in enumerate(PHASES):
        native = _native_files(images, f"{name}/{RAW_PHASES[index]}")
        present = _by_lower_name(images, f"{name}/{phase}")
        for band in dict.fromkeys((GRID_BAND, *bands)):
            rect = f"{name}/{phase}/{band}.tif"
            found = present.get(f"{band}.tif".lower(), [])
            if len(found) > 1:
                raise InputDataError(
                    f"band {band} twice, in names that differ only by case or zero padding: "
                    f"{', '.join(n.rsplit('/', 1)[1] for n in found)}",
                    images.where(found[0]),
                    "keep one of the two files",
                )
            if found:
                files[index, band] = found[0]
            elif band in native:
                files[index, band] = native[band]
                fallbacks.append(native[band])
            else:
                raise InputDataError("band file is missing", images.where(rect), fix_of(images))
    return files, fallbacks


# A rectified folder's band file, the whole name: `B02.tif`, `B2.TIF`, `B8a.tif` (not `Copy of
# B02.tif` or `RGB-B2.tif`, which are no band files of the dataset).
_BAND_FILE = re.compile(r"B0?\d{1,2}A?\.tif", re.IGNORECASE)


def _by_lower_name(images: Tree, folder: str) -> dict[str, list[str]]:
    """The files of `folder` by lower-case name, a band file's by its band: `B02.TIF` (FAT and
    Windows copies), `B8a.tif` and `B2.tif` (re-exported unpadded) are the band files
    `B02.tif`, `B8A.tif` and `B02.tif`."""
    found: dict[str, list[str]] = {}
    for file_name in images.listdir(folder):
        band = s2_band_name(file_name) if _BAND_FILE.fullmatch(file_name) else None
        key = f"{band}.tif" if band is not None else file_name
        found.setdefault(key.lower(), []).append(f"{folder}/{file_name}")
    return found


def _native_files(images: Tree, folder: str) -> dict[str, str]:
    """Band -> file of a non-rectified folder, whose names end in the band (`..._B8A.tif`)."""
    found: dict[str, str] = {}
    for file_name in images.listdir(folder):
        band = s2_band_name(file_name)
        if band is not None and "_" in file_name:
            found[band] = f"{folder}/{file_name}"
    return found


def _grid(
    images: Tree, name: str, band_files: dict[tuple[int, str], str]
) -> tuple[int, int, str | None, Any]:
    """(H, W, CRS, transform) of the city's B02 (phase 1's, or phase 2's where only that one is
    georeferenced: the grid every band is checked against), after checking the sizes agree."""
    headers = []
    for index in range(len(PHASES)):
        with open_raster(images, band_files[index, GRID_BAND]) as src:
            georef = src.crs is not None and not src.transform.is_identity
            headers.append(
                (src.height, src.width, crs_text(src.crs) if georef else None, src.transform)
            )
    if headers[0][:2] != headers[1][:2]:
        raise InputDataError(
            f"{GRID_BAND} is {headers[1][0]}x{headers[1][1]} in phase 2 but "
            f"{headers[0][0]}x{headers[0][1]} in phase 1",
            images.where(band_files[1, GRID_BAND]),
            fix_of(images),
        )
    georeferenced = [header for header in headers if header[2] is not None]
    return (georeferenced or headers)[0]


def crs_text(crs: Any) -> str:
    """A CRS as the city records it: its EPSG code, else its WKT."""
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else str(crs.to_wkt())


def label_rel(labels: Tree, name: str, prefer_tif: bool = False) -> str | None:
    """The city's change map file, or None when the labels lack it."""
    # cm.png is what torchgeo reads; the tif (same map, values 1/2) is the fallback, and is
    # read first under --label-nodata, whose value the README gives in the tif's codes.
    files = [f"{name}/cm/cm.png", f"{name}/cm/{name}-cm.tif"]
    for rel in reversed(files) if prefer_tif else files:
        if labels.has(rel):
            return rel
    return None


# A change map's class codes: cm.png is 0 (no change) or non-zero (change: 255 in 8-bit maps, 1
# in 16-bit 0/1 ones), the tif 1 or 2. Another grey level may mark unlabelled pixels.
_CHANGE_CODES = {
    ".png": {0: "no change", 1: "change", 255: "change"},
    ".tif": {1: "no change", 2: "change"},
}


def _label_size(labels: Tree, rel: str) -> tuple[int, int]:
    if rel.endswith(".tif"):
        with open_raster(labels, rel) as src:
            return int(src.height), int(src.width)
    with open_png(labels, rel) as img:
        return img.height, img.width


def read_dates(images: Tree, name: str) -> dict[str, str] | None:
    """dates.txt ("date_1: 20161130" per line) as strings; None when the file is missing."""
    rel = f"{name}/dates.txt"
    if not images.has(rel):
        return None
    lines = [line for line in read_text(images, rel).splitlines() if line.strip()]
    dates: dict[str, str] = {}
    for i, line in enumerate(lines, start=1):
        key, sep, value = line.partition(":")
        dates[key.strip() if sep else f"date_{i}"] = (value if sep else line).strip()
    return dates
