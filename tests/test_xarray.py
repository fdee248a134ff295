"""Stores as xarray, rioxarray and GDAL users open them: no warnings, CF units, flags and CRS."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr

from specdm_cli.stores import open_store
from tests.conftest import manifest_of, prepare_demo, run_cli
from tests.fault_tools import run_killed
from tests.fixtures.geotiff_folder import make_geotiff_folder
from tests.test_faults_concurrency import DEMO


def _open_quietly(store: Path, **options: object) -> xr.Dataset:
    """xr.open_zarr with every warning an error (the package's own filters overridden)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return xr.open_zarr(store, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def georeferenced_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("geo")
    raw = make_geotiff_folder(root / "raw", n=3, size=(24, 20))
    out = root / "g.zarr"
    code, _, stderr = run_cli("prepare", "geotiff", raw, "--out", out, "--patch-size", "16",
                              "--val-fraction", "0", "--quiet")  # fmt: skip
    assert code == 0, stderr
    return out


def test_xarray_opens_a_store_without_warnings_with_wavelengths_units_and_flags(
    demo_ss_store: Path,
) -> None:
    dataset = _open_quietly(demo_ss_store)
    manifest = manifest_of(demo_ss_store)
    assert dataset.sizes["sample"] == manifest["count"]
    wavelength = dataset.coords["wavelength"]
    assert wavelength.dims == ("band",) and wavelength.attrs["units"] == "nm"
    # Demo scenes are reflectance x 10000: CF packing shows reflectance, raw values on request.
    image = dataset["image"]
    assert image.attrs["units"] == "1"
    raw = xr.open_zarr(demo_ss_store, mask_and_scale=False)["image"]
    assert raw.dtype == np.uint16 and raw.attrs["scale_factor"] == 1e-4
    np.testing.assert_allclose(image[0].values, raw[0].values * 1e-4)
    mask = dataset["mask"]
    classes = manifest["classes"]
    assert isinstance(classes, list)
    assert mask.attrs["flag_values"] == [*range(len(classes)), 255]
    assert mask.attrs["flag_meanings"].split() == [
        *(c["name"].replace(" ", "_") for c in classes),
        "ignore",
    ]


def test_rioxarray_finds_the_crs_and_each_samples_grid(georeferenced_store: Path) -> None:
    rioxarray = pytest.importorskip("rioxarray")
    assert rioxarray is not None
    dataset = _open_quietly(georeferenced_store)
    assert dataset.sizes["sample"] == manifest_of(georeferenced_store)["count"]  # truncated
    tile = dataset["image"].isel(sample=1)
    assert tile.rio.crs.to_epsg() == 32632
    tile = tile.assign_coords(x=tile.x_coordinate, y=tile.y_coordinate)
    np.testing.assert_allclose(tile.rio.bounds(), dataset["bounds"][1].values)
    assert dataset["mask"].attrs["grid_mapping"] == "spatial_ref"
    assert dataset["x_coordinate"].attrs["units"] == "m"


def test_stores_without_consolidated_metadata_still_open(tmp_path: Path) -> None:
    store = prepare_demo(tmp_path / "old.zarr", n=8)
    root = store / "zarr.json"
    metadata = json.loads(root.read_text())
    metadata.pop("consolidated_metadata", None)  # as written before this release
    root.write_text(json.dumps(metadata))
    assert open_store(store).read(0)["image"].shape == (10, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert xr.open_zarr(store, consolidated=False)["image"].sizes["sample"] == 8


def test_only_complete_stores_are_consolidated(demo_ss_store: Path, tmp_path: Path) -> None:
    # A consolidated record made before the store is complete could miss what changes later.
    assert json.loads((demo_ss_store / "zarr.json").read_text()).get("consolidated_metadata")
    killed = tmp_path / "killed.zarr"
    run_killed(*DEMO, "--out", killed, fault="prepare.after_block:1")
    assert manifest_of(killed)["complete"] is False
    assert json.loads((killed / "zarr.json").read_text()).get("consolidated_metadata") is None


def test_synthetic_geotiff_tiles_open_without_a_not_georeferenced_warning(tmp_path: Path) -> None:
    out = tmp_path / "tiles"
    code, _, stderr = run_cli("prepare", "demo", "--n", "4", "--size", "32", "--format",
                              "geotiff", "--out", out, "--quiet")  # fmt: skip
    assert code == 0, stderr
    for tile in (out / "images" / "000000.tif", out / "masks" / "000000.tif"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with rasterio.open(tile) as source:
                assert source.crs is None and source.transform.is_identity
