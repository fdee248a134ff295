"""`specdm filter` of a georeferenced store: the subset keeps each sample's bounds and the CRS."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import zarr

from specdm_cli.manifest import QualityScores
from specdm_cli.stores import open_store
from specdm_cli.stores.quality import write_quality
from tests.conftest import manifest_of, run_cli
from tests.fixtures.geotiff_folder import make_geotiff_folder


def _scored_geotiff_prepare(root: Path, store_format: str) -> Path:
    """A store prepared from georeferenced GeoTIFFs, scored so that every other sample passes."""
    raw = make_geotiff_folder(root / "raw", n=3, size=(24, 20))
    out = root / ("g.zarr" if store_format == "zarr" else "g")
    code, _, stderr = run_cli("prepare", "geotiff", raw, "--out", out, "--patch-size", "16",
                              "--val-fraction", "0", "--format", store_format, "--quiet")  # fmt: skip
    assert code == 0, stderr
    manifest = open_store(out).manifest
    info = QualityScores(definition="test", feature_hash="f" * 64, reference="r",
                         reference_manifest_sha256="0", count=manifest.count)  # fmt: skip
    write_quality(out, manifest, np.arange(manifest.count) % 2, info)
    return out


def test_filter_keeps_the_bounds_grid_mapping_and_pixel_centres(tmp_path: Path) -> None:
    """The subset had no `bounds`, `spatial_ref` or pixel centres, while its manifest named a CRS."""
    store = _scored_geotiff_prepare(tmp_path, "zarr")
    out = tmp_path / "sub.zarr"
    code, _, stderr = run_cli("filter", store, "--min-quality", "1", "--out", out, "--quiet")
    assert code == 0, stderr
    kept = manifest_of(out)["parent"]["parent_index"]  # type: ignore[index]
    assert len(kept) >= 1 and manifest_of(out)["crs"] == manifest_of(store)["crs"]
    parent, subset = zarr.open_group(store, mode="r"), zarr.open_group(out, mode="r")
    for name in ("bounds", "x_coordinate", "y_coordinate", "source_id"):
        np.testing.assert_array_equal(subset[name][:], parent[name][:][kept], err_msg=name)
    assert subset["spatial_ref"].attrs.asdict() == parent["spatial_ref"].attrs.asdict()
    assert run_cli("inspect", out, "--verify")[0] == 0


def test_filter_of_geotiff_tiles_keeps_each_tiles_georeferencing(tmp_path: Path) -> None:
    store = _scored_geotiff_prepare(tmp_path, "geotiff")
    out = tmp_path / "sub"
    code, _, stderr = run_cli("filter", store, "--min-quality", "1", "--out", out, "--quiet")
    assert code == 0, stderr
    kept = manifest_of(out)["parent"]["parent_index"]  # type: ignore[index]
    for position, index in enumerate(kept):
        with (
            rasterio.open(out / "images" / f"{position:06d}.tif") as tile,
            rasterio.open(store / "images" / f"{index:06d}.tif") as source,
        ):
            assert tile.crs == source.crs and tile.crs is not None
            assert tile.transform == source.transform


def test_a_bar_typed_as_a_stored_score_prints_keeps_that_sample(tmp_path: Path) -> None:
    """Scores are kept as float32: `--min-quality 0.29975167`, the score as numpy prints it,
    was a float64 just above it and dropped the very sample it was read from."""
    store = _scored_geotiff_prepare(tmp_path, "zarr")
    manifest = open_store(store).manifest
    scores = np.full(manifest.count, 0.1, np.float32)
    scores[1] = 0.2997516691684723  # np.float32 prints it 0.29975167
    write_quality(store, manifest, scores, manifest.quality_scores)  # type: ignore[arg-type]
    typed = str(np.float32(scores[1]))
    assert float(typed) > float(scores[1])  # the float64 bar is above the stored score
    out = tmp_path / "sub.zarr"
    code, _, stderr = run_cli("filter", store, "--min-quality", typed, "--out", out, "--quiet")
    assert code == 0, stderr
    assert manifest_of(out)["parent"]["parent_index"] == [1]  # type: ignore[index]
