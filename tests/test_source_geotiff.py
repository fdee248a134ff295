"""The GeoTIFF-folder reader: layouts, bands, classes, splits, patches, georeferencing, errors."""

from __future__ import annotations

import csv
import errno
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.crs import CRS
from rasterio.enums import ColorInterp
from rasterio.transform import from_origin

from specdm_cli.errors import InputDataError, UsageError
from specdm_cli.manifest import Band, ClassInfo, Manifest
from specdm_cli.sources.base import PrepareOptions, SourcePlan
from specdm_cli.sources.geotiff import read_geotiff
from specdm_cli.sources.geotiff import reader as geotiff_reader
from specdm_cli.stores import open_store
from tests.conftest import manifest_of, run_cli
from tests.fault_tools import assert_one_error_line
from tests.fixtures.geotiff_folder import (
    CRS_EPSG,
    ORIGIN,
    PIXEL_M,
    TILE_STEP_M,
    band_name,
    make_geotiff_folder,
    stems,
    wavelengths,
    write_classes,
    write_image,
    write_label,
)


def _read(path: Path, band: int | None = None) -> np.ndarray:
    with rasterio.open(path) as src:
        return np.asarray(src.read(band) if band else src.read())


def _geo(path: Path) -> dict[str, object]:
    with rasterio.open(path) as src:
        return {"crs": src.crs, "transform": src.transform}


def _plan(root: Path, **options: object) -> SourcePlan:
    return read_geotiff(root, PrepareOptions(**options))  # type: ignore[arg-type]


def _write_splits(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("stem", "split"), *rows])
    return path


def test_ss_folder_reads_bands_classes_and_pixels(tmp_path: Path) -> None:
    root = make_geotiff_folder(tmp_path / "raw")
    plan = _plan(root)
    spec = plan.spec
    assert (spec.dataset, spec.task, spec.dtype) == ("geotiff", "ss", "uint16")
    assert (spec.height, spec.width) == (24, 20)
    assert [b.name for b in spec.bands] == [band_name(i) for i in range(5)]
    assert [b.wavelength_nm for b in spec.bands] == wavelengths(5)
    assert [c.source_id for c in plan.candidates] == stems(4)
    sample = plan.load(plan.candidates[1])
    image = sample.arrays["image"]
    assert image.dtype == np.uint16 and image.shape == (5, 24, 20)
    np.testing.assert_array_equal(image, _read(root / "images" / "tile_01.tif"))
    assert sample.nodata_pixels == 0


def test_noncontiguous_codes_are_remapped_in_code_order_and_kept(tmp_path: Path) -> None:
    root = make_geotiff_folder(tmp_path / "raw", codes=[100, 10, 40])
    plan = _plan(root)
    assert [(c.index, c.code, c.name) for c in plan.spec.classes] == [
        (0, 10, "class_10"),
        (1, 40, "class_40"),
        (2, 100, "class_100"),
    ]
    raw = _read(root / "masks" / "tile_02.tif", 1)
    mask = plan.load(plan.candidates[2]).arrays["mask"]
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, np.searchsorted([10, 40, 100], raw))
    assert len({tuple(c.colour) for c in plan.spec.classes}) == 3


@pytest.mark.parametrize("kind", ["json", "csv"])
def test_classes_from_file_found_in_raw(tmp_path: Path, kind: str) -> None:
    root = make_geotiff_folder(tmp_path / "raw", classes_file=kind)
    classes = _plan(root).spec.classes
    assert [(c.index, c.code, c.name) for c in classes] == [
        (0, 10, "name_10"),
        (1, 40, "name_40"),
        (2, 100, "name_100"),
    ]
    assert classes[1].colour == (40, 24, 8)


def test_classes_file_option_may_declare_absent_codes(tmp_path: Path) -> None:
    root = make_geotiff_folder(tmp_path / "raw", codes=[10, 40])
    path = tmp_path / "legend.json"
    # Listed out of code order: indices follow the codes, not the file.
    entries = [{"code": 40}, {"code": 10, "name": "water"}, {"code": 20, "color": "#00ff00"}]
    path.write_text(json.dumps(entries), encoding="utf-8")
    plan = _plan(root, classes_file=path)
    assert [c.name for c in plan.spec.classes] == ["water", "class_20", "class_40"]
    assert plan.spec.classes[1].colour == (0, 255, 0)
    raw = _read(root / "masks" / "tile_00.tif", 1)
    mask = plan.load(plan.candidates[0]).arrays["mask"]
    np.testing.assert_array_equal(mask, np.where(raw == 10, 0, 2))


def _paint_masks(root: Path, folder: str = "masks") -> dict[int, tuple[int, int, int]]:
    """Masks re-saved as RGB class colours (as CVAT and other labelling tools export them),
    PNG for the first, GeoTIFF for the others; returns code -> colour of the classes file."""
    classes = {c.code: c.colour for c in _plan(root).spec.classes}
    for path in sorted((root / folder).iterdir()):
        codes = _read(path)[0]
        rgb = np.zeros((3, *codes.shape), np.uint8)
        for code, colour in classes.items():
            rgb[:, codes == code] = np.array(colour, np.uint8)[:, None]
        path.unlink()
        if path.stem.endswith("00"):
            Image.fromarray(rgb.transpose(1, 2, 0), mode="RGB").save(path.with_suffix(".png"))
        else:
            write_image(path, rgb, _geo(root / "images" / path.name))
    return {int(str(code)): colour for code, colour in classes.items()}


def test_rgb_colour_masks_map_through_the_classes_file(tmp_path: Path) -> None:
    root = make_geotiff_folder(tmp_path / "raw", n=3, classes_file="csv")
    by_codes = _plan(root)
    expected = [by_codes.load(c).arrays["mask"] for c in by_codes.candidates]
    _paint_masks(root)
    plan = _plan(root)
    assert plan.spec.details["labels"].startswith("RGB")
    assert [c.code for c in plan.spec.classes] == [c.code for c in by_codes.spec.classes]
    for candidate, mask in zip(plan.candidates, expected, strict=True):
        np.testing.assert_array_equal(plan.load(candidate).arrays["mask"], mask)


def test_rgb_colour_masks_need_a_classes_file_with_every_colour(tmp_path: Path) -> None:
    root = make_geotiff_folder(tmp_path / "raw", n=2, classes_file="csv")
    colours = _paint_masks(root)
    (root / "classes.csv").unlink()
    with pytest.raises(InputDataError, match="no classes file says") as info:
        _plan(root)
    assert "--classes" in (info.value.hint or "")
    assert info.value.path == root  # it named root/classes.csv, a file that is not there
    partial = tmp_path / "partial.csv"
    partial.write_text("code,name,colour\n10,water,#0a4682\n40,forest,\n100,town,#641464\n")
    with pytest.raises(InputDataError, match=r"no colour for code\(s\) \[40\]") as info:
        _plan(root, classes_file=partial)
    assert info.value.path == partial
    two = [c for c in sorted(colours) if c != 100]
    missing = tmp_path / "two.csv"
    write_classes(missing, two)
    plan = _plan(root, classes_file=missing)
    r, g, b = colours[100]
    with pytest.raises(InputDataError, match=f"#{r:02x}{g:02x}{b:02x}") as info:
        plan.load(plan.candidates[0])
    assert info.value.path == root / "masks" / "tile_00.png"


