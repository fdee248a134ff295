"""Child processes of the tests, each the leader of its own process group, killed whole.

A test that fails or times out must not leave its children behind: a frozen CLI (SPECDM_FAULT
`stop`) or the ranks it spawned kept a lock and two CPU cores busy for hours once. So every
process a test starts goes through `start` or `run`: it gets a new session (its ranks and
helpers join its group), the kernel kills it if pytest dies (PR_SET_PDEATHSIG), and the
autouse fixture in conftest kills every group still alive when the test ends, pass or fail.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1
_started: list[subprocess.Popen[Any]] = []


def _die_with_parent(then: Callable[[], None] | None) -> Callable[[], None]:
    """A preexec_fn: ask Linux for SIGKILL when pytest dies, then run `then`."""

    def preexec() -> None:
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if then is not None:
            then()

    return preexec


def start(
    command: Sequence[str | Path], preexec: Callable[[], None] | None = None, **kwargs: Any
) -> subprocess.Popen[Any]:
    """`subprocess.Popen(command, **kwargs)` in a new process group, killed at test end."""
    process: subprocess.Popen[Any] = subprocess.Popen(
        [str(part) for part in command],
        start_new_session=True,
        preexec_fn=_die_with_parent(preexec),
        **kwargs,
    )
    _started.append(process)
    return process


def kill_group(process: subprocess.Popen[Any]) -> None:
    """SIGKILL the process's whole group (stopped members too) and reap the leader."""
    if process in _started:
        _started.remove(process)  # once only: a dead group's id may later name another's
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone
        os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)  # reaps it and closes its pipes


def kill_started() -> None:
    """Kill the group of every process started since the last call (the conftest fixture)."""
    while _started:
        kill_group(_started[-1])


def run(
    command: Sequence[str | Path],
    timeout: float = 300,
    preexec: Callable[[], None] | None = None,
    **kwargs: Any,
) -> subprocess.CompletedProcess[Any]:
    """`subprocess.run(command, capture_output=True, ...)`, whose group dies with it on timeout."""
    process = start(command, preexec, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        kill_group(process)  # a rank or helper the command left behind goes too
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def python(*args: str | Path) -> list[str]:
    """The command line `python -m specdm_cli ARGS` (the real CLI in a fresh interpreter)."""
    return [sys.executable, "-m", "specdm_cli", *map(str, args)]


def ranks_of(parent: int) -> list[int]:
    """The spawned rank processes of `parent` (not its multiprocessing helpers)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [
        pid for pid in map(int, children)
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]  # fmt: skip


def is_stopped(pid: int) -> bool:
    """Whether `pid` is stopped (SIGSTOP, e.g. frozen at a SPECDM_FAULT point)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def has_pending(pid: int, signum: int) -> bool:
    """Whether `signum` waits for `pid` to handle it (e.g. sent while it is stopped)."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    pending = int(fields["ShdPnd"], 16) | int(fields["SigPnd"], 16)
    return bool(pending >> (signum - 1) & 1)


def wait_for(condition: Callable[[], bool], seconds: float = 120) -> None:
    """Poll `condition` until it holds; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
