"""The tests' process helper: a timed-out or abandoned child takes its own children with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import processes

# A parent that starts a grandchild in its group, prints its pid, then stops itself like a
# frozen writer (SPECDM_FAULT=...:stop) with a rank beside it.
FAMILY = (
    "import os, signal, subprocess, sys\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "print(child.pid, flush=True)\n"
    "os.kill(os.getpid(), signal.SIGSTOP)\n"
)


def _gone(pid: int, seconds: float = 30) -> bool:
    """True once `pid` is dead (a zombie counts: only its parent can reap it)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_group_takes_a_stopped_parent_and_its_child() -> None:
    parent = processes.start([sys.executable, "-c", FAMILY], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    processes.kill_group(parent)
    assert parent.returncode == -signal.SIGKILL
    assert _gone(child)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_run_kills_the_group_on_timeout(tmp_path: Path) -> None:
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(tmp_path / 'pid')!r}, 'w').write(str(child.pid))\n"
        "time.sleep(600)\n"
    )
    with pytest.raises(subprocess.TimeoutExpired):
        processes.run([sys.executable, "-c", script], timeout=5)
    assert _gone(int((tmp_path / "pid").read_text()))


def test_children_get_a_group_of_their_own() -> None:
    done = processes.run([sys.executable, "-c", "import os; print(os.getpgid(0))"], text=True)
    assert int(done.stdout) != os.getpgid(0)
