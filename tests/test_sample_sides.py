"""Sample sides fit-vae can train on: square, a multiple of 8 (it halves a side up to three
times and turns samples by 90 degrees). Other sizes were prepared without a word, then fit-vae
failed at its first step with "unexpected RuntimeError ... (a bug)", exit 1."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import manifest_of, run_cli
from tests.fault_tools import assert_one_error_line
from tests.fixtures.geotiff_folder import make_geotiff_folder
from tests.test_fit_vae_cli import TINY


def test_untrainable_tiles_are_warned_of_refused_by_fit_vae_and_the_fix_trains(
    tmp_path: Path,
) -> None:
    raw = make_geotiff_folder(tmp_path / "raw", size=(30, 30))
    odd = tmp_path / "odd.zarr"
    code, _, stderr = run_cli("prepare", "geotiff", raw, "--out", odd)
    assert code == 0, stderr
    assert "warning: samples are 30x30" in stderr and "--patch-size 24 gives samples" in stderr
    code, _, stderr = run_cli("fit-vae", odd, "--run", tmp_path / "run", *TINY, "--steps", "1")
    assert_one_error_line(code, stderr, 3, "the store's samples are 30x30")
    assert "--patch-size 24" in stderr and not (tmp_path / "run").exists()
    # The fix the lines give: 24 x 24 patches of the same tiles, which fit-vae trains on.
    fixed = tmp_path / "fixed.zarr"
    code, _, stderr = run_cli("prepare", "geotiff", raw, "--out", fixed, "--patch-size", "24")
    assert code == 0 and "warning: samples are" not in stderr, stderr
    assert (manifest_of(fixed)["height"], manifest_of(fixed)["width"]) == (24, 24)
    code, _, stderr = run_cli("fit-vae", fixed, "--run", tmp_path / "run", *TINY, "--steps", "1")
    assert code == 0, stderr


def test_a_patch_size_not_a_multiple_of_8_is_a_usage_error(tmp_path: Path) -> None:
    raw = make_geotiff_folder(tmp_path / "raw", size=(30, 30))
    for command in (("geotiff", raw, "--patch-size", "250"), ("demo", "--size", "30")):
        out = tmp_path / "out.zarr"
        code, _, stderr = run_cli("prepare", *command, "--out", out)
        assert_one_error_line(code, stderr, 2, f"{command[-2]} {command[-1]}: samples are square")
        assert f"e.g. {command[-2]} {int(command[-1]) // 8 * 8}" in stderr and not out.exists()
