"""Locks under contention: one holder at a time with many contenders, stale locks taken over
whatever pid they name, overlapping shard plans refused, the run registry's lock waited for.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from specdm_cli.pipeline.runs.registry import read_registry, record_run
from tests import processes
from tests.conftest import manifest_of, run_cli
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
