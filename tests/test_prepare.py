"""`specdm prepare` and `specdm inspect` end to end on the demo source: stores, resume, errors."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
import xarray as xr
import zarr

from specdm_cli.errors import Interrupted
from specdm_cli.fs.lock import LOCK_NAME, DirLock
from specdm_cli.pipeline.prepare.prepare import prepare
from specdm_cli.pipeline.prepare.request import PrepareRequest
from specdm_cli.pipeline.signals import StopFlag
from specdm_cli.sources.base import PrepareOptions
from specdm_cli.stores import open_store, store_sha256
from tests.conftest import manifest_of, prepare_demo, run_cli
from tests.fault_tools import assert_one_error_line
from tests.fixtures.geotiff_folder import make_geotiff_folder


def _arrays(store: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(store, mode="r")
    return {name: np.asarray(array[:]) for name, array in group.arrays()}


def test_demo_store_layout_and_manifest(demo_ss_store: Path) -> None:
    manifest = manifest_of(demo_ss_store)
    assert manifest["complete"] is True
    assert manifest["count"] == 24
    assert sum(manifest["split_counts"].values()) == 24  # type: ignore[attr-defined]
    group = zarr.open_group(demo_ss_store, mode="r")
    image, mask = group["image"], group["mask"]
    assert image.shape == (24, 10, 32, 32) and image.dtype == np.uint16
    assert image.chunks == (1, 10, 32, 32)
    assert mask.shape == (24, 32, 32) and mask.dtype == np.uint8
    assert np.asarray(group["written"][:]).all()
    assert group.attrs["specdm"]["count"] == 24


def test_normalization_is_the_train_split_statistics(demo_ss_store: Path) -> None:
    reader = open_store(demo_ss_store)
    train = [reader.read(i) for i in reader.indices("train")]
    pixels = np.concatenate(
        [s["image"][:, s["mask"] != 255].astype(np.float64) for s in train], axis=1
    )
    stats = reader.manifest.normalization
    assert stats is not None and stats.split == "train"
    np.testing.assert_allclose(stats.mean, pixels.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(stats.std, pixels.std(axis=1), rtol=1e-6)
    assert stats.pixels == pixels.shape[1]


def test_class_fraction_per_sample_matches_the_mask(demo_ss_store: Path) -> None:
    reader = open_store(demo_ss_store)
    fractions = reader.class_fractions()
    sample = reader.read(3)["mask"]
    counts = np.bincount(sample[sample != 255].ravel(), minlength=fractions.shape[1])
    np.testing.assert_allclose(fractions[3], counts / counts.sum(), rtol=1e-6)


def test_xarray_opens_the_store_with_band_names(demo_ss_store: Path) -> None:
    dataset = xr.open_zarr(demo_ss_store, consolidated=False)
    assert dataset["image"].dims == ("sample", "band", "y", "x")
    assert list(dataset["band"].values)[:3] == ["B02", "B03", "B04"]
    assert dataset["mask"].sizes["sample"] == 24


def test_inspect_json_and_schema(demo_ss_store: Path) -> None:
    code, stdout, _ = run_cli("inspect", demo_ss_store, "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["count"] == 24 and report["written"] == 24
    assert abs(sum(c["pixel_fraction"] for c in report["classes"]) - 1.0) < 1e-6
    code, stdout, _ = run_cli("inspect", "--schema")
    assert code == 0 and "complete" in json.loads(stdout)["properties"]
    code, stdout, stderr = run_cli("inspect", demo_ss_store, "--schema")  # the store was ignored
    assert code == 2 and "reads no STORE" in stderr and stdout == ""
    code, stdout, _ = run_cli("inspect", demo_ss_store)
    assert code == 0 and "B8A" in stdout


def test_geotiff_format_round_trips_through_the_geotiff_reader(tmp_path: Path) -> None:
    tiles = prepare_demo(tmp_path / "tiles", "--format", "geotiff", n=6)
    manifest = manifest_of(tiles)
    assert manifest["format"] == "geotiff" and len(manifest["files"]) == 6  # type: ignore[arg-type]
    with rasterio.open(tiles / "images" / "000000.tif") as src:
        assert src.profile["compress"] == "deflate" and src.count == 10
        assert src.descriptions[0].startswith("B02 (492.7")
    with rasterio.open(tiles / "masks" / "000000.tif") as src:
        assert src.colormap(1)[1][:3] != (0, 0, 0) or src.colormap(1)[0][:3] != (0, 0, 0)
    code, _, stderr = run_cli("prepare", "geotiff", tiles, "--out", tmp_path / "back.zarr", "--quiet",
                              "--val-fraction", "0", "--patch-size", "32")  # fmt: skip
    assert code == 0, stderr
    original, back = open_store(tiles), open_store(tmp_path / "back.zarr")
    assert len(back) == 6
    back_by_id = dict(zip(back.source_ids() or [], range(len(back)), strict=True))
    for index in range(6):
        again = back.read(back_by_id[f"{index:06d}"])
        np.testing.assert_array_equal(again["image"], original.read(index)["image"])
        np.testing.assert_array_equal(again["mask"], original.read(index)["mask"])


def test_an_export_read_back_keeps_its_own_splits(tmp_path: Path) -> None:
    """The splits were drawn again by --val-fraction (96/32 became 115/13 for a user)."""
    tiles = prepare_demo(tmp_path / "tiles", "--format", "geotiff", n=20)
    exported = {f"{r['index']:06d}": r["split"] for r in manifest_of(tiles)["files"]}  # type: ignore[union-attr]
    assert len(set(exported.values())) == 3
    # --val-fraction is not what splits it: said so, with no warning that the val split is far
    # above it.
    code, _, stderr = run_cli("prepare", "geotiff", tiles, "--out", tmp_path / "back.zarr",
                              "--patch-size", "32", "--val-fraction", "0.01")  # fmt: skip
    warnings = [line for line in stderr.splitlines() if line.startswith("warning")]
    assert code == 0 and warnings == [
        "warning: the splits come from manifest.json (a specdm export's own splits): "
        "--val-fraction not read"
    ], stderr
    back = open_store(tmp_path / "back.zarr")
    splits = {s: back.indices(s) for s in ("train", "val", "test")}
    ids = back.source_ids() or []
    assert {ids[i]: s for s, found in splits.items() for i in found} == exported
    assert manifest_of(tmp_path / "back.zarr")["source"]["details"]["splits_from"].startswith(  # type: ignore[index]
        "manifest.json"
    )


def test_a_masks_colour_table_gives_its_classes_colours_and_the_export_keeps_them(
    tmp_path: Path,
) -> None:
    """Land-cover masks ship a palette: it was replaced by invented colours, in the manifest
    and in a GeoTIFF export's masks."""
    raw = make_geotiff_folder(tmp_path / "raw", n=2, size=(16, 16))
    palette = {10: (255, 0, 0), 40: (0, 128, 0), 100: (0, 0, 255)}
    for mask in (raw / "masks").iterdir():
        with rasterio.open(mask, "r+") as dst:
            dst.write_colormap(1, {code: (*rgb, 255) for code, rgb in palette.items()})
    tiles = tmp_path / "tiles"
    code, _, stderr = run_cli("prepare", "geotiff", raw, "--out", tiles, "--format", "geotiff",
                              "--patch-size", "16", "--quiet")  # fmt: skip
    assert code == 0, stderr
    classes = manifest_of(tiles)["classes"]
    assert {c["code"]: tuple(c["colour"]) for c in classes} == palette  # type: ignore[union-attr,index]
    with rasterio.open(next((tiles / "masks").iterdir())) as exported:
        table = exported.colormap(1)
    assert [table[c["index"]][:3] for c in classes] == list(palette.values())  # type: ignore[union-attr,index]


