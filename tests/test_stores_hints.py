"""An incomplete store's hint names the fix that works for the command that wrote it."""

from __future__ import annotations

import json
import shlex
import signal
from pathlib import Path

import numpy as np
import pytest

from specdm_cli.config import (
    PATCH_FILTER_DEFAULTS,
    PREPARE_FLAGS,
    PrepareOptions,
    default_test_fraction,
    prepare_default,
)
from specdm_cli.manifest import QualityScores
from specdm_cli.pipeline.prepare.request import PrepareRequest
from specdm_cli.stores import open_store
from specdm_cli.stores.hints import prepare_again
from specdm_cli.stores.quality import write_quality
from tests.conftest import manifest_of, run_cli
from tests.fault_tools import assert_one_error_line, run_killed, signal_at_stop, spawn
from tests.fixtures.geotiff_folder import make_geotiff_folder
from tests.test_faults_concurrency import SYNTH


def test_a_killed_filter_output_says_overwrite_and_a_shard_store_the_missing_shards(
    tmp_path: Path,
) -> None:
    """Every reader said "rerun its command with --resume", which `filter` does not take."""
    store = tmp_path / "syn.zarr"
    code, _, stderr = run_cli(*SYNTH, "--shard", "0/2", "--out", store)
    assert code == 0, stderr
    code, _, stderr = run_cli("inspect", store)
    assert_one_error_line(code, stderr, 3, "incomplete")
    assert "--shard i/N" in stderr and f"specdm synthesize --finalize {store}" in stderr
    code, _, stderr = run_cli(*SYNTH, "--shard", "1/2", "--out", store)
    assert code == 0, stderr
    info = QualityScores(definition="test", feature_hash="f" * 64, reference="r",
                         reference_manifest_sha256="0", count=8)  # fmt: skip
    write_quality(store, open_store(store).manifest, np.linspace(0, 1, 8), info)
    out = tmp_path / "good.zarr"
    command = ("filter", store, "--min-quality", "0", "--out", out, "--quiet")
    run_killed(*command, fault="atomic.before_replace:2")  # before its final manifest
    code, _, stderr = run_cli("inspect", out)
    assert_one_error_line(code, stderr, 3, "incomplete")
    assert "`specdm filter`" in stderr and "--overwrite" in stderr and "--resume" not in stderr
    assert run_cli(*command, "--overwrite")[0] == 0


def test_an_interrupted_plain_synthesize_says_resume_not_shards(tmp_path: Path) -> None:
    """A plain run also leaves a record per batch: readers took them for shards and sent the
    user to `--shard i/N` and `--finalize`, which fails on a store nobody sharded."""
    store = tmp_path / "syn.zarr"
    process = spawn(*SYNTH, "--out", store, fault="synthesize.after_batch:1:stop")
    assert "interrupted" in signal_at_stop(process, signal.SIGINT)
    code, _, stderr = run_cli("inspect", store)
    assert_one_error_line(
        code, stderr, 3, "rerun `specdm synthesize` with the same options and --resume"
    )
    assert "--shard" not in stderr and "--finalize" not in stderr
    assert run_cli(*SYNTH, "--out", store, "--resume")[0] == 0


def test_a_killed_prepare_says_prepare_resume(tmp_path: Path) -> None:
    out = tmp_path / "p.zarr"
    command = ("prepare", "demo", "--task", "ss", "--n", "8", "--size", "16", "--quiet")
    run_killed(*command, "--out", out, fault="prepare.after_block")
    code, _, stderr = run_cli("inspect", out)
    assert_one_error_line(
        code, stderr, 3, "rerun `specdm prepare` with the same options and --resume"
    )
    assert run_cli(*command, "--out", out, "--resume")[0] == 0


