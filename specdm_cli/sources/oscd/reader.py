"""OSCD reader: the three Onera folders (or their zips) in, bi-temporal uint16 patches out."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

from rasterio.errors import NotGeoreferencedWarning

from specdm_cli.sources.base import (
    Candidate,
    PrepareOptions,
    SourcePlan,
    SourceSpec,
    patch_windows,
    require_dir,
)
from specdm_cli.sources.oscd.archive import open_trees
from specdm_cli.sources.oscd.layout import (
    GRID_BAND,
    OSCD_CLASSES,
    SPLIT_ORDER,
    assign_splits,
    list_cities,
    open_city,
    read_dates,
    select_bands,
)
from specdm_cli.sources.oscd.pixels import CityCache, Context, load_patch
from specdm_cli.sources.sentinel2 import S2_RGB_BANDS, s2_bands


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
    bands = select_bands(options.bands)
    images, labels = open_trees(require_dir(raw, "oscd"))
    listed = list_cities(images, labels)
    splits = assign_splits(listed, options)
    cities = {
        name: open_city(images, labels[origin], name, splits[name], bands)
        for origin, names in listed.items()
        for name in names
    }
    crs_set = {city.crs for city in cities.values()}
    crs = crs_set.pop() if len(crs_set) == 1 else None
    ctx = Context(images, cities, bands, options.patch_size, options.nodata, crs is not None)
    spec = _spec(ctx, crs, listed, splits)
    load = functools.partial(load_patch, ctx=ctx, cache=CityCache(ctx))
    return SourcePlan(spec=spec, candidates=_candidates(ctx, options), load=load)


def _spec(
    ctx: Context, crs: str | None, listed: dict[str, list[str]], splits: dict[str, str]
) -> SourceSpec:
    crs_by_city = {name: city.crs for name, city in ctx.cities.items()}
    details: dict[str, Any] = {
        "cities": {
            s: [c for n in listed.values() for c in n if splits[c] == s] for s in SPLIT_ORDER
        },
        "val_from": "train cities, by city",
        "dates": {name: read_dates(ctx.images, name) for name in ctx.cities},
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


def _candidates(ctx: Context, options: PrepareOptions) -> list[Candidate]:
    """Overlapping windows of every city, train cities first, then val, then test."""
    return [
        Candidate(f"{city.name}/y{y}_x{x}", split, (city.name, y, x))
        for split in SPLIT_ORDER
        for city in ctx.cities.values()
        if city.split == split
        for y, x in patch_windows(city.height, city.width, options.patch_size, options.overlap)
    ]
