"""`prepare geotiff` on the files real folders hold: JPEG images, companions of ENVI data,
names in two Unicode forms, custom CRSs spelled two ways, and thousands of tiles."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.crs import CRS
from rasterio.transform import from_origin

from specdm_cli.sources.geotiff.headers import lossy_compression
from specdm_cli.stores import open_store
from tests.conftest import run_cli
from tests.fault_tools import assert_one_error_line
from tests.fixtures.geotiff_folder import make_geotiff_folder, write_image, write_label
from tests.fixtures.real_layouts import images_to_envi


def _rgb(seed: int, size: int = 16) -> np.ndarray:
    # Values 1..254: no pixel is blank or 255.
    return np.random.default_rng(seed).integers(1, 255, (size, size, 3), dtype=np.uint8)


def _codes(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).choice(np.array([1, 2], np.uint8), (size, size))


def _prepare(raw: Path, out: Path, *extra: str) -> tuple[int, str]:
    code, _, stderr = run_cli("prepare", "geotiff", raw, "--out", out, "-q", *extra)
    return code, stderr


def _folders(root: Path) -> tuple[Path, Path]:
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    return images, masks


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".JPG"])
def test_jpeg_images_pair_with_png_masks(tmp_path: Path, suffix: str) -> None:
    """DeepGlobe's layout: JPEG satellite images, PNG masks; one image saved as .jpeg among
    PNG ones pairs as well."""
    images, masks = _folders(tmp_path / "raw")
    for i, stem in enumerate(["a", "b"]):
        image = images / f"{stem}{suffix if stem == 'a' else '.png'}"
        Image.fromarray(_rgb(i)).save(image, quality=95)  # PNG ignores the quality
        Image.fromarray(_codes(i)).save(masks / f"{stem}.png")
    code, stderr = _prepare(tmp_path / "raw", tmp_path / "s.zarr", "--patch-size", "16")
    assert code == 0, stderr
    store = open_store(tmp_path / "s.zarr")
    assert sorted(store.source_ids() or []) == ["a", "b"]
    assert store.manifest.dtype == "uint8" and len(store.manifest.bands) == 3


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg"])
def test_a_jpeg_mask_is_refused_as_lossy(tmp_path: Path, suffix: str) -> None:
    images, masks = _folders(tmp_path / "raw")
    Image.fromarray(_rgb(0)).save(images / "a.png")
    Image.fromarray(_codes(0)).save(masks / f"a{suffix}")
    code, stderr = _prepare(tmp_path / "raw", tmp_path / "s.zarr")
    assert_one_error_line(code, stderr, 3, f"({masks / f'a{suffix}'})")
    assert "lossy" in stderr and "PNG or GeoTIFF" in stderr
    assert not (tmp_path / "s.zarr").exists()


def _rewrite_masks(raw: Path, driver: str, suffix: str, **options: object) -> list[Path]:
    """Every mask of a made folder rewritten with `driver` and creation `options`."""
    written = []
    for tif in sorted((raw / "masks").glob("*.tif")):
        with rasterio.open(tif) as src:
            codes = src.read(1)
            profile = {key: src.profile[key] for key in ("count", "dtype", "height", "width")}
            profile.update(crs=src.crs, transform=src.transform, driver=driver, **options)
        tif.unlink()
        with rasterio.open(tif.with_suffix(suffix), "w", **profile) as dst:
            dst.write(codes, 1)
        written.append(tif.with_suffix(suffix))
    return written


@pytest.mark.parametrize(
    ("driver", "suffix", "options", "said"),
    [
        ("GTiff", ".tif", {"compress": "jpeg"}, "JPEG-compressed"),
        ("GTiff", ".tif", {"compress": "lerc", "max_z_error": 3}, "LERC-compressed"),
        ("GTiff", ".tif", {"compress": "lerc_deflate", "max_z_error": 3}, "LERC-compressed"),
        ("GTiff", ".tif", {"compress": "lerc_zstd", "max_z_error": 3}, "LERC-compressed"),
        ("JP2OpenJPEG", ".jp2", {}, "compressed with loss (JP2OpenJPEG)"),
    ],
)
def test_a_mask_compressed_with_loss_is_refused(
    tmp_path: Path, driver: str, suffix: str, options: dict[str, object], said: str
) -> None:
    """A JPEG-in-TIFF or default JPEG 2000 mask prepared with exit 0 and a class gone (the
    codes change along edges; review15 H1): only the `.jpg` extension was refused."""
    raw = make_geotiff_folder(tmp_path / "raw", n=2, size=(32, 32))
    first = _rewrite_masks(raw, driver, suffix, **options)[0]
    code, stderr = _prepare(raw, tmp_path / "s.zarr", "--patch-size", "32")
    assert_one_error_line(code, stderr, 3, f"the mask is {said}")
    assert f"({first})" in stderr and "compressing this file again keeps its damage" in stderr
    assert not (tmp_path / "s.zarr").exists()


def test_a_colour_mask_in_ycbcr_jpeg_reads_as_lossy(tmp_path: Path) -> None:
    """GDAL names RGB JPEG-in-TIFF `YCbCr JPEG`: the check for `JPEG` alone let it through to
    "add these colours to --classes", JPEG's artefacts as classes (review16)."""
    path = tmp_path / "m.tif"
    profile = {"driver": "GTiff", "height": 16, "width": 16, "count": 3, "dtype": "uint8"}
    with rasterio.open(path, "w", **profile, compress="jpeg", photometric="ycbcr") as dst:
        dst.write(np.stack([_codes(0) * 100] * 3))
    with rasterio.open(path) as src:
        assert src.tags(ns="IMAGE_STRUCTURE")["COMPRESSION"] == "YCbCr JPEG"
        assert lossy_compression(src) == "JPEG-compressed: its class codes change along edges"


