"""`specdm prepare` on real data as it comes (issue 15): sparse labels, label nodata, failed
runs that leave nothing in the way, split files saved on Windows; through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr
from rasterio.crs import CRS
from rasterio.transform import from_origin

from specdm_cli.manifest import Band, rgb_bands
from specdm_cli.pipeline.benchmark.benchmark import rgb_notice
from specdm_cli.pipeline.synthesize.preview import rgb_note
from specdm_cli.sources.geotiff.bands import read_bands
from specdm_cli.sources.geotiff.layout import raster_stem
from specdm_cli.sources.sentinel2 import S2_WAVELENGTH_NM
from specdm_cli.stores import open_store
from tests.conftest import manifest_of, run_cli
from tests.fixtures.geotiff_folder import make_geotiff_folder
from tests.fixtures.real_layouts import (
    S2_L1C_NAMES,
    SEN1FLOODS11_CHIPS,
    images_to_envi,
    make_gdal_formats,
    make_sen1floods11,
    make_sparse_change,
    rasters_to_netcdf,
    write_raster,
)
from tests.fixtures.segmunich import make_segmunich, segmunich_sample, write_sample


def _prepare(*args: str | Path) -> tuple[int, str, str]:
    return run_cli("prepare", *args, "--quiet")


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# --- 1. unlabelled is not blank --------------------------------------------------------------


def test_sparse_reference_keeps_every_patch_at_the_default_max_blank(tmp_path: Path) -> None:
    raw = make_sparse_change(tmp_path / "raw", labelled=0.13)
    code, stdout, stderr = _prepare("geotiff", raw, "--out", tmp_path / "s.zarr", "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["count"] == 4 and summary["removed"] == {}
    assert summary["nodata_pixels"] == 0


def test_max_unlabelled_is_its_own_counted_filter(tmp_path: Path) -> None:
    raw = make_sparse_change(tmp_path / "raw", labelled=0.13)
    out = tmp_path / "s.zarr"
    code, _, stderr = _prepare("geotiff", raw, "--out", out, "--max-unlabelled", "0.5")
    assert code == 3
    line = _one_line(stderr)
    assert "every patch was removed by the filters (4 by --max-unlabelled 0.5)" in line
    assert line.endswith("relax --max-unlabelled and rerun")
    code, _, stderr = run_cli("prepare", "geotiff", raw, "--out", out, "--max-unlabelled", "0.9")
    assert code == 0, stderr
    assert stderr.splitlines()[-1].endswith(
        ": 4 samples (train 3, val 1), 0 of 4 patches removed by the filters"
    )  # words, not Python dicts


def test_normalisation_uses_every_valid_image_pixel(tmp_path: Path) -> None:
    raw = make_sparse_change(tmp_path / "raw", labelled=0.13)
    out = tmp_path / "s.zarr"
    code, _, stderr = _prepare("geotiff", raw, "--out", out, "--val-fraction", "0")
    assert code == 0, stderr
    pixels = []
    for folder in ("t1", "t2"):
        for path in sorted((raw / folder).glob("*.tif")):
            with rasterio.open(path) as src:
                pixels.append(src.read().reshape(src.count, -1).astype(np.float64))
    every = np.concatenate(pixels, axis=1)
    normalization = manifest_of(out)["normalization"]
    assert isinstance(normalization, dict)
    assert normalization["pixels"] == every.shape[1]
    np.testing.assert_allclose(normalization["mean"], every.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(normalization["std"], every.std(axis=1), rtol=1e-6)


# --- 2. label nodata --------------------------------------------------------------------------


def test_negative_label_without_label_nodata_names_the_file_and_the_option(
    tmp_path: Path,
) -> None:
    raw = make_sen1floods11(tmp_path / "raw")
    code, _, stderr = _prepare("geotiff", raw, "--out", tmp_path / "f.zarr")
    assert code == 3
    line = _one_line(stderr)
    assert "masks/Bolivia_103757.tif" in line and "--label-nodata -1" in line
    assert "declare it as the mask's nodata" not in line
    assert not (tmp_path / "f.zarr").exists()


def test_label_nodata_becomes_ignore_and_is_counted(tmp_path: Path) -> None:
    raw = make_sen1floods11(tmp_path / "raw", nodata_share=0.25)
    out = tmp_path / "f.zarr"
    code, stdout, stderr = _prepare(
        "geotiff", raw, "--out", out, "--label-nodata", "-1", "--val-fraction", "0", "--json"
    )
    assert code == 0, stderr
    manifest = manifest_of(out)
    assert [c["code"] for c in manifest["classes"]] == [0, 1]  # type: ignore[union-attr]
    masks = zarr.open_group(out, mode="r")["mask"][:]
    expected = 0
    for index, stem in enumerate(SEN1FLOODS11_CHIPS):
        with rasterio.open(raw / "masks" / f"{stem}.tif") as src:
            raw_label = src.read(1)
        np.testing.assert_array_equal(masks[index] == 255, raw_label == -1)
        expected += int((raw_label == -1).sum())
    assert json.loads(stdout)["nodata_pixels"] == expected
    assert manifest["source"]["nodata_pixels"] == expected  # type: ignore[index]


def test_label_nodata_must_be_a_number(tmp_path: Path) -> None:
    raw = make_sen1floods11(tmp_path / "raw")
    code, _, stderr = _prepare("geotiff", raw, "--out", tmp_path / "f.zarr", "--label-nodata", "x")
    assert code == 2
    assert "--label-nodata 'x' is not a number" in _one_line(stderr)


# --- 6. a failed prepare leaves nothing in the way --------------------------------------------


def test_rerun_after_every_patch_was_removed_needs_no_overwrite(tmp_path: Path) -> None:
    raw = make_sparse_change(tmp_path / "raw")
    out = tmp_path / "s.zarr"
    assert _prepare("geotiff", raw, "--out", out, "--max-unlabelled", "0.2")[0] == 3
    assert not out.exists()
    code, _, stderr = _prepare("geotiff", raw, "--out", out)
    assert code == 0, stderr
    assert manifest_of(out)["complete"] is True


def test_resume_with_a_changed_option_names_it(tmp_path: Path) -> None:
    raw = make_sparse_change(tmp_path / "raw")
    out = tmp_path / "s.zarr"
    assert _prepare("geotiff", raw, "--out", out)[0] == 0
    code, _, stderr = _prepare("geotiff", raw, "--out", out, "--resume", "--max-blank", "0.2")
    assert code == 3
    line = _one_line(stderr)
    assert "--max-blank: store 0.5, now 0.2" in line
    code, _, stderr = _prepare("geotiff", raw, "--out", out, "--resume", "--label-nodata", "7")
    assert "--label-nodata: store unset, now 7.0" in _one_line(stderr)


def test_resume_of_a_store_made_before_the_new_options_still_matches(tmp_path: Path) -> None:
    raw = make_sparse_change(tmp_path / "raw")
    out = tmp_path / "s.zarr"
    assert _prepare("geotiff", raw, "--out", out)[0] == 0
    plan = manifest_of(out)["plan"]
    assert isinstance(plan, dict)
    assert "max_unlabelled" not in plan and "label_nodata" not in plan["options"]
    code, _, stderr = _prepare("geotiff", raw, "--out", out, "--resume")
    assert code == 0, stderr


# --- 7. SegMunich split files -----------------------------------------------------------------


def test_segmunich_split_lines_with_extension_crlf_and_blank_lines(tmp_path: Path) -> None:
    raw = make_segmunich(tmp_path / "raw", splits={"train": 3, "val": 1}, size=16)
    dataset = raw / "TUM_128" / "dataset"
    (dataset / "train.txt").write_bytes(b"\xef\xbb\xbf1.tif\r\n\r\n2\r\n  3.TIF \r\n\r\n")
    (dataset / "val.txt").write_bytes(b"4\r\n")
    code, stdout, stderr = _prepare("segmunich", raw, "--out", tmp_path / "s.zarr", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["split_counts"] == {"train": 3, "val": 1}
    ids = zarr.open_group(tmp_path / "s.zarr", mode="r")["source_id"][:]
    assert list(np.asarray(ids)) == ["train/1", "train/2", "train/3", "val/4"]


def test_segmunich_label_nodata(tmp_path: Path) -> None:
    raw = make_segmunich(tmp_path / "raw", splits={"train": 2}, size=16, wrap=None)
    image, label = segmunich_sample(16, 0, 1)
    label[:4] = 250  # a re-exported label's fill value: not a SegMunich code
    write_sample(raw, "train", "1", image, label)
    out = tmp_path / "s.zarr"
    assert _prepare("segmunich", raw, "--out", out)[0] == 3
    code, stdout, stderr = _prepare(
        "segmunich", raw, "--out", out, "--label-nodata", "250", "--json"
    )
    assert code == 0, stderr
    assert json.loads(stdout)["nodata_pixels"] == 4 * 16
    assert (zarr.open_group(out, mode="r")["mask"][0][:4] == 255).all()


# --- 4. any raster GDAL reads; 5. Sentinel-2 band names ---------------------------------------


def test_envi_jpeg2000_and_vrt_images_keep_pixels_crs_and_band_names(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    images = make_gdal_formats(raw)
    out = tmp_path / "g.zarr"
    code, _, stderr = _prepare("geotiff", raw, "--out", out, "--val-fraction", "0")
    assert code == 0, stderr
    manifest = manifest_of(out)
    assert manifest["crs"] == "EPSG:32632"
    bands = manifest["bands"]
    assert isinstance(bands, list)
    assert [b["name"] for b in bands] == ["B02", "B03", "B04", "B08"]
    assert [b["wavelength_nm"] for b in bands] == [492.7, 559.8, 664.6, 832.8]
    assert manifest["rgb_bands"] == ["B04", "B03", "B02"]
    group = zarr.open_group(out, mode="r")
    ids = list(np.asarray(group["source_id"][:]))
    assert sorted(ids) == sorted(images)
    for index, stem in enumerate(ids):
        np.testing.assert_array_equal(group["image"][index], images[stem])
    left = [b[0] for b in np.asarray(group["bounds"][:])]
    assert sorted(left) == [600_000.0, 601_000.0, 602_000.0, 603_000.0]


def test_each_gdal_format_alone_names_its_bands(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    make_gdal_formats(raw)
    expected = ["B02", "B03", "B04", "B08"]
    rasters = [p for p in sorted((raw / "images").iterdir()) if raster_stem(p) is not None]
    assert [raster_stem(p) for p in rasters] == ["envi_bare", "envi_img", "jpeg2000", "virtual"]
    for path in rasters:
        stem = raster_stem(path)
        bands = read_bands(path)
        assert [b.name for b in bands] == expected, stem
        assert bands[0].wavelength_nm == 492.7 and bands[0].fwhm_nm == 66


@pytest.mark.parametrize("suffix", [".raw", ".cube"])
def test_envi_data_of_any_extension_beside_its_header_is_read(tmp_path: Path, suffix: str) -> None:
    """`tile.raw` + `tile.hdr` (SPECIM, GDAL's ENVI driver) was "no raster files in folder"."""
    raw = make_geotiff_folder(tmp_path / "raw", n=2)
    expected = {p.stem: _pixels(p) for p in sorted((raw / "images").glob("*.tif"))}
    images_to_envi(raw, suffix)
    sidecars = sorted(p.name for p in (raw / "images").iterdir() if raster_stem(p) is None)
    assert sidecars == sorted(
        f"tile_0{i}{end}" for i in (0, 1) for end in (".hdr", f"{suffix}.aux.xml")
    )
    _assert_prepared_images(raw, tmp_path / "g.zarr", expected)


def _assert_prepared_images(raw: Path, out: Path, expected: dict[str, np.ndarray]) -> None:
    """`prepare geotiff RAW` stores each tile's pixels as they are (one patch per tile)."""
    code, _, stderr = _prepare("geotiff", raw, "--out", out, "--val-fraction", "0")
    assert code == 0, stderr
    group = zarr.open_group(out, mode="r")
    for index, stem in enumerate(np.asarray(group["source_id"][:])):
        np.testing.assert_array_equal(group["image"][index], expected[str(stem)])


def _pixels(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return np.asarray(src.read())


def test_netcdf_masks_are_read_like_geotiff(tmp_path: Path) -> None:
    """`.nc` (GDAL's netCDF driver) was passed over: "no raster files in folder"."""
    raw = make_geotiff_folder(tmp_path / "raw", n=2)
    code, _, stderr = _prepare("geotiff", raw, "--out", tmp_path / "tif.zarr", "--seed", "3")
    assert code == 0, stderr
    assert len(rasters_to_netcdf(raw / "masks")) == 2
    code, _, stderr = _prepare("geotiff", raw, "--out", tmp_path / "nc.zarr", "--seed", "3")
    assert code == 0, stderr
    from_tif, from_netcdf = (
        zarr.open_group(tmp_path / n, mode="r") for n in ("tif.zarr", "nc.zarr")
    )
    for name in ("source_id", "image", "mask"):
        np.testing.assert_array_equal(from_netcdf[name][:], from_tif[name][:])
    assert (
        manifest_of(tmp_path / "nc.zarr")["classes"]
        == manifest_of(tmp_path / "tif.zarr")["classes"]
    )


def test_netcdf_of_subdatasets_is_refused_naming_them_and_the_rio_stack_fix_works(
    tmp_path: Path,
) -> None:
    raw = make_geotiff_folder(tmp_path / "raw", n=2, bands=3)
    expected = {p.stem: _pixels(p) for p in sorted((raw / "images").glob("*.tif"))}
    first = rasters_to_netcdf(raw / "images")[0]
    code, _, stderr = _prepare("geotiff", raw, "--out", tmp_path / "g.zarr")
    assert code == 3
    line = _one_line(stderr)
    assert "subdatasets (Band1, Band2, Band3)" in line and first.name in line
    assert f"rio stack --driver GTiff 'netcdf:{first}:Band1' ... {first.stem}.tif" in line
    assert not (tmp_path / "g.zarr").exists()
    # The fix the line gives, with every subdataset; the netCDF files kept elsewhere.
    rio = Path(sys.executable).parent / "rio"
    for netcdf in sorted((raw / "images").glob("*.nc")):
        bands = [f"netcdf:{netcdf}:Band{i}" for i in (1, 2, 3)]
        stacked = netcdf.with_suffix(".tif")
        subprocess.run([rio, "stack", "--driver", "GTiff", *bands, stacked], check=True)
        netcdf.rename(tmp_path / netcdf.name)
    _assert_prepared_images(raw, tmp_path / "v.zarr", expected)


def _with_bad_bands(raw: Path, bad: slice) -> dict[str, np.ndarray]:
    """Fill bands `bad` of every image with the nodata tag -9999, as hyperspectral products
    ship their water-vapour bands; returns each tile's pixels."""
    pixels = {}
    for tif in sorted((raw / "images").glob("*.tif")):
        with rasterio.open(tif, "r+") as src:
            data = src.read()
            data[bad] = -9999
            src.nodata = -9999
            src.write(data)
        pixels[tif.stem] = data
    return pixels


def test_one_bad_band_is_named_in_the_singular(tmp_path: Path) -> None:
    raw = make_geotiff_folder(tmp_path / "raw", n=1, bands=6, dtype="float32", size=(8, 8))
    _with_bad_bands(raw, slice(3, 4))
    code, _, stderr = _prepare("geotiff", raw, "--out", tmp_path / "g.zarr")
    assert code == 3
    line = _one_line(stderr)
    assert "band 4 holds only nodata in every pixel" in line and "--bands 1-3,5-6" in line


def test_bad_bands_filled_with_nodata_are_named_and_left_out_with_bands(tmp_path: Path) -> None:
    """A cube whose bands 6-7 are nodata in every pixel was "every patch was removed by the
    filters: relax --max-blank", which cannot help (each pixel counts as nodata)."""
    raw = make_geotiff_folder(tmp_path / "raw", n=2, bands=12, dtype="float32", size=(8, 8))
    pixels = _with_bad_bands(raw, slice(5, 7))
    code, _, stderr = _prepare("geotiff", raw, "--out", tmp_path / "g.zarr")
    assert code == 3
    line = _one_line(stderr)
    assert "bands 6-7 hold only nodata in every pixel" in line and "tile_00.tif" in line
    assert line.endswith("leave them out: --bands 1-5,8-12")
    keep = [*range(5), *range(7, 12)]
    out = tmp_path / "k.zarr"
    args = ("--out", out, "--val-fraction", "0", "--bands", "1-5,8-12")
    code, _, stderr = _prepare("geotiff", raw, *args)
    assert code == 0, stderr
    group = zarr.open_group(out, mode="r")
    for index, stem in enumerate(np.asarray(group["source_id"][:])):
        np.testing.assert_array_equal(group["image"][index], pixels[str(stem)][keep])
    manifest = manifest_of(out)
    assert [b["name"] for b in manifest["bands"]] == [f"B{i + 1:02d}" for i in keep]
    assert manifest["source"]["details"]["bands_read"] == [i + 1 for i in keep]  # type: ignore[index]


@pytest.mark.parametrize(
    ("strip", "thin_band", "bad"),
    [((50, 78), None, "band 3 holds"), (None, 4, None)],
    ids=["data-off-the-first-windows", "a-band-with-data-in-its-top-rows"],
)
def test_bands_are_judged_on_the_whole_file_not_the_first_windows(
    tmp_path: Path, strip: tuple[int, int] | None, thin_band: int | None, bad: str | None
) -> None:
    """The probe's 16 windows, read alone, let a fill band pass where the data lay between
    them (a flight line's strip), and called a band with data in its top rows all nodata."""
    raw = make_geotiff_folder(tmp_path / "raw", n=1, bands=5, dtype="float32", size=(256, 256))
    tif = raw / "images" / "tile_00.tif"
    with rasterio.open(tif, "r+") as src:
        data = src.read()
        if strip is not None:
            data[:, :, : strip[0]] = data[:, :, strip[1] :] = -9999
            data[2] = -9999
        if thin_band is not None:
            data[thin_band, 12:] = -9999
        src.nodata = -9999
        src.write(data)
    code, _, stderr = _prepare("geotiff", raw, "--out", tmp_path / "g.zarr", "--val-fraction",
                               "0", "--max-blank", "1", "--patch-size", "32")  # fmt: skip
    if bad is None:
        assert code == 0, stderr
    else:
        assert code == 3 and f"{bad} only nodata in every pixel" in _one_line(stderr)


@pytest.mark.parametrize(
    ("bands", "code", "words"),
    [
        ("B02,b04", 0, ""),
        ("13", 3, "--bands 13 is past the 12 bands of the images"),
        ("2,1-3", 2, "--bands names band 2 twice"),
        ("NIR", 3, "--bands NIR: no band of that name (the images' bands: B01, B02,"),
        ("3-1", 2, "--bands 3-1: not a range of band numbers"),
    ],
)
def test_bands_by_number_or_name_and_their_errors(
    tmp_path: Path, bands: str, code: int, words: str
) -> None:
    raw = make_geotiff_folder(tmp_path / "raw", n=1, bands=12, size=(8, 8))
    out = tmp_path / "g.zarr"
    got, _, stderr = _prepare("geotiff", raw, "--out", out, "--val-fraction", "0", "--bands", bands)
    assert got == code, stderr
    if code:
        assert words in _one_line(stderr)
    else:
        assert [b["name"] for b in manifest_of(out)["bands"]] == ["B02", "B04"]
        with rasterio.open(raw / "images" / "tile_00.tif") as src:
            expected = src.read([2, 4])
        np.testing.assert_array_equal(zarr.open_group(out, mode="r")["image"][0], expected)


def test_polygon_labels_in_place_of_masks_say_to_rasterize_them(tmp_path: Path) -> None:
    raw = make_geotiff_folder(tmp_path / "raw", n=2)
    for mask in sorted((raw / "masks").glob("*.tif")):
        mask.unlink()
        mask.with_suffix(".geojson").write_text('{"type": "FeatureCollection", "features": []}')
    code, _, stderr = _prepare("geotiff", raw, "--out", tmp_path / "g.zarr")
    assert code == 3
    line = _one_line(stderr)
    assert "vector labels (tile_00.geojson, tile_01.geojson)" in line and "gdal_rasterize" in line


def _into_subfolders(raw: Path, names: tuple[str, str]) -> dict[str, str]:
    """Tiles 0-2 into images/<first>/ and masks/<first>/, the rest into <second>/; returns
    each tile's new stem (`train/tile_00`)."""
    moved = {}
    for folder in ("images", "masks"):
        for index, tile in enumerate(sorted((raw / folder).glob("*.tif"))):
            sub = names[0] if index < 3 else names[1]
            (raw / folder / sub).mkdir(exist_ok=True)
            tile.rename(raw / folder / sub / tile.name)
            moved[f"{sub}/{tile.stem}"] = sub
    return moved


def _split_of_each_tile(store_path: Path) -> dict[str, str]:
    """Each source tile's split (source ids are `<stem>/y0_x0`: a patch of the tile)."""
    store = open_store(store_path)
    splits: dict[str, set[str]] = {}
    for source_id, split in zip(store.source_ids() or [], store.splits(), strict=True):
        splits.setdefault(source_id.rsplit("/", 1)[0], set()).add(str(split))
    assert all(len(found) == 1 for found in splits.values()), "a tile in two splits"
    return {tile: found.pop() for tile, found in splits.items()}


def test_tiles_in_split_folders_take_their_folder_s_split(tmp_path: Path) -> None:
    """`images/train/` + `masks/train/` (as many downloads ship) was "no raster files"."""
    raw = make_geotiff_folder(tmp_path / "raw", n=5)
    # Numbering that starts again in each split: the folder tells the tiles apart.
    (raw / "images" / "tile_04.tif").rename(raw / "images" / "x.tif")
    (raw / "masks" / "tile_04.tif").rename(raw / "masks" / "x.tif")
    moved = _into_subfolders(raw, ("Training", "val"))
    for folder in ("images", "masks"):
        (raw / folder / "val" / "x.tif").rename(raw / folder / "val" / "tile_00.tif")
    out = tmp_path / "g.zarr"
    code, _, stderr = _prepare("geotiff", raw, "--out", out, "--patch-size", "16")
    assert code == 0, stderr
    assert _split_of_each_tile(out) == {
        "Training/tile_00": "train", "Training/tile_01": "train",
        "Training/tile_02": "train", "val/tile_03": "val", "val/tile_00": "val",
    }  # fmt: skip
    assert len(moved) == 5
    assert manifest_of(out)["source"]["details"]["splits_from"] == "split folders"  # type: ignore[index]
    args = ("--out", tmp_path / "h.zarr", "--patch-size", "16", "--val-fraction", "0.5")
    code, _, stderr = run_cli("prepare", "geotiff", raw, *args)
    assert code == 0, stderr
    assert "the splits come from split folders: --val-fraction not read" in stderr


def test_split_folders_spelled_differently_in_images_and_masks_pair(tmp_path: Path) -> None:
    """`images/Train/` beside `masks/train/` (and `val/` beside `validation/`) was "tile_00.tif
    has no partner in masks/": one split, whatever its folders' case or word."""
    raw = make_geotiff_folder(tmp_path / "raw", n=4)
    _into_subfolders(raw, ("Train", "val"))
    (raw / "masks" / "Train").rename(raw / "masks" / "train")
    (raw / "masks" / "val").rename(raw / "masks" / "validation")
    out = tmp_path / "g.zarr"
    code, _, stderr = _prepare("geotiff", raw, "--out", out, "--patch-size", "16")
    assert code == 0, stderr
    assert _split_of_each_tile(out) == {
        "Train/tile_00": "train", "Train/tile_01": "train",
        "Train/tile_02": "train", "val/tile_03": "val",
    }  # fmt: skip
    (raw / "images" / "training").mkdir()  # a second folder of one split holding a tile again
    (raw / "images" / "training" / "tile_00.tif").hardlink_to(
        raw / "images" / "Train" / "tile_00.tif"
    )
    code, _, stderr = _prepare("geotiff", raw, "--out", tmp_path / "h.zarr")
    assert code == 3
    line = _one_line(stderr)
    assert "two folders of the train split (Train/ and training/) hold tile_00" in line


def test_top_folders_in_another_case_are_read_and_a_labels_folder_is_named(
    tmp_path: Path,
) -> None:
    """`Images/` + `Masks/` (Windows and Kaggle trees) were "no images/+masks/ folders", and a
    `labels/` in place of `masks/` went unnamed in "folder missing" (review15 M2)."""
    raw = make_geotiff_folder(tmp_path / "raw", n=2)
    (raw / "images").rename(raw / "Images")
    (raw / "masks").rename(raw / "Masks")
    out = tmp_path / "g.zarr"
    code, _, stderr = _prepare("geotiff", raw, "--out", out, "--val-fraction", "0")
    assert code == 0, stderr
    assert sorted(open_store(out).source_ids() or []) == ["tile_00", "tile_01"]
    (raw / "Masks").rename(raw / "labels")
    code, _, stderr = _prepare("geotiff", raw, "--out", tmp_path / "h.zarr")
    assert code == 3
    assert _one_line(stderr).endswith("raw/ has labels/: rename it masks/ (or link it: ln -s "
                                      "labels masks)")  # fmt: skip


def test_a_split_folder_without_its_masks_is_named_as_a_folder(tmp_path: Path) -> None:
    """`images/test/` without `masks/test/` (a test split shipped unlabelled) was told as one of
    its tiles without a partner; the README promises the folder named (review15 M3)."""
    raw = make_geotiff_folder(tmp_path / "raw", n=4)
    _into_subfolders(raw, ("train", "test"))
    for tile in (raw / "masks" / "test").iterdir():
        tile.unlink()
    code, _, stderr = _prepare("geotiff", raw, "--out", tmp_path / "g.zarr")
    assert code == 3
    line = _one_line(stderr)
    assert "images/test/ has files and masks/test/ holds no files" in line
    assert f"({raw / 'masks' / 'test'})" in line and "move images/test/ out of images/" in line
    (raw / "masks" / "test").rmdir()
    code, _, stderr = _prepare("geotiff", raw, "--out", tmp_path / "g.zarr")
    assert code == 3
    assert "images/test/ has files and masks/test/ is missing" in _one_line(stderr)
    for tile in (raw / "masks" / "train").iterdir():  # masks without split folders
        tile.rename(raw / "masks" / tile.name)
    (raw / "masks" / "train").rmdir()
    code, _, stderr = _prepare("geotiff", raw, "--out", tmp_path / "g.zarr")
    assert code == 3
    assert "masks/ holds its files without split folders" in _one_line(stderr)


@pytest.mark.parametrize(("image", "mask"), [("t0", "t0_mask"), ("123_sat", "123_mask")])
def test_a_mask_named_with_a_suffix_is_named_with_the_rename(
    tmp_path: Path, image: str, mask: str
) -> None:
    """`masks/t0_mask.tif` (DeepGlobe: `123_sat`/`123_mask`) was "t0.tif has no partner ...:
    add the missing file or remove its partners", which told the user to delete data (M1)."""
    raw = make_geotiff_folder(tmp_path / "raw", n=1)
    (raw / "images" / "tile_00.tif").rename(raw / "images" / f"{image}.tif")
    (raw / "masks" / "tile_00.tif").rename(raw / "masks" / f"{mask}.tif")
    code, _, stderr = _prepare("geotiff", raw, "--out", tmp_path / "g.zarr")
    assert code == 3
    line = _one_line(stderr)
    held, wanted = raw / "masks" / f"{mask}.tif", raw / "masks" / f"{image}.tif"
    assert f"{image}.tif has no partner in masks/, which holds {mask}.tif" in line
    assert line.endswith(f"(e.g. mv '{held}' '{wanted}')") and "remove" not in line


def test_the_rename_of_a_suffixed_mask_stays_in_its_split_folder(tmp_path: Path) -> None:
    """With `images/Train/` beside `masks/train/`, the `mv` named `masks/Train/`, a folder that
    is not there (review16 M5)."""
    raw = make_geotiff_folder(tmp_path / "raw", n=2)
    _into_subfolders(raw, ("Train", "Train"))
    (raw / "masks" / "Train").rename(raw / "masks" / "train")
    held = raw / "masks" / "train" / "tile_00_mask.tif"
    (raw / "masks" / "train" / "tile_00.tif").rename(held)
    code, _, stderr = _prepare("geotiff", raw, "--out", tmp_path / "g.zarr")
    assert code == 3
    assert _one_line(stderr).endswith(f"(e.g. mv '{held}' '{held.with_name('tile_00.tif')}')")
    held.unlink()  # no near name: the missing file is named in the folder that holds its split
    code, _, stderr = _prepare("geotiff", raw, "--out", tmp_path / "g.zarr")
    assert code == 3
    assert f"({raw / 'masks' / 'train' / 'tile_00.tif'})" in _one_line(stderr)


def test_two_layout_folders_differing_only_by_case_are_named(tmp_path: Path) -> None:
    """`Masks/` and `MASKS/`: told "folder missing: add masks/" (review16 L3)."""
    raw = make_geotiff_folder(tmp_path / "raw", n=1)
    (raw / "masks").rename(raw / "Masks")
    (raw / "MASKS").mkdir()
    code, _, stderr = _prepare("geotiff", raw, "--out", tmp_path / "g.zarr")
    assert code == 3
    assert "MASKS/ and Masks/ differ only by case" in _one_line(stderr)


def test_the_demo_s_untrained_class_warning_gives_the_demo_s_fix(tmp_path: Path) -> None:
    """Four demo scenes leave a class out of train on most seeds; the fix named a --splits file,
    which `prepare demo` does not read."""
    warned = []
    for seed in range(4):
        code, _, stderr = run_cli("prepare", "demo", "--n", "4", "--size", "32", "--seed", str(seed),
                                  "--out", tmp_path / f"d{seed}.zarr")  # fmt: skip
        assert code == 0, stderr
        warned += [line for line in stderr.splitlines() if "no train pixels" in line]
    assert warned and all(line.endswith("more scenes (--n) or another --seed") for line in warned)


def test_a_class_only_in_held_out_tiles_is_warned_of(tmp_path: Path) -> None:
    """A class present in val but not in train: prepare said nothing, and its IoU of 0 pulled
    the segmenter's val mIoU down with no model able to learn it."""
    raw = make_geotiff_folder(tmp_path / "raw", n=4)
    with rasterio.open(raw / "masks" / "tile_03.tif", "r+") as src:
        mask = src.read(1)
        mask[:4] = 77  # a rare class, drawn only in the val tile
        src.write(mask, 1)
    splits = tmp_path / "splits.csv"
    splits.write_text("stem,split\ntile_00,train\ntile_01,train\ntile_02,test\ntile_03,val\n")
    args = ("--out", tmp_path / "g.zarr", "--splits", splits)
    code, _, stderr = run_cli("prepare", "geotiff", raw, *args)
    assert code == 0, stderr
    assert "warning: 1 class(es) have no train pixels, only held-out ones: class_77 (val)" in stderr
    assert "move tiles that hold them to train (--splits FILE.csv)" in stderr
    splits.write_text("stem,split\ntile_00,train\ntile_01,val\ntile_02,test\ntile_03,train\n")
    code, _, stderr = run_cli("prepare", "geotiff", raw, "--overwrite", *args)
    assert code == 0 and "no train pixels" not in stderr, stderr


def test_a_classes_json_beside_missing_masks_is_no_vector_label(tmp_path: Path) -> None:
    raw = make_geotiff_folder(tmp_path / "raw", n=2)
    for mask in sorted((raw / "masks").glob("*.tif")):
        mask.unlink()
    (raw / "masks" / "classes.json").write_text('{"0": "water", "1": "forest"}')
    code, _, stderr = _prepare("geotiff", raw, "--out", tmp_path / "g.zarr")
    assert code == 3
    line = _one_line(stderr)
    assert "no raster files in folder" in line and "vector" not in line
    (raw / "masks" / "labels.json").write_text('{"images": [], "annotations": []}')  # COCO
    code, _, stderr = _prepare("geotiff", raw, "--out", tmp_path / "g.zarr")
    assert code == 3 and "vector labels (labels.json)" in _one_line(stderr)


def test_split_folders_at_the_top_take_their_split_and_one_without_masks_is_named(
    tmp_path: Path,
) -> None:
    """`train/images/` + `train/masks/`, `val/...` (Kaggle-style downloads) was "no images/ +
    masks/ folders; the tiles are one folder down: pass raw/train", which left val out."""
    raw = tmp_path / "raw"
    for split, seed in (("train", 0), ("Val", 1)):
        make_geotiff_folder(raw / split, n=2, seed=seed)
    out = tmp_path / "g.zarr"
    code, _, stderr = _prepare("geotiff", raw, "--out", out, "--patch-size", "16")
    assert code == 0, stderr
    assert _split_of_each_tile(out) == {
        "train/tile_00": "train",
        "train/tile_01": "train",
        "Val/tile_00": "val",
        "Val/tile_01": "val",
    }
    (raw / "test" / "images").mkdir(parents=True)  # a test split shipped without its masks
    code, _, stderr = _prepare("geotiff", raw, "--out", tmp_path / "h.zarr")
    assert code == 3
    line = _one_line(stderr)
    assert "a split folder lacks the folders" in line and "move test/ out of raw/" in line


def test_a_splits_file_names_tiles_of_split_folders_by_their_folder(tmp_path: Path) -> None:
    raw = make_geotiff_folder(tmp_path / "raw", n=4)
    _into_subfolders(raw, ("train", "val"))
    splits = tmp_path / "splits.csv"
    rows = ["images/train/tile_00.tif,test", "train\\tile_01,val", "train/tile_02,train",
            "val/tile_03.tif,train"]  # fmt: skip
    splits.write_text("stem,split\n" + "\n".join(rows) + "\n")
    out = tmp_path / "g.zarr"
    code, _, stderr = _prepare(
        "geotiff", raw, "--out", out, "--splits", splits, "--patch-size", "16"
    )
    assert code == 0, stderr
    assert _split_of_each_tile(out) == {
        "train/tile_00": "test",
        "train/tile_01": "val",
        "train/tile_02": "train",
        "val/tile_03": "train",
    }


def test_tiles_in_other_subfolders_are_named_with_the_fix(tmp_path: Path) -> None:
    raw = make_geotiff_folder(tmp_path / "raw", n=4)
    _into_subfolders(raw, ("region_a", "region_b"))
    # ENVI data named by its header alone (`.raw` beside `.hdr`) counts as tiles there too.
    envi = raw / "images" / "region_c"
    envi.mkdir()
    (envi / "cube.raw").write_bytes(bytes(16))
    (envi / "cube.hdr").write_text("ENVI\n")
    code, _, stderr = _prepare("geotiff", raw, "--out", tmp_path / "g.zarr")
    assert code == 3
    line = _one_line(stderr)
    assert "in its subfolders (region_a/, region_b/, region_c/)" in line
    assert "--splits FILE.csv" in line


def test_envi_header_wavelengths_and_path_band_names(tmp_path: Path) -> None:
    cube = tmp_path / "cube.img"
    geo = {"crs": CRS.from_epsg(32632), "transform": from_origin(0, 0, 1, 1)}
    names = tuple(f"/scratch/run 3/cube_band_{i:03d}.tif" for i in range(1, 7))
    write_raster(cube, np.ones((6, 4, 5), np.float32), geo, names, driver="ENVI")
    cube.with_name("cube.img.aux.xml").unlink(missing_ok=True)
    header = cube.with_suffix(".hdr")
    header.write_text(
        header.read_text()
        + "wavelength units = Micrometers\nwavelength = {0.40, 0.45, 0.50, 0.55, 0.60, 0.65}\n"
        + "fwhm = {0.01, 0.01, 0.01, 0.01, 0.01, 0.01}\n"
    )
    bands = read_bands(cube)
    assert [b.name for b in bands] == [f"cube_band_{i:03d}" for i in range(1, 7)]
    np.testing.assert_allclose([b.wavelength_nm for b in bands], [400, 450, 500, 550, 600, 650])
    assert bands[0].fwhm_nm == 10


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (S2_L1C_NAMES, ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09",
                        "B10", "B11", "B12"]),
        (("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8a", "B9", "B11", "B12"),
         ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]),
        (tuple(f"S2B_MSIL2A_20200101_T32UQD_{b}" for b in ("B02", "B03", "B04", "B08A")),
         ["B02", "B03", "B04", "B8A"]),
    ],
)  # fmt: skip
def test_sentinel2_band_spellings(
    tmp_path: Path, names: tuple[str, ...], expected: list[str]
) -> None:
    path = tmp_path / "chip.tif"
    write_raster(path, np.ones((len(names), 4, 4), np.uint16), {}, names)
    bands = read_bands(path)
    assert [b.name for b in bands] == expected
    assert all(b.wavelength_nm == S2_WAVELENGTH_NM[b.name] for b in bands)
    if "B04" in expected:
        assert rgb_bands(bands) == ["B04", "B03", "B02"]


