"""Thread defaults that hold on a shared host: the CPUs a process may use, and sleeping OpenMP
waits chosen before torch loads (examples/bench_synthesize.py --only threads measures both)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from specdm_cli import __main__ as entry
from specdm_cli.pipeline.train.common import available_cpus, torch_threads


@pytest.mark.parametrize(
    ("cpu_max", "limit"),
    [("200000 100000\n", 2), ("50000 100000\n", 1), ("max 100000\n", None), (None, None)],
)
def test_available_cpus_follow_affinity_and_the_cgroup_quota(
    tmp_path: Path, cpu_max: str | None, limit: int | None
) -> None:
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max, encoding="ascii")
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(path) == min(affinity, limit or affinity)


def test_default_threads_are_the_available_cpus() -> None:
    import torch

    with torch_threads(None):
        assert torch.get_num_threads() == available_cpus()
    with torch_threads(1):
        assert torch.get_num_threads() == 1


def _run_entry(monkeypatch: pytest.MonkeyPatch) -> str | None:
    seen: dict[str, str | None] = {}
    fake_cli = ModuleType("specdm_cli.cli")
    fake_cli.main = lambda: seen.update(policy=os.environ.get("OMP_WAIT_POLICY"))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "specdm_cli.cli", fake_cli)
    entry.main()
    return seen["policy"]


def test_the_command_sets_passive_waits_before_loading_the_cli(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert _run_entry(monkeypatch) == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice wins
    assert _run_entry(monkeypatch) == "ACTIVE"
