"""`--overwrite` never destroys a command's own input, and replaces only what the same kind of
command made (DESIGN.md; issue: data safety, item 1)."""

from __future__ import annotations

import shutil
from pathlib import Path

from specdm_cli.pipeline.runs.choose import demo_model_path
from tests.conftest import prepare_demo, run_cli


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def demo_run_copy(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(demo_model_path("ss"), run)
    return run


def test_filter_into_its_own_store_is_refused(tmp_path: Path) -> None:
    store = prepare_demo(tmp_path / "s.zarr", n=8)
    before = tree_bytes(store)
    code, _, stderr = run_cli("filter", store, "--min-quality", "0", "--out", store, "--overwrite")
    assert code == 2 and "overlaps the input" in stderr
    assert tree_bytes(store) == before


def test_synthesize_into_its_model_is_refused(tmp_path: Path) -> None:
    run = demo_run_copy(tmp_path)
    before = tree_bytes(run)
    for out in (run, run / "inside.zarr", tmp_path):
        code, _, stderr = run_cli(
            "synthesize", "--model", run, "--n", "2", "--out", out, "--overwrite", "--quiet"
        )
        assert code == 2 and "overlaps the input" in stderr, (out, stderr)
    assert tree_bytes(run) == before


def test_fit_vae_into_its_store_is_refused(tmp_path: Path) -> None:
    store = prepare_demo(tmp_path / "s.zarr", n=8)
    before = tree_bytes(store)
    code, _, stderr = run_cli("fit-vae", store, "--run", store, "--overwrite", "--quiet")
    assert code == 2 and "overlaps the input" in stderr
    assert tree_bytes(store) == before


def test_prepare_overwrite_replaces_a_store_but_never_a_run(tmp_path: Path) -> None:
    run = demo_run_copy(tmp_path)
    before = tree_bytes(run)
    code, _, stderr = run_cli("prepare", "demo", "--n", "8", "--size", "32", "--out", run,
                              "--overwrite", "--quiet")  # fmt: skip
    assert code == 3 and "not a specdm store" in stderr
    assert tree_bytes(run) == before
    store = prepare_demo(tmp_path / "s.zarr", n=8)
    assert prepare_demo(store, "--overwrite", "--seed", "1", n=8) == store


def test_prepare_inside_its_raw_folder_is_refused(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "keep.txt").write_text("mine")
    code, _, stderr = run_cli("prepare", "geotiff", raw, "--out", raw / "out.zarr", "--quiet")
    assert code == 2 and "overlaps the input" in stderr
    assert sorted(p.name for p in raw.iterdir()) == ["keep.txt"]
