"""Damaged Zarr chunks and GeoTIFF tiles: a missing, short or garbled one never reads as data.

Each sample's arrays carry a crc32 in the store (array `checksum`, beside `written`). Readers
check it on every read, `inspect --verify` reads everything and names the damaged samples
(exit 3), and `--resume` rewrites them to the bytes of an undamaged run.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr

from specdm_cli.errors import InputDataError
from specdm_cli.stores import open_store
from tests.conftest import PAPER_LOSS, prepare_demo, run_cli
from tests.fault_tools import assert_one_error_line
from tests.test_faults_concurrency import SYNTH


def arrays(store: Path) -> dict[str, np.ndarray]:
    return {name: np.asarray(a[:]) for name, a in zarr.open_group(store, mode="r").arrays()}


def _delete(chunk: Path) -> None:
    chunk.unlink()


def _truncate(chunk: Path) -> None:
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])


def _garble(chunk: Path) -> None:
    data = bytearray(chunk.read_bytes())
    data[-8:] = bytes(8)  # same length; blosc may still decompress it into other values
    chunk.write_bytes(bytes(data))


DAMAGE: dict[str, Callable[[Path], None]] = {
    "missing": _delete,
    "short": _truncate,
    "garbled": _garble,
}


def _damage(store: Path, index: int, how: str) -> None:
    for chunk in (store / "image" / "c" / str(index), store / "mask" / "c" / str(index)):
        DAMAGE[how](next(p for p in chunk.rglob("*") if p.is_file()))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_demo(tmp_path_factory.mktemp("chunks") / "s.zarr", n=24, size=16)


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_damaged_chunks_are_named_by_readers_and_verify(
    pristine: Path, tmp_path: Path, how: str
) -> None:
    store = tmp_path / "s.zarr"
    shutil.copytree(pristine, store)
    _damage(store, 3, how)
    with pytest.raises(InputDataError, match="sample 3 is damaged"):
        open_store(store).read(3)
    code, _, stderr = run_cli("inspect", store, "--verify", "-q")
    assert_one_error_line(code, stderr, 3, "damaged samples")
    assert ": 3 " in stderr and "--resume" in stderr


def test_prepare_resume_rewrites_damaged_samples(pristine: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    shutil.copytree(pristine, store)
    _damage(store, 3, "missing")
    _damage(store, 7, "garbled")
    command = ("prepare", "demo", "--task", "ss", "--n", "24", "--size", "16", "--quiet")
    code, _, stderr = run_cli(*command, "--out", store, "--resume")
    assert code == 0, stderr
    assert "rewriting 2 damaged samples (3, 7)" in stderr
    expected, actual = arrays(pristine), arrays(store)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
    assert run_cli("inspect", store, "--verify")[0] == 0


def test_synthesize_resume_rewrites_damaged_samples(tmp_path: Path) -> None:
    store = tmp_path / "syn.zarr"
    assert run_cli(*SYNTH, "--out", store)[0] == 0
    expected = arrays(store)
    _damage(store, 5, "missing")
    code, _, stderr = run_cli("inspect", store, "--verify", "-q")
    assert_one_error_line(code, stderr, 3, ": 5 ")
    code, _, stderr = run_cli(*SYNTH, "--out", store, "--resume")
    assert code == 0, stderr
    actual = arrays(store)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
    assert run_cli("inspect", store, "--verify")[0] == 0


def test_a_damaged_per_sample_table_is_one_line_exit_3(tmp_path: Path) -> None:
    """The tables of what was written and what it holds: a short chunk there was exit 1,
    "unexpected RuntimeError (a bug)", from inspect and --resume alike; every reader of a table
    now names it."""
    store = tmp_path / "syn.zarr"
    assert run_cli(*SYNTH, "--out", store)[0] == 0
    for table in ("written", "class_fraction"):
        chunk = next(p for p in (store / table / "c").rglob("*") if p.is_file())
        chunk.write_bytes(chunk.read_bytes()[:10])  # blosc's header cut: it cannot decompress
    for command in (("inspect", store), (*SYNTH, "--out", store, "--resume")):
        code, _, stderr = run_cli(*command)
        assert_one_error_line(code, stderr, 3, "per-sample table 'written' is damaged")
    with pytest.raises(InputDataError, match="'class_fraction' is damaged"):
        open_store(store, allow_incomplete=True).class_fractions()


def _garble_middle(chunk: Path) -> None:
    data = bytearray(chunk.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])
    chunk.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _garble_middle], ids=["half", "garbled"])
def test_a_table_chunk_cut_past_blosc_header_is_named_not_read_as_values(
    tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    """A table chunk cut past blosc's header, or garbled inside it, decompressed into other
    values (class fractions of 7e9) with no error: each table chunk carries a crc32c now."""
    store = tmp_path / "syn.zarr"
    assert run_cli(*SYNTH, "--out", store)[0] == 0
    readers = {"class_fraction": "class_fractions", "split": "splits",
               "candidate": "candidates", "checksum": "sample_checksums"}  # fmt: skip
    for table, read in readers.items():
        chunk = min(p for p in (store / table / "c").rglob("*") if p.is_file())  # samples 0-
        pristine = chunk.read_bytes()
        damage(chunk)
        with pytest.raises(InputDataError, match=f"'{table}' is damaged"):
            getattr(open_store(store), read)()
        chunk.write_bytes(pristine)
    code, _, stderr = run_cli("inspect", store, "--verify", "-q")
    assert code == 0, stderr


def test_a_store_without_checksums_still_opens(pristine: Path, tmp_path: Path) -> None:
    store = tmp_path / "old.zarr"
    shutil.copytree(pristine, store, ignore=shutil.ignore_patterns("checksum"))
    assert open_store(store).read(0)["image"].shape[0] > 0
    code, stdout, stderr = run_cli("inspect", store, "--verify", "--json")
    assert code == 0, stderr
    assert "no checksums" in stdout
    _damage(store, 2, "short")  # without checksums, an unreadable chunk is still caught
    with pytest.raises(InputDataError, match="sample 2 is damaged"):
        open_store(store).read(2)


@pytest.mark.parametrize("content", ["", "{not json", '{"zarr_format": 3}'])
def test_an_arrays_garbled_metadata_is_one_line_naming_the_store(
    pristine: Path, tmp_path: Path, content: str
) -> None:
    """`inspect` stopped with "unexpected JSONDecodeError" (exit 1) where readers said exit 3."""
    store = tmp_path / "s.zarr"
    shutil.copytree(pristine, store)
    (store / "image" / "zarr.json").write_text(content)
    code, _, stderr = run_cli("inspect", store)
    assert_one_error_line(code, stderr, 3, "array 'image'")
    assert f"({store})" in stderr and "file:" not in stderr


def test_fit_vae_on_a_damaged_store_is_one_line_exit_3(pristine: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    shutil.copytree(pristine, store)
    _damage(store, 3, "missing")  # reads as zeros and class 0 without the checksum
    vae = ("--image-blocks", "8,16,16", "--mask-blocks", "8,8,16", "--norm-groups", "4",
           *PAPER_LOSS,
           "--batch-size", "4", "--threads", "2", "--quiet", "--steps", "2")  # fmt: skip
    code, _, stderr = run_cli("fit-vae", store, "--run", tmp_path / "run", *vae)
    assert_one_error_line(code, stderr, 3, "sample 3 is damaged")
    # Nothing was trained, so nothing is left: once the store is repaired, the same command
    # runs as it is (no --overwrite, no --resume that refuses "another store").
    assert not (tmp_path / "run").exists()
    (tmp_path / "mine").mkdir()  # a folder the user made stays, empty
    code, _, stderr = run_cli("fit-vae", store, "--run", tmp_path / "mine", *vae)
    assert code == 3 and (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())
    shutil.rmtree(store)
    shutil.copytree(pristine, store)
    code, _, stderr = run_cli("fit-vae", store, "--run", tmp_path / "run", *vae)
    assert code == 0, stderr


def test_a_garbled_geotiff_tile_is_named_and_rewritten_by_resume(tmp_path: Path) -> None:
    """GeoTIFF stores carry each tile's crc32 in their sample records: a tile rewritten with
    other pixels (a valid TIFF, so GDAL reads it) is named by every reader and `--resume`."""
    store = tmp_path / "syn"
    assert run_cli(*SYNTH, "--format", "geotiff", "--out", store)[0] == 0
    tiles = sorted((store / "images").glob("*.tif"))
    expected = {tile.name: tile.read_bytes() for tile in tiles}
    with rasterio.open(tiles[5]) as src:
        values, profile = src.read(), src.profile
    values[0, 0, 0] += 1
    with rasterio.open(tiles[5], "w", **profile) as dst:
        dst.write(values)
    code, _, stderr = run_cli("inspect", store, "--verify", "-q")
    assert_one_error_line(code, stderr, 3, ": 5 ")
    with pytest.raises(InputDataError, match=r"sample 5: tile images/000005\.tif does not match"):
        open_store(store).read(5)
    code, _, stderr = run_cli(*SYNTH, "--format", "geotiff", "--out", store, "--resume")
    assert code == 0, stderr
    assert {tile.name: tile.read_bytes() for tile in tiles} == expected
    code, stdout, _ = run_cli("inspect", store, "--verify", "--json")
    assert code == 0 and "all samples match their checksums" in stdout
