"""Two processes on one store: a live writer's lock refuses the second (exit 6), even with
`--overwrite`; a lock left by a killed writer is taken over; shards on disjoint ranges proceed
side by side and the last one finalizes the store to the bytes of one uninterrupted run.

The first writer is the real CLI in a subprocess, frozen at a named point with
`SPECDM_FAULT=point:nth:stop` (alive, holding its lock) while the second runs in-process.
Run directories get the same checks in `test_faults_training.py`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests import processes
from tests.conftest import manifest_of, run_cli
from tests.fault_tools import assert_one_error_line, spawn, wait_until_stopped

DEMO = ("prepare", "demo", "--n", "120", "--size", "16", "--seed", "3", "--quiet")
# The shipped demo model: nothing to train. 8 pairs on a grid of B=2: shard 0/2 = batches 0-1.
SYNTH = ("synthesize", "--model", "demo", "--task", "ss", "--n", "8", "--batch-size", "2",
         "--steps", "2", "--threads", "2", "--quiet")  # fmt: skip


def arrays(store: Path) -> dict[str, np.ndarray]:
    return {name: np.asarray(a[:]) for name, a in zarr.open_group(store, mode="r").arrays()}


def locks(store: Path) -> list[str]:
    return sorted(p.name for p in store.glob(".specdm.lock*"))


def test_prepare_second_writer_refused_stale_lock_taken_over(tmp_path: Path) -> None:
    reference = tmp_path / "ref.zarr"
    assert run_cli(*DEMO, "--out", reference)[0] == 0
    out = tmp_path / "s.zarr"
    first = spawn(*DEMO, "--out", out, fault="prepare.after_block:1:stop")
    try:
        wait_until_stopped(first)
        for extra in ("--resume", "--overwrite"):
            code, _, stderr = run_cli(*DEMO, "--out", out, extra)
            assert_one_error_line(code, stderr, 6, f"process {first.pid}")
        assert manifest_of(out)["complete"] is False  # --overwrite removed nothing
    finally:
        first.kill()
        first.communicate(timeout=60)
    assert locks(out) == [".specdm.lock"]  # left by the killed writer
    code, _, stderr = run_cli(*DEMO, "--out", out, "--resume")
    assert code == 0, stderr
    assert locks(out) == []
    expected, actual = arrays(reference), arrays(out)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def test_a_second_writer_is_refused_while_an_overwrite_has_removed_the_old_store(
    tmp_path: Path,
) -> None:
    """Between removing the old store and creating the new one, `--overwrite` held no lock: a
    second `prepare --overwrite` started then went ahead, and one of the two failed with exit 5
    "cannot write (No such file or directory)" or lost the store that the other had made."""
    out = tmp_path / "s.zarr"
    assert run_cli(*DEMO, "--out", out)[0] == 0
    reference = arrays(out)
    first = spawn(*DEMO, "--out", out, "--overwrite", fault="store.after_remove:1:stop")
    try:
        wait_until_stopped(first)
        assert not out.exists()  # the old store is gone, the new one not made yet
        for extra in ((), ("--overwrite",), ("--resume",)):
            code, _, stderr = run_cli(*DEMO, "--out", out, *extra)
            assert_one_error_line(code, stderr, 6, f"process {first.pid}")
            assert str(out) in stderr
        assert not out.exists()
        first.send_signal(signal.SIGCONT)
        _, stderr = first.communicate(timeout=300)
        assert first.returncode == 0, stderr
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate(timeout=60)
    for name, expected in reference.items():
        np.testing.assert_array_equal(arrays(out)[name], expected, err_msg=name)
    assert not list(tmp_path.glob(".s.zarr*")), "claim or removal leftovers"


def test_inspect_of_a_store_being_written_names_its_writer(tmp_path: Path) -> None:
    """It said "store is incomplete (its writer stopped early): rerun ... --resume", which the
    live writer's lock then refused."""
    out = tmp_path / "s.zarr"
    first = spawn(*DEMO, "--out", out, fault="prepare.after_block:1:stop")
    try:
        wait_until_stopped(first)
        code, _, stderr = run_cli("inspect", out)
        assert_one_error_line(code, stderr, 6, f"being written by process {first.pid}")
        assert "--allow-incomplete" in stderr and "--resume" not in stderr
        code, stdout, stderr = run_cli("inspect", out, "--allow-incomplete", "--json")
        assert code == 0, stderr
        assert json.loads(stdout)["complete"] is False
    finally:
        first.kill()
        first.communicate(timeout=60)
    code, _, stderr = run_cli("inspect", out)  # its writer is dead now: it stopped early
    assert_one_error_line(code, stderr, 3, "--resume")


