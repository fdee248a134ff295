"""`specdm prepare` on real data as it comes (issue 15): sparse labels, label nodata, failed
runs that leave nothing in the way, split files saved on Windows; through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import rasterio
import zarr

from tests.conftest import manifest_of, run_cli
from tests.fixtures.real_layouts import SEN1FLOODS11_CHIPS, make_sen1floods11, make_sparse_change
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
    assert "every patch was removed" in line and "'unlabelled': 4" in line
    assert "--max-unlabelled" in line


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
