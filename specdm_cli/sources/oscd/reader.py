"""OSCD reader: the three Onera folders (or their zips) in, bi-temporal uint16 patches out."""

from __future__ import annotations

import functools
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from rasterio.errors import NotGeoreferencedWarning

from specdm_cli.config import Progress
from specdm_cli.sources.base import (
    Candidate,
    PrepareOptions,
    SourcePlan,
    SourceSpec,
    patch_windows,
    require_dir,
)
from specdm_cli.sources.oscd.archive import Tree, labels_merged, open_trees
from specdm_cli.sources.oscd.cities import (
    assign_splits,
    choose_cities,
    list_cities,
    usable_cities,
    val_share_warning,
)
from specdm_cli.sources.oscd.layout import (
    GRID_BAND,
    OSCD_CLASSES,
    SPLIT_ORDER,
    City,
    leaving_out,
    open_city,
    read_dates,
    select_bands,
)
from specdm_cli.sources.oscd.pixels import CityCache, Context, load_patch
from specdm_cli.sources.sentinel2 import S2_RGB_BANDS, s2_bands


def read_oscd(
    raw: Path | None, options: PrepareOptions, progress: Progress | None = None
) -> SourcePlan:
    """Open OSCD: list the cities, split them, read one header per city and phase.

    Args:
        raw: the folder holding the extracted folders (Images, Train Labels, Test Labels) or
            the original zips, which are read in place. A partial download is fine: test
            cities without labels are skipped with a warning.
        options: bands (default the paper's ten), patch_size, overlap, nodata, cities,
            val_cities or val_fraction and seed (val is carved from the train cities, by city).

    Returns:
        The plan; its thread-safe `load` returns `image_t1`, `image_t2` (C, H, W) uint16
        reflectance x 10000 and `change` (H, W) uint8 (0, 1, 255 = nodata or padding).

    Raises:
        InputDataError: a missing folder, zip, city, band or label; a corrupt file or zip;
            sizes that disagree; an unknown band or city name (--bands, --cities, or
            --val-cities naming no train city).
        UsageError: --val-cities names every train city.
    """
    # Plain TIFFs (as OSCD's may be) warn on every open; a missing CRS only disables bounds.
    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
    bands = select_bands(options.bands)
    root = require_dir(raw, "oscd")
    images, labels = open_trees(root)
    listed = choose_cities(list_cities(images, labels), options.cities, images)
    listed, left_out = usable_cities(root, images, labels, listed, options.cities is not None)
    notes: list[str] = []
    splits = assign_splits(listed, options)
    cities: dict[str, City] = {}
    native: list[str] = []
    every = [name for names in listed.values() for name in names]
    for origin, names in listed.items():
        for name in names:
            with leaving_out(name, every):
                cities[name], fallbacks = open_city(
                    images, _tree(labels, origin), name, splits[name], bands, options.label_nodata
                )
            native += fallbacks
    crs_set = {city.crs for city in cities.values()}
    crs = crs_set.pop() if len(crs_set) == 1 else None
    ctx = Context(
        images, cities, bands, options.patch_size, options.nodata, crs is not None,
        options.label_nodata,
    )  # fmt: skip
    spec = _spec(ctx, crs, listed, splits, native)
    if labels_merged(images, labels):
        spec.details["label_layout"] = "<city>/cm/ inside the image folders (SpectralGPT)"
    candidates = _candidates(ctx, options)
    notes += _native_warning(native)
    share = val_share_warning(Counter(c.ref[0] for c in candidates), splits, options)
    notes += [share] if share else []
    load = functools.partial(load_patch, ctx=ctx, cache=CityCache(ctx))
    return SourcePlan(spec, candidates, load, warnings=notes, left_out=left_out)


def _tree(labels: dict[str, Tree | None], split: str) -> Tree:
    tree = labels[split]
    assert tree is not None  # usable_cities kept only cities whose labels exist
    return tree


def _native_warning(native: list[str]) -> list[str]:
    if not native:
        return []
    cities = sorted({rel.split("/", 1)[0] for rel in native})
    return [
        f"warning: {len(native)} band files missing from imgs_N_rect/ "
        f"({', '.join(cities)}); read the non-rectified imgs_N/<product>_Bxx.tif instead, "
        f"e.g. {native[0]}"
    ]


def _spec(
    ctx: Context,
    crs: str | None,
    listed: dict[str, list[str]],
    splits: dict[str, str],
    native: list[str],
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
    if native:
        details["non_rectified_band_files"] = native
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