def test_grey_masks_saved_as_rgb_read_as_class_codes(tmp_path: Path) -> None:
    """A grey mask re-saved as RGB (R = G = B, as image editors save it) was refused: "RGB
    label files hold class colours, and no classes file says which class each is"."""
    root = make_geotiff_folder(tmp_path / "raw", n=3, codes=[0, 1, 2], size=(16, 16))
    code, _, stderr = run_cli("prepare", "geotiff", root, "--out", tmp_path / "codes.zarr", "-q")
    assert code == 0, stderr
    for path in sorted((root / "masks").iterdir()):
        grey = np.repeat(_read(path, 1)[None], 3, axis=0)
        path.unlink()
        if path.stem.endswith("00"):
            Image.fromarray(grey.transpose(1, 2, 0), mode="RGB").save(path.with_suffix(".png"))
        else:
            write_image(path, grey, _geo(root / "images" / path.name))
    out = tmp_path / "grey.zarr"
    code, _, stderr = run_cli("prepare", "geotiff", root, "--out", out)
    assert code == 0, stderr
    assert "note: 3 RGB mask(s) hold only grey levels (R = G = B" in stderr
    stores = [open_store(store) for store in (tmp_path / "codes.zarr", out)]
    for index in range(len(stores[0])):
        np.testing.assert_array_equal(*(s.read(index)["mask"] for s in stores))
    assert [c["code"] for c in manifest_of(out)["classes"]] == [0, 1, 2]  # type: ignore[index]


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_an_alpha_band_in_a_label_marks_unlabelled_pixels(tmp_path: Path, mode: str) -> None:
    """Labelling tools export RGBA colour masks and LA code masks: refused as "4 bands" before.
    A transparent pixel is unlabelled whatever colour or code it holds."""
    root = make_geotiff_folder(tmp_path / "raw", n=3, classes_file="csv")
    by_codes = _plan(root)
    expected = [by_codes.load(c).arrays["mask"] for c in by_codes.candidates]
    colours = _paint_masks(root) if mode == "RGBA" else {}
    for path in sorted((root / "masks").iterdir()):
        values = _read(path)
        alpha = np.full(values.shape[1:], 255, np.uint8)
        alpha[:2, :3] = 0
        values[:, :2, :3] = 7  # neither a class colour nor a class code
        stacked = np.concatenate([values.astype(np.uint8), alpha[None]]).transpose(1, 2, 0)
        path.unlink()
        Image.fromarray(stacked.squeeze() if mode == "LA" else stacked, mode=mode).save(
            path.with_suffix(".png")
        )
    if mode == "LA":
        (root / "classes.csv").unlink()  # discovered from the masks: 7 is not among them
    plan = _plan(root)
    assert [c.code for c in plan.spec.classes] == [c.code for c in by_codes.spec.classes]
    for candidate, mask in zip(plan.candidates, expected, strict=True):
        loaded = plan.load(candidate)
        assert (loaded.arrays["mask"][:2, :3] == 255).all() and loaded.nodata_pixels >= 6
        unmasked = np.ones(mask.shape, bool)
        unmasked[:2, :3] = False
        np.testing.assert_array_equal(loaded.arrays["mask"][unmasked], mask[unmasked])
    assert colours or mode == "LA"


def test_change_detection_folder(tmp_path: Path) -> None:
    root = make_geotiff_folder(tmp_path / "raw", task="cd", codes=[0, 1], n=3)
    plan = _plan(root)
    assert plan.spec.task == "cd"
    assert [c.code for c in plan.spec.classes] == [0, 1]
    sample = plan.load(plan.candidates[0])
    assert set(sample.arrays) == {"image_t1", "image_t2", "change"}
    np.testing.assert_array_equal(sample.arrays["image_t2"], _read(root / "t2" / "tile_00.tif"))
    np.testing.assert_array_equal(
        sample.arrays["change"], _read(root / "change" / "tile_00.tif", 1)
    )


def test_a_task_the_folder_does_not_hold_is_refused(tmp_path: Path) -> None:

    root = make_geotiff_folder(tmp_path / "raw", task="cd", codes=[0, 1], n=2)
    code, _, stderr = run_cli("prepare", "geotiff", root, "--task", "ss", "--out", tmp_path / "s")
    assert code == 2 and "--task ss: the geotiff data here is task cd" in stderr
    assert not (tmp_path / "s").exists()
    code, _, stderr = run_cli("prepare", "geotiff", root, "--task", "cd", "--out", tmp_path / "c")
    assert code == 0, stderr
    # Refused before --overwrite removes the store that is there.
    code, _, stderr = run_cli(
        "prepare", "geotiff", root, "--task", "ss", "--out", tmp_path / "c", "--overwrite"
    )
    assert code == 2 and (tmp_path / "c" / "manifest.json").is_file()


def test_a_layout_one_folder_down_is_named(tmp_path: Path) -> None:
    """An archive unpacked into a folder of its own name (raw/tiles/images, raw/tiles/masks)
    was told "put the tiles in those folders"."""
    nested = make_geotiff_folder(tmp_path / "raw" / "tiles", task="ss", codes=[1, 2], n=2)
    (tmp_path / "raw" / "docs").mkdir()
    code, _, stderr = run_cli("prepare", "geotiff", tmp_path / "raw", "--out", tmp_path / "s")
    assert_one_error_line(code, stderr, 3, f"the tiles are one folder down: pass {nested}")
    assert not (tmp_path / "s").exists()


def test_a_split_far_from_its_fraction_is_a_warning(tmp_path: Path) -> None:
    two = _plan(make_geotiff_folder(tmp_path / "two", n=2))  # --val-fraction 0.1 of 2 files
    assert two.warnings == [
        "warning: val is 1 of 2 source files (50%, asked 0.1): splits take whole files; "
        "--splits FILE.csv chooses them"
    ]
    assert _plan(make_geotiff_folder(tmp_path / "ten", n=10)).warnings == []  # 1 of 10


def test_change_masks_of_more_than_two_codes_are_a_warning(tmp_path: Path) -> None:
    three = _plan(make_geotiff_folder(tmp_path / "three", task="cd", codes=[0, 1, 2], n=10))
    assert [c.code for c in three.spec.classes] == [0, 1, 2]
    assert three.warnings == [
        "warning: the change masks hold 3 codes (0, 1, 2), so the store has 3 change classes, "
        "not change / no change; if a code means no data, pass --label-nodata CODE"
    ]
    two = _plan(make_geotiff_folder(tmp_path / "two", task="cd", codes=[0, 1], n=10))
    assert two.warnings == []
    assert [c.name for c in two.spec.classes] == ["no change", "change"]
    assert [c.name for c in three.spec.classes] == ["class_0", "class_1", "class_2"]


def test_change_masks_of_0_and_255_read_255_as_change(tmp_path: Path) -> None:
    """LEVIR-CD's, WHU-CD's and OSCD's encoding: 255 is change there, not "no label"."""
    root = make_geotiff_folder(tmp_path / "raw", task="cd", codes=[0, 255], n=10)
    plan = _plan(root)
    assert [c.code for c in plan.spec.classes] == [0, 255]
    assert [c.name for c in plan.spec.classes] == ["no change", "change"]  # not class_0/255
    assert "note: the change masks hold only 0 and 255: read 255 as change" in plan.warnings[0]
    raw = _read(root / "change" / "tile_00.tif", 1)
    change = plan.load(plan.candidates[0]).arrays["change"]
    np.testing.assert_array_equal(change, np.where(raw == 255, 1, 0))
    # Told that 255 means no data, the one class left is said to be no change / change pair.
    alone = _plan(root, label_nodata=255.0)
    assert [c.code for c in alone.spec.classes] == [0]
    assert alone.warnings[0].startswith("warning: the change masks hold one class code (0)")


def test_change_masks_whose_nodata_tag_is_no_change_are_a_warning(tmp_path: Path) -> None:
    """gdal_rasterize -a_nodata 0 -burn 1: the tag makes "no change" no data; a classes file
    that declares 0 puts it back."""
    root = make_geotiff_folder(tmp_path / "raw", task="cd", codes=[0, 1], n=10)
    for stem in stems(10):
        path = root / "change" / f"{stem}.tif"
        write_label(path, _read(path, 1), _geo(path), nodata=0)
    tagged = _plan(root)
    assert [c.code for c in tagged.spec.classes] == [1]
    assert "declare both codes in a classes file" in tagged.warnings[0]
    write_classes(root / "classes.csv", [0, 1])
    declared = _plan(root)
    assert [c.code for c in declared.spec.classes] == [0, 1]
    raw = _read(root / "change" / "tile_00.tif", 1)
    np.testing.assert_array_equal(declared.load(declared.candidates[0]).arrays["change"], raw)


def test_a_classes_file_may_declare_255_a_class(tmp_path: Path) -> None:
    """0/255 building masks: undeclared, 255 is "no label" (said, as one class is left);
    declared, it is a class, and a nodata tag still reads as no label."""
    root = make_geotiff_folder(tmp_path / "raw", codes=[0, 255], n=10)
    undeclared = _plan(root)
    assert [c.code for c in undeclared.spec.classes] == [0]
    assert "if 255 is a class" in undeclared.warnings[0]
    path = root / "masks" / "tile_00.tif"
    raw = _read(path, 1).astype(np.uint16)
    raw[0, 0] = 7  # a no-data fill, tagged
    write_label(path, raw, _geo(path), nodata=7)
    write_classes(root / "classes.json", [0, 255])
    declared = _plan(root)
    assert [c.code for c in declared.spec.classes] == [0, 255]
    mask = declared.load(declared.candidates[0]).arrays["mask"]
    expected = np.where(raw == 255, 1, 0)
    expected[0, 0] = 255
    np.testing.assert_array_equal(mask, expected)


def test_band_names_fall_back_and_wavelengths_come_from_tags(tmp_path: Path) -> None:
    root = make_geotiff_folder(tmp_path / "raw", n=1, bands=3)
    path = root / "images" / "tile_00.tif"
    with rasterio.open(path, "r+") as dst:
        dst.set_band_description(1, "664.6 nm")
        dst.set_band_description(2, "")
        dst.update_tags(2, wavelength="0.56", wavelength_units="micrometers")
        dst.set_band_description(3, "SWIR")
    bands = _plan(root).spec.bands
    assert [(b.name, b.wavelength_nm) for b in bands] == [
        ("band_1", 664.6),
        ("band_2", 560.0),
        ("SWIR", None),
    ]
    with rasterio.open(path, "r+") as dst:  # ENVI writes its units out
        dst.set_band_description(3, "Band 3 (1610 Nanometers)")
    assert (_plan(root).spec.bands[2].name, _plan(root).spec.bands[2].wavelength_nm) == (
        "Band 3",
        1610.0,
    )


