"""CF-convention attributes and coordinates of Zarr stores, so xarray and rioxarray read them
as a remote-sensing user expects: units and scale, band wavelengths, flag meanings, the CRS."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from rasterio.crs import CRS

from specdm_cli.manifest import Manifest

GRID_MAPPING = "spatial_ref"  # the name rioxarray looks for first
X_COORDINATE, Y_COORDINATE = "x_coordinate", "y_coordinate"
# Sources whose readers give Sentinel-2 reflectance x 10000 (README, prepare): CF packing
# (scale_factor) lets xarray show reflectance itself; mask_and_scale=False gives the stored values.
REFLECTANCE_SOURCES = {"segmunich", "oscd", "demo"}
REFLECTANCE_SCALE = 1e-4


def _reflectance(manifest: Manifest) -> bool:
    """Are the image values reflectance x 10000? Real data by source; synthetic data by the
    source its model was trained on (stores synthesized before it was recorded: the demo
    models only, trained on demo scenes)."""
    if manifest.source is not None:
        return manifest.source.dataset in REFLECTANCE_SOURCES
    if manifest.model is None:
        return False
    trained_on = manifest.model.details.get("source_dataset")
    return trained_on in REFLECTANCE_SOURCES or manifest.model.kind == "demo"


def image_attributes(manifest: Manifest, georeferenced: bool) -> dict[str, Any]:
    """Attributes of an image array: units/scale where known, its coordinates, its CRS."""
    coordinates = ["wavelength", *(_spatial_names() if georeferenced else [])]
    attributes: dict[str, Any] = {"coordinates": " ".join(coordinates)}
    if _reflectance(manifest):
        attributes.update(
            long_name="reflectance (stored x 10000)",
            units="1",
            scale_factor=REFLECTANCE_SCALE,
            add_offset=0.0,
        )
    else:
        attributes["long_name"] = "image values in the source data's units (see manifest.json)"
    if georeferenced:
        attributes["grid_mapping"] = GRID_MAPPING
    return attributes


def label_attributes(manifest: Manifest, georeferenced: bool) -> dict[str, Any]:
    """Attributes of a mask: CF flags naming every class index and the ignore value."""
    classes = sorted(manifest.classes, key=lambda c: c.index)
    attributes: dict[str, Any] = {
        "long_name": "change class index" if manifest.task == "cd" else "class index",
        "ignore_index": manifest.ignore_index,
        "flag_values": [c.index for c in classes] + [manifest.ignore_index],
        "flag_meanings": " ".join([*(_flag_word(c.name) for c in classes), "ignore"]),
    }
    if georeferenced:
        attributes.update(coordinates=" ".join(_spatial_names()), grid_mapping=GRID_MAPPING)
    return attributes


def _flag_word(name: str) -> str:
    """CF flag meanings are blank-separated words: `bare soil` -> `bare_soil`."""
    return re.sub(r"\W+", "_", name.strip()).strip("_") or "unnamed"


def _spatial_names() -> list[str]:
    return [X_COORDINATE, Y_COORDINATE, GRID_MAPPING]


def create_spatial_coordinates(group: zarr.Group, manifest: Manifest, capacity: int) -> None:
    """The CRS as a CF grid mapping and each sample's pixel-centre x/y (filled when written).

    Samples lie anywhere in the CRS, so x and y are per sample (sample, x) and (sample, y):
    `tile.assign_coords(x=tile.x_coordinate, y=tile.y_coordinate)` gives rioxarray one tile's grid.
    """
    crs = CRS.from_user_input(manifest.crs)
    wkt = crs.to_wkt()
    grid = group.create_array(GRID_MAPPING, shape=(), dtype="int32", fill_value=0)
    grid.attrs.update({"crs_wkt": wkt, "spatial_ref": wkt})
    axes = (("x", X_COORDINATE, manifest.width), ("y", Y_COORDINATE, manifest.height))
    for axis, name, size in axes:
        array = group.create_array(
            name, shape=(capacity, size), chunks=(manifest.batch_grid, size), dtype="float64",
            fill_value=np.nan, dimension_names=("sample", axis),
        )  # fmt: skip
        array.attrs.update(_axis_attributes(crs, axis))


def _axis_attributes(crs: CRS, axis: str) -> dict[str, Any]:
    if crs.is_geographic:
        name = "longitude" if axis == "x" else "latitude"
        return {"standard_name": name, "units": f"degrees_{'east' if axis == 'x' else 'north'}"}
    units = crs.linear_units or "unknown"
    return {
        "standard_name": f"projection_{axis}_coordinate",
        "long_name": f"{axis} of the pixel centres of each sample",
        "units": "m" if units in ("metre", "meter") else units,
    }


def pixel_centres(
    bounds: tuple[float, float, float, float], height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """x (west to east) and y (north to south) of the pixel centres of (left, bottom, right, top)."""
    left, bottom, right, top = bounds
    x = left + (np.arange(width) + 0.5) * (right - left) / width
    y = top - (np.arange(height) + 0.5) * (top - bottom) / height
    return x, y


def consolidate(root: Path) -> None:
    """Record every array's metadata in the root zarr.json, so xarray opens the store without
    listing its folder, where manifest.json, .specdm/ and locks would each warn."""
    with warnings.catch_warnings():
        # Consolidated metadata is zarr-python's extension to v3; other readers ignore it.
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        warnings.filterwarnings("ignore", message="Object at .* is not recognized")
        zarr.consolidate_metadata(root, zarr_format=3)
