"""OSCD cities: which exist, their split, and their headers (grid, CRS, change map)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from specdm_cli.errors import InputDataError
from specdm_cli.manifest import ClassInfo
from specdm_cli.sources.base import (
    PrepareOptions,
)
from specdm_cli.sources.oscd.archive import FIX_ARCHIVE, Tree, open_png, open_raster, read_text
from specdm_cli.sources.sentinel2 import S2_ALL_BANDS, S2_TEN_BANDS

# Only the co-registered `_rect` folders: `imgs_1/`, `imgs_2/` hold raw native-resolution crops.
PHASES = ("imgs_1_rect", "imgs_2_rect")
GRID_BAND = "B02"  # a 10 m band: its H x W is the grid every other band is put on
# `code` is the class's value in cm.png terms (0 = no change, non-zero = change); the
# `<city>-cm.tif` files say 1 and 2 instead (datasets.md 2.3).
OSCD_CLASSES = [
    ClassInfo(index=0, name="no change", colour=(0, 0, 0), code=0),
    ClassInfo(index=1, name="change", colour=(255, 255, 255), code=1),
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


def select_bands(requested: tuple[str, ...] | None) -> tuple[str, ...]:
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


def list_cities(images: Tree, labels: dict[str, Tree]) -> dict[str, list[str]]:
    """Cities per original split: Images/<split>.txt, else the label folder's sub-folders."""
    listed: dict[str, list[str]] = {}
    for split, tree in labels.items():
        txt = f"{split}.txt"
        if images.has(txt):
            text = read_text(images.source(txt))
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
        raise InputDataError("no OSCD cities found", images.where("train.txt"), FIX_ARCHIVE)
    return listed


def assign_splits(listed: dict[str, list[str]], options: PrepareOptions) -> dict[str, str]:
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


def open_city(images: Tree, labels: Tree, name: str, split: str, bands: tuple[str, ...]) -> City:
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
                    "band file is missing", images.where(f"{name}/{phase}/{band}.tif"), FIX_ARCHIVE
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
    return City(name, split, labels, label_rel, height, width, crs, transform)


def _grid(images: Tree, name: str) -> tuple[int, int, str | None, Any]:
    """(H, W, CRS, transform) of the city's B02 in phase 1, after checking phase 2 agrees."""
    headers = []
    for phase in PHASES:
        with open_raster(images, f"{name}/{phase}/{GRID_BAND}.tif") as src:
            georef = src.crs is not None and not src.transform.is_identity
            headers.append(
                (src.height, src.width, _crs_text(src.crs) if georef else None, src.transform)
            )
    if headers[0][:2] != headers[1][:2]:
        raise InputDataError(
            f"{GRID_BAND} is {headers[1][0]}x{headers[1][1]} in {PHASES[1]} but "
            f"{headers[0][0]}x{headers[0][1]} in {PHASES[0]}",
            images.where(f"{name}/{PHASES[1]}/{GRID_BAND}.tif"),
            FIX_ARCHIVE,
        )
    return headers[0]


def _crs_text(crs: Any) -> str:
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else str(crs.to_wkt())


def _label_rel(labels: Tree, name: str) -> str:
    # cm.png is what torchgeo reads; the tif (same map, values 1/2) is the fallback.
    for rel in (f"{name}/cm/cm.png", f"{name}/cm/{name}-cm.tif"):
        if labels.has(rel):
            return rel
    raise InputDataError(
        f"no change map for city {name!r} (cm/cm.png or cm/{name}-cm.tif)",
        labels.where(f"{name}/cm"),
        f"extract the whole labels archive or remove {name} from the city list",
    )


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
    lines = [line for line in read_text(images.source(rel)).splitlines() if line.strip()]
    dates: dict[str, str] = {}
    for i, line in enumerate(lines, start=1):
        key, sep, value = line.partition(":")
        dates[key.strip() if sep else f"date_{i}"] = (value if sep else line).strip()
    return dates