def _describe_bands(path: Path, names: list[str]) -> None:
    with rasterio.open(path, "r+") as dst:
        for index, name in enumerate(names):
            dst.set_band_description(index + 1, name)


@pytest.mark.parametrize(("task", "folder"), [("ss", "images"), ("cd", "t2")])
def test_files_that_list_their_bands_in_other_orders_are_refused(
    tmp_path: Path, task: str, folder: str
) -> None:
    """gdalbuildvrt over files sorted by name puts B8A after B12: the pixels of such a file
    would be stored under the first file's band names, silently in the wrong bands."""
    root = make_geotiff_folder(tmp_path / "raw", task=task, n=2, bands=3)
    for path in sorted(root.glob("[it]*/*.tif")):  # images/, t1/, t2/
        _describe_bands(path, ["B02", "B03", "B04"])
    reordered = root / folder / "tile_01.tif"
    _describe_bands(reordered, ["B04", "B03", "B02"])
    with pytest.raises(
        InputDataError, match=r"band 1 is 'B04', tile_0[01]\.tif's band 1 is 'B02'"
    ) as info:
        _plan(root)
    assert info.value.path == reordered and "gdal_translate -b" in (info.value.hint or "")


@pytest.mark.parametrize(
    "names",
    [
        ["", "", ""],  # named in one file only
        ["T32UPV_B02_10m", "T32UPV_B03_10m", "T32UPV_B04_10m"],  # gdalbuildvrt -separate names
    ],
)
def test_bands_named_otherwise_are_not_taken_for_a_reorder(
    tmp_path: Path, names: list[str]
) -> None:
    root = make_geotiff_folder(tmp_path / "raw", n=2, bands=3)
    _describe_bands(root / "images" / "tile_00.tif", ["T32UPU_B02_10m", "B03", "B04"])
    _describe_bands(root / "images" / "tile_01.tif", names)
    assert len(_plan(root).candidates) == 2


def test_splits_from_csv(tmp_path: Path) -> None:
    root = make_geotiff_folder(tmp_path / "raw", size=(40, 40))
    rows = [("tile_00", "train"), ("tile_01.tif", "val"), ("tile_02", "test"), ("tile_03", "train")]
    plan = _plan(root, splits_file=_write_splits(tmp_path / "s.csv", rows), patch_size=16)
    by_file = {c.ref[0]: c.split for c in plan.candidates}
    assert by_file == {"tile_00": "train", "tile_01": "val", "tile_02": "test", "tile_03": "train"}
    assert plan.load(plan.candidates[-1]).split == "train"


def test_splits_file_stems_written_as_paths_name_their_tiles(tmp_path: Path) -> None:
    """`images/tile_00.tif`, `./tile_01.tif` or a Windows path was "no image has the stem
    'images/tile_00'" (exit 3, hint "fix it"): each now names the tile its file name does."""
    root = make_geotiff_folder(tmp_path / "raw", n=4, size=(16, 16))
    rows = [
        ("images/tile_00.tif", "train"), ("./tile_01.tif", "val"),
        (f"{root}\\masks\\tile_02.TIF", "test"), ("tile_03", "train"),
    ]  # fmt: skip
    out = tmp_path / "s.zarr"
    splits = _write_splits(tmp_path / "s.csv", rows)
    code, _, stderr = run_cli("prepare", "geotiff", root, "--out", out, "--splits", splits, "-q")
    assert code == 0, stderr
    assert manifest_of(out)["source"]["split_counts"] == {"train": 2, "val": 1, "test": 1}  # type: ignore[index]
    bad = _write_splits(tmp_path / "bad.csv", [*rows[:3], ("images/tile_3", "train")])
    code, _, stderr = run_cli("prepare", "geotiff", root, "--out", tmp_path / "b", "--splits", bad)
    assert_one_error_line(code, stderr, 3, "line 5: no image has the stem 'tile_3'")
    assert "without folder or extension, e.g. 'tile_00'" in stderr


def test_splits_file_without_a_header_is_read_and_a_wrong_header_names_the_fix(
    tmp_path: Path,
) -> None:
    """Rows `tile_00,train` with no header line were refused with "needs columns stem,split:
    one row per file: stem,train|val|test", a hint describing the very file given. A first row
    whose second field is a split name is a row now; a header of other words names `stem,split`."""
    root = make_geotiff_folder(tmp_path / "raw", n=3, size=(16, 16))
    splits = tmp_path / "s.csv"
    splits.write_text("tile_00,train\ntile_01,val\ntile_02,test\n", encoding="utf-8")
    out = tmp_path / "s.zarr"
    code, _, stderr = run_cli("prepare", "geotiff", root, "--out", out, "--splits", splits, "-q")
    assert code == 0, stderr
    assert manifest_of(out)["source"]["split_counts"] == {"train": 1, "val": 1, "test": 1}  # type: ignore[index]
    splits.write_text("tile_00,training\n", encoding="utf-8")
    code, _, stderr = run_cli(
        "prepare", "geotiff", root, "--out", tmp_path / "b", "--splits", splits
    )
    assert_one_error_line(code, stderr, 3, "needs a header line stem,split")
    assert "start the file with the line `stem,split`" in stderr
    splits.write_text("tile_00,train\ntile_01,val\ntile_02,training\n", encoding="utf-8")
    code, _, stderr = run_cli(
        "prepare", "geotiff", root, "--out", tmp_path / "b", "--splits", splits
    )
    assert_one_error_line(code, stderr, 3, "line 3: split 'training' is not train, val or test")


def test_splits_file_with_split_fractions_or_seed_is_a_usage_error(tmp_path: Path) -> None:
    """The file chooses every split: --val-fraction, --test-fraction and --seed were ignored
    with exit 0 and no word; given (not left at their defaults) they are exit 2 now."""
    root = make_geotiff_folder(tmp_path / "raw", n=2, size=(16, 16))
    splits = _write_splits(tmp_path / "s.csv", [("tile_00", "train"), ("tile_01", "val")])
    command = ("prepare", "geotiff", root, "--out", tmp_path / "s.zarr", "--splits", splits)
    code, _, stderr = run_cli(*command, "--val-fraction", "0.5", "--seed", "3")
    assert_one_error_line(code, stderr, 2, "--splits gives every tile's split")
    assert "--val-fraction, --seed would not be read" in stderr
    code, _, stderr = run_cli(*command, "--test-fraction", "0.2")
    assert_one_error_line(code, stderr, 2, "--test-fraction would not be read")
    assert not (tmp_path / "s.zarr").exists()


def test_csv_files_saved_by_a_spreadsheet_are_read(tmp_path: Path) -> None:
    # Excel's "CSV UTF-8" starts with a byte-order mark: the first column was '\ufeffcode'.
    root = make_geotiff_folder(tmp_path / "raw", n=2, codes=[10, 40])
    legend, splits = tmp_path / "legend.csv", tmp_path / "splits.csv"
    legend.write_text("code,name\r\n10,water\r\n40,forest\r\n", encoding="utf-8-sig")
    splits.write_text("stem,split\r\ntile_00,train\r\ntile_01,val\r\n", encoding="utf-8-sig")
    plan = _plan(root, classes_file=legend, splits_file=splits)
    assert [c.name for c in plan.spec.classes] == ["water", "forest"]
    assert {c.ref[0]: c.split for c in plan.candidates} == {"tile_00": "train", "tile_01": "val"}


def test_fraction_splits_are_by_file_and_deterministic(tmp_path: Path) -> None:
    root = make_geotiff_folder(tmp_path / "raw", n=10, size=(20, 20), bands=1)
    options = {"val_fraction": 0.2, "test_fraction": 0.3, "patch_size": 8, "overlap": 0.0}

    def splits(seed: int) -> dict[str, str]:
        plan = _plan(root, seed=seed, **options)
        seen: dict[str, set[str]] = {}
        for c in plan.candidates:
            seen.setdefault(c.ref[0], set()).add(c.split)
        assert all(len(s) == 1 for s in seen.values()), "one file's patches span splits"
        return {stem: s.pop() for stem, s in seen.items()}

    first = splits(seed=1)
    assert sorted(first.values()).count("val") == 2
    assert sorted(first.values()).count("test") == 3
    assert splits(seed=1) == first
    assert any(splits(seed=s) != first for s in range(2, 6))