def test_a_mask_in_lossless_jpeg_2000_keeps_its_codes(tmp_path: Path) -> None:
    raw = make_geotiff_folder(tmp_path / "raw", n=2, size=(32, 32))
    _rewrite_masks(raw, "JP2OpenJPEG", ".jp2", QUALITY=100, REVERSIBLE="YES")
    code, stderr = _prepare(raw, tmp_path / "s.zarr", "--patch-size", "32", "--val-fraction", "0")
    assert code == 0, stderr
    store = open_store(tmp_path / "s.zarr")
    assert [c.code for c in store.manifest.classes] == [10, 40, 100]
    masks = [store.read(i)["mask"] for i in store.indices("train")]
    assert {int(v) for mask in masks for v in np.unique(mask)} == {0, 1, 2}


def _list_bad_bands(data: Path, flags: str) -> None:
    """Add a bad band list (`bbl = {1, 0, ...}`, 0 = bad) to the ENVI header of `data`."""
    header = data.with_suffix(".hdr")
    header.write_text(header.read_text() + f"bbl = {{{flags}}}\n")


def _prepare_16(raw: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli("prepare", "geotiff", raw, "--out", out, "--patch-size", "16",
                   "--val-fraction", "0", *extra)  # fmt: skip


def test_bands_an_envi_header_marks_bad_are_left_out_with_a_note(tmp_path: Path) -> None:
    """The header's bad band list (bbl) was not read: the store kept band 4, or a band of fill
    stopped the run asking for --bands (review15 L6). --bands still chooses."""
    raw = make_geotiff_folder(tmp_path / "raw", n=2, size=(16, 16))
    for data in images_to_envi(raw, ".img"):
        _list_bad_bands(data, "1, 1, 1, 0, 1")
    code, _, stderr = _prepare_16(raw, tmp_path / "s.zarr")
    assert code == 0, stderr
    assert "note: left out band 4, which the ENVI header of tile_00.img marks bad" in stderr
    store = open_store(tmp_path / "s.zarr")
    assert [band.name for band in store.manifest.bands] == [f"B0{i}" for i in (1, 2, 3, 5)]
    code, stderr = _prepare(raw, tmp_path / "t.zarr", "--patch-size", "16", "--val-fraction", "0",
                            "--bands", "1-5")  # fmt: skip
    assert code == 0, stderr
    assert len(open_store(tmp_path / "t.zarr").manifest.bands) == 5


def test_envi_headers_that_mark_other_bands_bad_are_refused(tmp_path: Path) -> None:
    """Only the first file's bad band list (bbl) was read: a band another header marks bad was
    stored from that file, and one the first marks bad was left out of every file."""
    raw = make_geotiff_folder(tmp_path / "raw", n=2, size=(16, 16))
    marked = ("1, 1, 1, 0, 1", "1, 0, 1, 1, 1")
    for data, flags in zip(images_to_envi(raw, ".img"), marked, strict=True):
        _list_bad_bands(data, flags)
    out = tmp_path / "s.zarr"
    code, _, stderr = _prepare_16(raw, out)
    said = "the bad bands its ENVI header lists (bbl) are 2, images/tile_00.img's 4"
    assert_one_error_line(code, stderr, 3, said)
    assert "tile_01.img" in stderr and not out.exists()
    code, stderr = _prepare(raw, out, "--patch-size", "16", "--val-fraction", "0", "--bands", "1-5")
    assert code == 0, stderr


def test_the_phases_of_a_cd_pair_must_list_one_set_of_bad_bands(tmp_path: Path) -> None:
    """The pair's lists were merged, and a refusal or note named the t1 file for a band its
    t2 partner's header marked (review18 M3)."""
    raw = make_geotiff_folder(tmp_path / "raw", task="cd", n=2, size=(16, 16))
    for folder, flags in (("t1", "1, 1, 1, 0, 1"), ("t2", "1, 0, 1, 0, 1")):
        for data in images_to_envi(raw, ".img", folder):
            _list_bad_bands(data, flags)
    out = tmp_path / "s.zarr"
    code, _, stderr = _prepare_16(raw, out)
    said = "the bad bands its ENVI header lists (bbl) are 2, 4, t1/tile_00.img's 4"
    assert_one_error_line(code, stderr, 3, said)
    assert f"({raw / 't2' / 'tile_00.img'})" in stderr and not out.exists()
    code, _, stderr = _prepare_16(raw, out, "--bands", "1-5")  # --bands chooses: lists unread
    assert code == 0, stderr


def test_envi_data_beside_its_camera_s_notes_and_logs_is_read(tmp_path: Path) -> None:
    """`t.raw` + `t.hdr` beside `t.log` and `t.txt`: "two files share the stem 't'"."""
    raw = make_geotiff_folder(tmp_path / "raw", n=2)
    images_to_envi(raw, ".raw")
    for end in (".txt", ".log", ".csv", ".json", ".xml", ".md", ".html", ".pdf"):
        (raw / "images" / f"tile_00{end}").write_text("integration time 12 ms\n")
    code, stderr = _prepare(raw, tmp_path / "s.zarr", "--val-fraction", "0")
    assert code == 0, stderr
    assert sorted(open_store(tmp_path / "s.zarr").source_ids() or []) == ["tile_00", "tile_01"]


def test_two_rasters_of_one_stem_are_both_named(tmp_path: Path) -> None:
    """An ENVI cube beside its PNG quicklook: the line named only one of them."""
    images, masks = _folders(tmp_path / "raw")
    Image.fromarray(_rgb(0)).save(images / "t.png")
    Image.fromarray(_rgb(0)).save(images / "t.tif")
    Image.fromarray(_codes(0)).save(masks / "t.png")
    code, stderr = _prepare(tmp_path / "raw", tmp_path / "s.zarr")
    assert_one_error_line(code, stderr, 3, "t.png and t.tif share the stem 't'")
    assert "keep one" in stderr


def test_names_in_either_unicode_form_pair_and_take_their_split(tmp_path: Path) -> None:
    """An image named on macOS (NFD) and its mask named on Linux (NFC) were "Zürich.tif has no
    partner in masks/"; a splits file may spell the stem either way."""
    images, masks = _folders(tmp_path / "raw")
    for i, name in enumerate(["Zürich", "Köln"]):
        Image.fromarray(_rgb(i)).save(images / f"{unicodedata.normalize('NFD', name)}.png")
        Image.fromarray(_codes(i)).save(masks / f"{unicodedata.normalize('NFC', name)}.png")
    splits = tmp_path / "splits.csv"
    rows = [f"{unicodedata.normalize('NFD', 'Zürich')}.png,val", "images/Köln.png,train"]
    splits.write_text("\n".join(["stem,split", *rows]) + "\n", encoding="utf-8")
    code, stderr = _prepare(tmp_path / "raw", tmp_path / "s.zarr", "--splits", str(splits))
    assert code == 0, stderr
    store = open_store(tmp_path / "s.zarr")
    ids = store.source_ids() or []
    assert sorted(ids) == sorted(unicodedata.normalize("NFC", n) for n in ["Zürich", "Köln"])
    assert (
        dict(zip(ids, store.splits(), strict=True))[unicodedata.normalize("NFC", "Zürich")] == "val"
    )


_LAEA = "+proj=laea +lat_0=52 +lon_0=10 +x_0=0 +y_0=0 +ellps=GRS80 +units=m +no_defs"


def _esri(crs: CRS) -> CRS:
    """The CRS as ArcGIS writes it (ESRI WKT): the same CRS, other text."""
    return CRS.from_wkt(crs.to_wkt(version="WKT1_ESRI"))


def _custom_crs_folder(root: Path, mask_crs: CRS, second_image_crs: CRS) -> Path:
    """Two tiles in a CRS without an EPSG code, written from its PROJ string; the masks, and
    the second image, in `mask_crs` and `second_image_crs`."""
    root = make_geotiff_folder(root, n=2)
    for i, stem in enumerate(["tile_00", "tile_01"]):
        geo = {"transform": from_origin(1000 + 1000 * i, 2000, 10, 10)}
        image, mask = root / "images" / f"{stem}.tif", root / "masks" / f"{stem}.tif"
        write_image(
            image, _pixels(image), {**geo, "crs": [CRS.from_proj4(_LAEA), second_image_crs][i]}
        )
        write_label(mask, _pixels(mask)[0], {**geo, "crs": mask_crs})
    return root


def _pixels(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return np.asarray(src.read())


def test_one_custom_crs_spelled_two_ways_is_one_crs(tmp_path: Path) -> None:
    """A PROJ-string image and its ESRI-WKT mask were "CRS 'unknown' (WKT) differs from its
    image's 'unknown' (WKT)"; tiles spelled both ways are one CRS, so bounds are kept."""
    esri = _esri(CRS.from_proj4(_LAEA))
    raw = _custom_crs_folder(tmp_path / "raw", mask_crs=esri, second_image_crs=esri)
    code, stderr = _prepare(raw, tmp_path / "s.zarr", "--val-fraction", "0")
    assert code == 0, stderr
    manifest = open_store(tmp_path / "s.zarr").manifest
    assert manifest.crs is not None and CRS.from_user_input(manifest.crs) == CRS.from_proj4(_LAEA)


def test_two_custom_crss_are_told_apart_in_the_error(tmp_path: Path) -> None:
    other = CRS.from_proj4(_LAEA.replace("+lon_0=10", "+lon_0=11"))
    raw = _custom_crs_folder(tmp_path / "raw", mask_crs=_esri(other), second_image_crs=other)
    code, stderr = _prepare(raw, tmp_path / "s.zarr")
    mask = raw / "masks" / "tile_00.tif"
    assert_one_error_line(code, stderr, 3, f"({mask})")
    assert "+lon_0=11" in stderr and "+lon_0=10" in stderr and "unknown" not in stderr


@pytest.mark.parametrize("classes_file", [None, "csv"])
def test_planning_reports_headers_and_mask_scans_as_it_goes(
    tmp_path: Path, classes_file: str | None
) -> None:
    """2,000 tiles planned for ~30 s without a line: each file's header, then each mask's scan
    (discovering classes, or checking a classes file's), now shows on the stage's progress."""
    raw = make_geotiff_folder(tmp_path / "raw", n=100, size=(8, 8), classes_file=classes_file)
    code, _, stderr = run_cli("prepare", "geotiff", raw, "--out", tmp_path / "out.zarr")
    assert code == 0, stderr
    headers = stderr.index("prepare: reading headers 100/100 (100%)")
    assert stderr.index("prepare: scanning masks 100/100 (100%)") > headers
    # A small folder plans in a blink: no such lines (its errors stay one line).
    small = make_geotiff_folder(tmp_path / "small", n=99, size=(8, 8))
    code, _, stderr = run_cli("prepare", "geotiff", small, "--out", tmp_path / "small.zarr")
    assert code == 0 and "reading headers" not in stderr and "scanning masks" not in stderr