def test_a_cube_named_b1_to_b20_is_not_sentinel2(tmp_path: Path) -> None:
    path = tmp_path / "cube.tif"
    names = tuple(f"B{i}" for i in range(1, 21))
    write_raster(path, np.ones((20, 4, 4), np.uint16), {}, names)
    bands = read_bands(path)
    assert [b.name for b in bands] == list(names)
    assert all(b.wavelength_nm is None for b in bands) and rgb_bands(bands) is None


def test_sen1floods11_chip_gets_s2_wavelengths_through_the_cli(tmp_path: Path) -> None:
    raw = make_sen1floods11(tmp_path / "raw")
    out = tmp_path / "f.zarr"
    assert _prepare("geotiff", raw, "--out", out, "--label-nodata", "-1")[0] == 0
    manifest = manifest_of(out)
    assert manifest["rgb_bands"] == ["B04", "B03", "B02"]
    assert manifest["bands"][8] == {"name": "B8A", "wavelength_nm": 864.7, "fwhm_nm": 21.0}  # type: ignore[index]


def test_unknown_rgb_bands_are_said_in_one_line(tmp_path: Path) -> None:
    raw = make_sen1floods11(tmp_path / "raw", descriptions=None)
    out = tmp_path / "f.zarr"
    assert _prepare("geotiff", raw, "--out", out, "--label-nodata", "-1")[0] == 0
    assert manifest_of(out)["rgb_bands"] is None
    note = rgb_notice(out)  # what benchmark says on stderr; synthesize --preview says the same
    assert note is not None and note == rgb_note(open_store(out).manifest)
    assert "no red, green and blue bands" in note and "band_1, band_2, band_3" in note
    assert "\n" not in note