def test_patches_cover_edges_and_small_files_are_padded(tmp_path: Path) -> None:
    root = make_geotiff_folder(tmp_path / "raw", n=2, sizes=[(40, 30), (10, 12)], bands=2)
    plan = _plan(root, patch_size=16, overlap=0.5)
    assert (plan.spec.height, plan.spec.width) == (16, 16)
    big = [c for c in plan.candidates if c.ref[0] == "tile_00"]
    covered = np.zeros((40, 30), dtype=bool)
    image = _read(root / "images" / "tile_00.tif")
    for candidate in big:
        _, y, x = candidate.ref
        assert candidate.source_id == f"tile_00/y{y}_x{x}"
        patch = plan.load(candidate).arrays["image"]
        np.testing.assert_array_equal(patch, image[:, y : y + 16, x : x + 16])
        covered[y : y + 16, x : x + 16] = True
    assert covered.all()
    small = plan.load(next(c for c in plan.candidates if c.source_id == "tile_01"))
    mask, padded = small.arrays["mask"], small.arrays["image"]
    assert padded.shape == (2, 16, 16) and mask.shape == (16, 16)
    assert (mask[10:, :] == 255).all() and (mask[:, 12:] == 255).all()
    assert (mask[:10, :12] != 255).all()
    np.testing.assert_array_equal(padded[:, :10, :12], _read(root / "images" / "tile_01.tif"))
    assert (padded[:, 10:, :] > 0).all()  # filled like nodata (band mean), never a blank 0
    assert [line for line in plan.warnings if "smaller than" in line] == [
        "note: 1 of 2 files are smaller than the 16x16 patch (e.g. tile_01.tif, 10x12): padded, "
        "the padding labelled 255 (`--patch-size` sets the patch)"
    ]
    assert not [line for line in _plan(root, patch_size=8).warnings if "smaller than" in line]


def test_a_scene_smaller_than_the_patch_is_kept_not_dropped_as_blank(tmp_path: Path) -> None:
    """Its padding is neither blank nor unlabelled land: `--max-blank` and `--max-unlabelled`
    count the pixels the scene covers (a 6 x 8 scene is under a fifth of a 16 x 16 patch)."""
    root = make_geotiff_folder(tmp_path / "raw", n=2, sizes=[(16, 16), (6, 8)], bands=2)
    out = tmp_path / "store.zarr"
    code, _, stderr = run_cli("prepare", "geotiff", root, "--out", out, "--patch-size", "16",
                              "--val-fraction", "0", "--test-fraction", "0",
                              "--max-unlabelled", "0.5")  # fmt: skip
    assert code == 0, stderr
    store = open_store(out)
    ids = store.source_ids() or []
    assert sorted(ids) == ["tile_00", "tile_01"]
    small = store.read(ids.index("tile_01"))["mask"]
    assert (small[6:] == 255).all() and (small[:, 8:] == 255).all() and (small[:6, :8] != 255).all()


def _band_vrt(bands: list[tuple[Path, str]], height: int, width: int) -> str:
    """A VRT stacking one-band files, each band keeping its file's type (`gdalbuildvrt
    -separate`)."""
    stacked = "".join(
        f'<VRTRasterBand dataType="{kind}" band="{i + 1}"><SimpleSource><SourceFilename '
        f'relativeToVRT="0">{path}</SourceFilename><SourceBand>1</SourceBand></SimpleSource>'
        "</VRTRasterBand>"
        for i, (path, kind) in enumerate(bands)
    )
    return f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">{stacked}</VRTDataset>'


def test_a_vrt_of_bands_of_two_types_is_read_at_the_type_that_holds_both(tmp_path: Path) -> None:
    """UInt16 and Float32 band files stacked: a float32 store with every value as written."""
    root = make_geotiff_folder(tmp_path / "raw", n=2, size=(16, 16), bands=1,
                               georeferenced=False)  # fmt: skip
    parts, written = tmp_path / "bands", {}
    parts.mkdir()
    for stem in ("tile_00", "tile_01"):
        counts = (root / "images" / f"{stem}.tif").rename(parts / f"{stem}_dn.tif")
        ratio = np.random.default_rng(0).random((1, 16, 16)).astype(np.float32)
        write_image(parts / f"{stem}_ratio.tif", ratio, {})
        (root / "images" / f"{stem}.vrt").write_text(
            _band_vrt([(counts, "UInt16"), (parts / f"{stem}_ratio.tif", "Float32")], 16, 16)
        )
        written[stem] = np.concatenate([_read(counts).astype(np.float32), ratio])
    out = tmp_path / "store.zarr"
    code, _, stderr = run_cli("prepare", "geotiff", root, "--out", out, "--patch-size", "16",
                              "--val-fraction", "0", "--test-fraction", "0")  # fmt: skip
    assert code == 0, stderr
    store = open_store(out)
    assert store.manifest.dtype == "float32"
    for index, stem in enumerate(store.source_ids() or []):
        np.testing.assert_array_equal(store.read(index)["image"], written[stem])


def test_a_vrt_whose_band_file_is_missing_is_one_line_naming_that_file(tmp_path: Path) -> None:
    """GDAL's reason, not rasterio's "See previous exception", and no store left."""
    root = make_geotiff_folder(tmp_path / "raw", n=2, size=(16, 16), bands=1)
    parts = tmp_path / "bands"
    parts.mkdir()
    for stem in ("tile_00", "tile_01"):
        counts = (root / "images" / f"{stem}.tif").rename(parts / f"{stem}_B01.tif")
        (root / "images" / f"{stem}.vrt").write_text(_band_vrt([(counts, "UInt16")], 16, 16))
    (parts / "tile_01_B01.tif").unlink()
    out = tmp_path / "store.zarr"
    code, _, stderr = run_cli("prepare", "geotiff", root, "--out", out, "--workers", "1")
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 3 and "tile_01_B01.tif" in line and "Traceback" not in stderr, stderr
    assert not out.exists()


