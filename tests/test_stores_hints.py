"""An incomplete store's hint names the fix that works for the command that wrote it."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np

from specdm_cli.manifest import QualityScores
from specdm_cli.stores import open_store
from specdm_cli.stores.quality import write_quality
from tests.conftest import run_cli
from tests.fault_tools import assert_one_error_line, run_killed, signal_at_stop, spawn
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
