"""Sample sides fit-vae can train on: square, a multiple of 8 (it halves a side up to three
times and turns samples by 90 degrees). Other sizes were prepared without a word, then fit-vae
failed at its first step with "unexpected RuntimeError ... (a bug)", exit 1."""

from __future__ import annotations

import shlex
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
        below = int(command[-1]) // 8 * 8  # both neighbours: 30 is nearer 32 than 24
        assert f"e.g. {command[-2]} {below} or {below + 8}" in stderr and not out.exists()


def test_fit_vae_gives_a_prepare_command_that_works_as_written(tmp_path: Path) -> None:
    """The hint was "prepare the store again with --patch-size 24", which exits 3 as written
    (the store exists; --overwrite was missing). It is a whole command now, with the store's
    raw folder, its split options and --overwrite, and it makes a store fit-vae trains on."""
    raw = make_geotiff_folder(tmp_path / "raw", n=4, size=(30, 30))
    odd = tmp_path / "odd.zarr"
    code, _, stderr = run_cli("prepare", "geotiff", raw, "--out", odd, "--val-fraction", "0.3")
    assert code == 0, stderr
    code, _, stderr = run_cli("fit-vae", odd, "--run", tmp_path / "run", *TINY, "--steps", "1")
    assert_one_error_line(code, stderr, 3, "the store's samples are 30x30")
    command = shlex.split(stderr.split("`")[1])
    assert command[:3] == ["specdm", "prepare", "geotiff"] and command[-1] == "--overwrite"
    assert "--patch-size 24" in stderr and "--val-fraction 0.3" in stderr
    code, _, stderr = run_cli(*command[1:], "-q")
    assert code == 0, stderr
    assert (manifest_of(odd)["height"], manifest_of(odd)["width"]) == (24, 24)
    assert "val=0.3" in manifest_of(odd)["source"]["details"]["splits_from"]  # type: ignore[index]
    code, _, stderr = run_cli("fit-vae", odd, "--run", tmp_path / "run", *TINY, "--steps", "1")
    assert code == 0, stderr
