"""The SegMunich reader on tiny raw trees in the official and GFM-Bench layouts."""

from __future__ import annotations

import csv
import json
import re
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from specdm_cli.errors import InputDataError
from specdm_cli.sources.base import PrepareOptions, SourcePlan
from specdm_cli.sources.segmunich import SEGMUNICH_BANDS, read_segmunich
from tests.conftest import run_cli
from tests.fixtures.segmunich import RAW_CODES, make_segmunich

OPTIONS = PrepareOptions()
# The remap of every published loader (datasets.md 1.4), written out by hand.
EXPECTED_INDEX = {0: 0, 21: 1, 22: 2, 23: 3, 31: 4, 5: 5, 32: 6, 33: 7, 41: 8, 13: 9, 14: 10}
EXPECTED_INDEX |= {11: 11, 12: 12, 255: 255}


def _open(root: Path, options: PrepareOptions = OPTIONS) -> SourcePlan:
    return read_segmunich(root, options)


def _tree(tmp_path: Path, splits: dict[str, int] | None = None, size: int = 16) -> Path:
    """An official tree wrapped in TUM_128/; returns the TUM_128 folder."""
    return make_segmunich(tmp_path, splits=splits, size=size) / "TUM_128"


def _input_error(root: Path, match: str, options: PrepareOptions = OPTIONS) -> InputDataError:
    """The error of opening `root` and loading every sample; it must say `match`."""
    with pytest.raises(InputDataError, match=match) as info:
        plan = _open(root, options)
        for candidate in plan.candidates:
            plan.load(candidate)
    assert info.value.hint
    return info.value


def test_official_layout_lists_splits_in_order_and_loads_file_values(tmp_path: Path) -> None:
    plan = _open(make_segmunich(tmp_path))

    ids = [c.source_id for c in plan.candidates]
    assert ids == ["train/1", "train/2", "train/3", "val/4", "val/5"]
    assert [c.split for c in plan.candidates] == ["train"] * 3 + ["val"] * 2
    spec = plan.spec
    assert (spec.dataset, spec.task, spec.dtype, spec.height, spec.width) == (
        "segmunich",
        "ss",
        "float32",
        16,
        16,
    )
    assert spec.details["layout"] == "official"
    assert spec.details["splits"] == ["train", "val"]
    assert [c.index for c in spec.classes] == list(range(13))
    assert len({c.colour for c in spec.classes}) == 13

    sample = plan.load(plan.candidates[3])
    on_disk = tifffile.imread(tmp_path / "TUM_128" / "val" / "img" / "4.tif")
    assert sample.source_id == "val/4" and sample.split == "val"
    assert sample.arrays["image"].dtype == np.float32
    np.testing.assert_array_equal(sample.arrays["image"], on_disk.transpose(2, 0, 1))
    mask = sample.arrays["mask"]
    assert mask.dtype == np.uint8 and mask.shape == (16, 16)
    assert mask.max() < 13 and sample.nodata_pixels == 0


@pytest.mark.parametrize("wrap", ["SegMunich", None])
def test_dofa_mmseg_layout_reads_png_class_indices(tmp_path: Path, wrap: str | None) -> None:
    # DOFA's copy (datasets.md 1.6): img_dir/ and ann_dir/ per split, labels already indices.
    plan = _open(make_segmunich(tmp_path, layout="mmseg", wrap=wrap))
    tree = tmp_path / wrap if wrap else tmp_path
    assert [c.source_id for c in plan.candidates] == [
        "train/1",
        "train/2",
        "train/3",
        "val/4",
        "val/5",
    ]
    assert plan.spec.details["layout"] == "mmseg"
    assert plan.spec.details["splits"] == ["train", "val"]
    assert [c.code for c in plan.spec.classes] == list(range(13))
    assert [c.name for c in plan.spec.classes][:2] == ["Background", "Arable land"]
    sample = plan.load(plan.candidates[3])
    on_disk = np.asarray(Image.open(tree / "ann_dir" / "val" / "4.png"))
    np.testing.assert_array_equal(sample.arrays["mask"], on_disk)
    # The same pixels as the official layout's raw codes, remapped: one class table.
    official_plan = _open(make_segmunich(tmp_path / "official"))
    official = official_plan.load(official_plan.candidates[3])
    np.testing.assert_array_equal(sample.arrays["mask"], official.arrays["mask"])
    np.testing.assert_array_equal(sample.arrays["image"], official.arrays["image"])


def test_mmseg_palette_png_labels_are_their_indices(tmp_path: Path) -> None:
    make_segmunich(tmp_path, layout="mmseg", wrap=None)
    path = tmp_path / "ann_dir" / "train" / "1.png"
    indices = np.asarray(Image.open(path))
    paletted = Image.fromarray(indices, mode="P")
    paletted.putpalette([v for i in range(256) for v in (i * 7 % 256, i * 13 % 256, i)])
    paletted.save(path)
    plan = _open(tmp_path)
    np.testing.assert_array_equal(plan.load(plan.candidates[0]).arrays["mask"], indices)


