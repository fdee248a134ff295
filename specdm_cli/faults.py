"""Test-only fault injection: kill or freeze the process at a named point (SPECDM_FAULT).

`SPECDM_FAULT=point[:nth[:action]]`: the nth time `point` is reached (default the first), the
process sends itself SIGKILL (`kill`, the default) or SIGSTOP (`stop`: it stays alive and keeps
its locks until the test continues or kills it); several faults are comma-separated. The
fault suite uses it to stop the real CLI deterministically, e.g. after the second block of
`prepare` or in the middle of a checkpoint write, then checks that `--resume` recovers exactly.
Without the variable every call is a dictionary lookup and nothing else.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_seen: Counter[str] = Counter()
_ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


def fault_point(name: str) -> None:
    """Kill (or stop) this process the nth time `name` is reached, if SPECDM_FAULT asks for it
    (several faults: comma-separated)."""
    wanted = os.environ.get("SPECDM_FAULT")
    if not wanted:
        return
    faults = [spec.split(":") for spec in wanted.split(",")]
    mine = [spec[1:] or [""] for spec in faults if spec[0] == name]
    if not mine:
        return
    _seen[name] += 1
    for nth, *action in mine:
        if _seen[name] == int(nth or 1):
            os.kill(os.getpid(), _ACTIONS[action[0] if action else "kill"])
