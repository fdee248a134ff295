"""`specdm prepare` on raw trees in the real layouts, end to end through the CLI; read back with
zarr, xarray and rasterio; every bad input is one line, the right exit code, nothing complete."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
import tifffile
import xarray as xr
import zarr

from tests.conftest import manifest_of, run_cli
from tests.fixtures.geotiff_folder import make_geotiff_folder
from tests.fixtures.oscd import make_oscd
from tests.fixtures.segmunich import make_segmunich, write_sample


def _prepare(*args: str | Path) -> tuple[int, str, str]:
    return run_cli("prepare", *args, "--quiet")


def test_segmunich_official_layout_end_to_end(tmp_path: Path) -> None:
    raw = make_segmunich(tmp_path / "raw", splits={"train": 4, "val": 2}, size=16)
    code, _, stderr = _prepare("segmunich", raw, "--out", tmp_path / "s.zarr")
    assert code == 0, stderr
    manifest = manifest_of(tmp_path / "s.zarr")
    assert manifest["split_counts"] == {"train": 4, "val": 2}
    assert [b["name"] for b in manifest["bands"]][3] == "B08"  # type: ignore[index]
    assert manifest["classes"][1]["code"] == 21  # type: ignore[index]
    image, label = (
        tifffile.imread(raw / "TUM_128" / "train" / "img" / "1.tif"),
        tifffile.imread(raw / "TUM_128" / "train" / "label" / "1.tif"),
    )
    group = zarr.open_group(tmp_path / "s.zarr", mode="r")
    np.testing.assert_array_equal(group["image"][0], image.transpose(2, 0, 1))
    assert group["image"].dtype == np.float32
    codes = [c["code"] for c in manifest["classes"]]  # type: ignore[union-attr]
    np.testing.assert_array_equal(np.asarray(codes)[group["mask"][0]], label)
    assert list(np.asarray(group["source_id"][:2])) == ["train/1", "train/2"]


@pytest.mark.parametrize(
    ("layout", "name", "splits"),
    [("gfm", "gfm-bench", {"train": 3, "test": 2}), ("mmseg", "mmseg", {"train": 3, "val": 2})],
)
def test_segmunich_gfm_and_mmseg_layouts(
    tmp_path: Path, layout: str, name: str, splits: dict[str, int]
) -> None:
    raw = make_segmunich(tmp_path / "raw", layout=layout, wrap="SegMunich")
    code, stdout, stderr = run_cli(
        "prepare", "segmunich", raw, "--out", tmp_path / "g.zarr", "--json", "--quiet"
    )
    assert code == 0, stderr
    assert json.loads(stdout)["split_counts"] == splits
    manifest = json.loads((tmp_path / "g.zarr" / "manifest.json").read_text())
    assert manifest["source"]["details"]["layout"] == name
    assert len(manifest["classes"]) == 13


def test_blank_and_background_filters_are_counted(tmp_path: Path) -> None:
    raw = make_segmunich(tmp_path / "raw", splits={"train": 4}, size=16, wrap=None)
    image = np.zeros((16, 16, 10), np.float32)
    write_sample(raw, "train", "2", image, np.full((16, 16), 21, np.uint8))
    write_sample(raw, "train", "3", image + 500, np.zeros((16, 16), np.uint8))
    code, stdout, _ = run_cli("prepare", "segmunich", raw, "--out", tmp_path / "f.zarr", "--json",
                              "--quiet", "--max-background", "0.9")  # fmt: skip
    assert code == 0
    summary = json.loads(stdout)
    assert summary["removed"] == {"blank": 1, "background": 1}
    assert summary["count"] == 2 and summary["candidates"] == 4
    assert manifest_of(tmp_path / "f.zarr")["source"]["removed"] == {"blank": 1, "background": 1}  # type: ignore[index]
    assert zarr.open_group(tmp_path / "f.zarr", mode="r")["image"].shape[0] == 2


def test_oscd_zips_end_to_end_with_val_by_city(tmp_path: Path) -> None:
    raw = make_oscd(tmp_path / "raw", zipped=True)
    code, _, stderr = _prepare("oscd", raw, "--out", tmp_path / "o.zarr", "--patch-size", "16",
                               "--overlap", "0.5", "--val-fraction", "0.5")  # fmt: skip
    assert code == 0, stderr
    manifest = manifest_of(tmp_path / "o.zarr")
    cities = manifest["source"]["details"]["cities"]  # type: ignore[index]
    assert set(cities) >= {"train", "val", "test"} and cities["val"]
    # Stored values (reflectance x 10000), not the reflectance CF packing decodes to.
    dataset = xr.open_zarr(tmp_path / "o.zarr", mask_and_scale=False)
    assert dataset["image_t1"].dims == ("sample", "band", "y", "x")
    assert dataset["image_t1"].dtype == np.uint16 and dataset.sizes["band"] == 10
    ids = [str(s) for s in dataset["source_id"].values]
    splits = np.asarray(dataset["split"].values)
    for city in cities["val"]:
        assert all(splits[i] == 1 for i, s in enumerate(ids) if s.startswith(f"{city}/"))


def test_geotiff_folder_to_geotiff_store_keeps_georeferencing(tmp_path: Path) -> None:
    raw = make_geotiff_folder(tmp_path / "raw", n=3, size=(24, 20))
    code, _, stderr = _prepare("geotiff", raw, "--out", tmp_path / "t", "--format", "geotiff",
                               "--patch-size", "16", "--val-fraction", "0")  # fmt: skip
    assert code == 0, stderr
    manifest = manifest_of(tmp_path / "t")
    assert manifest["crs"] == "EPSG:32632"
    first = manifest["files"][0]  # type: ignore[index]
    with rasterio.open(tmp_path / "t" / first["files"]["image"]) as src:
        assert src.crs.to_epsg() == 32632
        assert tuple(src.bounds) == pytest.approx(first["bounds"])
    assert [c["code"] for c in manifest["classes"]] == [10, 40, 100]  # type: ignore[union-attr]


def _wrong_band_count(raw: Path) -> None:
    write_sample(raw, "train", "1", np.ones((16, 16, 9), np.float32), np.zeros((16, 16), np.uint8))


def _size_mismatch(raw: Path) -> None:
    write_sample(raw, "train", "2", np.ones((16, 16, 10), np.float32), np.zeros((8, 16), np.uint8))


def _unknown_code(raw: Path) -> None:
    write_sample(
        raw, "train", "2", np.ones((16, 16, 10), np.float32), np.full((16, 16), 99, np.uint8)
    )


def _undeclared_nan(raw: Path) -> None:
    image = np.ones((16, 16, 10), np.float32)
    image[3, 3, 2] = np.nan
    write_sample(raw, "train", "3", image, np.zeros((16, 16), np.uint8))


def _truncated_tiff(raw: Path) -> None:
    path = raw / "train" / "img" / "2.tif"
    path.write_bytes(path.read_bytes()[:300])


def _missing_split_file(raw: Path) -> None:
    for listing in (raw / "dataset").glob("*.txt"):
        listing.unlink()


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (_wrong_band_count, "expected 10 bands"),
        (_size_mismatch, "16"),
        (_unknown_code, "99"),
        (_undeclared_nan, "NaN"),
        (_truncated_tiff, "corrupt or truncated"),
        (_missing_split_file, "dataset"),
    ],
)
def test_bad_segmunich_input_is_one_line_exit_3_and_nothing_complete(
    tmp_path: Path, damage: Callable[[Path], None], words: str
) -> None:
    raw = make_segmunich(tmp_path / "raw", splits={"train": 3}, size=16, wrap=None)
    damage(raw)
    out = tmp_path / "bad.zarr"
    code, _, stderr = _prepare("segmunich", raw, "--out", out)
    assert code == 3, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0]
    assert "Traceback" not in stderr
    assert not out.exists() or manifest_of(out)["complete"] is False


def test_unreadable_oscd_zip_is_one_line(tmp_path: Path) -> None:
    raw = make_oscd(tmp_path / "raw", zipped=True)
    broken = next(raw.glob("*Images.zip"))
    broken.write_bytes(b"PK\x03\x04 this is not a zip")
    code, _, stderr = _prepare("oscd", raw, "--out", tmp_path / "o.zarr")
    assert code == 3 and broken.name in stderr and "Traceback" not in stderr
    assert zipfile.is_zipfile(next(raw.glob("*Train Labels.zip")))


def test_empty_folder_is_refused_leaving_no_folder_made_for_the_output(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "stores" / "new" / "x.zarr"
    code, _, stderr = _prepare("geotiff", tmp_path / "empty", "--out", out)
    assert code == 3 and "empty" in stderr
    assert not (tmp_path / "stores").exists()
    (tmp_path / "stores").mkdir()
    (tmp_path / "stores" / "mine.txt").write_text("not specdm's")
    code, _, stderr = _prepare("geotiff", tmp_path / "empty", "--out", out)
    assert code == 3
    assert sorted(p.name for p in (tmp_path / "stores").iterdir()) == ["mine.txt"]


@pytest.mark.parametrize(("option", "noted"), [("--nodata", False), ("--label-nodata", True)])
def test_the_sparse_label_note_counts_missing_labels_not_missing_images(
    tmp_path: Path, option: str, noted: bool
) -> None:
    # Half of every tile is 0: as image nodata its labels become 255 too, but no label is
    # missing where an image is; as label nodata (with code 0) half the labels are missing.
    raw = make_geotiff_folder(tmp_path / "raw", n=3, codes=[0, 1, 2])
    for path in sorted((raw / "images").iterdir()):
        with rasterio.open(path, "r+") as dst:
            image = dst.read()
            image[:, :, :10] = 0
            dst.write(image)
    for path in sorted((raw / "masks").iterdir()):
        with rasterio.open(path, "r+") as dst:
            mask = dst.read(1)
            mask[:, :10] = 0
            mask[:, 10:] = np.where(mask[:, 10:] == 0, 1, mask[:, 10:])
            dst.write(mask, 1)
    code, _stdout, stderr = run_cli(
        "prepare", "geotiff", raw, "--out", tmp_path / "s.zarr", option, "0", "--max-blank", "1"
    )
    assert code == 0, stderr
    assert ("--unlabelled-class" in stderr) is noted, stderr
