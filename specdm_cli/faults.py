"""Test-only fault injection: kill the process at a named point (set SPECDM_FAULT=point[:nth]).

The fault suite uses it to stop the real CLI deterministically, e.g. after the second block of
`prepare` or in the middle of a checkpoint write, then checks that `--resume` recovers exactly.
Without the variable every call is a dictionary lookup and nothing else.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_seen: Counter[str] = Counter()


def fault_point(name: str) -> None:
    """SIGKILL this process the nth time `name` is reached, if SPECDM_FAULT asks for it."""
    wanted = os.environ.get("SPECDM_FAULT")
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    _seen[name] += 1
    if _seen[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
