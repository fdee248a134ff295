"""Tiny hostile inputs cannot exhaust memory or disk (issue 16, item 6): sizes are planned from
headers and refused before anything is allocated or written, codes map sparsely, and a signal
stops the planning at once."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from tests import processes
from tests.conftest import prepare_demo, run_cli
from tests.fault_tools import assert_one_error_line, signal_at_stop, spawn, wait_until_stopped
from tests.fixtures.geotiff_folder import make_geotiff_folder, write_classes

HUGE_CODE = 2_000_000_000
MEMORY_LIMIT = 3 << 30  # address space of the child: a prepare of a tiny folder needs < 1.5 GB


def sparse_tiff(path: Path, size: int, bands: int, dtype: str, block: np.ndarray) -> None:
    """A tiled GeoTIFF whose header says size x size but which stores one 256 px block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "width": size, "height": size, "count": bands, "dtype": dtype,
               "tiled": True, "blockxsize": 256, "blockysize": 256, "sparse_ok": True,
               "compress": "deflate", "crs": "EPSG:32632",
               "transform": rasterio.transform.from_origin(600000, 5400000, 10, 10)}  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(block, window=Window(0, 0, block.shape[-1], block.shape[-2]))


def hostile_folder(root: Path, size: int, bands: int) -> Path:
    """A few MB on disk whose headers ask for size^2 pixels of `bands` bands."""
    sparse_tiff(
        root / "images" / "a.tif", size, bands, "uint16", np.ones((bands, 256, 256), "uint16")
    )
    sparse_tiff(root / "masks" / "a.tif", size, 1, "uint8", np.ones((1, 256, 256), "uint8"))
    return root


def limited(memory: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))


def test_a_header_asking_for_terabytes_is_refused_before_writing(tmp_path: Path) -> None:
    raw = hostile_folder(tmp_path / "raw", size=20_000, bands=512)
    assert sum(p.stat().st_size for p in raw.rglob("*.tif")) < 20e6
    out = tmp_path / "s.zarr"
    result = subprocess.run(
        processes.python("prepare", "geotiff", raw, "--out", out),
        capture_output=True, text=True, timeout=300, preexec_fn=lambda: limited(MEMORY_LIMIT),
    )  # fmt: skip
    assert_one_error_line(result.returncode, result.stderr, 5, "needs about")
    assert "free" in result.stderr and "--patch-size" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".s.zarr*"))


def test_a_class_code_of_two_billion_costs_no_lookup_table(tmp_path: Path) -> None:
    raw = make_geotiff_folder(tmp_path / "raw", n=2, size=(16, 16), bands=3, codes=[7, 40])
    for mask in (raw / "masks").glob("*.tif"):
        with rasterio.open(mask) as src:
            label, profile = src.read(1).astype(np.uint32), src.profile
        label[label == 40] = HUGE_CODE
        with rasterio.open(mask, "w", **{**profile, "dtype": "uint32"}) as dst:
            dst.write(label, 1)
    write_classes(raw / "classes.json", [7, HUGE_CODE])
    out = tmp_path / "s.zarr"
    result = subprocess.run(
        processes.python("prepare", "geotiff", raw, "--out", out, "--patch-size", "16"),
        capture_output=True, text=True, timeout=300, preexec_fn=lambda: limited(MEMORY_LIMIT),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["code"] for c in manifest["classes"]] == [7, HUGE_CODE]


def test_a_signal_during_the_class_scan_stops_it_at_once(tmp_path: Path) -> None:
    raw = hostile_folder(tmp_path / "raw", size=6_000, bands=2)
    out = tmp_path / "s.zarr"
    scanning = spawn("prepare", "geotiff", raw, "--out", out, fault="geotiff.scan_block:2:stop")
    stderr = signal_at_stop(scanning, signal.SIGTERM, timeout=60)
    assert scanning.returncode == 143, stderr
    assert stderr.strip() == "interrupted: rerun with --resume"
    assert not out.exists()


