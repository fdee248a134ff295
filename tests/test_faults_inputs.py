"""Corrupt inputs, property-based: every case is one stderr line, the right exit code, no traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import manifest_of, prepare_demo, run_cli
from tests.fixtures.oscd import make_oscd
from tests.fixtures.segmunich import make_segmunich

BOUNDED = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def assert_one_line(code: int, stderr: str, expected_code: int) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == expected_code, stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert "Traceback" not in stderr


def garble(data: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
    """Truncate at `cut` (a fraction in 1/1000) and overwrite a few bytes."""
    garbled = bytearray(data[: max(1, len(data) * cut // 1000)])
    for position, value in flips:
        if garbled:
            garbled[position % len(garbled)] = value
    return bytes(garbled)


GARBLING = (
    st.integers(0, 999),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
)


@BOUNDED
@given(*GARBLING)
def test_garbled_manifest_is_refused(
    tmp_path_factory, cut: int, flips: list[tuple[int, int]]
) -> None:  # type: ignore[no-untyped-def]
    store = prepare_demo(tmp_path_factory.mktemp("m") / "s.zarr", n=4)
    manifest = store / "manifest.json"
    manifest.write_bytes(garble(manifest.read_bytes(), cut, flips))
    try:
        json.loads(manifest.read_text())
        still_valid = True
    except (ValueError, UnicodeDecodeError):
        still_valid = False
    code, _, stderr = run_cli("inspect", store)
    if code != 0 or not still_valid:
        assert_one_line(code, stderr, 3)


@BOUNDED
@given(*GARBLING)
def test_garbled_segmunich_tiff_is_refused(
    tmp_path_factory, cut: int, flips: list[tuple[int, int]]
) -> None:  # type: ignore[no-untyped-def]
    raw = make_segmunich(tmp_path_factory.mktemp("raw"), splits={"train": 2}, size=16, wrap=None)
    image = raw / "train" / "img" / "2.tif"
    image.write_bytes(garble(image.read_bytes(), cut, flips))
    # One output per example: a shared one would make later examples test "output exists".
    out = raw.with_name(f"{raw.name}-out.zarr")
    code, _, stderr = run_cli("prepare", "segmunich", raw, "--out", out, "--quiet")
    if code != 0:
        assert_one_line(code, stderr, 3)
        assert not out.exists() or manifest_of(out)["complete"] is False


@BOUNDED
@given(*GARBLING)
def test_garbled_oscd_zip_is_refused(
    tmp_path_factory, cut: int, flips: list[tuple[int, int]]
) -> None:  # type: ignore[no-untyped-def]
    raw = make_oscd(tmp_path_factory.mktemp("oscd"), zipped=True)
    labels = next(raw.glob("*Train Labels.zip"))
    labels.write_bytes(garble(labels.read_bytes(), cut, flips))
    code, _, stderr = run_cli(
        "prepare",
        "oscd",
        raw,
        "--out",
        raw.with_name(raw.name + "-out.zarr"),
        "--quiet",
        "--patch-size",
        "16",
    )
    if code != 0:
        assert_one_line(code, stderr, 3)


def test_path_traversal_in_a_geotiff_manifest_is_refused(tmp_path: Path) -> None:
    store = prepare_demo(tmp_path / "tiles", "--format", "geotiff", n=3)
    secret = tmp_path / "secret.tif"
    shutil.copy(store / "images" / "000000.tif", secret)
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["files"][0]["files"]["image"] = "../secret.tif"
    (store / "manifest.json").write_text(json.dumps(manifest))
    code, _, stderr = run_cli("inspect", store)
    assert_one_line(code, stderr, 3)
    assert "outside the store" in stderr
