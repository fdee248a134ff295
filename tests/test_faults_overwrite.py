"""`--overwrite` never destroys a command's own input, and replaces only what the same kind of
command made (DESIGN.md; issue: data safety, item 1)."""

from __future__ import annotations

import shutil
from pathlib import Path

from specdm_cli.pipeline.runs.choose import demo_model_path
from tests.conftest import manifest_of, prepare_demo, run_cli
from tests.fault_tools import assert_one_error_line
from tests.fixtures.geotiff_folder import make_geotiff_folder


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


def test_overwrite_replaces_only_a_store_the_same_command_made(tmp_path: Path) -> None:
    """A prepared store is real data: `synthesize --overwrite` onto it is refused, as is
    `prepare --overwrite` onto a synthetic store; each replaces its own."""
    real = prepare_demo(tmp_path / "real.zarr", n=8)
    synthetic = tmp_path / "syn.zarr"
    synth = ("synthesize", "--model", "demo", "--task", "ss", "--n", "2", "--steps", "2",
             "--threads", "1", "--quiet", "--out")  # fmt: skip
    assert run_cli(*synth, synthetic)[0] == 0
    before = tree_bytes(real), tree_bytes(synthetic)
    # Without --overwrite it was a list of some 15 plan differences ending "or --overwrite".
    code, _, stderr = run_cli(*synth, real)
    assert_one_error_line(code, stderr, 3, "--out is a store `specdm prepare` made, not a synth")
    assert "--overwrite replaces only a store synthesize made" in stderr
    code, _, stderr = run_cli(*synth, real, "--overwrite")
    assert code == 3 and "`specdm prepare` made with `specdm synthesize`" in stderr, stderr
    code, _, stderr = run_cli("prepare", "demo", "--n", "8", "--size", "32", "--out", synthetic,
                              "--overwrite", "--quiet")  # fmt: skip
    assert code == 3 and "`specdm synthesize` made with `specdm prepare`" in stderr, stderr
    assert (tree_bytes(real), tree_bytes(synthetic)) == before
    assert run_cli(*synth, synthetic, "--overwrite", "--seed", "1")[0] == 0
    assert tree_bytes(synthetic) != before[1]


def test_a_refused_overwrite_leaves_the_old_store(tmp_path: Path) -> None:
    """Every option is checked before the old store is removed: steps past the schedule, a
    sampler the model lacks, a batch the memory cannot hold."""
    synthetic = tmp_path / "syn.zarr"
    synth = ("synthesize", "--model", "demo", "--task", "ss", "--n", "2", "--threads", "1",
             "--quiet", "--out", synthetic)  # fmt: skip
    assert run_cli(*synth, "--steps", "2")[0] == 0
    before = tree_bytes(synthetic)
    for refused, code in (
        (("--steps", "5000"), 2),
        (("--sampler", "distilled"), 4),
        (("--batch-size", "1000000000", "--require", "0:0.01"), 5),
    ):
        exit_code, _, stderr = run_cli(*synth, "--overwrite", *refused)
        assert exit_code == code and "Traceback" not in stderr, (refused, stderr)
        assert tree_bytes(synthetic) == before, refused


def test_a_prepare_overwrite_that_fails_on_its_inputs_leaves_the_old_store(
    tmp_path: Path,
) -> None:
    """The old store was removed before RAW and the options were read: a band typo or a wrong
    folder (exit 3) left no store at all, where a real dataset's takes hours to make."""
    raw = make_geotiff_folder(tmp_path / "raw", n=3, size=(16, 16))
    store = tmp_path / "s.zarr"
    assert run_cli("prepare", "geotiff", raw, "--out", store, "--quiet")[0] == 0
    before = tree_bytes(store)
    for refused in ((raw, "--bands", "1,99"), (tmp_path / "nowhere",), (tmp_path,)):
        code, _, stderr = run_cli("prepare", "geotiff", *refused, "--out", store, "--overwrite")
        assert code in (2, 3) and "Traceback" not in stderr, (refused, stderr)
        assert tree_bytes(store) == before, refused
    assert run_cli("prepare", "geotiff", raw, "--out", store, "--overwrite", "--bands", "1")[0] == 0
    assert manifest_of(store)["source"]["details"]["bands_read"] == [1]  # type: ignore[index]


def test_an_out_that_is_no_store_is_named_as_the_output(tmp_path: Path) -> None:
    """A file, or a folder of something else, was told to `run specdm prepare first` or that its
    manifest was unreadable; an empty folder is used with --overwrite."""
    synth = ("synthesize", "--model", "demo", "--task", "ss", "--n", "2", "--steps", "2",
             "--threads", "1", "--quiet", "--out")  # fmt: skip
    a_file, empty, foreign = tmp_path / "notes.txt", tmp_path / "empty", tmp_path / "foreign"
    a_file.write_text("mine")
    empty.mkdir()
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    for out, words in ((a_file, "--out is a file"), (empty, "holds no specdm store"),
                       (foreign, "holds no specdm store")):  # fmt: skip
        code, _, stderr = run_cli(*synth, out)
        assert code == 3 and words in stderr and "choose another --out" in stderr, stderr
    assert a_file.read_text() == "mine" and (foreign / "keep.txt").read_text() == "mine"
    assert run_cli(*synth, empty, "--overwrite")[0] == 0
    assert (empty / "manifest.json").is_file()
