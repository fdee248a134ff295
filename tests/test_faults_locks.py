"""Locks under contention: one holder at a time with many contenders, stale locks taken over
whatever pid they name, overlapping shard plans refused, the run registry's lock waited for,
readers' claims respected by `--overwrite`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from specdm_cli.fs.lock import DirLock, ReadLock
from specdm_cli.pipeline.runs.registry import read_registry, record_run
from tests import processes
from tests.conftest import PAPER_LOSS, manifest_of, run_cli
from tests.fault_tools import assert_one_error_line, run_killed, spawn, wait_until_stopped
from tests.test_faults_concurrency import DEMO, SYNTH

# Each contender takes and drops the lock ROUNDS times; inside, it creates a marker file with
# O_EXCL: a marker already there means two processes hold the lock at once.
CONTENDER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from specdm_cli.errors import LockHeldError
    from specdm_cli.fs.lock import DirLock
    folder, rounds = Path(sys.argv[1]), int(sys.argv[2])
    marker = folder / "inside"
    doubles = taken = 0
    while taken < rounds:
        lock = DirLock(folder)
        try:
            lock.acquire()
        except LockHeldError:
            continue
        taken += 1
        try:
            handle = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            doubles += 1
        else:
            time.sleep(0.0005)
            os.close(handle)
            marker.unlink()
        lock.release()
    print(doubles, taken)
    """
)


def test_four_contenders_never_hold_the_lock_together(tmp_path: Path) -> None:
    contenders = [
        processes.start(
            [sys.executable, "-c", CONTENDER, str(tmp_path), "150"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    doubles = taken = 0
    for process in contenders:
        stdout, stderr = process.communicate(timeout=240)
        assert process.returncode == 0, stderr
        found, rounds = map(int, stdout.split())
        doubles, taken = doubles + found, taken + rounds
    assert taken == 600
    assert doubles == 0, f"{doubles} double holds in {taken} acquisitions"


def test_a_stale_lock_naming_a_live_pid_is_taken_over_with_one_note(tmp_path: Path) -> None:
    # pid 1 is alive in every container; a reused pid looks the same. Only the OS lock counts.
    out = tmp_path / "s.zarr"
    run_killed(*DEMO, "--out", out, fault="prepare.after_block:1")
    record = {"pid": 1, "host": socket.gethostname(), "started": time.time() - 60}
    (out / ".specdm.lock").write_text(json.dumps(record))
    code, _, stderr = run_cli(*DEMO, "--out", out, "--resume")
    assert code == 0, stderr
    notes = [line for line in stderr.splitlines() if "stale lock" in line]
    assert len(notes) == 1 and "process 1 on" in notes[0], stderr
    assert manifest_of(out)["complete"] is True
    assert not (out / ".specdm.lock").exists()


def test_a_shard_plan_overlapping_a_live_one_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "shards.zarr"
    # Shard 0/2 (batches 0-1 of 4) freezes after its first batch, holding its lock.
    first = spawn(*SYNTH, "--out", out, "--shard", "0/2", fault="synthesize.after_batch:1:stop")
    try:
        wait_until_stopped(first)
        for overlapping in (("--shard", "1/3"), ()):  # batch 1; every batch
            code, _, stderr = run_cli(*SYNTH, "--out", out, *overlapping)
            assert_one_error_line(code, stderr, 6, "shard 0/2 is writing batches 0-1")
        code, _, stderr = run_cli(*SYNTH, "--out", out, "--shard", "2/3")  # batches 2-3: free
        assert code == 0, stderr
    finally:
        first.kill()
        first.communicate(timeout=60)
    code, _, stderr = run_cli(*SYNTH, "--out", out, "--shard", "0/2")
    assert code == 0, stderr
    assert manifest_of(out)["complete"] is True


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from specdm_cli.fs.lock import DirLock
    with DirLock(Path(sys.argv[1]), ".runs.lock"):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


def test_the_run_registry_waits_for_a_lock_held_for_a_moment(tmp_path: Path) -> None:
    home = tmp_path / "specdm-home"  # SPECDM_HOME of this test (conftest)
    home.mkdir(parents=True, exist_ok=True)
    holder = processes.start(
        [sys.executable, "-c", HOLDER, str(home), "1.5"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        record_run(tmp_path / "run", "ss", "vae", can_sample=False)
    finally:
        holder.communicate(timeout=60)
    assert [entry["run_id"] for entry in read_registry()] == ["run"]


# Tiny VAE training that checkpoints after its first step (so it can freeze there).
FIT_VAE = ("fit-vae", "--steps", "4", "--batch-size", "2", "--image-blocks", "8,8,8",
           *PAPER_LOSS,
           "--mask-blocks", "8,8,8", "--norm-groups", "4", "--checkpoint-every", "1",
           "--val-every", "100", "--threads", "1", "--quiet")  # fmt: skip


def test_a_store_being_trained_on_is_not_replaced(tmp_path: Path) -> None:
    """Issue 16 item 3: `prepare --overwrite` of the store `fit-vae` reads is refused (exit 6)
    while the training lives; the run then names the store it trained on, intact."""
    store = tmp_path / "s.zarr"
    assert run_cli(*DEMO, "--out", store)[0] == 0
    before = manifest_of(store)
    trainer = spawn(*FIT_VAE, store, "--run", tmp_path / "run",
                    fault="checkpoint.before_publish:1:stop")  # fmt: skip
    try:
        wait_until_stopped(trainer)
        code, _, stderr = run_cli(*DEMO, "--seed", "4", "--out", store, "--overwrite")
        assert_one_error_line(code, stderr, 6, "in use: read by process")
        assert manifest_of(store) == before
    finally:
        processes.kill_group(trainer)
    # The reader died: its claim died with it, and the store may be replaced now.
    code, _, stderr = run_cli(*DEMO, "--seed", "4", "--out", store, "--overwrite")
    assert code == 0, stderr
    assert manifest_of(store)["plan"] != before["plan"]


def test_readers_claim_stores_and_models_and_release_them(tmp_path: Path) -> None:
    """A store being written (its writer lock held) is refused to a reader; a reader's claim
    blocks `--overwrite` of a store and of a run, and leaves nothing behind when released."""
    store = tmp_path / "s.zarr"
    assert run_cli(*DEMO, "--out", store)[0] == 0
    with DirLock(store):
        code, _, stderr = run_cli("filter", store, "--min-quality", "0", "--out", tmp_path / "f")
        assert_one_error_line(code, stderr, 6, "being written by process")
    dead = store / ".specdm.read-1-killed.lock"  # a claim its reader left when it was killed
    dead.write_text("{}")
    os.utime(dead, (time.time() - 60, time.time() - 60))
    with ReadLock(store):
        code, _, stderr = run_cli(*DEMO, "--out", store, "--overwrite")
        assert_one_error_line(code, stderr, 6, "in use: read by process")
    assert sorted(p.name for p in store.glob(".specdm*")) == [".specdm"]
    run = tmp_path / "run"
    assert run_cli(*FIT_VAE, store, "--run", run)[0] == 0
    with ReadLock(run, refuse_writer=False):
        code, _, stderr = run_cli(*FIT_VAE, store, "--run", run, "--overwrite")
        assert_one_error_line(code, stderr, 6, "in use: read by process")