def test_a_raw_folder_you_may_not_read_is_input_data_not_an_unwritable_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exit 3 naming the folder, where it was exit 5 "cannot write here". Tests run as root,
    whom chmod does not stop, so the listing's EACCES is raised as a user would meet it."""
    root = make_geotiff_folder(tmp_path / "raw", n=2)
    listing = Path.iterdir

    def refused(folder: Path) -> Iterator[Path]:
        if folder.name == "masks":
            raise PermissionError(errno.EACCES, "Permission denied", str(folder))
        return listing(folder)

    monkeypatch.setattr(Path, "iterdir", refused)
    for task in ((), ("--task", "ss")):
        out = tmp_path / "store.zarr"
        code, _, stderr = run_cli("prepare", "geotiff", root, "--out", out, *task)
        (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert code == 3 and "cannot read the raw data (Permission denied)" in line, stderr
        assert str(root / "masks") in line and not out.exists()


def test_a_failure_that_is_not_the_input_s_leaves_no_empty_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever fails before a first sample is written, no store is left that a rerun would
    have to be told to --overwrite or --resume."""
    root = make_geotiff_folder(tmp_path / "raw", n=2)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a reader's bug")

    monkeypatch.setattr(geotiff_reader, "_read_window", broken)
    out = tmp_path / "store.zarr"
    code, _, stderr = run_cli("prepare", "geotiff", root, "--out", out, "--workers", "1")
    assert code == 1 and "a reader's bug" in stderr and "Traceback" not in stderr
    assert not out.exists()


def test_same_size_tiles_keep_their_size(tmp_path: Path) -> None:
    root = make_geotiff_folder(tmp_path / "raw", n=2, size=(12, 20), bands=1)
    plan = _plan(root, patch_size=16)
    assert (plan.spec.height, plan.spec.width) == (12, 16)
    assert [c.source_id for c in plan.candidates] == [
        f"{s}/y0_x{x}" for s in stems(2) for x in (0, 4)
    ]


def test_bounds_and_crs_of_georeferenced_patches(tmp_path: Path) -> None:
    root = make_geotiff_folder(tmp_path / "raw", n=2, size=(24, 20), bands=1)
    plan = _plan(root, patch_size=16, overlap=0.5)
    assert plan.spec.crs == f"EPSG:{CRS_EPSG}"
    candidate = next(c for c in plan.candidates if c.ref == ("tile_01", 8, 4))
    left = ORIGIN[0] + TILE_STEP_M + 4 * PIXEL_M
    top = ORIGIN[1] - TILE_STEP_M - 8 * PIXEL_M
    expected = (left, top - 16 * PIXEL_M, left + 16 * PIXEL_M, top)
    assert plan.load(candidate).bounds == pytest.approx(expected)


def test_a_mask_without_georeferencing_is_taken_as_on_its_image_grid(tmp_path: Path) -> None:
    root = make_geotiff_folder(tmp_path / "raw", n=2)
    label = _read(root / "masks" / "tile_01.tif", 1)
    write_label(root / "masks" / "tile_01.tif", label, {})
    plan = _plan(root)
    loaded = {c.source_id: plan.load(c) for c in plan.candidates}
    assert len(loaded) == 2 and plan.spec.crs == f"EPSG:{CRS_EPSG}"


@pytest.mark.parametrize("image_crs", [True, False])
def test_a_mask_with_a_transform_but_no_crs_must_lie_on_its_image_grid(
    tmp_path: Path, image_crs: bool
) -> None:
    """Masks are often written with the image's transform and no CRS: the transform still
    says where the mask lies, and a shifted one was read 16 pixels off, exit 0."""
    root = make_geotiff_folder(tmp_path / "raw", n=1, georeferenced=image_crs)
    image, mask = root / "images" / "tile_00.tif", root / "masks" / "tile_00.tif"
    transform = from_origin(ORIGIN[0], ORIGIN[1], PIXEL_M, PIXEL_M)
    if not image_crs:
        write_image(image, _read(image), {"transform": transform})
    label = _read(mask, 1)
    write_label(mask, label, {"transform": transform})
    assert len(_plan(root).candidates) == 1  # the image's own transform: on its grid
    shifted = from_origin(ORIGIN[0] + 16 * PIXEL_M, ORIGIN[1], PIXEL_M, PIXEL_M)
    write_label(mask, label, {"transform": shifted})
    with pytest.raises(InputDataError, match="not on its image's grid") as info:
        _plan(root)
    assert info.value.path == mask


def test_png_masks_of_a_labelling_tool_pair_with_their_images(tmp_path: Path) -> None:
    root = make_geotiff_folder(tmp_path / "raw", n=2, codes=[1, 2])
    label = _read(root / "masks" / "tile_01.tif", 1)
    (root / "masks" / "tile_01.tif").unlink()
    Image.fromarray(label).save(root / "masks" / "tile_01.png")
    plan = _plan(root)
    sample = next(plan.load(c) for c in plan.candidates if c.source_id.startswith("tile_01"))
    np.testing.assert_array_equal(sample.arrays["mask"], np.where(label == 1, 0, 1))


def test_a_missing_partner_of_a_png_set_is_named_as_png(tmp_path: Path) -> None:
    """A PNG set's missing mask was named `masks/tile_02.tif`: now with the extension its
    folder's files have (`.png` masks beside `.tif` images, as mmseg's `ann_dir` holds)."""
    root = make_geotiff_folder(tmp_path / "raw", n=3, codes=[1, 2])
    for mask in sorted((root / "masks").glob("*.tif")):
        Image.fromarray(_read(mask, 1)).save(mask.with_suffix(".png"))
        mask.unlink()
    (root / "masks" / "tile_02.png").unlink()
    code, _, stderr = run_cli("prepare", "geotiff", root, "--out", tmp_path / "s.zarr", "-q")
    assert_one_error_line(code, stderr, 3, f"({root / 'masks' / 'tile_02.png'})")
    assert not (tmp_path / "s.zarr").exists()


def test_a_crs_without_an_epsg_code_is_named_not_dumped_in_the_error(tmp_path: Path) -> None:
    root = make_geotiff_folder(tmp_path / "raw", n=1)
    mask = root / "masks" / "tile_00.tif"
    lambert = CRS.from_proj4("+proj=lcc +lat_1=49 +lat_2=44 +lat_0=46.5 +lon_0=3 +datum=WGS84")
    write_label(mask, _read(mask, 1), {**_geo(mask), "crs": lambert})
    with pytest.raises(InputDataError, match="differs from its image's EPSG:") as info:
        _plan(root)
    assert len(str(info.value)) < 200 and "(WKT)" in str(info.value)


def test_a_float_mask_with_nan_points_at_label_nodata_nan(tmp_path: Path) -> None:
    root = make_geotiff_folder(tmp_path / "raw", n=1, codes=[1, 2])
    mask = root / "masks" / "tile_00.tif"
    label = _read(mask, 1).astype(np.float32)
    label[0, :3] = np.nan
    write_label(mask, label, _geo(mask))
    with pytest.raises(InputDataError, match="holds NaN values") as info:
        _plan(root)
    assert "--label-nodata nan" in (info.value.hint or "")
    plan = _plan(root, label_nodata=float("nan"))
    assert (plan.load(plan.candidates[0]).arrays["mask"][0, :3] == 255).all()


def test_tiles_of_two_utm_zones_are_read_without_bounds(tmp_path: Path) -> None:
    """Sentinel-2 tiles of zones 32N and 33N were refused ("reproject every file to one CRS");
    the pixels need no shared CRS, the bounds do: they are left out, each file's CRS recorded."""
    root = make_geotiff_folder(tmp_path / "raw", n=3)
    for folder in ("images", "masks"):
        path = root / folder / "tile_01.tif"
        geo = {"crs": CRS.from_epsg(32633), "transform": from_origin(300_000, 5_300_000, 10, 10)}
        if folder == "images":
            write_image(path, _read(path), geo)
        else:
            write_label(path, _read(path, 1), geo)
    plan = _plan(root)
    assert plan.spec.crs is None
    assert plan.spec.details["crs_by_file"] == {
        "tile_00": "EPSG:32632", "tile_01": "EPSG:32633", "tile_02": "EPSG:32632"
    }  # fmt: skip
    assert any("lie in 2 CRSs (EPSG:32632, EPSG:32633)" in line for line in plan.warnings)
    assert all(plan.load(c).bounds is None for c in plan.candidates)
    out = tmp_path / "store.zarr"
    code, _, stderr = run_cli("prepare", "geotiff", root, "--out", out, "--val-fraction", "0")
    assert code == 0, stderr
    assert manifest_of(out)["crs"] is None
    code, stdout, _ = run_cli("inspect", out)
    assert (
        code == 0 and "crs: 2 CRSs (EPSG:32632, EPSG:32633; source.details.crs_by_file)" in stdout
    )


def test_ungeoreferenced_folder_has_no_crs_or_bounds(tmp_path: Path) -> None:
    root = make_geotiff_folder(tmp_path / "raw", n=2, georeferenced=False)
    plan = _plan(root)
    assert plan.spec.crs is None
    assert plan.load(plan.candidates[0]).bounds is None


def test_224_bands(tmp_path: Path) -> None:
    root = make_geotiff_folder(tmp_path / "raw", n=2, size=(8, 8), bands=224, dtype="int16")
    plan = _plan(root)
    assert len(plan.spec.bands) == 224 and plan.spec.dtype == "int16"
    assert plan.spec.bands[223].name == "B224"
    assert plan.spec.bands[223].wavelength_nm == pytest.approx(2190.0)
    assert plan.spec.rgb_bands is not None and len(plan.spec.rgb_bands) == 3
    assert plan.load(plan.candidates[1]).arrays["image"].shape == (224, 8, 8)


def test_float64_becomes_float32_and_nan_nodata_is_ignored(tmp_path: Path) -> None:
    root = make_geotiff_folder(tmp_path / "raw", n=1, bands=2, dtype="float64")
    image = _read(root / "images" / "tile_00.tif")
    image[:, 0, 0] = np.nan
    write_image(root / "images" / "tile_00.tif", image, {}, nodata=float("nan"))
    plan = _plan(root)
    assert plan.spec.dtype == "float32"
    sample = plan.load(plan.candidates[0])
    assert sample.arrays["image"].dtype == np.float32
    assert np.isfinite(sample.arrays["image"]).all()
    assert sample.nodata_pixels == 1 and sample.arrays["mask"][0, 0] == 255


def test_a_bad_file_met_mid_run_says_which_rerun_takes_the_option_its_hint_names(
    tmp_path: Path,
) -> None:
    """The line said "pass --nodata nan ...; rerun with --resume once the file is fixed", and
    `--nodata nan --resume` is refused: another option is another plan (review15 M6)."""
    root = make_geotiff_folder(tmp_path / "raw", n=12, bands=2, dtype="float32", size=(32, 32))
    last = root / "images" / "tile_11.tif"
    image = _read(last)
    image[:, 0, 0] = np.nan
    write_image(last, image, _geo(last))
    out = tmp_path / "s.zarr"
    args = ("prepare", "geotiff", root, "--out", out, "--patch-size", "16", "--workers", "1",
            "--val-fraction", "0", "-q")  # fmt: skip
    code, _, stderr = run_cli(*args)
    assert_one_error_line(code, stderr, 3, "pass --nodata nan")
    assert stderr.strip().endswith(
        f"{out} keeps the samples written so far: once the file itself is fixed, rerun the same "
        "command with --resume; with another option or the file left out, rerun with --overwrite"
    )
    assert manifest_of(out)["complete"] is False
    code, _, stderr = run_cli(*args, "--nodata", "nan", "--resume")
    assert_one_error_line(code, stderr, 3, "cannot resume")
    code, _, stderr = run_cli(*args, "--nodata", "nan", "--overwrite")
    assert code == 0, stderr
    assert manifest_of(out)["complete"] is True