# A raster attribute table as ArcGIS writes one beside a classified GeoTIFF: a value column,
# a count, and the names in a string column it does not mark GFU_Name.
_ARCGIS_RAT = """<PAMDataset><PAMRasterBand band="1">
<GDALRasterAttributeTable tableType="thematic">
<FieldDefn index="0"><Name>Value</Name><Type>0</Type><Usage>0</Usage></FieldDefn>
<FieldDefn index="1"><Name>Count</Name><Type>1</Type><Usage>1</Usage></FieldDefn>
<FieldDefn index="2"><Name>Class_Name</Name><Type>2</Type><Usage>0</Usage></FieldDefn>
<Row index="0"><F>10</F><F>120</F><F>Water</F></Row>
<Row index="1"><F>40</F><F>80</F><F>Cropland</F></Row>
<Row index="2"><F>100</F><F>30</F><F>Built-up</F></Row>
</GDALRasterAttributeTable></PAMRasterBand></PAMDataset>"""
# GDAL's category names: the code is the position, blanks are codes without a name.
_GDAL_CATEGORIES = (
    '<PAMDataset><PAMRasterBand band="1"><CategoryNames>'
    + "<Category></Category>" * 10 + "<Category>Water</Category>"
    + "<Category></Category>" * 29 + "<Category>Cropland</Category>"
    + "<Category></Category>" * 59 + "<Category>Built-up</Category>"
    + "</CategoryNames></PAMRasterBand></PAMDataset>"
)  # fmt: skip