def test_macos_appledouble_files_are_not_samples(tmp_path: Path) -> None:
    """A copy made on macOS leaves ._<id>.tif beside each file; it was taken for a sample."""
    make_segmunich(tmp_path, layout="mmseg", wrap=None)
    (tmp_path / "img_dir" / "train" / "._1.tif").write_bytes(b"\x00\x05\x16\x07")
    assert [c.source_id for c in _open(tmp_path).candidates][:3] == [
        "train/1",
        "train/2",
        "train/3",
    ]


def test_a_tree_extracted_twice_over_by_windows_is_found(tmp_path: Path) -> None:
    """Windows' "Extract All" of TUM_128.zip into TUM_128/ makes TUM_128/TUM_128/; that folder
    was refused with a hint to pass "the folder containing TUM_128/", which it was."""
    raw = tmp_path / "download"
    make_segmunich(tmp_path / "x")
    (raw / "TUM_128").mkdir(parents=True)
    (tmp_path / "x" / "TUM_128").rename(raw / "TUM_128" / "TUM_128")
    assert len(_open(raw).candidates) == len(_open(raw / "TUM_128" / "TUM_128").candidates) > 0


def test_an_rgb_label_tiff_is_told_as_colours_not_as_a_size(tmp_path: Path) -> None:
    """It was told "all SegMunich patches must share one size"."""
    tree = _tree(tmp_path, splits={"train": 2})
    path = tree / "train" / "label" / "1.tif"
    codes = tifffile.imread(path)
    tifffile.imwrite(path, np.stack([codes] * 3, axis=-1), photometric="rgb")
    err = _input_error(tmp_path, "label TIFF holds 3 colour channels, not class codes")
    assert err.path == path


def test_mmseg_image_without_its_label_is_named(tmp_path: Path) -> None:
    make_segmunich(tmp_path, layout="mmseg", wrap=None)
    (tmp_path / "ann_dir" / "val" / "5.png").unlink()
    err = _input_error(tmp_path, "listed in split 'val' is missing")
    assert err.path == tmp_path / "ann_dir" / "val" / "5.png"


def _huge_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", 20000, 20000)  # IHDR width, height: PIL's bomb guard
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def _colours(path: Path) -> None:
    indices = np.asarray(Image.open(path))
    Image.fromarray(np.stack([indices] * 3, axis=-1), mode="RGB").save(path)


def _not_a_png(path: Path) -> None:
    path.write_bytes(b"not a png")


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (_huge_header, "PNG"),
        (_colours, "3 colour channels, not class indices"),
        (_not_a_png, "corrupt or truncated PNG"),
    ],
)
def test_a_broken_mmseg_label_is_named(
    tmp_path: Path, damage: Callable[[Path], None], words: str
) -> None:
    make_segmunich(tmp_path, layout="mmseg", wrap=None)
    path = tmp_path / "ann_dir" / "train" / "2.png"
    damage(path)
    plan = _open(tmp_path)
    with pytest.raises(InputDataError, match=words) as info:
        plan.load(plan.candidates[1])
    assert info.value.path == path


@pytest.mark.parametrize(("listed", "folder"), [("val", "test"), ("test", "val")])
def test_val_and_test_name_one_split(tmp_path: Path, listed: str, folder: str) -> None:
    # The official code reads test, the unpacked archive of third-party tools has val
    # (datasets.md 1.2): a list of one name with the folder of the other is that split.
    tree = make_segmunich(tmp_path, splits={"train": 2, listed: 2}) / "TUM_128"
    if listed != folder:
        (tree / listed).rename(tree / folder)
    plan = _open(tmp_path)
    assert [c.source_id for c in plan.candidates] == [
        "train/1",
        "train/2",
        f"{listed}/3",
        f"{listed}/4",
    ]
    assert plan.candidates[2].ref[0] == tree / folder / "img" / "3.tif"
    assert plan.load(plan.candidates[2]).split == listed
    assert len(plan.warnings) == 1 and f"read from {folder}/" in plan.warnings[0]


