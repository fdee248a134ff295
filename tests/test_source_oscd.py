"""The OSCD reader on tiny raw trees in the real layout: folders, zips, labels, splits, errors."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import tifffile
from affine import Affine
from PIL import Image

from specdm_cli.errors import InputDataError, reason_of
from specdm_cli.sources.base import PrepareOptions, RawSample, SourcePlan
from specdm_cli.sources.oscd import pixels as oscd_pixels
from specdm_cli.sources.oscd import read_oscd
from specdm_cli.sources.sentinel2 import S2_TEN_BANDS
from specdm_cli.stores import open_store
from tests.conftest import manifest_of, run_cli
from tests.fixtures.oscd import (
    BANDS,
    IMAGES,
    TEST_LABELS,
    TRAIN_LABELS,
    make_oscd,
    oscd_city,
    rezip_with_backslashes,
)

SMALL = PrepareOptions(patch_size=16, overlap=0.5)
SIZES = {"aguasclaras": (40, 48), "bercy": (36, 44), "brasilia": (30, 38)}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """make_oscd(**kwargs), written once per module and kwargs: read it, never edit it."""
    made: dict[str, Path] = {}

    def build(**kwargs: Any) -> Path:
        key = repr(sorted(kwargs.items()))
        if key not in made:
            made[key] = make_oscd(tmp_path_factory.mktemp("oscd"), **kwargs)
        return made[key]

    return build


@pytest.fixture
def raw(tree: Callable[..., Path], tmp_path: Path) -> Path:
    """An editable default tree: hard links to the shared one, so edits go through `_fresh`."""
    return Path(shutil.copytree(tree(), tmp_path / "raw", copy_function=os.link))


def _fresh(path: Path) -> Path:
    """Unlink `path` before it is rewritten: writing into a hard link would edit the shared tree."""
    path.unlink(missing_ok=True)
    return path


def _load_all(plan: SourcePlan) -> dict[str, RawSample]:
    return {c.source_id: plan.load(c) for c in plan.candidates}


def _city_samples(plan: SourcePlan, city: str) -> list[tuple[int, int, RawSample]]:
    return [(c.ref[1], c.ref[2], plan.load(c)) for c in plan.candidates if c.ref[0] == city]


def _band_file(root: Path, city: str, phase: int, band: str) -> Path:
    return root / IMAGES / city / f"imgs_{phase}_rect" / f"{band}.tif"


def _error(root: Path, options: PrepareOptions = SMALL) -> InputDataError:
    """The error of opening `root` and loading every sample; it must carry a hint."""
    with pytest.raises(InputDataError) as info:
        _load_all(read_oscd(root, options))
    assert info.value.hint
    return info.value


def test_default_spec_ten_bands_and_hand_counted_windows(tree: Callable[..., Path]) -> None:
    plan = read_oscd(tree(), SMALL)
    spec = plan.spec
    assert (spec.dataset, spec.task, spec.dtype, spec.height, spec.width) == (
        "oscd",
        "cd",
        "uint16",
        16,
        16,
    )
    assert [b.name for b in spec.bands] == list(S2_TEN_BANDS)
    assert spec.rgb_bands == ["B04", "B03", "B02"]
    assert [(c.index, c.name, c.code) for c in spec.classes] == [
        (0, "no change", "0 in cm.png, 1 in <city>-cm.tif"),
        (1, "change", "non-zero in cm.png, 2 in <city>-cm.tif"),
    ]
    assert spec.crs is None
    # Stride 8: aguasclaras 40x48 -> 4 x 5, bercy 36x44 -> 4 x 5, brasilia 30x38 -> 3 x 4.
    assert len(plan.candidates) == 20 + 20 + 12
    first = plan.candidates[0]
    assert first.source_id == f"{first.ref[0]}/y0_x0" and first.ref[1:] == (0, 0)
    sample = plan.load(first)
    assert sample.arrays["image_t1"].shape == (10, 16, 16)
    assert sample.arrays["image_t1"].dtype == np.uint16
    assert sample.arrays["change"].dtype == np.uint8
    assert sample.bounds is None


def test_windows_cover_every_pixel_of_every_city(tree: Callable[..., Path]) -> None:
    plan = read_oscd(tree(), SMALL)
    for city, (height, width) in SIZES.items():
        covered = np.zeros((height, width), dtype=bool)
        for c in plan.candidates:
            if c.ref[0] == city:
                covered[c.ref[1] : c.ref[1] + 16, c.ref[2] : c.ref[2] + 16] = True
        assert covered.all(), city


def test_samples_hold_the_file_values_and_the_change_map(tree: Callable[..., Path]) -> None:
    plan = read_oscd(tree(), SMALL)
    t1, t2, change = oscd_city("bercy", *SIZES["bercy"])
    order = [BANDS.index(b) for b in S2_TEN_BANDS]
    for y, x, sample in _city_samples(plan, "bercy"):
        window = np.s_[y : y + 16, x : x + 16]
        np.testing.assert_array_equal(sample.arrays["image_t1"], t1[order][(slice(None), *window)])
        np.testing.assert_array_equal(sample.arrays["image_t2"], t2[order][(slice(None), *window)])
        np.testing.assert_array_equal(sample.arrays["change"], change[window].astype(np.uint8))
        assert sample.nodata_pixels == 0
    # The fixture's maps hold change (a few percent), so the label test can fail.
    assert 0 < change.mean() < 0.2


def test_folders_and_zips_give_identical_samples(tree: Callable[..., Path]) -> None:
    raw, zipped = tree(), tree(zipped=True)
    assert sorted(p.name for p in zipped.iterdir()) == sorted(
        f"{s}.zip" for s in (IMAGES, TRAIN_LABELS, TEST_LABELS)
    )
    from_dirs, from_zips = read_oscd(raw, SMALL), read_oscd(zipped, SMALL)
    assert from_dirs.candidates == from_zips.candidates
    assert from_dirs.spec.details == from_zips.spec.details
    dirs, zips = _load_all(from_dirs), _load_all(from_zips)
    for source_id, sample in dirs.items():
        for name, array in sample.arrays.items():
            np.testing.assert_array_equal(array, zips[source_id].arrays[name])


def test_folders_extracted_one_level_too_deep_read_alike(raw: Path, tmp_path: Path) -> None:
    # Windows' "Extract All" of X.zip makes X/X/...: the archive names were taken for cities.
    nested = tmp_path / "nested"
    for stem in (IMAGES, TRAIN_LABELS, TEST_LABELS):
        shutil.copytree(raw / stem, nested / stem / stem, copy_function=os.link)
    _assert_read_alike(raw, nested)


def _assert_read_alike(raw: Path, other: Path) -> None:
    """`other` gives the samples of the default tree `raw`, array for array."""
    flat, found = _load_all(read_oscd(raw, SMALL)), _load_all(read_oscd(other, SMALL))
    assert sorted(found) == sorted(flat) and len(flat) > 0
    for source_id, sample in flat.items():
        for name, array in sample.arrays.items():
            np.testing.assert_array_equal(found[source_id].arrays[name], array, err_msg=name)


def _merged(raw: Path, images: Path, stems: tuple[str, ...] = (TRAIN_LABELS, TEST_LABELS)) -> Path:
    """SpectralGPT's layout: each city's cm/ of the label folders `stems` copied into its image
    folder."""
    shutil.copytree(raw / IMAGES, images, copy_function=os.link)
    for stem in stems:
        for city in (raw / stem).iterdir():
            shutil.copytree(city / "cm", images / city.name / "cm", copy_function=os.link)
    return images


@pytest.mark.parametrize("given", ["parent", "images"])
def test_change_maps_merged_into_the_city_folders_read_alike(
    raw: Path, tmp_path: Path, given: str
) -> None:
    images = _merged(raw, tmp_path / "merged" / IMAGES)
    given_root = images.parent if given == "parent" else images
    assert "SpectralGPT" in read_oscd(given_root, SMALL).spec.details["label_layout"]
    _assert_read_alike(raw, given_root)


def test_train_maps_merged_beside_a_test_labels_folder_read_alike(
    raw: Path, tmp_path: Path
) -> None:
    images = _merged(raw, tmp_path / "mixed" / IMAGES, (TRAIN_LABELS,))
    shutil.copytree(raw / TEST_LABELS, images.parent / TEST_LABELS, copy_function=os.link)
    _assert_read_alike(raw, images.parent)


def test_merged_change_maps_without_city_lists_is_an_error(raw: Path, tmp_path: Path) -> None:
    images = _merged(raw, tmp_path / "merged" / IMAGES)
    for name in ("train.txt", "test.txt"):
        (images / name).unlink()
    err = _error(images.parent)
    assert "no train.txt or test.txt" in str(err) and err.path == images / "train.txt"


@pytest.mark.parametrize("zipped", [False, True])
def test_cities_from_label_folders_when_txt_is_missing(
    tree: Callable[..., Path], zipped: bool
) -> None:
    root = tree(zipped=zipped, with_txt=False)
    plan = read_oscd(root, PrepareOptions(patch_size=16, val_fraction=0))
    cities = plan.spec.details["cities"]
    assert cities == {"train": ["aguasclaras", "bercy"], "val": [], "test": ["brasilia"]}


def test_city_lists_in_utf16_are_read_and_undecodable_ones_named(raw: Path) -> None:
    _fresh(raw / IMAGES / "train.txt").write_text("bercy,aguasclaras\n", encoding="utf-16")
    options = PrepareOptions(patch_size=16, overlap=0.5, val_fraction=0)
    cities = read_oscd(raw, options).spec.details["cities"]
    assert cities["train"] == ["bercy", "aguasclaras"]
    _fresh(raw / IMAGES / "train.txt").write_bytes(b"bercy,\xff\xfeaguas\n")
    assert _error(raw).path == raw / IMAGES / "train.txt"


def test_txt_wins_over_label_folders(raw: Path) -> None:
    _fresh(raw / IMAGES / "train.txt").write_text("bercy\n")
    cities = read_oscd(raw, SMALL).spec.details["cities"]
    assert cities == {"train": ["bercy"], "val": [], "test": ["brasilia"]}


def test_rgba_change_map_ignores_alpha(tree: Callable[..., Path]) -> None:
    root = tree(rgba_city="bercy", tif_labels_only="brasilia")
    with Image.open(root / TRAIN_LABELS / "bercy" / "cm" / "cm.png") as img:
        assert img.mode == "RGBA"
    _, _, change = oscd_city("bercy", *SIZES["bercy"])
    for y, x, sample in _city_samples(read_oscd(root, SMALL), "bercy"):
        expected = change[y : y + 16, x : x + 16].astype(np.uint8)
        np.testing.assert_array_equal(sample.arrays["change"], expected)


@pytest.mark.parametrize(("value", "name"), [(1, "no change"), (2, "change")])
def test_label_nodata_naming_a_tif_class_is_a_usage_error(
    tree: Callable[..., Path], tmp_path: Path, value: int, name: str
) -> None:
    """`--label-nodata 1` on `<city>-cm.tif` labels turned every "no change" pixel into 255
    with exit 0 and a note (review15 M5); cm.png's 0 was refused, the tif's codes were not."""
    root = tree(tif_labels_only="brasilia")
    out = tmp_path / "s.zarr"
    code, _, stderr = run_cli("prepare", "oscd", root, "--out", out, "--patch-size", "16",
                              "--label-nodata", str(value), "-q")  # fmt: skip
    said = f"--label-nodata {value} is the class '{name}' in "
    assert code == 2 and said in _error_line(stderr) and "-cm.tif" in _error_line(stderr)
    assert not out.exists()


def test_tif_labels_two_means_change(tree: Callable[..., Path]) -> None:
    root = tree(rgba_city="bercy", tif_labels_only="brasilia")
    assert not (root / TEST_LABELS / "brasilia" / "cm" / "cm.png").exists()
    plan = read_oscd(root, SMALL)
    assert plan.spec.details["label_source"]["brasilia"] == "cm/brasilia-cm.tif"
    assert plan.spec.details["label_source"]["bercy"] == "cm/cm.png"
    _, _, change = oscd_city("brasilia", *SIZES["brasilia"])
    for y, x, sample in _city_samples(plan, "brasilia"):
        expected = change[y : y + 16, x : x + 16].astype(np.uint8)
        np.testing.assert_array_equal(sample.arrays["change"], expected)


def test_cm_png_is_preferred_over_the_tif(raw: Path) -> None:
    tif = raw / TRAIN_LABELS / "bercy" / "cm" / "bercy-cm.tif"
    tifffile.imwrite(_fresh(tif), np.full(SIZES["bercy"], 2, dtype=np.uint8))
    samples = _city_samples(read_oscd(raw, SMALL), "bercy")
    assert not all(sample.arrays["change"].all() for _, _, sample in samples)


def test_city_smaller_than_a_patch_is_padded_as_nodata(tree: Callable[..., Path]) -> None:
    root = tree(cities={"tiny": ("train", 10, 12), "other": ("test", 20, 20)})
    plan = read_oscd(root, PrepareOptions(patch_size=16, val_fraction=0))
    tiny = [c for c in plan.candidates if c.ref[0] == "tiny"]
    assert [c.source_id for c in tiny] == ["tiny/y0_x0"]
    sample = plan.load(tiny[0])
    change = sample.arrays["change"]
    assert change.shape == (16, 16)
    assert (change[10:] == 255).all() and (change[:, 12:] == 255).all()
    assert (change[:10, :12] != 255).all()
    assert sample.nodata_pixels == 16 * 16 - 10 * 12
    image = sample.arrays["image_t1"]
    assert image.shape == (10, 16, 16)
    means = image[:, :10, :12].reshape(10, -1).mean(axis=1).astype(np.uint16)
    np.testing.assert_array_equal(image[:, 15, 15], means)


def test_a_city_smaller_than_half_a_patch_is_kept_in_the_store(
    tree: Callable[..., Path], tmp_path: Path
) -> None:
    """Padding is not blank land: a 6 x 8 city (under a fifth of the 16 x 16 patch) is kept,
    where `--max-blank` counted its padding and dropped it."""
    root = tree(cities={"tiny": ("train", 6, 8), "other": ("test", 20, 20)})
    code, _, stderr = _prepare(root, "--out", tmp_path / "o.zarr", "--val-fraction", "0")
    assert code == 0, stderr
    assert "tiny/y0_x0" in (open_store(tmp_path / "o.zarr").source_ids() or [])


def test_bands_option_picks_and_orders_bands(tree: Callable[..., Path]) -> None:
    raw = tree()
    bands = ("B8A", "B01", "B04")
    plan = read_oscd(raw, PrepareOptions(patch_size=16, overlap=0.5, bands=bands))
    assert [b.name for b in plan.spec.bands] == list(bands)
    assert plan.spec.details["bands"] == list(bands)
    assert plan.spec.rgb_bands is None
    t1, _, _ = oscd_city("bercy", *SIZES["bercy"])
    y, x, sample = _city_samples(plan, "bercy")[-1]
    expected = t1[[BANDS.index(b) for b in bands], y : y + 16, x : x + 16]
    np.testing.assert_array_equal(sample.arrays["image_t1"], expected)


@pytest.mark.parametrize(("band", "factor"), [("B05", 2), ("B01", 6)])
def test_coarse_bands_are_resampled_bilinearly_onto_the_10m_grid(
    tree: Callable[..., Path], band: str, factor: int
) -> None:
    raw = tree(coarse_rect_city="aguasclaras")
    height, width = SIZES["aguasclaras"]
    coarse = tifffile.imread(_band_file(raw, "aguasclaras", 1, band))
    assert coarse.shape == (-(-height // factor), -(-width // factor))
    plan = read_oscd(raw, PrepareOptions(patch_size=64, bands=(band, "B02")))
    ((_, _, sample),) = _city_samples(plan, "aguasclaras")
    got = sample.arrays["image_t1"][0, :height, :width].astype(np.float64)
    truth = oscd_city("aguasclaras", height, width)[0][BANDS.index(band)].astype(np.float64)
    nearest = np.repeat(np.repeat(coarse, factor, 0), factor, 1)[:height, :width]
    # Bilinear: within the coarse range, closer to the 10 m truth than blocky nearest.
    assert coarse.min() <= got.min() and got.max() <= coarse.max()
    assert np.abs(got - truth).mean() < np.abs(nearest - truth).mean()
    assert len(np.unique(got)) > coarse.size
    assert (sample.arrays["change"][height:] == 255).all()


def test_val_is_carved_from_train_by_city_deterministically(
    tree: Callable[..., Path],
) -> None:
    cities = {f"c{i}": ("train", 12, 14) for i in range(5)} | {"t": ("test", 12, 14)}
    root = tree(cities=cities)

    def split_of(seed: int, fraction: float = 0.4) -> dict[str, list[str]]:
        options = PrepareOptions(patch_size=8, overlap=0.5, val_fraction=fraction, seed=seed)
        plan = read_oscd(root, options)
        found: dict[str, set[str]] = {}
        for c in plan.candidates:
            found.setdefault(c.ref[0], set()).add(c.split)
        assert all(len(splits) == 1 for splits in found.values())  # no city in two splits
        by_split = plan.spec.details["cities"]
        assert {city: splits.pop() for city, splits in found.items()} == {
            city: split for split, names in by_split.items() for city in names
        }
        assert plan.spec.details["val_from"] == "train cities, by city"
        return dict(by_split)

    first = split_of(seed=3)
    assert len(first["val"]) == 2 and len(first["train"]) == 3 and first["test"] == ["t"]
    assert split_of(seed=3) == first
    assert len({tuple(split_of(seed)["val"]) for seed in range(6)}) > 1
    assert split_of(seed=0, fraction=0.0)["val"] == []
    assert len(split_of(seed=0, fraction=0.01)["val"]) == 1  # at least one city


def test_dates_are_kept_as_strings_and_missing_is_none(raw: Path) -> None:
    (raw / IMAGES / "brasilia" / "dates.txt").unlink()
    dates = read_oscd(raw, SMALL).spec.details["dates"]
    assert dates["bercy"] == {"date_1": "20161130", "date_2": "20170829"}
    assert dates["brasilia"] is None


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_nodata_tag_of_one_phase_ignores_the_label_there(raw: Path) -> None:
    path = _band_file(raw, "bercy", 2, "B02")
    band = tifffile.imread(path)
    band[:4, :5] = 0
    profile = {"driver": "GTiff", "count": 1, "dtype": "uint16", "nodata": 0}
    with rasterio.open(_fresh(path), "w", height=36, width=44, **profile) as dst:
        dst.write(band, 1)
    (y, x, sample), *_ = _city_samples(read_oscd(raw, SMALL), "bercy")
    assert (y, x) == (0, 0)
    assert sample.nodata_pixels == 20
    assert (sample.arrays["change"][:4, :5] == 255).all()
    assert (sample.arrays["change"][4:] != 255).all()
    assert (sample.arrays["image_t2"][:, :4, :5] != 0).all()  # replaced by the valid mean


@pytest.mark.parametrize("declared", ["option", "tag"])
def test_declared_nan_in_a_float_band_is_nodata(raw: Path, declared: str) -> None:
    # A band re-saved as float32 with NaN holes: NaN declared nodata (--nodata nan, or the
    # file's NaN tag) marks those pixels; it was refused as values that do not fit uint16.
    path = _band_file(raw, "bercy", 1, "B03")
    band = tifffile.imread(path).astype(np.float32)
    band[:3, :6] = np.nan
    profile = {"driver": "GTiff", "count": 1, "dtype": "float32", "height": 36, "width": 44}
    tag = {"nodata": float("nan")} if declared == "tag" else {}
    with rasterio.open(_fresh(path), "w", **profile, **tag) as dst:
        dst.write(band, 1)
    options = PrepareOptions(
        patch_size=16, overlap=0.5, nodata=float("nan") if declared == "option" else None
    )
    (y, x, sample), *_ = _city_samples(read_oscd(raw, options), "bercy")
    assert (y, x) == (0, 0) and sample.nodata_pixels == 18
    assert (sample.arrays["change"][:3, :6] == 255).all()
    assert (sample.arrays["change"][3:] != 255).all()
    assert (sample.arrays["image_t1"][:, :3, :6] != 0).all()  # replaced by the valid mean


def _rewrite_band(path: Path, band: np.ndarray, **profile: Any) -> None:
    height, width = band.shape
    with rasterio.open(
        _fresh(path), "w", driver="GTiff", count=1, height=height, width=width,
        dtype=band.dtype.name, **profile,
    ) as dst:  # fmt: skip
        dst.write(band, 1)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_a_nodata_value_uint16_cannot_hold_is_nodata_not_a_range_error(raw: Path) -> None:
    """An int16 band tagged -9999 (a common GDAL export): the tag marks the pixels; the check
    that values fit uint16 refused it."""
    path = _band_file(raw, "bercy", 1, "B03")
    band = tifffile.imread(path).astype(np.int16)
    band[:3, :6] = -9999
    _rewrite_band(path, band, nodata=-9999)
    (y, x, sample), *_ = _city_samples(read_oscd(raw, SMALL), "bercy")
    assert (y, x) == (0, 0) and sample.nodata_pixels == 18
    assert (sample.arrays["change"][:3, :6] == 255).all()
    assert (sample.arrays["change"][3:] != 255).all()


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
@pytest.mark.parametrize("case", ["nan undeclared", "reflectance 0-1"])
def test_float_bands_oscd_does_not_hold_are_told_with_their_fix(raw: Path, case: str) -> None:
    path = _band_file(raw, "bercy", 1, "B03")
    band = tifffile.imread(path).astype(np.float32)
    if case == "nan undeclared":
        band[:3, :6] = np.nan
    else:  # rounded to uint16 it was 0s and 1s: the city removed as blank, exit 0
        band /= 10000
    _rewrite_band(path, band)
    error = _error(raw)
    assert error.path == path
    assert ("--nodata nan" if case == "nan undeclared" else "by 10000") in error.hint


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
@pytest.mark.parametrize("case", ["shifted", "another CRS, phase 1 not georeferenced"])
def test_a_band_off_its_citys_georeferenced_grid_is_refused(raw: Path, case: str) -> None:
    """Phase 2's B04 shifted by three pixels: stacked as it was, every pixel was misplaced. Where
    phase 1's B02 carries no georeference, phase 2's is the grid (no band was checked)."""
    transform = Affine(10, 0, 100000, 0, -10, 200000)
    for phase in (1, 2):
        for band_name in ("B02", "B04"):
            path = _band_file(raw, "bercy", phase, band_name)
            if case != "shifted" and phase == 1:
                continue  # left as the fixture wrote it: no CRS, no transform
            odd = band_name == "B04" and phase == 2
            shifted = transform * Affine.translation(3, 0) if odd else transform
            crs = "EPSG:32632" if odd and case != "shifted" else "EPSG:32631"
            _rewrite_band(
                path, tifffile.imread(path), crs=crs,
                transform=shifted if case == "shifted" else transform,
            )  # fmt: skip
    error = _error(raw)
    assert (
        error.path == _band_file(raw, "bercy", 2, "B04") and "off its city's grid" in error.message
    )


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
@pytest.mark.parametrize("damage", ["empty", "no grid's size"])
def test_a_broken_band_of_the_last_city_is_told_before_any_sample_is_written(
    raw: Path, tmp_path: Path, damage: str
) -> None:
    """Planning read only B02's header: an empty (or odd-sized) B8A of the last city was found
    after every other city was written, leaving an incomplete store (review15 M4)."""
    last = read_oscd(raw, SMALL).candidates[-1].ref[0]
    band = _band_file(raw, last, 2, "B8A")
    if damage == "empty":
        _fresh(band).write_bytes(b"")
    else:
        _rewrite_band(band, np.ones((7, 5), np.uint16))
    out = tmp_path / "s.zarr"
    code, _, stderr = run_cli("prepare", "oscd", raw, "--out", out, "--patch-size", "16",
                              "--workers", "1", "-q")  # fmt: skip
    assert code == 3 and f"({band})" in _error_line(stderr)
    assert f"leave {last} out: --cities" in _error_line(stderr)
    assert not out.exists()


def test_label_nodata_applies_to_the_tif_change_map(
    tree: Callable[..., Path], tmp_path: Path
) -> None:
    """`<city>-cm.tif` holding 0 is an unknown code, and the error points at --label-nodata:
    that option must then do what it says."""
    root = Path(shutil.copytree(tree(tif_labels_only="brasilia"), tmp_path / "raw"))
    tif = root / TEST_LABELS / "brasilia" / "cm" / "brasilia-cm.tif"
    codes = tifffile.imread(tif)
    codes[:2, :3] = 0
    tifffile.imwrite(_fresh(tif), codes)
    assert "--label-nodata" in _error(root).hint
    plan = read_oscd(root, PrepareOptions(patch_size=16, overlap=0.5, label_nodata=0))
    (sample,) = [s for y, x, s in _city_samples(plan, "brasilia") if (y, x) == (0, 0)]
    assert (sample.arrays["change"][:2, :3] == 255).all()
    assert (sample.arrays["change"][2:] != 255).all()
    # Counted in source.nodata_pixels, as the README says (they were not, for OSCD).
    assert sample.nodata_pixels == 6


def test_a_tif_change_map_s_nodata_tag_reads_as_255(
    tree: Callable[..., Path], tmp_path: Path
) -> None:
    """`<city>-cm.tif` tagged nodata 0 (as the README says, the tag is read like
    --label-nodata) failed with exit 3 "unknown label code(s) [0]"."""
    root = Path(shutil.copytree(tree(tif_labels_only="brasilia"), tmp_path / "raw"))
    tif = root / TEST_LABELS / "brasilia" / "cm" / "brasilia-cm.tif"
    codes = tifffile.imread(tif)
    codes[:2, :3] = 0
    with rasterio.open(
        _fresh(tif), "w", driver="GTiff", height=codes.shape[0], width=codes.shape[1],
        count=1, dtype="uint8", nodata=0,
    ) as dst:  # fmt: skip
        dst.write(codes, 1)
    out = tmp_path / "store.zarr"
    code, _, stderr = run_cli(
        "prepare", "oscd", root, "--out", out, "--patch-size", "16", "--val-fraction", "0", "-q"
    )
    assert code == 0, stderr
    plan = read_oscd(root, SMALL)
    (sample,) = [s for y, x, s in _city_samples(plan, "brasilia") if (y, x) == (0, 0)]
    assert (sample.arrays["change"][:2, :3] == 255).all()
    assert (sample.arrays["change"][2:] != 255).all()


def test_label_nodata_applies_to_cm_png_and_prefers_the_tif(raw: Path, tmp_path: Path) -> None:
    """--label-nodata was ignored, without a word, where a city's change map is cm.png. Now
    the tif is read where a city has one (the option's value is in its codes); a cm.png alone
    takes the value as a grey level, and 0 ("no change" there) is refused with exit 2."""
    png = raw / TEST_LABELS / "brasilia" / "cm" / "cm.png"
    _fresh(raw / TEST_LABELS / "brasilia" / "cm" / "brasilia-cm.tif")
    grey = np.asarray(Image.open(png)).copy()
    grey[:2, :3] = 128  # a hand-drawn "unknown" patch
    Image.fromarray(grey).save(_fresh(png))
    out = tmp_path / "store.zarr"
    code, _, stderr = run_cli(
        "prepare", "oscd", raw, "--out", out, "--patch-size", "16", "--val-fraction", "0",
        "--label-nodata", "128", "-q",
    )  # fmt: skip
    assert code == 0, stderr
    plan = read_oscd(raw, PrepareOptions(patch_size=16, overlap=0.5, label_nodata=128))
    assert plan.spec.details["label_source"]["bercy"] == "cm/bercy-cm.tif"
    (sample,) = [s for y, x, s in _city_samples(plan, "brasilia") if (y, x) == (0, 0)]
    assert (sample.arrays["change"][:2, :3] == 255).all()
    assert (sample.arrays["change"][2:] != 255).all()
    code, _, stderr = run_cli(
        "prepare", "oscd", raw, "--out", tmp_path / "zero.zarr", "--label-nodata", "0", "-q"
    )
    said = "--label-nodata 0 is the class 'no change' in brasilia/cm/cm.png"
    assert code == 2 and said in _error_line(stderr) and not (tmp_path / "zero.zarr").exists()
    # 255 is how an 8-bit cm.png holds change: as nodata it emptied the class (review16 M2).
    code, _, stderr = run_cli(
        "prepare", "oscd", raw, "--out", tmp_path / "full.zarr", "--label-nodata", "255", "-q"
    )
    said = "--label-nodata 255 is the class 'change' in brasilia/cm/cm.png"
    assert code == 2 and said in _error_line(stderr) and not (tmp_path / "full.zarr").exists()


def test_georeferenced_rect_files_give_crs_and_bounds(raw: Path) -> None:
    for city, (height, width) in SIZES.items():
        for phase in (1, 2):
            path = _band_file(raw, city, phase, "B02")
            band = tifffile.imread(path)
            profile = {"driver": "GTiff", "count": 1, "dtype": "uint16", "crs": "EPSG:32723"}
            transform = Affine(10, 0, 100000, 0, -10, 200000)
            with rasterio.open(
                _fresh(path), "w", height=height, width=width, transform=transform, **profile
            ) as dst:
                dst.write(band, 1)
    plan = read_oscd(raw, SMALL)
    assert plan.spec.crs == "EPSG:32723"
    (candidate,) = [c for c in plan.candidates if c.source_id == "bercy/y8_x16"]
    assert plan.load(candidate).bounds == (100160.0, 199760.0, 100320.0, 199920.0)


def test_each_city_is_read_once_when_loaded_in_order(
    tree: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    original = oscd_pixels._read_city

    def counting(ctx: Any, city: Any) -> Any:
        reads.append(city.name)
        return original(ctx, city)

    monkeypatch.setattr(oscd_pixels, "_read_city", counting)
    _load_all(read_oscd(tree(), SMALL))
    assert sorted(reads) == sorted(SIZES)


def test_thread_pool_loads_equal_sequential_loads(tree: Callable[..., Path]) -> None:
    raw = tree()
    plan = read_oscd(raw, PrepareOptions(patch_size=8, overlap=0.5))
    sequential = _load_all(read_oscd(raw, PrepareOptions(patch_size=8, overlap=0.5)))
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(plan.load, plan.candidates))
    for sample in parallel:
        for name, array in sample.arrays.items():
            np.testing.assert_array_equal(array, sequential[sample.source_id].arrays[name])


# Each error case: (edit the tree, the path the error must name relative to the raw folder).
def _drop(rel: str) -> Callable[[Path], object]:
    def edit(root: Path) -> None:
        target = root / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return edit


def _garbage(rel: str) -> Callable[[Path], object]:
    return lambda root: _fresh(root / rel).write_bytes(b"not an image at all" * 10)


def _resize_tif(rel: str, shape: tuple[int, int]) -> Callable[[Path], object]:
    return lambda root: tifffile.imwrite(_fresh(root / rel), np.ones(shape, dtype=np.uint16))


def _list_extra_city(root: Path) -> None:
    _fresh(root / IMAGES / "train.txt").write_text("aguasclaras,bercy,paris\n")


BERCY = f"{IMAGES}/bercy"
ERROR_CASES = {
    "images folder missing": (_drop(IMAGES), IMAGES),
    "train labels missing": (_drop(TRAIN_LABELS), TRAIN_LABELS),
    "listed city without images": (_list_extra_city, f"{IMAGES}/paris"),
    "city without change map": (_drop(f"{TRAIN_LABELS}/bercy/cm"), f"{TRAIN_LABELS}/bercy/cm"),
    "missing band file": (_drop(f"{BERCY}/imgs_2_rect/B05.tif"), f"{BERCY}/imgs_2_rect/B05.tif"),
    "phases of different size": (
        _resize_tif(f"{BERCY}/imgs_2_rect/B02.tif", (36, 40)),
        f"{BERCY}/imgs_2_rect/B02.tif",
    ),
    "band on no S2 grid": (
        _resize_tif(f"{BERCY}/imgs_1_rect/B05.tif", (36, 10)),
        f"{BERCY}/imgs_1_rect/B05.tif",
    ),
    "label size differs": (
        lambda root: Image.new("L", (10, 10)).save(_fresh(root / TRAIN_LABELS / "bercy/cm/cm.png")),
        f"{TRAIN_LABELS}/bercy/cm/cm.png",
    ),
    "corrupt band": (_garbage(f"{BERCY}/imgs_1_rect/B03.tif"), f"{BERCY}/imgs_1_rect/B03.tif"),
    "corrupt grid band": (_garbage(f"{BERCY}/imgs_1_rect/B02.tif"), f"{BERCY}/imgs_1_rect/B02.tif"),
    "corrupt png": (_garbage(f"{TRAIN_LABELS}/bercy/cm/cm.png"), f"{TRAIN_LABELS}/bercy/cm/cm.png"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_broken_trees_raise_input_errors_naming_the_culprit(raw: Path, case: str) -> None:
    edit, culprit = ERROR_CASES[case]
    edit(raw)
    assert _error(raw).path == raw / culprit


@pytest.mark.parametrize("rel", [f"{BERCY}/imgs_1_rect/B03.tif", f"{BERCY}/imgs_2_rect/B02.tif"])
def test_a_bad_band_s_hint_leaves_its_city_out_as_written(
    raw: Path, tmp_path: Path, rel: str
) -> None:
    """Met while planning (B02's header) or mid-run (another band's pixels): removing the file
    alone, then rerunning, says it is missing; the line now gives the --cities that leaves the
    city out, and that rerun prepares the others."""
    _garbage(rel)(raw)
    out = tmp_path / "o.zarr"
    code, _, stderr = _prepare(raw, "--out", out)
    assert code == 3
    line = _error_line(stderr)
    assert f"({raw / rel})" in line and "or leave bercy out: --cities aguasclaras,brasilia" in line
    code, stdout, stderr = _prepare(
        raw, "--out", out, "--cities", "aguasclaras,brasilia", "--overwrite"
    )
    assert code == 0, stderr
    assert json.loads(stdout)["split_counts"]["test"] > 0


def test_zips_with_backslash_names_read_as_the_folders(
    tree: Callable[..., Path], tmp_path: Path
) -> None:
    """Zips of PowerShell 5's Compress-Archive (`bercy\\imgs_1_rect\\B01.tif`) were "no OSCD
    cities found"."""
    root = Path(shutil.copytree(tree(zipped=True), tmp_path / "raw"))
    rezip_with_backslashes(root)
    code, _, stderr = run_cli(
        "prepare", "oscd", root, "--out", tmp_path / "o.zarr", "--patch-size", "16",
        "--val-fraction", "0", "-q",
    )  # fmt: skip
    assert code == 0, stderr
    from_dirs, from_zips = read_oscd(tree(), SMALL), read_oscd(root, SMALL)
    assert from_dirs.candidates == from_zips.candidates
    dirs, zips = _load_all(from_dirs), _load_all(from_zips)
    for source_id, sample in dirs.items():
        for name, array in sample.arrays.items():
            np.testing.assert_array_equal(array, zips[source_id].arrays[name])


def test_corrupt_member_of_a_zip_is_named_inside_the_zip(raw: Path, tmp_path: Path) -> None:
    _fresh(raw / BERCY / "imgs_1_rect" / "B03.tif").write_bytes(b"garbage" * 20)
    root = tmp_path / "zipped"
    for stem in (IMAGES, TRAIN_LABELS, TEST_LABELS):
        shutil.make_archive(str(root / stem), "zip", raw, stem)
    error = _error(root)
    assert error.path == root / f"{IMAGES}.zip" / BERCY / "imgs_1_rect" / "B03.tif"


def test_corrupt_zip_is_named(tree: Callable[..., Path], tmp_path: Path) -> None:
    root = Path(shutil.copytree(tree(zipped=True), tmp_path / "raw", copy_function=os.link))
    _fresh(root / f"{TRAIN_LABELS}.zip").write_bytes(b"PK truncated")
    error = _error(root)
    assert error.path == root / f"{TRAIN_LABELS}.zip"
    # A zip is re-downloaded, not "re-extracted from the OSCD archive": it is that archive.
    assert error.hint == "re-download the zip (OSCD's zips are read in place)"


def test_a_band_missing_from_a_zip_asks_for_the_zip_not_a_re_extraction(
    raw: Path, tmp_path: Path
) -> None:
    _band_file(raw, "bercy", 1, "B04").unlink()
    root = tmp_path / "zipped"
    for stem in (IMAGES, TRAIN_LABELS, TEST_LABELS):
        shutil.make_archive(str(root / stem), "zip", raw, stem)
    error = _error(root)
    assert error.path == root / f"{IMAGES}.zip" / BERCY / "imgs_1_rect" / "B04.tif"
    assert error.hint is not None and error.hint.startswith("re-download the zip")


@pytest.mark.parametrize("inside", ["own folders", "images folder"])
def test_zips_extracted_one_level_down_are_found(raw: Path, tmp_path: Path, inside: str) -> None:
    """`unzip X.zip -d images` (or the label zips into the Images folder) put each top folder
    one level down: "OSCD folder (or its .zip) is missing", naming neither."""
    deeper = tmp_path / "deeper"
    folders = {IMAGES: "images", TRAIN_LABELS: "train", TEST_LABELS: "test"}
    if inside == "images folder":
        folders = {IMAGES: "", TRAIN_LABELS: IMAGES, TEST_LABELS: IMAGES}
    for stem, folder in folders.items():
        shutil.copytree(raw / stem, deeper / folder / stem, copy_function=os.link)
    _assert_read_alike(raw, deeper)


def test_a_partial_images_folder_beside_its_whole_zip_is_named_with_the_fix(
    raw: Path, tmp_path: Path
) -> None:
    """An interrupted unzip: the partial folder was read, and the hint said to drop the train
    city it lacks (--cities), never naming the whole zip beside it."""
    root = tmp_path / "partial"
    for stem in (IMAGES, TRAIN_LABELS, TEST_LABELS):
        shutil.make_archive(str(root / stem), "zip", raw, stem)
    shutil.copytree(raw / IMAGES, root / IMAGES, copy_function=os.link)
    shutil.rmtree(root / IMAGES / "bercy")
    code, _, stderr = _prepare(root, "--out", tmp_path / "o.zarr")
    assert code == 3
    line = _error_line(stderr)
    assert f"{IMAGES}.zip beside it" in line and "move the folder away to read the zip" in line
    assert "--cities" not in line
    (root / IMAGES).rename(tmp_path / "moved away")
    _assert_read_alike(raw, root)
    shutil.copytree(raw / TRAIN_LABELS, root / TRAIN_LABELS, copy_function=os.link)
    shutil.rmtree(root / TRAIN_LABELS / "bercy")  # the same of the Train Labels
    code, _, stderr = _prepare(root, "--out", tmp_path / "o.zarr")
    assert code == 3 and f"{TRAIN_LABELS}.zip beside it" in _error_line(stderr)


@pytest.mark.parametrize("kind", ["deflate64", "encrypted"])
def test_a_zip_python_cannot_decode_asks_for_the_extracted_folder(
    tree: Callable[..., Path], tmp_path: Path, kind: str
) -> None:
    root = Path(shutil.copytree(tree(zipped=True), tmp_path / "raw"))
    archive = root / f"{IMAGES}.zip"
    _mark_every_member(archive, kind)
    error = _error(root)
    assert error.path == archive and "extracted folder" in error.hint
    assert ("not supported" if kind == "deflate64" else "encrypted") in error.message


def _mark_every_member(archive: Path, kind: str) -> None:
    """Rewrite each member's headers as 7-Zip writes a Deflate64 (method 9) or an encrypted
    (flag bit 0) member; the bytes after them stay as they were."""
    data = bytearray(archive.read_bytes())
    # Offsets of the method and the flags in a local header (PK\3\4) and a central one (PK\1\2).
    for signature, flags, method in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        start = data.find(signature)
        while start >= 0:
            if kind == "deflate64":
                data[start + method : start + method + 2] = (9).to_bytes(2, "little")
            else:
                data[start + flags] |= 1
            start = data.find(signature, start + 4)
    archive.write_bytes(bytes(data))


def test_an_empty_band_file_says_gdal_s_reason_not_its_path_twice(
    raw: Path, tmp_path: Path
) -> None:
    """GDAL puts the file first ("'/long/path/B04.tif' not recognized as ..."): cut at 120
    characters, the reason was lost behind a path the line names anyway."""
    band = _fresh(_band_file(raw, "bercy", 1, "B04"))
    band.write_bytes(b"")
    code, _, stderr = run_cli(
        "prepare", "oscd", raw, "--out", tmp_path / "o.zarr", "--patch-size", "16", "-q"
    )
    (line,) = stderr.strip().splitlines()
    assert code == 3 and line.count(str(band)) == 1
    assert "(not recognized as being in a supported file format.)" in line


@pytest.mark.parametrize(
    ("gdal", "reason"),
    [
        ("4f0c1b2e-9bb9-445c-92b1-6ecff99f7f25.tif: TIFFReadDirectory:Failed", "TIFFReadDirectory"),
        ("/data/S2/B02.jp2: No such file or directory", "/data/S2/B02.jp2: No such"),
    ],
)
def test_gdal_s_name_of_a_zip_member_goes_that_of_another_file_stays(
    gdal: str, reason: str
) -> None:
    """A zip member is read in memory, under a uuid name that tells the user nothing; a VRT's
    missing band file is the reason itself."""
    assert reason_of(OSError(gdal), "bercy/imgs_1_rect/B04.tif").startswith(reason)


def test_missing_and_empty_raw_folders(tmp_path: Path) -> None:
    assert _error(tmp_path / "nowhere").path == tmp_path / "nowhere"
    (tmp_path / "empty").mkdir()
    assert _error(tmp_path / "empty").path == tmp_path / "empty"


def test_city_in_both_train_and_test_is_an_error(raw: Path) -> None:
    _fresh(raw / IMAGES / "test.txt").write_text("brasilia,bercy\n")
    assert "both train and test" in _error(raw).message


@pytest.mark.parametrize("bands", [("B02", "B13"), ("B02", "B02"), ()])
def test_bad_band_lists_are_errors(tree: Callable[..., Path], bands: tuple[str, ...]) -> None:
    error = _error(tree(), PrepareOptions(bands=bands))
    assert "B13" in error.message if "B13" in bands else "band list" in error.message


# --- partial and variant downloads (issue 15) --------------------------------------------------


def _prepare(*args: str | Path) -> tuple[int, str, str]:
    """The real CLI without --quiet, so warnings reach stderr."""
    code, stdout, stderr = run_cli("prepare", "oscd", *args, "--patch-size", "16", "--json")
    return code, stdout, stderr


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


def _error_line(stderr: str) -> str:
    """The one error line (the progress bar's line is the only other one)."""
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in stderr
    return line


def test_images_and_train_labels_only_skip_test_cities_with_one_warning(
    raw: Path, tmp_path: Path
) -> None:
    shutil.rmtree(raw / TEST_LABELS)
    code, stdout, stderr = _prepare(raw, "--out", tmp_path / "o.zarr", "--val-fraction", "0")
    assert code == 0, stderr
    (line,) = _warnings(stderr)
    assert "brasilia" in line and TEST_LABELS in line
    assert set(json.loads(stdout)["split_counts"]) == {"train"}
    assert json.loads(stdout)["warnings"] == [line]


def test_a_store_that_skipped_test_cities_says_so_once_test_labels_are_added(
    raw: Path, tmp_path: Path
) -> None:
    """Adding the Test Labels as the warning says, then --resume, was "already complete"
    (exit 0) and the store still lacked test; a plain rerun asked for --resume. Now the
    manifest records the skipped cities, and either rerun is refused with --overwrite."""
    labels = raw / TEST_LABELS
    labels.rename(tmp_path / "later")
    out = tmp_path / "o.zarr"
    code, _, stderr = _prepare(raw, "--out", out, "--val-fraction", "0")
    assert code == 0, stderr
    (part,) = manifest_of(out)["source"]["details"]["left_out"]  # type: ignore[index]
    assert part["part"] == "test cities brasilia"
    assert str(labels.absolute()) in part["restored_by"]
    (tmp_path / "later").rename(labels)
    for rerun in (["--resume"], []):
        code, _, stderr = _prepare(raw, "--out", out, "--val-fraction", "0", *rerun)
        assert code == 3, stderr
        line = _error_line(stderr)
        assert "left out test cities brasilia" in line and str(labels.absolute()) in line
        assert line.endswith("rerun with --overwrite to prepare the whole dataset")
    code, stdout, stderr = _prepare(raw, "--out", out, "--val-fraction", "0", "--overwrite")
    assert code == 0, stderr
    assert set(json.loads(stdout)["split_counts"]) == {"train", "test"}
    assert "left_out" not in manifest_of(out)["source"]["details"]  # type: ignore[operator]


def test_quiet_still_tells_of_test_cities_left_out(raw: Path, tmp_path: Path) -> None:
    """With -q the run exited 0 and printed nothing: --quiet silences progress, not data
    left out."""
    shutil.rmtree(raw / TEST_LABELS)
    out = tmp_path / "o.zarr"
    code, _, stderr = run_cli("prepare", "oscd", raw, "--out", out, "--patch-size", "16", "-q")
    assert code == 0, stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith("warning: skipping 1 test cities") and "brasilia" in line
    (part,) = manifest_of(out)["source"]["details"]["left_out"]  # type: ignore[index]
    assert part["part"] == "test cities brasilia"


def test_cities_option_needs_no_test_labels_and_warns_of_nothing(raw: Path, tmp_path: Path) -> None:
    shutil.rmtree(raw / TEST_LABELS)
    code, _, stderr = _prepare(
        raw, "--out", tmp_path / "o.zarr", "--cities", "aguasclaras", "--val-fraction", "0"
    )
    assert code == 0, stderr
    assert _warnings(stderr) == []
    assert manifest_of(tmp_path / "o.zarr")["source"]["details"]["cities"] == {  # type: ignore[index]
        "train": ["aguasclaras"],
        "val": [],
        "test": [],
    }


def test_a_train_city_s_change_map_missing_from_its_labels_asks_to_re_extract_it(
    raw: Path, tmp_path: Path
) -> None:
    """The Train Labels folder is there: "add '... Train Labels' to RAW" did not fit."""
    shutil.rmtree(raw / TRAIN_LABELS / "bercy" / "cm")
    code, _, stderr = _prepare(raw, "--out", tmp_path / "o.zarr")
    assert code == 3
    line = _error_line(stderr)
    assert f"({raw / TRAIN_LABELS / 'bercy' / 'cm'})" in line
    assert f"re-extract their cm/ folders from '{TRAIN_LABELS}'" in line and "add '" not in line


def test_a_test_city_asked_for_without_labels_is_an_error(raw: Path, tmp_path: Path) -> None:
    shutil.rmtree(raw / TEST_LABELS)
    code, _, stderr = _prepare(raw, "--out", tmp_path / "o.zarr", "--cities", "bercy,brasilia")
    assert code == 3
    line = _error_line(stderr)
    assert "brasilia" in line and TEST_LABELS in line and "--cities" in line


def test_absent_listed_cities_are_one_error_listing_all_and_cities_continues(
    raw: Path, tmp_path: Path
) -> None:
    _fresh(raw / IMAGES / "train.txt").write_text("aguasclaras,bercy,paris,nantes\n")
    code, _, stderr = _prepare(raw, "--out", tmp_path / "o.zarr")
    assert code == 3
    line = _error_line(stderr)
    assert "paris, nantes" in line
    assert "--cities aguasclaras,bercy,brasilia" in line
    chosen = "aguasclaras,bercy,brasilia"
    code, stdout, stderr = _prepare(raw, "--out", tmp_path / "o.zarr", "--cities", chosen)
    assert code == 0, stderr
    assert json.loads(stdout)["count"] > 0


def test_a_city_folder_in_another_case_than_the_list_is_named_with_the_rename(
    raw: Path, tmp_path: Path
) -> None:
    """`Bercy/` where train.txt lists `bercy`: the hint was `--cities` without bercy, leaving
    out data the user has (review15 L2)."""
    (raw / IMAGES / "bercy").rename(raw / IMAGES / "Bercy")
    code, _, stderr = _prepare(raw, "--out", tmp_path / "o.zarr")
    assert code == 3
    assert _error_line(stderr).endswith(
        "the folders are named in another case than the city list: rename Bercy/ to bercy/"
    )


def test_unknown_city_in_cities_option_lists_the_known_ones(raw: Path, tmp_path: Path) -> None:
    code, _, stderr = _prepare(raw, "--out", tmp_path / "o.zarr", "--cities", "bercy,rome")
    assert code == 3
    assert "rome" in _error_line(stderr)
    assert "choose among aguasclaras, bercy, brasilia" in stderr


def test_band_files_missing_from_rect_are_read_from_the_native_folder(
    tree: Callable[..., Path], raw: Path
) -> None:
    missing = {(1, "B02"), (1, "B8A"), (2, "B05")}
    for phase, band in missing:
        _band_file(raw, "aguasclaras", phase, band).unlink()
    plan = read_oscd(raw, PrepareOptions(patch_size=16, overlap=0.5, val_fraction=0))
    (line,) = plan.warnings
    assert "3 band files" in line and "aguasclaras" in line and "imgs_1/" in line
    native = plan.spec.details["non_rectified_band_files"]
    assert any(rel.endswith("_B8A.tif") and "/imgs_1/" in rel for rel in native)
    # imgs_N/ holds the 20 m / 60 m bands at native size: read from there they equal the rect
    # bands of a tree whose rect bands were left that coarse; the other bands are the rect ones.
    options = PrepareOptions(patch_size=16, overlap=0.5)
    rect = _load_all(read_oscd(tree(), options))
    coarse = _load_all(read_oscd(tree(coarse_rect_city="aguasclaras"), options))
    for source_id, sample in _load_all(plan).items():
        np.testing.assert_array_equal(sample.arrays["change"], rect[source_id].arrays["change"])
        for phase, name in ((1, "image_t1"), (2, "image_t2")):
            for index, band in enumerate(S2_TEN_BANDS):
                source = coarse if (phase, band) in missing else rect
                expected = source[source_id].arrays[name][index]
                np.testing.assert_array_equal(sample.arrays[name][index], expected, err_msg=band)


def test_band_files_named_in_another_case_are_read(tree: Callable[..., Path], raw: Path) -> None:
    """`B02.TIF` (FAT and Windows copies), `B8a.tif` and `B2.tif` (re-exported unpadded) were
    "band file is missing": the file was there. They are read as SegMunich's `1.TIF` is, with
    the same pixels."""
    folder = raw / IMAGES / "bercy" / "imgs_1_rect"
    for path in list(folder.iterdir()):
        path.rename(path.with_suffix(".TIF"))
    _band_file(raw, "bercy", 2, "B8A").rename(_band_file(raw, "bercy", 2, "B8a"))
    for path in (raw / IMAGES / "aguasclaras" / "imgs_2_rect").glob("B0?.tif"):
        path.rename(path.with_name(path.name.replace("B0", "B")))  # B2.tif (review15 L3)
    # A user's copy beside a band is no band file (review17: "B02 twice" once padding was read).
    shutil.copy(
        _band_file(raw, "bercy", 2, "B02"), folder.parent / "imgs_2_rect" / "Copy of B02.tif"
    )
    expected = _load_all(read_oscd(tree(), SMALL))
    loaded = _load_all(read_oscd(raw, SMALL))
    assert loaded.keys() == expected.keys()
    for source_id, sample in loaded.items():
        for name, array in sample.arrays.items():
            np.testing.assert_array_equal(array, expected[source_id].arrays[name], err_msg=name)


def test_a_band_file_twice_in_names_differing_by_case_is_refused_naming_both(raw: Path) -> None:
    band = _band_file(raw, "bercy", 1, "B04")
    shutil.copy(band, band.with_suffix(".TIF"))
    err = _error(raw)
    assert "B04.TIF, B04.tif" in err.message and err.path is not None
    assert err.path.parent == band.parent


def test_band_missing_from_both_folders_still_names_the_rect_file(raw: Path) -> None:
    _band_file(raw, "aguasclaras", 1, "B03").unlink()
    for path in (raw / IMAGES / "aguasclaras" / "imgs_1").glob("*_B03.tif"):
        path.unlink()
    assert _error(raw).path == _band_file(raw, "aguasclaras", 1, "B03")


def test_val_share_far_above_the_fraction_warns_and_val_cities_chooses(
    raw: Path, tmp_path: Path
) -> None:
    code, _, stderr = _prepare(raw, "--out", tmp_path / "a.zarr", "--val-fraction", "0.1")
    assert code == 0, stderr
    (line,) = _warnings(stderr)
    assert "far above --val-fraction 0.1" in line and "--val-cities" in line
    code, _, stderr = _prepare(raw, "--out", tmp_path / "b.zarr", "--val-cities", "bercy")
    assert code == 0, stderr
    assert _warnings(stderr) == []
    cities = manifest_of(tmp_path / "b.zarr")["source"]["details"]["cities"]  # type: ignore[index]
    assert cities["val"] == ["bercy"] and cities["train"] == ["aguasclaras"]


@pytest.mark.parametrize(
    ("option", "value", "message", "exit_code"),
    [
        # A value naming what the data lacks is exit 3 (input data) for every option; it was 2
        # for --val-cities alone.
        ("--bands", "B02,B88", "unknown band(s) ['B88']", 3),
        ("--cities", "rome", "names no listed city: rome", 3),
        ("--val-cities", "rome", "not a train city: rome", 3),
        ("--val-cities", "brasilia", "not a train city: brasilia", 3),
        # A choice that leaves no train city is a usage error, as out-of-range values are.
        ("--val-cities", "aguasclaras,bercy", "takes every train city", 2),
        ("--overlap", "1.5", "--overlap must lie in [0, 1)", 2),
    ],
)
def test_bad_option_values_exit_by_one_rule(
    tree: Callable[..., Path], tmp_path: Path, option: str, value: str, message: str, exit_code: int
) -> None:
    code, _, stderr = _prepare(tree(), "--out", tmp_path / "o.zarr", option, value)
    assert code == exit_code and message in _error_line(stderr)


def test_zipped_download_without_test_labels_nor_a_rect_band(
    tree: Callable[..., Path], raw: Path, tmp_path: Path
) -> None:
    _band_file(raw, "aguasclaras", 2, "B03").unlink()
    root = tmp_path / "zipped"
    for stem in (IMAGES, TRAIN_LABELS):
        shutil.make_archive(str(root / stem), "zip", raw, stem)
    plan = read_oscd(root, SMALL)
    assert "brasilia" in plan.left_out[0].warning and "imgs_2/" in plan.warnings[0]
    assert {c.split for c in plan.candidates} == {"train", "val"}
    expected = _load_all(read_oscd(raw, SMALL))
    for source_id, sample in _load_all(plan).items():
        np.testing.assert_array_equal(
            sample.arrays["image_t2"], expected[source_id].arrays["image_t2"]
        )


def test_bands_option_takes_any_sentinel2_spelling(tree: Callable[..., Path]) -> None:
    plan = read_oscd(tree(), PrepareOptions(patch_size=16, bands=("B2", "b8a", "B08")))
    assert [b.name for b in plan.spec.bands] == ["B02", "B8A", "B08"]