def test_bands_named_red_green_blue_are_the_preview_bands(tmp_path: Path) -> None:
    """An RGB+NIR product's descriptions (no wavelengths) name the preview bands, any case."""
    names = ("Blue", "GREEN", "red", "NIR", *(f"extra_{i}" for i in range(9)))
    raw = make_sen1floods11(tmp_path / "raw", descriptions=names)
    out = tmp_path / "f.zarr"
    assert _prepare("geotiff", raw, "--out", out, "--label-nodata", "-1")[0] == 0
    assert manifest_of(out)["rgb_bands"] == ["red", "GREEN", "Blue"]
    assert rgb_notice(out) is None


def test_a_plain_rgb_geotiff_names_its_bands_by_colour(tmp_path: Path) -> None:
    """An RGB GeoTIFF or orthophoto (PHOTOMETRIC=RGB, no band descriptions) was `band_1..3`,
    with no preview bands: GDAL's colour interpretation names them."""
    raw = make_geotiff_folder(tmp_path / "raw", n=2, bands=3, dtype="uint8")
    for tif in sorted((raw / "images").glob("*.tif")):
        with rasterio.open(tif) as src:
            profile, pixels = src.profile, src.read()
        profile.update(photometric="RGB")
        with rasterio.open(tif, "w", **profile) as dst:
            dst.write(pixels)  # no descriptions: the colour interpretation is all it says
    out = tmp_path / "g.zarr"
    assert _prepare("geotiff", raw, "--out", out, "--patch-size", "16")[0] == 0
    manifest = manifest_of(out)
    assert [b["name"] for b in manifest["bands"]] == ["red", "green", "blue"]
    assert manifest["rgb_bands"] == ["red", "green", "blue"]


def test_wavelengths_outrank_band_names_for_the_preview() -> None:
    named = [Band(name=n) for n in ("blue", "green", "red")]
    measured = [Band(name=n, wavelength_nm=w) for n, w in (("b1", 490), ("b2", 560), ("b3", 665))]
    assert rgb_bands(named) == ["red", "green", "blue"]
    assert rgb_bands(named[:2]) is None
    assert rgb_bands(named + measured) == ["b3", "b2", "b1"]


def test_segmunich_tiff_whose_garbled_shape_divides_by_zero_is_one_line(tmp_path: Path) -> None:
    raw = make_segmunich(tmp_path / "raw", splits={"train": 2}, size=16, wrap=None)
    image = raw / "train" / "img" / "2.tif"
    data = bytearray(image.read_bytes())
    data = data[: len(data) * 17 // 1000]
    data[10] = 1  # tifffile's series detection then divides by zero (found by hypothesis)
    image.write_bytes(bytes(data))
    code, _, stderr = _prepare("segmunich", raw, "--out", tmp_path / "s.zarr")
    assert code == 3
    assert "corrupt or truncated TIFF" in _one_line(stderr) and "2.tif" in stderr
    assert not (tmp_path / "s.zarr").exists()
