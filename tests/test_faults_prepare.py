"""Fault suite for `prepare`: kill at named points, SIGTERM, disk full, unwritable output.

The real CLI runs in a subprocess (signals and kills need one); after each fault `--resume`
must give a store byte-identical to an uninterrupted run, with nothing left that claims to be
complete and no stray temporary files.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr

from tests import processes
from tests.fault_tools import assert_one_error_line, run_killed
from tests.fixtures.geotiff_folder import make_geotiff_folder

DEMO = ("prepare", "demo", "--n", "200", "--size", "32", "--seed", "5", "--quiet")


def specdm(
    *args: str | Path, env: dict[str, str] | None = None, fsize: int | None = None
) -> subprocess.CompletedProcess[str]:
    def limit_file_size() -> None:
        # Without ignoring SIGXFSZ the kernel kills the writer instead of failing its write.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return processes.run(
        processes.python(*args), text=True, env={**os.environ, **(env or {})},
        preexec=limit_file_size,
    )  # fmt: skip


def arrays(store: Path) -> dict[str, np.ndarray]:
    return {name: np.asarray(a[...]) for name, a in zarr.open_group(store, mode="r").arrays()}


def manifest_without_provenance(store: Path) -> dict[str, object]:
    manifest = json.loads((store / "manifest.json").read_text())
    manifest.pop("provenance")
    manifest["plan"].pop("raw", None)
    return manifest


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    assert specdm(*DEMO, "--out", out).returncode == 0
    return out


def assert_same_store(store: Path, reference: Path) -> None:
    expected, actual = arrays(reference), arrays(store)
    assert expected.keys() == actual.keys()
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
    assert manifest_without_provenance(store) == manifest_without_provenance(reference)
    assert not list(store.rglob(".*.tmp")), "stray temporary files left behind"


@pytest.mark.parametrize(
    "point", ["prepare.after_block:2", "atomic.before_replace:3", "prepare.before_manifest"]
)
def test_kill_then_resume_gives_the_uninterrupted_store(
    tmp_path: Path, reference: Path, point: str
) -> None:
    out = tmp_path / "killed.zarr"
    killed = specdm(*DEMO, "--out", out, env={"SPECDM_FAULT": point})
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    resumed = specdm(*DEMO, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_store(out, reference)


def test_sigterm_stops_cleanly_with_the_resume_hint(tmp_path: Path) -> None:
    out = tmp_path / "term.zarr"
    command = [
        sys.executable,
        "-m",
        "specdm_cli",
        "prepare",
        "demo",
        "--n",
        "3000",
        "--size",
        "32",
        "--quiet",
        "--out",
        str(out),
    ]
    process = processes.start(command, stderr=subprocess.PIPE, text=True)
    progress = out / ".specdm" / "prepare-progress.json"
    deadline = time.monotonic() + 120
    while not progress.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143
    assert stderr.strip().splitlines()[-1] == "interrupted: rerun with --resume"
    assert json.loads((out / "manifest.json").read_text())["complete"] is False


def test_disk_full_is_exit_5_and_a_resume_with_space_completes(tmp_path: Path) -> None:
    out = tmp_path / "tiles"
    args = (
        "prepare",
        "demo",
        "--n",
        "40",
        "--size",
        "64",
        "--format",
        "geotiff",
        "--quiet",
        "--out",
        out,
    )
    full = specdm(*args, fsize=24_000)
    assert full.returncode == 5, full.stderr
    lines = [line for line in full.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in full.stderr
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    again = specdm(*args, "--resume")
    assert again.returncode == 0, again.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True and len(manifest["files"]) == 40


def test_a_damaged_sample_marker_of_a_geotiff_store_is_rewritten_by_resume(
    tmp_path: Path,
) -> None:
    """A GeoTIFF store's sample markers are its written flags: one cut short (a disk fault)
    made `--resume` exit 1 "unexpected ValidationError ... a bug"."""
    args = ("prepare", "demo", "--n", "160", "--size", "32", "--seed", "5", "--format", "geotiff",
            "--workers", "1", "--quiet")  # fmt: skip
    reference, out = tmp_path / "reference", tmp_path / "tiles"
    assert specdm(*args, "--out", reference).returncode == 0
    run_killed(*args, "--out", out, fault="prepare.after_block:1")
    markers = sorted((out / ".specdm" / "written").glob("*.json"))
    assert markers, "the killed run marked no sample"
    markers[0].write_bytes(markers[0].read_bytes()[:40])
    again = specdm(*args, "--out", out, "--resume")
    assert again.returncode == 0, again.stderr
    assert f"rewriting 1 damaged samples ({int(markers[0].stem)})" in again.stderr
    tiles = sorted(p.relative_to(reference) for p in reference.rglob("*.tif"))
    assert tiles == sorted(p.relative_to(out) for p in out.rglob("*.tif"))
    for tile in tiles:
        assert (out / tile).read_bytes() == (reference / tile).read_bytes(), tile
    assert manifest_without_provenance(out) == manifest_without_provenance(reference)


def test_unwritable_output_is_exit_5_naming_the_output(tmp_path: Path) -> None:
    """The line named the claim file beside the output (`/proc/.x.zarr.specdm.lock`), a name
    the user never gave (review13 F12)."""
    for out in ("/sys/specdm-cannot-write.zarr", "/proc/specdm-cannot-write.zarr"):
        done = specdm(*DEMO, "--out", out)
        assert_one_error_line(done.returncode, done.stderr, 5, f"({out})")
        assert ".specdm.lock" not in done.stderr


def _recode_last_mask(raw: Path) -> None:
    """One code of a tile not read yet becomes another: the class list changes, the grid does not."""
    path = raw / "masks" / "tile_06.tif"
    with rasterio.open(path) as src:
        label, profile = src.read(1), src.profile
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.where(label == 40, 5, label).astype(label.dtype), 1)


def _remove_last_tile(raw: Path) -> None:
    for folder in ("images", "masks"):
        (raw / folder / "tile_06.tif").unlink()


def _rename_last_tile(raw: Path) -> None:
    for folder in ("images", "masks"):
        (raw / folder / "tile_06.tif").rename(raw / folder / "tile_09.tif")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (_recode_last_mask, "(classes)"),
        (_remove_last_tile, "(patches 112 -> 96)"),
        (_rename_last_tile, "(patches listed)"),
    ],
)
@pytest.mark.parametrize("before_progress", [False, True])
def test_a_resume_over_changed_raw_data_is_refused(
    tmp_path: Path, change: Callable[[Path], None], words: str, before_progress: bool
) -> None:
    """Samples written before the change would be read with another class list or patch grid:
    the resume refuses in one line (exit 3) and the begun store is left as it was."""
    raw = make_geotiff_folder(tmp_path / "raw", n=7, size=(32, 32), bands=3)
    out = tmp_path / "store.zarr"
    args = ("prepare", "geotiff", raw, "--out", out, "--patch-size", "8", "--overlap", "0",
            "--val-fraction", "0", "--test-fraction", "0", "--quiet")  # fmt: skip
    run_killed(*args, fault="prepare.after_block:1")  # 64 of the 112 patches written
    if before_progress:  # killed before its first block's record: the manifest says what was begun
        (out / ".specdm" / "prepare-progress.json").unlink()
    before = arrays(out)
    change(raw)
    resumed = specdm(*args, "--resume")
    if before_progress and change is _rename_last_tile:
        # No sample on record and the same classes, bands and count: a clean restart.
        assert resumed.returncode == 0, resumed.stderr
        return
    # The killed run left its lock; the resume that takes it over says so in a note first.
    told = [line for line in resumed.stderr.splitlines() if "took over a stale lock" not in line]
    assert_one_error_line(resumed.returncode, "\n".join(told), 3, words)
    assert "cannot resume" in resumed.stderr and "--overwrite" in resumed.stderr
    # Not a bad file's hint too ("once the file is fixed, rerun with --resume"): no file is
    # involved, and --resume is what was just refused.
    (line,) = [line for line in told if line.startswith("error:")]
    assert line.endswith("restore the raw data, or start again with --overwrite"), line
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    for name, values in arrays(out).items():
        np.testing.assert_array_equal(values, before[name], err_msg=name)


@pytest.mark.parametrize("older_tally", [False, True])
def test_a_resume_over_the_same_raw_data_completes(tmp_path: Path, older_tally: bool) -> None:
    """A progress record of a version before the raw data's fingerprint resumes unchecked."""
    raw = make_geotiff_folder(tmp_path / "raw", n=7, size=(32, 32), bands=3)
    args = ("prepare", "geotiff", raw, "--patch-size", "8", "--overlap", "0",
            "--val-fraction", "0", "--test-fraction", "0", "--quiet")  # fmt: skip
    out, reference = tmp_path / "store.zarr", tmp_path / "reference.zarr"
    assert specdm(*args, "--out", reference).returncode == 0
    run_killed(*args, "--out", out, fault="prepare.after_block:1")
    progress = out / ".specdm" / "prepare-progress.json"
    tally = json.loads(progress.read_text())
    assert tally["kept"] == 64 and tally["source"]["patches"] == 112
    if older_tally:
        del tally["source"]
        progress.write_text(json.dumps(tally))
    resumed = specdm(*args, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_store(out, reference)


def test_a_damaged_tile_met_mid_run_names_the_partial_store_and_both_ways_on(
    tmp_path: Path,
) -> None:
    """The line said "re-export or remove the file" alone: removing it, then --resume, was
    refused ("the raw data changed"); the store the run left was not mentioned."""
    from tests.conftest import manifest_of, run_cli

    raw = make_geotiff_folder(tmp_path / "raw", n=70, size=(32, 32))
    bad = raw / "images" / "tile_68.tif"
    with rasterio.open(bad) as src:  # in 16 x 16 tiles after its header: the cut takes pixels
        profile, pixels = src.profile, src.read()
    profile.update(compress="deflate", tiled=True, blockxsize=16, blockysize=16)
    with rasterio.open(bad, "w", **profile) as dst:
        dst.write(pixels)
    whole = bad.read_bytes()
    bad.write_bytes(whole[: len(whole) * 2 // 3])  # the header intact, the pixels cut
    out = tmp_path / "out.zarr"
    code, _, stderr = run_cli("prepare", "geotiff", raw, "--out", out, "--workers", "1", "-q")
    assert_one_error_line(code, stderr, 3, "tile_68.tif")
    assert f"{out} keeps the samples written so far" in stderr
    assert "--resume" in stderr and "--overwrite" in stderr
    assert out.exists() and not manifest_of(out)["complete"]
    bad.write_bytes(whole)  # the first way: the file mended, the run resumed
    code, _, stderr = run_cli("prepare", "geotiff", raw, "--out", out, "--resume")
    assert code == 0 and manifest_of(out)["count"] == 70, stderr
