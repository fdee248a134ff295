"""Helpers of the fault suite: the real CLI in a subprocess, frozen writers, checkpoint tensors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

from specdm_cli.fs.lock import LOCK_NAME
from tests import processes


def spawn(*args: str | Path, fault: str | None = None) -> subprocess.Popen[str]:
    """Start `python -m specdm_cli ARGS` with SPECDM_FAULT=`fault` (stderr captured)."""
    env = {**os.environ, "SPECDM_FAULT": fault} if fault else dict(os.environ)
    return processes.start(
        processes.python(*args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def run_killed(*args: str | Path, fault: str) -> str:
    """Run the CLI until SPECDM_FAULT kills it; returns its stderr."""
    process = spawn(*args, fault=fault)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL, f"not killed at {fault}: {stderr}"
    return stderr


def wait_until_stopped(process: subprocess.Popen[str]) -> None:
    """Block until the child froze itself (SPECDM_FAULT=point:nth:stop); it keeps its locks."""
    _, status = os.waitpid(process.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"the child exited instead of stopping (status {status})"


def signal_at_stop(process: subprocess.Popen[str], signum: int, timeout: float = 300) -> str:
    """Send `signum` to a child frozen at its fault point, let it run on; returns its stderr."""
    try:
        wait_until_stopped(process)
        process.send_signal(signum)  # delivered when it runs again
    finally:
        process.send_signal(signal.SIGCONT)
        _, stderr = process.communicate(timeout=timeout)
    return stderr


def assert_one_error_line(code: int, stderr: str, expected: int, words: str = "") -> None:
    """Exit code `expected`, one `error:` line on stderr (containing `words`), no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == expected, stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert words in lines[0] and "Traceback" not in stderr, stderr


def stage_of(run: Path, stage: str) -> dict[str, object] | None:
    """A stage of run.json as written (no verification), or None."""
    stages: dict[str, dict[str, object]] = json.loads((run / "run.json").read_text())["stages"]
    return stages.get(stage)


def checkpoint_state(run: Path, stage: str) -> dict[str, object]:
    """Every tensor of the stage's checkpoint (weights, EMA, optimizer) and its JSON files."""
    recorded = stage_of(run, stage)
    assert recorded is not None and recorded["checkpoint"], f"no {stage} checkpoint"
    folder = run / str(recorded["checkpoint"])
    state: dict[str, object] = {}
    for path in sorted(folder.rglob("*.safetensors")):
        for key, tensor in load_file(path).items():
            state[f"{path.relative_to(folder)}:{key}"] = tensor
    for path in sorted(folder.glob("*.json")):  # optimizer.json, ema.json (configs are rebuilt)
        state[path.name] = json.loads(path.read_text())
    return state


def assert_same_state(actual: dict[str, object], expected: dict[str, object]) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(actual[name], value), name  # type: ignore[arg-type]
        else:
            assert actual[name] == value, name


def assert_clean_run(run: Path) -> None:
    """No temporary files, partial or unnamed checkpoint folders, or lock left in a run dir."""
    assert not list(run.rglob(".*.tmp")), "stray temporary files"
    assert not list(run.glob(".*.partial")), "stray partial checkpoint folders"
    assert not (run / LOCK_NAME).exists(), "lock left behind"
    named = {
        str(s["checkpoint"]) for s in json.loads((run / "run.json").read_text())["stages"].values()
    }
    on_disk = {f"checkpoints/{p.name}" for p in (run / "checkpoints").iterdir()}
    assert on_disk == named, f"checkpoint folders {on_disk} but run.json names {named}"