def test_nodata_nan_adds_to_a_numeric_tag(tmp_path: Path) -> None:
    """A float file tagged -9999 that holds NaN too: the NaN error's hint, --nodata nan, made
    the -9999 pixels data (the store's minimum became -9999)."""
    root = make_geotiff_folder(tmp_path / "raw", n=1, bands=2, dtype="float32")
    path = root / "images" / "tile_00.tif"
    image = _read(path)
    image[:, 0] = -9999
    image[:, 1] = np.nan
    write_image(path, image, _geo(path), nodata=-9999)
    with pytest.raises(InputDataError, match="NaN is not declared nodata"):
        _plan(root).load(_plan(root).candidates[0])
    plan = _plan(root, nodata=float("nan"))
    sample = plan.load(plan.candidates[0])
    width = image.shape[2]
    assert sample.nodata_pixels == 2 * width
    assert (sample.arrays["mask"][:2] == 255).all() and (sample.arrays["mask"][2:] != 255).all()
    assert float(sample.arrays["image"].min()) > 0


def test_nodata_tags_and_option(tmp_path: Path) -> None:
    root = make_geotiff_folder(tmp_path / "raw", n=1, codes=[1, 2])
    label = _read(root / "masks" / "tile_00.tif", 1)
    label[5, 5] = 0
    write_label(root / "masks" / "tile_00.tif", label, {}, nodata=0)
    image = _read(root / "images" / "tile_00.tif")
    image[:, 3, 4] = 0  # the fixture's values are 1..9999: only this pixel holds 0
    write_image(root / "images" / "tile_00.tif", image, {})
    plan = _plan(root, nodata=0)
    assert [c.code for c in plan.spec.classes] == [1, 2]  # the mask's nodata is no class
    sample = plan.load(plan.candidates[0])
    assert sample.arrays["mask"][5, 5] == 255 and sample.arrays["mask"][3, 4] == 255
    assert sample.nodata_pixels == 2  # the mask's nodata pixel counts too (issue 15)


@pytest.mark.parametrize(
    ("dtype", "one_band_at_the_tag_is"), [("uint8", "a colour"), ("uint16", "nodata")]
)
def test_a_pixel_with_the_tag_in_one_band(
    tmp_path: Path, dtype: str, one_band_at_the_tag_is: str
) -> None:
    """8-bit RGB orthophotos tagged nodata 0 lost every pixel with a 0 in one channel (a deep
    shadow, a saturated blue) to nodata: label 255, colour replaced by the tile's mean. In a
    reflectance cube one band at the tag is still a band's footprint edge: nodata."""
    root = make_geotiff_folder(tmp_path / "raw", n=1, bands=3, codes=[1, 2])
    path = root / "images" / "tile_00.tif"
    image = np.random.default_rng(0).integers(1, 256, size=(3, 24, 20)).astype(dtype)
    image[0, 2, :] = 0  # row 2: red at the tag
    image[:, 5, :] = 0  # row 5: every band at the tag
    write_image(path, image, _geo(path), nodata=0)
    out = tmp_path / "store.zarr"
    code, _, stderr = run_cli("prepare", "geotiff", root, "--out", out, "--val-fraction", "0")
    assert code == 0, stderr
    stored = open_store(out).read(0)
    mask, pixels = stored["mask"][:24, :20], stored["image"][:, :24, :20]
    assert (mask[5] == 255).all() and (mask[[0, 1, 3, 4, 6]] != 255).all()
    if one_band_at_the_tag_is == "a colour":
        assert (mask[2] != 255).all()
        np.testing.assert_array_equal(pixels[:, 2], image[:, 2])
    else:
        assert (mask[2] == 255).all()
        assert (pixels[0, 2] > 0).all()  # filled with the valid pixels' mean
    assert manifest_of(out)["source"]["nodata_pixels"] == 20 * (1 if dtype == "uint8" else 2)


def test_a_rounded_float_nodata_tag_masks_the_lowest_float(tmp_path: Path) -> None:
    # ArcGIS-style exports tag float32 nodata as -3.40282e+38 and fill with -3.4028235e+38
    # (the lowest float32); `==` on the tag misses them, GDAL's mask does not.
    root = make_geotiff_folder(tmp_path / "raw", n=1, bands=2, dtype="float32")
    image = _read(root / "images" / "tile_00.tif")
    image[:, :6, :] = np.finfo(np.float32).min
    write_image(root / "images" / "tile_00.tif", image, {}, nodata=-3.40282e38)
    with rasterio.open(root / "images" / "tile_00.tif") as src:
        assert src.nodata != float(np.finfo(np.float32).min)  # the tag as such files carry it
    plan = _plan(root)
    sample = plan.load(plan.candidates[0])
    assert sample.nodata_pixels == 6 * 20
    assert (sample.arrays["mask"][:6] == 255).all() and (sample.arrays["mask"][6:] != 255).all()
    assert sample.arrays["image"].min() > 0  # filled with the valid pixels' mean


def test_a_float_label_s_rounded_nodata_tag_matches_the_lowest_float(tmp_path: Path) -> None:
    """A float32 label as ArcGIS/QGIS export it (tag -3.40282e+38, pixels -FLT_MAX) failed
    with exit 3 "negative label code -340282346638528859811704183484516925440"."""
    root = make_geotiff_folder(tmp_path / "raw", n=2, codes=[1, 2])
    for mask in sorted((root / "masks").glob("*.tif")):
        label = _read(mask, 1).astype(np.float32)
        label[:4] = np.finfo(np.float32).min
        write_label(mask, label, _geo(mask), nodata=-3.40282e38)
    out = tmp_path / "store.zarr"
    code, _, stderr = run_cli("prepare", "geotiff", root, "--out", out, "--patch-size", "32")
    assert code == 0, stderr
    store = open_store(out)
    for index in range(len(store.source_ids() or [])):
        mask = store.read(index)["mask"]
        assert (mask[:4] == 255).all() and (mask[4:24, :20] != 255).all()
    assert [c["code"] for c in manifest_of(out)["classes"]] == [1, 2]


def test_an_internal_mask_is_nodata_whatever_the_nodata_option(tmp_path: Path) -> None:
    root = make_geotiff_folder(tmp_path / "raw", n=1, codes=[1, 2])
    path = root / "images" / "tile_00.tif"
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "r+") as dst:
        hidden = np.full((dst.height, dst.width), 255, np.uint8)
        hidden[:, :3] = 0
        dst.write_mask(hidden)
    for options in ({}, {"nodata": 0}):
        sample = (plan := _plan(root, **options)).load(plan.candidates[0])
        assert sample.nodata_pixels == 3 * 24, options
        assert (sample.arrays["mask"][:, :3] == 255).all(), options


def test_an_alpha_band_is_the_mask_of_the_others_not_a_band(tmp_path: Path) -> None:
    # An RGBA export beside plain RGB tiles: its fourth band says where the image is valid.
    root = make_geotiff_folder(tmp_path / "raw", n=2, bands=3, codes=[1, 2])
    path = root / "images" / "tile_00.tif"
    rgb = _read(path)
    alpha = np.full(rgb.shape[1:], 255, rgb.dtype)
    alpha[:, :5] = 0
    write_image(path, np.concatenate([rgb, alpha[None]]), _geo(path))
    with rasterio.open(path, "r+") as dst:
        dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
    plan = _plan(root, val_fraction=0.5)  # 1 of 2 files: no note on the split
    assert len(plan.spec.bands) == 3
    assert len(plan.warnings) == 1 and "tile_00.tif" in plan.warnings[0]
    assert "alpha" in plan.warnings[0] and "rio edit-info" in plan.warnings[0]
    sample = plan.load(plan.candidates[0])
    assert sample.arrays["image"].shape[0] == 3
    assert sample.nodata_pixels == 5 * 24
    assert (sample.arrays["mask"][:, :5] == 255).all() and (
        sample.arrays["mask"][:, 5:] != 255
    ).all()
    np.testing.assert_array_equal(sample.arrays["image"][:, :, 5:], rgb[:, :, 5:])