def test_synthesize_shards_locks_and_finalize(tmp_path: Path) -> None:
    whole = tmp_path / "whole.zarr"
    code, _, stderr = run_cli(*SYNTH, "--out", whole)
    assert code == 0, stderr
    out = tmp_path / "shards.zarr"
    # Shard 0 freezes after its first batch is written, holding `.specdm.lock.0-of-2`.
    first = spawn(*SYNTH, "--out", out, "--shard", "0/2", fault="synthesize.after_batch:1:stop")
    try:
        wait_until_stopped(first)
        code, _, stderr = run_cli(*SYNTH, "--out", out, "--shard", "0/2")
        assert_one_error_line(code, stderr, 6, f"process {first.pid}")
        code, _, stderr = run_cli(*SYNTH, "--out", out, "--overwrite")
        assert_one_error_line(code, stderr, 6, f"process {first.pid}")
        # The other shard's range is free: it runs to the end beside the live shard 0.
        code, stdout, stderr = run_cli(*SYNTH, "--out", out, "--shard", "1/2", "--json")
        assert code == 0, stderr
        assert json.loads(stdout)["complete"] is False  # shard 0 is not done
        assert manifest_of(out)["complete"] is False
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    assert locks(out) == [".specdm.lock.0-of-2"]  # left by the killed shard
    code, stdout, stderr = run_cli(*SYNTH, "--out", out, "--shard", "0/2", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["complete"] is True  # the last shard in finalizes
    assert locks(out) == [] and not list(out.rglob(".*.tmp"))
    expected, merged = arrays(whole), arrays(out)
    for name in ("image", "mask", "written", "class_fraction"):
        np.testing.assert_array_equal(merged[name], expected[name], err_msg=name)


@pytest.mark.slow  # two spawned ranks import torch (about 20 s)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_ranks_stop_when_their_parent_is_killed(tmp_path: Path) -> None:
    # torch's spawn asks Linux for a SIGINT to each rank when the parent dies; the rank's
    # graceful stop finishes the batch in hand, so no orphan writes on or holds a lock.
    out = tmp_path / "s.zarr"
    options = (*SYNTH, "--n", "64", "--gpus", "cpu:2", "--out", out)  # later --n wins
    parent = spawn(*options, fault="synthesize.after_batch:1:stop")
    processes.wait_for(
        lambda: (
            len(processes.ranks_of(parent.pid)) == 2
            and all(map(processes.is_stopped, processes.ranks_of(parent.pid)))
        )
    )
    ranks = processes.ranks_of(parent.pid)
    parent.kill()  # SIGKILL: nothing in the parent can stop its ranks
    parent.wait()
    for pid in ranks:
        os.kill(pid, signal.SIGCONT)  # each now sees the signal its parent's death sent
    processes.wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in ranks), 60)
    written = np.asarray(zarr.open_group(out, mode="r")["written"][:])
    assert 0 < written.sum() < 64  # they stopped after the batch in hand, not at the end
    code, _, stderr = run_cli(*options, "--resume")  # no orphan holds a lock
    assert code == 0, stderr
    assert manifest_of(out)["complete"] is True