def test_split_lists_saved_as_utf16_or_with_a_byte_order_mark_are_read(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    (tree / "dataset" / "train.txt").write_text("1\n2\n3\n", encoding="utf-16")
    (tree / "dataset" / "val.txt").write_text("4\r\n5\r\n", encoding="utf-8-sig")
    assert [c.source_id for c in _open(tmp_path).candidates] == [
        "train/1", "train/2", "train/3", "val/4", "val/5"
    ]  # fmt: skip


def test_an_unreadable_split_list_is_an_input_error(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    (tree / "dataset" / "test.txt").mkdir()
    assert _input_error(tmp_path, "cannot read").path == tree / "dataset" / "test.txt"
    (tree / "dataset" / "test.txt").rmdir()
    (tree / "dataset" / "train.txt").write_bytes(b"1\n\xff\xfe\xfa2\n")
    assert _input_error(tmp_path, "not UTF-8 text").path == tree / "dataset" / "train.txt"


def test_gfm_bench_layout_orders_train_before_test(tmp_path: Path) -> None:
    root = make_segmunich(tmp_path, layout="gfm", wrap="SegMunich")
    metadata = tmp_path / "SegMunich" / "dataset" / "metadata.csv"
    # Reverse the data rows so the file lists test first: order must follow the splits.
    header, *rows = metadata.read_text().splitlines()
    # Saved back by a spreadsheet: a byte-order mark, CRLF line ends.
    metadata.write_text("\ufeff" + "\r\n".join([header, *reversed(rows)]) + "\r\n")

    plan = _open(root)

    ids = [c.source_id for c in plan.candidates]
    assert ids == ["train/3", "train/2", "train/1", "test/5", "test/4"]
    assert plan.spec.details["layout"] == "gfm-bench"
    assert plan.spec.details["splits"] == ["train", "test"]
    assert plan.load(plan.candidates[-1]).arrays["image"].shape == (10, 16, 16)


@pytest.mark.parametrize("wrap", [None, "TUM_128", "SegMunich"])
def test_root_may_be_the_tree_or_hold_one_wrapping_folder(tmp_path: Path, wrap: str | None) -> None:
    plan = _open(make_segmunich(tmp_path, wrap=wrap, splits={"train": 1, "test": 1}))

    assert [c.source_id for c in plan.candidates] == ["train/1", "test/2"]
    assert plan.spec.details["splits"] == ["train", "test"]


def test_band_order_is_the_measured_file_order(tmp_path: Path) -> None:
    spec = _open(make_segmunich(tmp_path)).spec

    expected = ["B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12"]
    assert list(SEGMUNICH_BANDS) == expected
    assert [b.name for b in spec.bands] == expected
    assert spec.bands[3].wavelength_nm == pytest.approx(832.8)
    assert spec.rgb_bands == ["B04", "B03", "B02"]
    assert spec.band_order_source and "B8A" in spec.band_order_source


def test_raw_codes_map_to_indices_and_255_stays_ignore(tmp_path: Path) -> None:
    tree = _tree(tmp_path, splits={"train": 1}, size=4)
    codes = np.array(sorted(EXPECTED_INDEX), dtype=np.uint8)  # 14 values incl. 255
    label = np.resize(codes, (4, 4))
    tifffile.imwrite(tree / "train" / "label" / "1.tif", label)

    plan = _open(tree)
    mask = plan.load(plan.candidates[0]).arrays["mask"]

    np.testing.assert_array_equal(mask, np.vectorize(EXPECTED_INDEX.get)(label))
    assert (mask == 255).sum() == (label == 255).sum() > 0
    assert plan.spec.details["label_codes"] == {
        str(code): index for code, index in EXPECTED_INDEX.items() if code != 255
    }
    assert {c.code: c.index for c in plan.spec.classes} == {
        code: index for code, index in EXPECTED_INDEX.items() if code != 255
    }
    assert sorted(int(str(c.code)) for c in plan.spec.classes) == sorted(RAW_CODES)


def test_chw_and_one_page_hwc_files_read_like_the_original_encoding(tmp_path: Path) -> None:
    tree = _tree(tmp_path, splits={"train": 3})
    img = tree / "train" / "img"
    original = tifffile.imread(img / "1.tif")
    tifffile.imwrite(img / "2.tif", original.transpose(2, 0, 1).copy())
    tifffile.imwrite(img / "3.tif", original, photometric="minisblack", planarconfig="contig")
    for label in ("2", "3"):
        (tree / "train" / "label" / f"{label}.tif").write_bytes(
            (tree / "train" / "label" / "1.tif").read_bytes()
        )

    plan = _open(tree)
    first, *others = (plan.load(c) for c in plan.candidates)

    for other in others:
        np.testing.assert_array_equal(other.arrays["image"], first.arrays["image"])
        np.testing.assert_array_equal(other.arrays["mask"], first.arrays["mask"])


def test_uint16_and_lzw_labels_are_read(tmp_path: Path) -> None:
    tree = _tree(tmp_path, splits={"train": 2})
    label_dir = tree / "train" / "label"
    raw = [tifffile.imread(label_dir / f"{i}.tif") for i in (1, 2)]
    tifffile.imwrite(label_dir / "1.tif", raw[0].astype(np.uint16))
    # tifffile needs imagecodecs for LZW; the reader falls back to PIL as the official code does.
    Image.fromarray(raw[1]).save(label_dir / "2.tif", compression="tiff_lzw")

    plan = _open(tree)
    masks = [plan.load(c).arrays["mask"] for c in plan.candidates]

    for mask, codes in zip(masks, raw, strict=True):
        assert mask.dtype == np.uint8
        np.testing.assert_array_equal(mask, np.vectorize(EXPECTED_INDEX.get)(codes))


@pytest.mark.parametrize(
    ("compress", "interleave"), [("lzw", "pixel"), ("lzw", "band"), ("zstd", "pixel")]
)
def test_images_re_saved_compressed_by_gdal_are_read(
    tmp_path: Path, compress: str, interleave: str
) -> None:
    # tifffile decodes LZW and ZSTD only with imagecodecs (not a dependency; for ZSTD it tries
    # Python 3.14's `compression` module, an ImportError before); GDAL reads such a file.
    import rasterio

    tree = _tree(tmp_path, splits={"train": 1})
    path = tree / "train" / "img" / "1.tif"
    original = tifffile.imread(path).transpose(2, 0, 1)
    profile = {"driver": "GTiff", "count": 10, "height": 16, "width": 16, "dtype": "float32"}
    with rasterio.open(path, "w", compress=compress, interleave=interleave, **profile) as dst:
        dst.write(original)
    sample = _open(tree).load(_open(tree).candidates[0])
    np.testing.assert_array_equal(sample.arrays["image"], original)


def test_a_label_re_saved_with_zstd_by_gdal_is_read(tmp_path: Path) -> None:
    import rasterio

    tree = _tree(tmp_path, splits={"train": 1})
    path = tree / "train" / "label" / "1.tif"
    codes = tifffile.imread(path)
    profile = {"driver": "GTiff", "count": 1, "height": 16, "width": 16, "dtype": "uint8"}
    with rasterio.open(path, "w", compress="zstd", **profile) as dst:
        dst.write(codes[None])
    mask = _open(tree).load(_open(tree).candidates[0]).arrays["mask"]
    np.testing.assert_array_equal(mask, np.vectorize(EXPECTED_INDEX.get)(codes))


def test_load_is_thread_safe_and_deterministic(tmp_path: Path) -> None:
    plan = _open(make_segmunich(tmp_path, splits={"train": 6, "val": 6}))

    serial = [plan.load(c).arrays for c in plan.candidates]
    with ThreadPoolExecutor(4) as pool:
        threaded = [s.arrays for s in pool.map(plan.load, plan.candidates)]

    for one, other in zip(serial, threaded, strict=True):
        for name in ("image", "mask"):
            np.testing.assert_array_equal(one[name], other[name])


def test_fixture_looks_like_the_real_patch(tmp_path: Path) -> None:
    tree = _tree(tmp_path, splits={"train": 1})
    image = tifffile.imread(tree / "train" / "img" / "1.tif")
    with tifffile.TiffFile(tree / "train" / "img" / "1.tif") as tif:
        assert len(tif.pages) == 16 and tif.pages[0].shape == (16, 10)

    assert image.dtype == np.float32 and np.all(image == np.rint(image))
    assert image.min() >= 100 and image.max() <= 5000
    blocks = image[1:15, 1:15].reshape(7, 2, 7, 2, 10)
    constant = (blocks == blocks[:, :1, :, :1]).all(axis=(0, 1, 2, 3))
    assert constant.tolist() == [False] * 4 + [True] * 6
    label = tifffile.imread(tree / "train" / "label" / "1.tif")
    assert label.dtype == np.uint8 and set(np.unique(label)) <= set(RAW_CODES)
    assert len(np.unique(label)) > 1 and (label[:, 1:] == label[:, :-1]).mean() > 0.5


# Errors: each is an InputDataError naming the offending path and saying how to fix it.


def test_missing_folder(tmp_path: Path) -> None:
    err = _input_error(tmp_path / "nowhere", "does not exist")
    assert err.path == tmp_path / "nowhere"


def test_empty_folder(tmp_path: Path) -> None:
    empty = tmp_path / "raw"  # tmp_path holds the test's SPECDM_HOME (conftest)
    empty.mkdir()
    err = _input_error(empty, "empty")
    assert err.path == empty


def test_folder_without_dataset_folder(tmp_path: Path) -> None:
    (tmp_path / "TUM_128" / "train").mkdir(parents=True)
    err = _input_error(tmp_path, "dataset/ folder")
    assert err.path == tmp_path / "dataset"
    assert "TUM_128" in (err.hint or "")


def test_unextracted_archive(tmp_path: Path) -> None:
    (tmp_path / "TUM_128.zip").write_bytes(b"PK")
    err = _input_error(tmp_path, "dataset/ folder")
    assert err.path == tmp_path / "dataset"
    assert "extract TUM_128.zip" in (err.hint or "")


def test_no_split_list(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    for split_list in (tree / "dataset").iterdir():
        split_list.unlink()
    (tree / "dataset" / "notes.txt").write_text("1\n")

    err = _input_error(tmp_path, "no split list")
    assert err.path == tree / "dataset"


def test_a_split_folder_without_its_list_is_told_not_dropped_silently(tmp_path: Path) -> None:
    """A partial extract without dataset/val.txt gave a store without val, exit 0, no word."""
    tree = _tree(tmp_path, splits={"train": 2, "val": 1})
    (tree / "dataset" / "val.txt").unlink()
    plan = _open(tmp_path)
    assert {c.split for c in plan.candidates} == {"train"}
    assert [part.warning for part in plan.left_out] == [
        "val/ has no dataset/val.txt: its 1 images are left out (restore val.txt from the "
        "archive to read them)"
    ]


def test_a_store_that_left_val_out_says_so_once_val_txt_is_restored(tmp_path: Path) -> None:
    """Restoring val.txt as the warning says, then --resume, was "already complete" (exit 0)
    and the store still lacked val; a plain rerun asked for --resume. Now the manifest records
    what was left out, and either rerun is refused with the fix that works (--overwrite)."""
    tree = _tree(tmp_path / "raw", splits={"train": 2, "val": 1})
    listing = tree / "dataset" / "val.txt"
    listing.rename(tmp_path / "val.txt")
    out = tmp_path / "s.zarr"
    code, _, stderr = run_cli("prepare", "segmunich", tree, "--out", out)
    assert code == 0, stderr
    details = json.loads((out / "manifest.json").read_text())["source"]["details"]
    assert details["left_out"] == [
        {
            "part": "the 1 images of val/",
            "reason": "no dataset/val.txt lists them",
            "restored_by": [str(listing.absolute())],
        }
    ]
    # Told nothing new while RAW still lacks it: --resume keeps the complete store.
    code, _, stderr = run_cli("prepare", "segmunich", tree, "--out", out, "--resume")
    assert code == 0 and "already complete" in stderr
    (tmp_path / "val.txt").rename(listing)
    for rerun in (["--resume"], []):
        code, _, stderr = run_cli("prepare", "segmunich", tree, "--out", out, *rerun)
        assert code == 3, stderr
        (line,) = stderr.strip().splitlines()
        assert "left out the 1 images of val/" in line and str(listing.absolute()) in line
        assert line.endswith("rerun with --overwrite to prepare the whole dataset")
    code, _, stderr = run_cli("prepare", "segmunich", tree, "--out", out, "--overwrite")
    assert code == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["split_counts"] == {"train": 2, "val": 1}
    assert "left_out" not in manifest["source"]["details"]


def test_quiet_still_tells_of_a_split_folder_left_out(tmp_path: Path) -> None:
    """With -q the run exited 0 and printed nothing: --quiet silences progress, not data
    left out."""
    tree = _tree(tmp_path / "raw", splits={"train": 2, "val": 1, "test": 1})
    (tree / "dataset" / "val.txt").unlink()
    out = tmp_path / "s.zarr"
    code, _, stderr = run_cli("prepare", "segmunich", tree, "--out", out, "-q")
    assert code == 0, stderr
    assert stderr.strip().splitlines() == [
        "val/ has no dataset/val.txt: its 1 images are left out (restore val.txt from the "
        "archive to read them)"
    ]
    details = json.loads((out / "manifest.json").read_text())["source"]["details"]
    assert [part["part"] for part in details["left_out"]] == ["the 1 images of val/"]


def test_a_store_without_train_is_told_at_prepare_not_first_by_fit_vae(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "raw", splits={"train": 2, "val": 1})
    (tree / "dataset" / "train.txt").unlink()
    out = tmp_path / "s.zarr"
    code, stdout, stderr = run_cli("prepare", "segmunich", tree, "--out", out, "--json")
    assert code == 0, stderr
    warnings = json.loads(stdout)["warnings"]
    assert any("train/ has no dataset/train.txt" in line for line in warnings)
    assert any(
        "no train split" in line
        and line.endswith("prepare it again with --overwrite and the dataset's train list "
                          "(dataset/train.txt)")
        for line in warnings
    )  # fmt: skip
    assert "no train split" in stderr


def test_metadata_csv_without_source_column(tmp_path: Path) -> None:
    make_segmunich(tmp_path, layout="gfm", wrap=None)
    metadata = tmp_path / "dataset" / "metadata.csv"
    with metadata.open("w", newline="") as handle:
        csv.writer(handle).writerows([["id", "split"], ["1", "train"]])

    err = _input_error(tmp_path, "columns id and source")
    assert err.path == metadata
    # Another tool's CSV: the way on is the lists this reader also takes (review15 L7).
    assert "dataset/<split>.txt lists" in (err.hint or "")


def test_image_listed_but_missing(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    (tree / "val" / "img" / "5.tif").unlink()

    err = _input_error(tmp_path, "listed in split 'val' is missing")
    assert err.path == tree / "val" / "img" / "5.tif"
    assert "val" in (err.hint or "")


def test_label_listed_but_missing(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    (tree / "train" / "label" / "2.tif").unlink()
    (tree / "train" / "label" / "3.tif").unlink()

    err = _input_error(tmp_path, r"missing \(and 1 more\)")
    assert err.path == tree / "train" / "label" / "2.tif"


def test_list_lines_giving_file_paths_name_their_files(tmp_path: Path) -> None:
    """A re-made list of `train/img/1.tif` lines looked for `img/train/img/1.tif` (review15 L4)."""
    tree = _tree(tmp_path, splits={"train": 3})
    ids = (tree / "dataset" / "train.txt").read_text().split()
    (tree / "dataset" / "train.txt").write_text("".join(f"train/img/{i}.tif\n" for i in ids))
    plan = read_segmunich(tree, PrepareOptions())
    assert [c.source_id for c in plan.candidates] == [f"train/{i}" for i in ids]


def test_list_lines_into_another_split_s_folder_are_not_read_from_this_one(
    tmp_path: Path,
) -> None:
    """`val/img/1.tif` in train.txt was read as train's 1 (review17): only this split's own
    folder is stripped from a path; another is reported missing."""
    tree = _tree(tmp_path, splits={"train": 2, "val": 1})
    first = (tree / "dataset" / "train.txt").read_text().split()[0]
    (tree / "dataset" / "train.txt").write_text(f"val/img/{first}.tif\n")
    err = _input_error(tmp_path, "file listed in split 'train' is missing")
    assert err.path == tree / "train" / "img" / "val" / "img" / f"{first}.tif"


def test_a_tiff_spelled_patch_is_the_listed_tif(tmp_path: Path) -> None:
    tree = _tree(tmp_path, splits={"train": 2})
    first = (tree / "dataset" / "train.txt").read_text().split()[0]
    image = tree / "train" / "img" / f"{first}.tif"
    image.rename(image.with_suffix(".tiff"))
    plan = read_segmunich(tree, PrepareOptions())
    assert plan.candidates[0].ref[0] == image.with_suffix(".tiff")


def test_an_mmseg_label_in_another_format_gets_the_png_conversion(tmp_path: Path) -> None:
    """The hint was `gdal_translate -of GTiff 1.tif 1.png`: a TIFF named .png (review17)."""
    root = make_segmunich(tmp_path, layout="mmseg", wrap=None)
    label = next((root / "ann_dir" / "train").glob("*.png"))
    label.rename(label.with_suffix(".tif"))
    err = _input_error(root, f"{label.stem}.tif is there, in another format than .png")
    assert f"gdal_translate -of PNG {label.stem}.tif {label.name}" in (err.hint or "")


def test_a_label_in_another_format_is_named(tmp_path: Path) -> None:
    """`label/1.png` beside a list naming 1: "file ... missing (label/1.tif)" alone (L4)."""
    tree = _tree(tmp_path, splits={"train": 2})
    first = (tree / "dataset" / "train.txt").read_text().split()[0]
    label = tree / "train" / "label" / f"{first}.tif"
    label.rename(label.with_suffix(".png"))
    err = _input_error(tmp_path, f"{first}.png is there, in another format than .tif")
    assert err.path == label and "gdal_translate -of GTiff" in (err.hint or "")


def test_split_folder_missing(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    (tree / "dataset" / "test.txt").write_text("9\n")

    err = _input_error(tmp_path, "folder missing for split 'test'")
    assert err.path == tree / "test" / "img"
    # A partial extract: the way on to the other splits, not only the whole archive (review15).
    assert (err.hint or "").endswith(
        "or take split 'test' out of the split lists in dataset/ to prepare the other splits"
    )


def test_duplicate_id_in_split_list(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    (tree / "dataset" / "train.txt").write_text("1\n2\n\n1\n")

    err = _input_error(tmp_path, r"listed twice: \['1'\]")
    assert err.path == tree / "dataset" / "train.txt"


@pytest.mark.parametrize("bands", [9, 13])
@pytest.mark.parametrize("which", ["1", "3"])
def test_wrong_band_count(tmp_path: Path, which: str, bands: int) -> None:
    # Sample 1 fails at open (it sets the spec); sample 3 fails when loaded. 13 bands (an
    # export with B01, B09, B10) were told as "more than a 16x16 patch ... must share one size".
    tree = _tree(tmp_path)
    path = tree / "train" / "img" / f"{which}.tif"
    tifffile.imwrite(path, np.full((16, 16, bands), 500, dtype=np.float32))

    err = _input_error(tmp_path, f"expected 10 bands, found {bands}")
    assert err.path == path


def test_label_size_differs_from_image(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    path = tree / "val" / "label" / "4.tif"
    tifffile.imwrite(path, np.zeros((16, 12), dtype=np.uint8))

    err = _input_error(tmp_path, "label is 16x12 but its image is 16x16")
    assert err.path == path


def test_image_size_differs_from_first_image(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    path = tree / "train" / "img" / "2.tif"
    tifffile.imwrite(path, np.full((8, 8, 10), 500, dtype=np.float32))

    err = _input_error(tmp_path, "image is 8x8 but the first image is 16x16")
    assert err.path == path


def test_unknown_label_code(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    path = tree / "train" / "label" / "3.tif"
    label = tifffile.imread(path)
    label[0, 0] = 7
    tifffile.imwrite(path, label)

    err = _input_error(tmp_path, r"unknown label code\(s\) \[7\]")
    assert err.path == path


def _with_nan(tmp_path: Path) -> Path:
    tree = _tree(tmp_path, splits={"train": 1})
    path = tree / "train" / "img" / "1.tif"
    image = tifffile.imread(path)
    image[2:4, 5, 7] = np.nan
    tifffile.imwrite(path, image)
    return path


def test_nan_without_declared_nodata(tmp_path: Path) -> None:
    path = _with_nan(tmp_path)

    err = _input_error(tmp_path, "NaN")
    assert err.path == path
    assert "--nodata nan" in (err.hint or "")


def test_nan_declared_nodata_becomes_ignore(tmp_path: Path) -> None:
    _with_nan(tmp_path)
    plan = _open(tmp_path, PrepareOptions(nodata=float("nan")))

    sample = plan.load(plan.candidates[0])

    assert sample.nodata_pixels == 2
    assert np.isfinite(sample.arrays["image"]).all()
    assert sample.arrays["mask"][2:4, 5].tolist() == [255, 255]
    assert (sample.arrays["mask"] == 255).sum() == 2


@pytest.mark.parametrize("which", ["img/1", "img/3", "label/2"])
def test_truncated_tiff(tmp_path: Path, which: str) -> None:
    tree = _tree(tmp_path)
    path = tree / "train" / f"{which}.tif"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    err = _input_error(tmp_path, "corrupt or truncated TIFF")
    assert err.path == path
    assert "re-download" in (err.hint or "")


def _leave_out_as_told(hint: str, tree: Path) -> None:
    """Do what the hint's "leave the sample out: ..." says, word for word."""
    told = hint.split("leave the sample out: ", 1)[1].split(";", 1)[0]
    line = re.fullmatch(r"delete its line \((\w+)\) from (\S+)", told)
    row = re.fullmatch(r"delete its row \(id (\w+)\) from (\S+)", told)
    image = re.fullmatch(r"remove its image (\S+)", told)
    if line or row:
        sample_id, listing = (line or row).groups()  # type: ignore[union-attr]
        kept = [x for x in Path(listing).read_text().splitlines() if x.split(",")[0] != sample_id]
        Path(listing).write_text("\n".join(kept) + "\n")
    else:
        assert image, hint
        Path(image.group(1)).unlink()


@pytest.mark.parametrize(
    ("layout", "bad", "told"),
    [
        (
            "official",
            "TUM_128/train/img/2.tif",
            "delete its line (2) from {tree}/dataset/train.txt",
        ),
        ("official", "TUM_128/val/label/5.tif", "delete its line (5) from {tree}/dataset/val.txt"),
        ("gfm", "TUM_128/test/img/4.tif", "delete its row (id 4) from {tree}/dataset/metadata.csv"),
        ("mmseg", "TUM_128/ann_dir/val/4.png", "remove its image {tree}/img_dir/val/4.tif"),
    ],
)
def test_a_bad_file_s_hint_leaves_its_sample_out_as_written(
    tmp_path: Path, layout: str, bad: str, told: str
) -> None:
    """ "re-download or remove the file" did not work as written: the id was still in its split
    list, and the rerun said the file listed there is missing. The hint now says how to leave
    the sample out where the layout lists it, and doing just that reads the rest."""
    make_segmunich(tmp_path, layout)
    tree = tmp_path / "TUM_128"
    path = tmp_path / bad
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    err = _input_error(tmp_path, "corrupt or truncated")
    assert err.path == path
    assert f"leave the sample out: {told.format(tree=tree)}" in (err.hint or "")
    path.unlink()
    _leave_out_as_told(err.hint or "", tree)
    plan = _open(tmp_path)
    assert len(plan.candidates) == 4
    for candidate in plan.candidates:
        plan.load(candidate)


def test_a_bad_file_met_mid_run_is_left_out_as_the_line_says(tmp_path: Path) -> None:
    """The real CLI: the store keeps the samples written so far, and the sample left out as
    the line says, --overwrite prepares the rest."""
    tree = _tree(tmp_path / "raw", splits={"train": 80})
    bad = tree / "train" / "img" / "70.tif"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    out = tmp_path / "s.zarr"
    code, _, stderr = run_cli("prepare", "segmunich", tree, "--out", out, "--workers", "1", "-q")
    assert code == 3
    (line,) = stderr.strip().splitlines()
    assert f"delete its line (70) from {tree}/dataset/train.txt" in line
    assert line.endswith(
        f"{out} keeps the samples written so far: once the file itself is fixed, rerun the "
        "same command with --resume; with another option or the file left out, rerun with "
        "--overwrite"
    )
    bad.unlink()
    _leave_out_as_told(line, tree)
    code, _, stderr = run_cli("prepare", "segmunich", tree, "--out", out, "--overwrite", "-q")
    assert code == 0, stderr
    assert json.loads((out / "manifest.json").read_text())["count"] == 79


@pytest.mark.parametrize(("code", "name"), [(0, "Background"), (21, "Arable land")])
def test_label_nodata_naming_a_class_is_a_usage_error(tmp_path: Path, code: int, name: str) -> None:
    """`--label-nodata 0` turned every Background pixel into 255 with exit 0 and a note
    (review15 M5), where `prepare geotiff` refuses a class code."""
    tree = _tree(tmp_path / "raw", splits={"train": 2})
    out = tmp_path / "s.zarr"
    exit_code, _, stderr = run_cli("prepare", "segmunich", tree, "--out", out,
                                   "--label-nodata", str(code), "-q")  # fmt: skip
    said = f"error: --label-nodata {code} is the class '{name}' in SegMunich's labels"
    assert exit_code == 2 and stderr.startswith(said) and len(stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("code", [255, 99])
def test_raw_255_labels_count_as_nodata_as_declared_ones_do(tmp_path: Path, code: int) -> None:
    """A raw 255 (SegMunich's ignore value) left `source.nodata_pixels` at 0, while the same
    pixels coded 99 and declared --label-nodata 99 counted."""
    tree = _tree(tmp_path / "raw", splits={"train": 2})
    label = tree / "train" / "label" / "2.tif"
    codes = tifffile.imread(label)
    codes[3:5, 2:9] = code
    tifffile.imwrite(label, codes)
    out = tmp_path / "s.zarr"
    declared = ["--label-nodata", "99"] if code == 99 else []
    code_, _, stderr = run_cli("prepare", "segmunich", tree, "--out", out, "-q", *declared)
    assert code_ == 0, stderr
    assert json.loads((out / "manifest.json").read_text())["source"]["nodata_pixels"] == 14


def test_not_a_tiff(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    path = tree / "val" / "img" / "5.tif"
    path.write_text("<html>404</html>")

    err = _input_error(tmp_path, "corrupt or truncated TIFF")
    assert err.path == path


def _rewrite_as_geotiff(path: Path, array: np.ndarray, nodata: float) -> None:
    """`array` ((H, W, C) or (H, W)) as GDAL writes a patch: band-separate, GDAL_NODATA tag."""
    import rasterio

    bands = array.transpose(2, 0, 1) if array.ndim == 3 else array[None]
    profile = {"driver": "GTiff", "count": bands.shape[0], "dtype": str(bands.dtype)}
    with rasterio.open(
        path, "w", height=bands.shape[1], width=bands.shape[2], nodata=nodata, **profile
    ) as dst:
        dst.write(bands)


def test_geotiff_nodata_tags_of_image_and_label_read_as_255(tmp_path: Path) -> None:
    """tifffile never reads GDAL's nodata tag (42113): an image tagged 0 kept its 0 pixels as
    reflectance, a label tagged 200 was exit 3 "unknown label code(s) [200]"."""
    raw = tmp_path / "raw"
    tree = _tree(raw, splits={"train": 2})
    image_path, label_path = tree / "train" / "img" / "1.tif", tree / "train" / "label" / "1.tif"
    image, label = tifffile.imread(image_path), tifffile.imread(label_path)
    image[:3] = 0
    label[-2:] = 200
    _rewrite_as_geotiff(image_path, image, nodata=0)
    _rewrite_as_geotiff(label_path, label, nodata=200)
    tagged_class = tree / "train" / "label" / "2.tif"  # 0 is Background: a class, not nodata
    _rewrite_as_geotiff(tagged_class, tifffile.imread(tagged_class), nodata=0)
    code, _, stderr = run_cli("prepare", "segmunich", raw, "--out", tmp_path / "s.zarr", "-q")
    assert code == 0, stderr
    plan = _open(raw)
    first, second = (plan.load(c) for c in plan.candidates)
    assert (first.arrays["mask"][:3] == 255).all() and (first.arrays["mask"][-2:] == 255).all()
    assert (first.arrays["mask"][3:-2] != 255).all()
    assert first.arrays["image"].min() > 0  # the tagged pixels filled with the valid mean
    assert (second.arrays["mask"] != 255).all()


@pytest.mark.parametrize("which", ["img/2", "label/3"])
def test_a_broken_link_says_fetch_the_data(tmp_path: Path, which: str) -> None:
    """A git-annex or DVC link not yet fetched was "corrupt or truncated TIFF ([Errno 2] ...",
    cut off, telling to re-download a file that only needs fetching."""
    raw = tmp_path / "raw"
    path = _tree(raw) / "train" / f"{which}.tif"
    path.unlink()
    path.symlink_to("../../.git/annex/objects/Xk/SHA256E-s678238--0123456789abcdef.tif")
    code, _, stderr = run_cli("prepare", "segmunich", raw, "--out", tmp_path / "s.zarr", "-q")
    assert code == 3
    (line,) = stderr.strip().splitlines()
    assert line.startswith("error: broken link") and str(path) in line
    assert "git annex get, dvc pull" in line and "Errno" not in line


@pytest.mark.parametrize("layout", ["official", "mmseg"])
def test_upper_case_extensions_are_the_same_files(tmp_path: Path, layout: str) -> None:
    """`1.TIF` (as a Windows tool or a FAT copy names it) was "file listed in split 'train' is
    missing"; the mmseg layout found no images at all."""
    raw = make_segmunich(tmp_path / "raw", layout=layout, wrap=None)
    expected = _open(raw)
    samples = [expected.load(c) for c in expected.candidates]
    for path in [p for p in raw.rglob("*") if p.suffix in (".tif", ".png")]:
        path.rename(path.with_suffix(path.suffix.upper()))
    code, _, stderr = run_cli("prepare", "segmunich", raw, "--out", tmp_path / "s.zarr", "-q")
    assert code == 0, stderr
    plan = _open(raw)
    assert [c.source_id for c in plan.candidates] == [c.source_id for c in expected.candidates]
    assert all(p.exists() and p.suffix.isupper() for c in plan.candidates for p in c.ref)
    for candidate, sample in zip(plan.candidates, samples, strict=True):
        for name, array in plan.load(candidate).arrays.items():
            np.testing.assert_array_equal(array, sample.arrays[name])