def test_scale_and_offset_tags_give_one_unit_across_tiles(tmp_path: Path) -> None:
    # Two conventions for one reflectance: DN x 1e-4 (offset 0) and (DN - 1000) x 1e-4, as
    # Sentinel-2 L2A before and after 2022; the store must hold the same values for both.
    root = make_geotiff_folder(tmp_path / "raw", n=2, bands=2, codes=[1, 2])
    old, new = root / "images" / "tile_00.tif", root / "images" / "tile_01.tif"
    reflectance_dn = _read(old)
    reflectance_dn[:, 0, 0] = 0  # the tag's nodata: a raw value, matched before scaling
    write_image(old, reflectance_dn, _geo(old), nodata=0)
    shifted_dn = reflectance_dn + 1000
    shifted_dn[:, 0, 0] = 0
    write_image(new, shifted_dn, _geo(new), nodata=0)
    for path, offset in ((old, 0.0), (new, -0.1)):
        with rasterio.open(path, "r+") as dst:
            dst.scales, dst.offsets = (1e-4, 1e-4), (offset, offset)
    plan = _plan(root)
    assert plan.spec.dtype == "float32"
    assert "scale" in plan.spec.details["values"]
    first, second = (plan.load(c) for c in plan.candidates)
    np.testing.assert_allclose(first.arrays["image"], second.arrays["image"], atol=1e-6)
    valid = first.arrays["mask"] != 255
    np.testing.assert_allclose(
        first.arrays["image"][:, valid], reflectance_dn[:, valid] * 1e-4, rtol=1e-6
    )
    assert first.nodata_pixels == second.nodata_pixels == 1


def test_a_scale_on_the_second_phase_alone_is_applied(tmp_path: Path) -> None:
    root = make_geotiff_folder(tmp_path / "raw", task="cd", n=1, bands=2, codes=[0, 1])
    t2 = root / "t2" / "tile_00.tif"
    raw_t2 = _read(t2)
    with rasterio.open(t2, "r+") as dst:
        dst.scales, dst.offsets = (1e-4, 1e-4), (-0.1, -0.1)
    plan = _plan(root)
    assert plan.spec.dtype == "float32"
    sample = plan.load(plan.candidates[0])
    np.testing.assert_allclose(sample.arrays["image_t2"], raw_t2 * 1e-4 - 0.1, rtol=1e-5)
    np.testing.assert_array_equal(sample.arrays["image_t1"], _read(root / "t1" / "tile_00.tif"))


def test_files_without_scale_or_offset_keep_their_values_and_dtype(tmp_path: Path) -> None:
    plan = _plan(make_geotiff_folder(tmp_path / "raw", n=1, bands=2))
    assert plan.spec.dtype == "uint16" and "values" not in plan.spec.details


def test_reads_a_specdm_geotiff_export_back(tmp_path: Path) -> None:
    root = make_geotiff_folder(tmp_path / "export", n=2, codes=[0, 1, 2], bands=2)
    (root / ".specdm" / "written").mkdir(parents=True)
    classes = [ClassInfo(index=i, name=f"c{i}", colour=(i, i, i), code=10 * i) for i in range(3)]
    manifest = Manifest(
        tool_version="0",
        format="geotiff",
        task="ss",
        count=2,
        height=24,
        width=20,
        dtype="uint16",
        arrays=["image", "mask"],
        bands=[Band(name="B01"), Band(name="B02")],
        classes=classes,
        batch_grid=1,
    )
    (root / "manifest.json").write_text(manifest.to_json(), encoding="utf-8")
    plan = _plan(root)
    assert [(c.name, c.code) for c in plan.spec.classes] == [("c0", 0), ("c1", 1), ("c2", 2)]
    assert len(plan.candidates) == 2


def test_foreign_manifest_json_is_ignored(tmp_path: Path) -> None:
    root = make_geotiff_folder(tmp_path / "raw", n=2)
    (root / "manifest.json").write_text('{"made by": "someone else"}', encoding="utf-8")
    assert [c.name for c in _plan(root).spec.classes] == ["class_10", "class_40", "class_100"]


