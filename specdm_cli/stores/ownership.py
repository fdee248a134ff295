"""What `--overwrite` may remove: a folder specdm made as a store or run, by the same stage.

A store is removed whole, under its writer lock, renamed aside first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from specdm_cli.errors import InputDataError
from specdm_cli.faults import fault_point
from specdm_cli.fs.atomic import remove_tree
from specdm_cli.fs.lock import DirLock, refuse_if_locked
from specdm_cli.manifest import load_manifest
from specdm_cli.stores.base import MANIFEST_NAME

OutputKind = Literal["store", "run"]


def is_ours(path: Path, kind: OutputKind) -> bool:
    """May `--overwrite` remove `path`? True for an empty folder or one that specdm made as
    `kind` (a store's manifest.json or a run's run.json validates); a folder a live process
    holds locked raises LockHeldError (exit 6): it is in use, not ours to remove.
    """
    if not path.is_dir():
        return False
    if not any(path.iterdir()):
        return True
    refuse_if_locked(path)
    if kind == "run":
        return (path / "run.json").is_file() and is_run_json(path / "run.json")
    try:
        load_manifest(path / MANIFEST_NAME)
    except InputDataError:
        return False
    return True


def remove_own(path: Path, kind: OutputKind, stage: object = None) -> None:
    """`--overwrite`: remove `path` if specdm made it as `kind` (DESIGN.md), and a store only if
    the `stage` overwriting it made it (where given): `synthesize --overwrite` onto a prepared
    store would delete real data. Else refuse."""
    refuse_overwrite_of_others(path, kind, stage)
    # Under its writer lock, so no reader starts between the check for readers and the removal;
    # renamed aside first, so no one sees a store half removed (its lock file gone, so unlocked,
    # its manifest gone, so "not a specdm store"): the name holds the whole store or nothing.
    aside = path.with_name(f".{path.name}.removing-{os.getpid()}")
    with DirLock(path) as lock:
        refuse_if_locked(path, mine=lock.path)
        remove_tree(aside)
        path.rename(aside)
    remove_tree(aside)
    fault_point("store.after_remove")  # the name is free: the new store is not made yet


def refuse_overwrite_of_others(path: Path, kind: OutputKind, stage: object = None) -> None:
    """`--overwrite` of `path` (which exists) is refused unless specdm made it as `kind`, by
    `stage` where given (see `remove_own`): checked before a command reads its inputs."""
    if not is_ours(path, kind):
        raise InputDataError(
            f"refusing to overwrite a folder that is not a specdm {kind}",
            path,
            "remove it yourself or choose another output",
        )
    made_by = _made_by(path) if kind == "store" else None
    if stage is not None and made_by not in (None, stage):
        raise InputDataError(
            f"refusing to overwrite a store `specdm {made_by}` made with `specdm {stage}`",
            path,
            "choose another output (remove it yourself if it is no longer needed)",
        )


def _made_by(store: Path) -> object:
    """The stage that made the store (its plan's), None for one that records none or for an
    empty folder."""
    if not (store / MANIFEST_NAME).is_file():
        return None
    return (load_manifest(store / MANIFEST_NAME).plan or {}).get("stage")


def is_run_json(path: Path) -> bool:
    """A run.json specdm wrote: `"specdm_run": true` beside a run's own fields, not any JSON."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(record, dict)
        and record.get("specdm_run") is True
        and {"run_id", "task", "stages", "source_manifest_sha256"} <= record.keys()
    )
