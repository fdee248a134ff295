"""Leftovers and provenance: what a killed writer leaves is cleaned by the next run, a resumed
run records no path of a deleted checkpoint, every weights file is listed and checked, and
atomic files get the umask's mode like any other file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from specdm_cli.fs.atomic import atomic_write_text
from tests.conftest import prepare_demo, run_cli
from tests.fault_tools import run_killed
from tests.test_faults_concurrency import DEMO, SYNTH
from tests.test_faults_corrupt import VAE


def test_a_store_abandoned_while_created_is_removed_by_the_next_run(tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    run_killed(*DEMO, "--out", out, fault="store.before_rename")
    assert [p.name for p in tmp_path.glob(".s.zarr.creating-*")], "the kill left nothing"
    code, _, stderr = run_cli(*DEMO, "--out", out)
    assert code == 0, stderr
    assert not list(tmp_path.glob(".s.zarr.creating-*"))


def test_an_overwrite_killed_while_removing_the_old_store_leaves_it_to_the_next_run(
    tmp_path: Path,
) -> None:
    out = tmp_path / "s.zarr"
    assert run_cli(*DEMO, "--out", out)[0] == 0
    run_killed(*DEMO, "--out", out, "--overwrite", fault="store.after_remove")
    assert not out.exists()  # the old store was renamed aside whole, then removed
    aside = tmp_path / ".s.zarr.removing-999999999"  # what a kill mid-removal leaves
    (aside / "image").mkdir(parents=True)
    code, _, stderr = run_cli(*DEMO, "--out", out)
    assert code == 0, stderr
    assert sorted(p.name for p in tmp_path.glob("*s.zarr*")) == ["s.zarr"]  # no claim, no aside


def test_stray_shard_records_are_removed_by_a_resume(tmp_path: Path) -> None:
    out = tmp_path / "syn.zarr"
    assert run_cli(*SYNTH, "--out", out)[0] == 0
    stray = out / ".specdm" / "shards" / ".000000000-000000008.json.x1y2.tmp"
    stray.write_text('{"start": 0')  # what a kill in the middle of a record write leaves
    code, _, stderr = run_cli(*SYNTH, "--out", out, "--resume")
    assert code == 0, stderr
    assert not stray.exists()


def test_a_resumed_run_records_no_checkpoint_path(tmp_path: Path) -> None:
    store = prepare_demo(tmp_path / "s.zarr", n=16, size=16)
    run = tmp_path / "run"
    assert run_cli("fit-vae", store, "--run", run, *VAE)[0] == 0
    code, _, stderr = run_cli("fit-vae", store, "--run", run, *VAE, "--steps", "4", "--resume")
    assert code == 0, stderr
    configs = list((run / "checkpoints").rglob("config.json"))
    assert configs
    for config in configs:
        assert "_name_or_path" not in json.loads(config.read_text()), config


def test_atomic_files_get_the_umask_mode(tmp_path: Path) -> None:
    mask = os.umask(0o022)
    os.umask(mask)
    atomic_write_text(tmp_path / "a.json", "{}")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~mask