@pytest.mark.parametrize("sidecar", ["arcgis-rat", "gdal-categories", "envi-header"])
def test_the_class_names_a_mask_file_carries_name_the_classes(tmp_path: Path, sidecar: str) -> None:
    """Classified products (NLCD, CORINE, ENVI classifications) name their codes in a sidecar:
    the classes were `class_10`, `class_40`, `class_100` in the manifest and every report."""
    raw = make_geotiff_folder(tmp_path / "raw", n=2, size=(16, 16))
    for mask in sorted((raw / "masks").glob("*.tif")):
        if sidecar == "envi-header":
            envi = mask.with_suffix(".img")
            rasterio.shutil.copy(mask, envi, driver="ENVI")
            mask.unlink()
            with envi.with_suffix(".hdr").open("a") as header:
                header.write("file type = ENVI Classification\nclasses = 101\nclass names = {")
                header.write(", ".join({10: "Water", 40: "Cropland", 100: "Built-up"}.get(i, "")
                                       for i in range(101)) + "}\n")  # fmt: skip
        else:
            xml = _ARCGIS_RAT if sidecar == "arcgis-rat" else _GDAL_CATEGORIES
            Path(f"{mask}.aux.xml").write_text(xml)
    out = tmp_path / "s.zarr"
    code, _, stderr = run_cli("prepare", "geotiff", raw, "--out", out, "--patch-size", "16",
                              "--quiet")  # fmt: skip
    assert code == 0, stderr
    classes = manifest_of(out)["classes"]
    assert {c["code"]: c["name"] for c in classes} == {  # type: ignore[union-attr,index]
        10: "Water", 40: "Cropland", 100: "Built-up"
    }  # fmt: skip


def test_cd_store_has_both_phases_and_change(demo_cd_store: Path) -> None:
    arrays = _arrays(demo_cd_store)
    assert arrays["image_t1"].shape == arrays["image_t2"].shape == (24, 10, 32, 32)
    assert set(np.unique(arrays["change"])) <= {0, 1, 255}


def _request(out: Path, **changes: object) -> PrepareRequest:
    options = PrepareOptions(task="ss", n=40, size=32, seed=3)
    fields = {"source": "demo", "raw": None, "out": out, "format": "zarr", "options": options,
              "batch_grid": 8, "workers": 2, **changes}  # fmt: skip
    return PrepareRequest(**fields)  # type: ignore[arg-type]


