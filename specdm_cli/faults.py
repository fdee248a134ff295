"""Test-only fault injection: kill or freeze the process at a named point (SPECDM_FAULT).

`SPECDM_FAULT=point[:nth[:action]]`: the nth time `point` is reached (default the first), the
process sends itself SIGKILL (`kill`, the default) or SIGSTOP (`stop`: it stays alive and keeps
its locks until the test continues or kills it). The fault suite uses it to stop the real CLI
deterministically, e.g. after the second block of `prepare` or in the middle of a checkpoint
write, then checks that `--resume` recovers exactly. Without the variable every call is a
dictionary lookup and nothing else.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_seen: Counter[str] = Counter()
_ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


def fault_point(name: str) -> None:
    """Kill (or stop) this process the nth time `name` is reached, if SPECDM_FAULT asks for it."""
    wanted = os.environ.get("SPECDM_FAULT")
    if not wanted:
        return
    point, _, rest = wanted.partition(":")
    if point != name:
        return
    nth, _, action = rest.partition(":")
    _seen[name] += 1
    if _seen[name] == int(nth or 1):
        os.kill(os.getpid(), _ACTIONS[action or "kill"])