def test_loads_are_thread_safe(tmp_path: Path) -> None:
    root = make_geotiff_folder(tmp_path / "raw", n=3, size=(30, 30), bands=3)
    plan = _plan(root, patch_size=16, overlap=0.5)
    serial = [plan.load(c).arrays["image"] for c in plan.candidates]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = [s.arrays["image"] for s in pool.map(plan.load, plan.candidates)]
    for a, b in zip(serial, threaded, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_files_windows_are_read_through_one_open_dataset_per_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large file is opened once per loading thread, not once per window (each open decoded
    its blocks again), and every dataset is closed when the plan is."""
    from specdm_cli.sources.geotiff import handles

    opened: list[rasterio.io.DatasetReader] = []
    real_open = handles.open_dataset

    def counting_open(path: Path) -> rasterio.io.DatasetReader:
        opened.append(real_open(path))
        return opened[-1]

    root = make_geotiff_folder(tmp_path / "raw", n=2, size=(64, 64), bands=3)
    plan = _plan(root, patch_size=16, overlap=0)
    monkeypatch.setattr(handles, "open_dataset", counting_open)
    per_window = [plan.load(c).arrays for c in plan.candidates]
    assert len(plan.candidates) == 32 and len(opened) == 4  # 2 files x (image, mask)
    with ThreadPoolExecutor(max_workers=2) as pool:
        threaded = list(pool.map(plan.load, plan.candidates))
    assert len(opened) <= 4 + 2 * 4  # at most each thread's own handle of each file
    for serial, other in zip(per_window, threaded, strict=True):
        for name in ("image", "mask"):
            np.testing.assert_array_equal(serial[name], other.arrays[name])
    assert not all(src.closed for src in opened)
    plan.close()
    assert all(src.closed for src in opened)


# --- errors: each names the culprit file -----------------------------------------------------

Breaker = Callable[[Path, Path], Path]  # (root, tmp_path) -> the path the error must name


def _remove_mask(root: Path, _: Path) -> Path:
    (root / "masks" / "tile_01.tif").unlink()
    return root / "masks" / "tile_01.tif"


def _remove_masks_folder(root: Path, _: Path) -> Path:
    for path in (root / "masks").iterdir():
        path.unlink()
    (root / "masks").rmdir()
    return root / "masks"


def _empty_masks_folder(root: Path, _: Path) -> Path:
    for path in (root / "masks").iterdir():
        path.unlink()
    return root / "masks"


def _neither_layout(root: Path, tmp: Path) -> Path:
    (root / "images").rename(tmp / "elsewhere")
    (root / "masks").rename(tmp / "elsewhere_masks")
    (root / "tiles").mkdir()
    return root


def _wrong_band_count(root: Path, _: Path) -> Path:
    path = root / "images" / "tile_02.tif"
    write_image(path, np.ones((4, 24, 20), dtype=np.uint16), {})
    return path


def _wrong_dtype(root: Path, _: Path) -> Path:
    path = root / "images" / "tile_03.tif"
    write_image(path, np.ones((5, 24, 20), dtype=np.float32), {})
    return path


def _mask_size(root: Path, _: Path) -> Path:
    path = root / "masks" / "tile_01.tif"
    write_label(path, np.full((24, 19), 10, dtype=np.uint8), {})
    return path


def _dangling_link(root: Path, _: Path) -> Path:
    """What git-annex and DVC leave before a fetch: 3 of 4 pairs were prepared, exit 0."""
    path = root / "images" / "tile_01.tif"
    path.unlink()
    path.symlink_to(root / ".git" / "annex" / "objects" / "tile_01.tif")
    return path


def _two_band_mask(root: Path, _: Path) -> Path:
    path = root / "masks" / "tile_01.tif"
    codes = _read(path)[0]
    write_image(path, np.stack([codes, codes]), _geo(path))
    return path


def _float_colour_mask(root: Path, _: Path) -> Path:
    path = root / "masks" / "tile_01.tif"
    write_image(path, np.ones((3, 24, 20), np.float32), _geo(path))
    return path


def _corrupt_tiff(root: Path, _: Path) -> Path:
    path = root / "images" / "tile_03.tif"
    path.write_bytes(b"II*\x00garbage" * 10)
    return path


def _one_file_without_crs(root: Path, _: Path) -> Path:
    path = root / "images" / "tile_02.tif"
    write_image(path, _read(path), {})
    write_label(root / "masks" / "tile_02.tif", _read(root / "masks" / "tile_02.tif", 1), {})
    return path


def _mask_in_another_crs(root: Path, _: Path) -> Path:
    path = root / "masks" / "tile_02.tif"
    geo = {"crs": CRS.from_epsg(4326), "transform": from_origin(11.0, 48.0, 1e-4, 1e-4)}
    write_label(path, _read(path, 1), geo)
    return path


def _mask_off_its_image_grid(root: Path, _: Path) -> Path:
    # A mask rasterised over another extent: read pixel for pixel it would label the wrong
    # ground (3 pixels east here).
    path = root / "masks" / "tile_01.tif"
    with rasterio.open(path) as src:
        transform, crs = src.transform, src.crs
    shifted = from_origin(transform.c + 3 * PIXEL_M, transform.f, PIXEL_M, PIXEL_M)
    write_label(path, _read(path, 1), {"crs": crs, "transform": shifted})
    return path


def test_the_rio_warp_a_grid_error_gives_puts_the_mask_on_its_image_s_grid(
    tmp_path: Path,
) -> None:
    """The fix the line gives works as written (rio ships with rasterio; gdalwarp, which it
    named before, is not installed with specdm)."""
    root = make_geotiff_folder(tmp_path / "raw", n=2)
    mask = _mask_off_its_image_grid(root, tmp_path)
    with pytest.raises(InputDataError) as info:
        _plan(root)
    command = re.search(
        r"rio warp (\S+) OUT --like (\S+) --src-nodata 255 --dst-nodata 255", info.value.hint or ""
    )
    assert command is not None and command.groups() == ("masks/tile_01.tif", "images/tile_01.tif")
    warped = tmp_path / "warped.tif"
    rio = Path(sys.executable).parent / "rio"
    subprocess.run([rio, "warp", command[1], warped, "--like", command[2], "--src-nodata", "255",
                    "--dst-nodata", "255"],
                   cwd=root, check=True)  # fmt: skip
    warped.replace(mask)
    plan = _plan(root)
    assert [c.code for c in plan.spec.classes] == [10, 40, 100]  # no class 0 from the warp
    warped_sample = next(c for c in plan.candidates if c.source_id.startswith("tile_01"))
    labels = plan.load(warped_sample).arrays["mask"][:24, :20]
    # The mask lay 3 pixels east: the image's 3 western columns have no label now.
    assert (labels[:, :3] == 255).all() and (labels[:, 3:] != 255).all()


def _bad_classes_json(root: Path, _: Path) -> Path:
    (root / "classes.json").write_text('{"classes": [{"name": "no code"}]}', encoding="utf-8")
    return root / "classes.json"


def _bad_classes_csv(root: Path, _: Path) -> Path:
    (root / "classes.csv").write_text("value,label\n10,water\n", encoding="utf-8")
    return root / "classes.csv"


def _duplicate_class_code(root: Path, _: Path) -> Path:
    (root / "classes.csv").write_text("code,name\n10,a\n10,b\n", encoding="utf-8")
    return root / "classes.csv"


@pytest.mark.parametrize(
    ("breaker", "words"),
    [
        (_remove_mask, "no partner in masks/"),
        (_remove_masks_folder, "folder missing"),
        (_empty_masks_folder, "no raster files"),
        (_neither_layout, "t1/+t2/+change/"),
        (_wrong_band_count, "expected 5 bands, found 4"),
        (_wrong_dtype, "expected dtype uint16, found float32"),
        (_mask_size, "differs from its image"),
        (_two_band_mask, "label file has 2 bands, expected 1"),
        (_dangling_link, "broken link"),
        (_float_colour_mask, "RGB label file holds float32 values"),
        (_corrupt_tiff, "corrupt"),
        (_one_file_without_crs, "CRS none differs from tile_00.tif's EPSG:32632"),
        (_mask_in_another_crs, "differs from its image's EPSG:32632"),
        (_mask_off_its_image_grid, "not on its image's grid"),
        (_bad_classes_json, "bad classes file"),
        (_bad_classes_csv, "columns code and name"),
        (_duplicate_class_code, "listed twice"),
    ],
)
def test_bad_folders_name_the_culprit(tmp_path: Path, breaker: Breaker, words: str) -> None:
    root = make_geotiff_folder(tmp_path / "raw")
    culprit = breaker(root, tmp_path)
    with pytest.raises(InputDataError, match=re.escape(words)) as info:
        _plan(root)
    assert info.value.path == culprit
    assert info.value.hint


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_missing_or_empty_raw_folder(tmp_path: Path, state: str) -> None:
    root = tmp_path / "raw"
    if state == "empty":
        root.mkdir()
    with pytest.raises(InputDataError) as info:
        _plan(root)
    assert info.value.path == root


@pytest.mark.parametrize(
    ("rows", "words"),
    [
        ([("tile_00", "train"), ("tile_09", "val")], "no image has the stem 'tile_09'"),
        ([("tile_00", "training")], "split 'training'"),
        ([("tile_00", "train"), ("tile_01", "val")], "2 file\\(s\\) have no split"),
    ],
)
def test_bad_splits_file(tmp_path: Path, rows: list[tuple[str, str]], words: str) -> None:
    root = make_geotiff_folder(tmp_path / "raw")
    path = _write_splits(tmp_path / "splits.csv", rows)
    with pytest.raises(InputDataError, match=words) as info:
        _plan(root, splits_file=path)
    assert info.value.path == path


def test_a_code_the_classes_file_lacks_is_an_error_before_any_sample(tmp_path: Path) -> None:
    """Found while loading, it left a half-written store after the blocks before it."""
    root = make_geotiff_folder(tmp_path / "raw", n=2, codes=[10, 40])
    legend = tmp_path / "legend.csv"
    legend.write_text("code,name\n10,a\n40,b\n", encoding="utf-8")
    label = _read(root / "masks" / "tile_01.tif", 1)
    label[0, 0] = 100
    write_label(root / "masks" / "tile_01.tif", label, _geo(root / "masks" / "tile_01.tif"))
    with pytest.raises(InputDataError, match=r"label code\(s\) \[100\] not in legend.csv") as info:
        _plan(root, classes_file=legend)
    assert info.value.path == root / "masks" / "tile_01.tif"
    assert "--label-nodata" in (info.value.hint or "")


def test_a_nodata_tag_the_classes_file_declares_a_class_is_read_as_the_class(
    tmp_path: Path,
) -> None:
    """Masks tagged nodata=0 by a tool's habit, with 0 a class of the file: every background
    pixel became 255 and the class vanished, exit 0 and no word."""
    root = make_geotiff_folder(tmp_path / "raw", n=2, codes=[0, 1, 2])
    for path in sorted((root / "masks").glob("*.tif")):
        write_label(path, _read(path, 1), _geo(path), nodata=0)
    legend = tmp_path / "legend.csv"
    legend.write_text("code,name\n0,background\n1,a\n2,b\n", encoding="utf-8")
    plan = _plan(root, classes_file=legend)
    assert any("tag 0 as nodata" in line and "read as the class" in line for line in plan.warnings)
    raw = _read(root / "masks" / "tile_00.tif", 1)
    np.testing.assert_array_equal(plan.load(plan.candidates[0]).arrays["mask"], raw)
    with pytest.raises(UsageError, match=r"--label-nodata 1 is the class 'a' in legend\.csv"):
        _plan(root, classes_file=legend, label_nodata=1.0)


def test_discovered_classes_leave_each_mask_its_own_nodata_tag(tmp_path: Path) -> None:
    """Only a classes file's codes outrank a tag: a code discovered in another mask does not
    (tile_00 tags 0 as nodata, tile_01 uses 0 as a class)."""
    root = make_geotiff_folder(tmp_path / "raw", n=2, codes=[0, 1, 2])
    tagged = root / "masks" / "tile_00.tif"
    write_label(tagged, _read(tagged, 1), _geo(tagged), nodata=0)
    plan = _plan(root)
    assert [c.code for c in plan.spec.classes] == [0, 1, 2]
    loaded = {c.source_id: plan.load(c).arrays["mask"] for c in plan.candidates}
    first, second = (loaded[k] for k in sorted(loaded))
    raw_first, raw_second = _read(tagged, 1), _read(root / "masks" / "tile_01.tif", 1)
    np.testing.assert_array_equal(first, np.where(raw_first == 0, 255, raw_first))
    np.testing.assert_array_equal(second, raw_second)


@pytest.mark.parametrize(
    ("tag", "option"), [(None, float("nan")), (float("inf"), None), (float("nan"), None)]
)
def test_nan_and_inf_nodata_with_a_classes_file_are_not_codes(
    tmp_path: Path, tag: float | None, option: float | None
) -> None:
    root = make_geotiff_folder(tmp_path / "raw", n=1, codes=[1, 2])
    mask = root / "masks" / "tile_00.tif"
    label = _read(mask, 1).astype(np.float32)
    label[0, :2] = np.nan if option is not None or tag != tag else np.inf
    write_label(mask, label, _geo(mask), **({"nodata": tag} if tag is not None else {}))
    legend = tmp_path / "legend.csv"
    legend.write_text("code,name\n1,a\n2,b\n", encoding="utf-8")
    plan = _plan(root, classes_file=legend, label_nodata=option)
    assert (plan.load(plan.candidates[0]).arrays["mask"][0, :2] == 255).all()


def test_a_discovered_code_that_is_the_dtype_maximum_is_noted(tmp_path: Path) -> None:
    root = make_geotiff_folder(tmp_path / "raw", n=1, codes=[1, 2, 65535])
    assert any("--label-nodata 65535" in line for line in _plan(root).warnings)
    assert not any("--label-nodata" in line for line in _plan(root, label_nodata=65535.0).warnings)


def test_missing_classes_file_is_an_error(tmp_path: Path) -> None:
    root = make_geotiff_folder(tmp_path / "raw", n=1)
    with pytest.raises(InputDataError, match="classes file not found") as info:
        _plan(root, classes_file=tmp_path / "nope.json")
    assert info.value.path == tmp_path / "nope.json"
