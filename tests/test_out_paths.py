"""Output paths: the default name says the format, and `--out -` is a usage error, not a folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import manifest_of, run_cli


def test_prepare_geotiff_default_folder_is_not_named_zarr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run_cli("prepare", "demo", "--format", "geotiff", "--n", "4", "--size",
                              "16", "--quiet")  # fmt: skip
    assert code == 0, stderr
    assert manifest_of(tmp_path / "demo")["format"] == "geotiff"
    assert not (tmp_path / "demo.zarr").exists()


@pytest.mark.parametrize(
    "command",
    [
        ("prepare", "demo", "--n", "4", "--size", "16"),
        ("synthesize", "--model", "demo", "--n", "4"),
        ("filter", "STORE", "--min-quality", "0.5"),
        ("benchmark", "--real", "STORE", "--synthetic", "STORE"),
    ],
    ids=lambda command: command[0],
)
def test_out_dash_is_a_usage_error(
    command: tuple[str, ...], demo_ss_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = [demo_ss_store if part == "STORE" else part for part in command]
    code, _, stderr = run_cli(*args, "--out", "-", "--quiet")
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr
    assert len(lines) == 1 and "--out - is not supported" in lines[0], stderr
    assert not (tmp_path / "-").exists()