def test_prepare_again_carries_every_recorded_option_the_source_reads(tmp_path: Path) -> None:
    """The command a mismatched side is answered with makes the same store at the new side:
    each option away from its command-line default is carried, read from the table that
    `prepare` also refuses a source's unread options by."""
    first = tmp_path / "first.zarr"
    options = ("--n", "256", "--test-fraction", "0.0", "--seed", "3", "--demo-variant", "hard")
    code, _, stderr = run_cli("prepare", "demo", "--out", first, "--size", "16", *options, "-q")
    assert code == 0, stderr
    again = tmp_path / "again.zarr"
    command = shlex.split(prepare_again(first, open_store(first).manifest, 8, out=again)[1:-1])
    for option, value in zip(options[::2], options[1::2], strict=True):
        assert command[command.index(option) + 1] == value, command
    code, _, stderr = run_cli(*command[1:], "-q")
    assert code == 0, stderr
    plans = [manifest_of(store)["plan"] for store in (first, again)]
    assert [{**plan["options"], "size": None} for plan in plans] == [  # type: ignore[index]
        {**plans[0]["options"], "size": None}  # type: ignore[index]
    ] * 2
    assert manifest_of(again)["height"] == 8


def test_relative_classes_and_splits_paths_give_a_hint_that_runs_from_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--classes/--splits were recorded as given, so the prepare-again command quoted a path
    relative to a folder the user may no longer be in; stores recorded so still resume."""
    raw = make_geotiff_folder(tmp_path / "raw", n=2, size=(16, 16), classes_file="csv")
    (tmp_path / "splits.csv").write_text("stem,split\ntile_00,train\ntile_01,val\n")
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "g.zarr"
    paths = ("--classes", "raw/classes.csv", "--splits", "splits.csv")
    command = ("prepare", "geotiff", raw, "--out", store, "--patch-size", "16", *paths, "-q")
    code, _, stderr = run_cli(*command)
    assert code == 0, stderr
    options = manifest_of(store)["plan"]["options"]  # type: ignore[index]
    assert options["classes_file"] == str(tmp_path / "raw" / "classes.csv")
    assert options["splits_file"] == str(tmp_path / "splits.csv")
    details = manifest_of(store)["source"]["details"]  # type: ignore[index]
    assert (details["classes_from"], details["splits_from"]) == (
        options["classes_file"],
        options["splits_file"],
    )
    monkeypatch.chdir(tmp_path / "raw")
    again = tmp_path / "again.zarr"
    hint = prepare_again(store, open_store(store).manifest, 8, out=again)
    code, _, stderr = run_cli(*shlex.split(hint[1:-1])[1:], "-q")
    assert code == 0 and manifest_of(again)["height"] == 8, stderr
    # A store that recorded them as given resumes from the folder they were given in, as
    # written there; from another folder it is refused, whichever files are named now.
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["plan"]["options"].update(classes_file="raw/classes.csv", splits_file="splits.csv")
    (store / "manifest.json").write_text(json.dumps(manifest))
    absolute = ("--classes", raw / "classes.csv", "--splits", tmp_path / "splits.csv")
    code, _, stderr = run_cli(*command[:-5], *absolute, "--resume")  # from raw/
    assert_one_error_line(code, stderr, 3, "cannot resume: the store was made with other inputs")
    assert '--classes: store "raw/classes.csv", now ' in stderr  # the flag, not the field
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run_cli(*command[:-1], "--resume", "--json")
    assert code == 0 and json.loads(stdout)["state"] == "already complete", stderr


def test_the_flag_table_names_prepare_options_with_their_command_line_defaults() -> None:
    """Hints leave an option out at `prepare_default`; were the command line's default another,
    the command they give would prepare a different store."""
    import typer.core
    import typer.main

    from specdm_cli.cli.app import app

    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    command = group.commands["prepare"]
    defaults = {param.opts[0]: param.default for param in command.params if param.opts}
    for field, (flag, readers) in PREPARE_FLAGS.items():
        for source in readers:
            given = defaults[flag]
            if field == "test_fraction" and given is None:  # each source's own
                given = default_test_fraction(source)
            assert given == prepare_default(field, source) or (field == "task" and given is None)
    for field, default in PATCH_FILTER_DEFAULTS.items():
        assert defaults[f"--{field.replace('_', '-')}"] == default
        assert (
            getattr(PrepareRequest("demo", None, Path("x"), "zarr", PrepareOptions()), field)
            == default
        )