def test_ctrl_c_while_the_cli_starts_prints_one_line(tmp_path: Path) -> None:
    """Issue 16 item 7: a Ctrl-C in the first second (importing typer, rich, the CLI) printed a
    traceback; now one line and exit 130, like a Ctrl-C in a command."""
    # Python leaves SIGINT ignored if its parent ignored it (a background job): restore the
    # default, as in a terminal, so the interpreter raises KeyboardInterrupt.
    starting = processes.start(
        processes.python("prepare", "demo", "--out", tmp_path / "s.zarr"),
        preexec=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "SPECDM_FAULT": "startup:1:stop"},
    )  # fmt: skip
    try:
        wait_until_stopped(starting)
        os.kill(starting.pid, signal.SIGINT)
        os.kill(starting.pid, signal.SIGCONT)
        _, stderr = starting.communicate(timeout=60)
    finally:
        processes.kill_group(starting)
    assert starting.returncode == 130, stderr
    assert stderr.strip() == "interrupted: nothing was written"
    assert not (tmp_path / "s.zarr").exists()


def test_ctrl_c_while_require_draws_stops_after_the_block_in_hand(tmp_path: Path) -> None:
    """A rare `--require` draws block after block before a batch is whole (here never: road
    over every pixel); a Ctrl-C there went unheard until it gave up, minutes later, with exit 2.
    Now the next block boundary stops it: exit 130, resumable."""
    out = tmp_path / "syn.zarr"
    drawing = spawn("synthesize", "--model", "demo", "--task", "ss", "--n", "4", "--batch-size",
                    "4", "--steps", "2", "--threads", "1", "--require", "road:1.0", "--out", out,
                    fault="synthesize.draw_block:2:stop")  # fmt: skip
    stderr = signal_at_stop(drawing, signal.SIGINT, timeout=120)
    assert drawing.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted: rerun with --resume"


def test_sigterm_stops_a_command_without_resume_in_one_line_and_drops_its_claim(
    tmp_path: Path,
) -> None:
    """`inspect`, `filter` and `benchmark` died where SIGTERM found them, leaving their read
    claim on the store; now they stop as Ctrl-C stops them: exit 143 and one line."""
    store = prepare_demo(tmp_path / "s.zarr", n=8, size=16)
    verifying = spawn("inspect", store, "--verify", fault="inspect.verify:1:stop")
    stderr = signal_at_stop(verifying, signal.SIGTERM, timeout=120)
    assert verifying.returncode == 143, stderr
    assert stderr.strip().startswith("interrupted: this command does not resume")
    assert not [
        p.name for p in store.iterdir() if p.name.startswith((".specdm.read-", ".specdm.lock"))
    ]


def test_batch_and_sample_counts_that_cannot_fit_are_refused_at_once(tmp_path: Path) -> None:
    """Issue 16 item 7: `--batch-size 10**9` ended in std::bad_alloc (exit 1), `--n 10**12` ran
    two minutes before disk full: both are refused from their sizes before any work."""
    out = tmp_path / "syn.zarr"
    synth = ("synthesize", "--model", "demo", "--task", "ss", "--out", out, "--quiet")
    code, _, stderr = run_cli(*synth, "--n", str(10**9), "--batch-size", str(10**9))
    assert_one_error_line(code, stderr, 5, "a batch of 1000000000 needs about")
    code, _, stderr = run_cli(*synth, "--n", str(10**12))
    assert_one_error_line(code, stderr, 5, "the store (1000000000000 samples of 64x64) needs about")
    assert not out.exists()
    store = prepare_demo(tmp_path / "s.zarr", n=8)
    run = tmp_path / "run"
    code, _, stderr = run_cli("fit-vae", store, "--run", run, "--batch-size", str(10**9))
    assert_one_error_line(code, stderr, 5, "a training batch of 1000000000 needs about")
    assert not run.exists()
