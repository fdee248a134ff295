"""The user data directory and its run registry (`runs.json`): later commands find runs there."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import platformdirs

from specdm_cli.errors import InputDataError
from specdm_cli.fs.atomic import atomic_write_text
from specdm_cli.fs.lock import DirLock
from specdm_cli.fs.paths import safe_component

REGISTRY_WAIT_S = 30.0


def user_dir() -> Path:
    """specdm's user data directory; SPECDM_HOME overrides it (tests, shared machines)."""
    home = os.environ.get("SPECDM_HOME")
    return Path(home) if home else Path(platformdirs.user_data_dir("specdm"))


def default_run_dir(store: Path) -> Path:
    """`<user data dir>/runs/<store name>-<timestamp>` (`rgb.zarr` -> `rgb-20261207-0448`): the
    store's name, not its source's, tells one's own datasets apart (every GeoTIFF folder's runs
    were `geotiff-<time>`); made a safe path component first."""
    runs = user_dir() / "runs"
    name = store.resolve().name.removesuffix(".zarr") or "run"
    run = runs / f"{safe_component(name)}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not run.resolve().is_relative_to(runs.resolve()):  # defence in depth: cannot happen
        raise InputDataError("run name escapes the runs folder", run, "pass --run")
    return run


def _registry() -> Path:
    return user_dir() / "runs.json"


_FIX_REGISTRY = (
    "move it away: runs stay where they are (`--model RUN` names one), and the next finished "
    "run starts a new registry"
)


def read_registry() -> list[dict[str, Any]]:
    """All registry entries, oldest first; none before the first run. A registry that cannot
    be read is an input error: read as empty, it sent commands to the demo model instead of
    the user's runs, and the next run's record erased every entry."""
    path = _registry()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise InputDataError(f"cannot read the run registry ({exc})", path, _FIX_REGISTRY) from None
    try:
        entries = json.loads(text)
    except ValueError:
        entries = None
    if not isinstance(entries, list):
        raise InputDataError("the run registry is not a JSON list of runs", path, _FIX_REGISTRY)
    return [entry for entry in entries if isinstance(entry, dict)]


def record_run(
    run: Path, task: str, stage: str, can_sample: bool, keep_existing: bool = False
) -> None:
    """Append (or update) the entry of `run` in the registry, under the registry's lock;
    `keep_existing` leaves an entry already there as it is (perhaps of a later stage)."""
    folder = user_dir()
    folder.mkdir(parents=True, exist_ok=True)
    # Held for the moment of one read-modify-write: wait for it rather than fail a finished run.
    with DirLock(folder, ".runs.lock", wait=REGISTRY_WAIT_S):
        current = read_registry()
        others = [e for e in current if e.get("path") != str(run.resolve())]
        if keep_existing and len(others) < len(current):
            return
        entries = others
        entries.append(
            {
                "path": str(run.resolve()),
                "run_id": run.name,
                "task": task,
                "stage": stage,
                "can_sample": can_sample,
                "finished": time.time(),
            }
        )
        atomic_write_text(_registry(), json.dumps(entries, indent=2))


def newest_run(task: str, can_sample: bool = True) -> Path | None:
    """The newest registered run of `task` that can sample (and still exists)."""
    found = registered_runs(task, can_sample)
    return found[0] if found else None


def registered_runs(task: str, can_sample: bool = True) -> list[Path]:
    """The registered runs of `task` that still exist (and, by default, could sample when
    registered), newest first."""
    found = []
    for entry in reversed(read_registry()):
        path = Path(str(entry.get("path", "")))
        if (
            entry.get("task") == task
            and (entry.get("can_sample") or not can_sample)
            and path.is_dir()
        ):
            found.append(path)
    return found