def test_interrupted_prepare_resumes_to_identical_store(tmp_path: Path) -> None:
    prepare(_request(tmp_path / "whole.zarr"), StopFlag())
    stop = StopFlag()

    def stop_after_two_blocks(stage: str, done: int, total: int) -> None:
        if done >= 16:
            stop.signum = 15

    with pytest.raises(Interrupted):
        prepare(_request(tmp_path / "cut.zarr"), stop, stop_after_two_blocks)
    assert manifest_of(tmp_path / "cut.zarr")["complete"] is False
    code, _, _ = run_cli("inspect", tmp_path / "cut.zarr")
    assert code == 3
    code, stdout, _ = run_cli("inspect", tmp_path / "cut.zarr", "--allow-incomplete")
    # It printed the capacity as the sample count ("INCOMPLETE: 40 samples" with 16 written).
    written = open_store(tmp_path / "cut.zarr", allow_incomplete=True).written().sum()
    assert code == 0 and f"INCOMPLETE: {written} of 40 samples written" in stdout
    assert 0 < written < 40 and "splits: not counted until the store is complete" in stdout
    summary = prepare(_request(tmp_path / "cut.zarr", resume=True), StopFlag())
    assert summary.state == "resumed"
    whole, cut = _arrays(tmp_path / "whole.zarr"), _arrays(tmp_path / "cut.zarr")
    assert whole.keys() == cut.keys()
    for name in whole:
        np.testing.assert_array_equal(whole[name], cut[name], err_msg=name)
    first, second = manifest_of(tmp_path / "whole.zarr"), manifest_of(tmp_path / "cut.zarr")
    assert first["normalization"] == second["normalization"]
    assert first["class_pixel_fraction"] == second["class_pixel_fraction"]
    assert not (tmp_path / "cut.zarr" / ".specdm" / "prepare-progress.json").exists()


def test_existing_output_resume_and_overwrite_rules(tmp_path: Path) -> None:
    store = prepare_demo(tmp_path / "s.zarr", n=8)
    code, _, stderr = run_cli("prepare", "demo", "--out", store, "--n", "8", "--size", "32")
    assert code == 3 and "already exists" in stderr and "Traceback" not in stderr
    code, stdout, _ = run_cli("prepare", "demo", "--out", store, "--n", "8", "--size", "32",
                              "--task", "ss", "--resume", "--json", "--quiet")  # fmt: skip
    assert code == 0 and json.loads(stdout)["state"] == "already complete"
    code, _, stderr = run_cli(
        "prepare", "demo", "--out", store, "--n", "9", "--size", "32", "--resume"
    )
    assert code == 3 and "other inputs or options" in stderr
    assert prepare_demo(store, "--overwrite", n=5) == store
    assert manifest_of(store)["count"] == 5
    # A mistyped RAW is the error to fix first, not the output that exists.
    code, _, stderr = run_cli("prepare", "geotiff", tmp_path / "no-such", "--out", store)
    assert code == 3 and "folder does not exist" in stderr and "no-such" in stderr


@pytest.mark.parametrize(
    ("source", "archive", "fix"),
    [
        ("geotiff", "tiles.zip", "unzip tiles.zip -d DIR"),
        ("segmunich", "TUM_128.tar.gz", "tar -xf TUM_128.tar.gz -C DIR"),
        ("oscd", "Onera Satellite Change Detection dataset - Images.zip", "read in place"),
    ],
)
def test_an_archive_passed_as_raw_says_how_to_read_it(
    tmp_path: Path, source: str, archive: str, fix: str
) -> None:
    """A download passed before extracting it was "not a folder: pass the folder that holds
    the raw data", which says nothing of the archive."""
    path = tmp_path / archive
    path.write_bytes(b"PK\x03\x04")
    code, _, stderr = run_cli("prepare", source, path, "--out", tmp_path / "s.zarr")
    assert_one_error_line(code, stderr, 3, "an archive, not a folder")
    assert fix in stderr and not (tmp_path / "s.zarr").exists()


def test_overwrite_refuses_a_folder_that_is_not_ours(tmp_path: Path) -> None:
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    code, _, stderr = run_cli("prepare", "demo", "--out", foreign, "--overwrite", "--n", "4")
    assert code == 3 and "not a specdm store" in stderr
    assert (foreign / "thesis.tex").read_text() == "years of work"


def _incomplete_store(tmp_path: Path) -> Path:
    stop = StopFlag()
    stop.signum = 2
    with pytest.raises(Interrupted):
        prepare(_request(tmp_path / "held.zarr"), stop)
    return tmp_path / "held.zarr"


def test_a_live_lock_is_refused_and_a_stale_lock_taken_over(tmp_path: Path) -> None:
    store = _incomplete_store(tmp_path)
    lock = store / LOCK_NAME
    # The OS lock decides who holds it; the pid in the file is for messages only.
    with DirLock(store), pytest.raises(Exception) as caught:
        prepare(_request(store, resume=True), StopFlag())
    assert getattr(caught.value, "exit_code", None) == 6
    lock.write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname(), "started": 0}))
    assert prepare(_request(store, resume=True), StopFlag()).state == "resumed"
    assert not lock.exists()


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["prepare", "mnist"], 2, "mnist"),
        (["prepare", "segmunich"], 2, "needs a RAW folder"),
        (["prepare", "demo", "some/folder"], 2, "takes no RAW"),
        (["prepare", "demo", "--n", "0"], 2, "--n"),
        (["prepare", "demo", "--format", "hdf5"], 2, "hdf5"),
        (["prepare", "demo", "--max-blank", "1.5"], 2, "--max-blank"),
        (["prepare", "segmunich", "raw", "--nodata", "lots"], 2, "--nodata 'lots' is not a number"),
        (["prepare", "demo", "--cities", "paris"], 2, "prepare demo does not read --cities"),
        (["prepare", "segmunich", "raw", "--classes", "c.csv"], 2, "--classes is for geotiff"),
        (["prepare", "oscd", "raw", "--demo-variant", "hard"], 2, "does not read --demo-variant"),
        # Options with defaults count where given: SegMunich has its own patches and splits.
        (
            ["prepare", "segmunich", "raw", "--patch-size", "16", "--seed", "3"],
            2,
            "prepare segmunich does not read --patch-size, --seed (--patch-size is for oscd",
        ),
        (["prepare", "segmunich", "raw", "--val-fraction", "0.5"], 2, "not read --val-fraction"),
        (["prepare", "oscd", "raw", "--n", "8"], 2, "prepare oscd does not read --n"),
        (["prepare", "demo", "--overlap", "0.5"], 2, "prepare demo does not read --overlap"),
        (["prepare", "segmunich", "/does/not/exist"], 3, "does not exist"),
        (["inspect", "/does/not/exist.zarr"], 3, "does not exist"),
    ],
)
def test_bad_input_is_one_line_with_its_exit_code(
    tmp_path: Path, args: list[str], code: int, words: str
) -> None:
    os.chdir(tmp_path)
    exit_code, _, stderr = run_cli(*args)
    assert exit_code == code
    assert words in stderr
    assert "Traceback" not in stderr
    assert len([line for line in stderr.splitlines() if line.strip()]) <= 3


def test_store_that_is_not_a_store_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "fake.zarr").mkdir()
    (tmp_path / "fake.zarr" / "manifest.json").write_text("{not json")
    code, _, stderr = run_cli("inspect", tmp_path / "fake.zarr")
    assert code == 3 and "unreadable manifest" in stderr


def _content(store: Path) -> str:
    code, stdout, stderr = run_cli("inspect", store, "--json")
    assert code == 0, stderr
    digest: str = json.loads(stdout)["content_sha256"]
    return digest


def test_inspect_content_digest_names_the_data_not_the_manifest(tmp_path: Path) -> None:
    first = prepare_demo(tmp_path / "first.zarr", n=8)
    again = prepare_demo(tmp_path / "again.zarr", n=8)
    tiles = prepare_demo(tmp_path / "tiles", "--format", "geotiff", n=8)
    other_seed = prepare_demo(tmp_path / "seed.zarr", "--seed", "5", n=8)
    other_splits = prepare_demo(tmp_path / "splits.zarr", "--val-fraction", "0.5", n=8)
    manifest = json.loads((again / "manifest.json").read_text())
    manifest["provenance"]["created"] = "another time"  # as a store made later would record
    (again / "manifest.json").write_text(json.dumps(manifest))
    assert store_sha256(first) != store_sha256(again)
    assert _content(first) == _content(again) == _content(tiles)
    assert _content(other_seed) != _content(first)
    assert _content(other_splits) != _content(first)
    code, stdout, _ = run_cli("inspect", first)
    assert code == 0 and f"content sha256: {_content(first)}" in stdout
