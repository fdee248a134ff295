"""Samples <-> disk: Zarr and GeoTIFF stores, their lifecycle (create, resume, overwrite) and locks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from specdm_cli.errors import InputDataError, UsageError
from specdm_cli.manifest import Manifest, load_manifest
from specdm_cli.stores.atomic import remove_tree
from specdm_cli.stores.base import MANIFEST_NAME, SampleMeta, StoreReader, StoreWriter
from specdm_cli.stores.geotiff_store import GeoTiffReader, GeoTiffWriter, create_geotiff
from specdm_cli.stores.lock import refuse_if_locked
from specdm_cli.stores.zarr_store import ZarrReader, ZarrWriter, create_zarr

__all__ = [
    "SampleMeta",
    "StoreReader",
    "StoreWriter",
    "create_store",
    "open_store",
    "open_writer",
    "resolve_target",
]

TargetState = Literal["fresh", "resume", "done"]


def open_store(path: Path, allow_incomplete: bool = False) -> StoreReader:
    """Open a store of either format for reading; an incomplete one only when asked for."""
    if not path.exists():
        raise InputDataError("store does not exist", path, "check the path or run `specdm prepare`")
    manifest = load_manifest(path / MANIFEST_NAME)
    if not manifest.complete and not allow_incomplete:
        raise InputDataError(
            "store is incomplete (its writer stopped early)",
            path,
            "rerun its command with --resume",
        )
    if manifest.format == "zarr":
        return ZarrReader(path, manifest)
    return GeoTiffReader(path, manifest)


def open_writer(path: Path, manifest: Manifest) -> StoreWriter:
    """A writer over an existing store laid out by `create_store`."""
    if manifest.format == "zarr":
        return ZarrWriter(path, manifest)
    return GeoTiffWriter(path, manifest)


def create_store(path: Path, manifest: Manifest, capacity: int, georeferenced: bool) -> None:
    """Lay out an empty store in a temporary sibling, then rename it into place atomically."""
    temp = path.with_name(f".{path.name}.creating-{os.getpid()}")
    remove_tree(temp)
    try:
        if manifest.format == "zarr":
            create_zarr(temp, manifest, capacity, georeferenced)
        else:
            create_geotiff(temp, manifest)
        temp.rename(path)
    except BaseException:
        remove_tree(temp)
        raise


def is_ours(path: Path) -> bool:
    """May `--overwrite` remove `path`? True for an empty folder or one whose manifest.json /
    run.json validates as specdm's; a folder a live process holds locked raises LockHeldError
    (exit 6): it is in use, not ours to remove.
    """
    if not path.is_dir():
        return False
    if not any(path.iterdir()):
        return True
    refuse_if_locked(path)
    try:
        load_manifest(path / MANIFEST_NAME)
    except InputDataError:
        return (path / "run.json").is_file() and _is_run_json(path / "run.json")
    return True


def _is_run_json(path: Path) -> bool:
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


def resolve_target(
    path: Path, plan: dict[str, object], resume: bool, overwrite: bool
) -> TargetState:
    """Decide what to do with an output path, per DESIGN.md's resume/overwrite rules.

    Returns "fresh" (nothing there, or removed by --overwrite), "resume" (an incomplete store
    of the same plan) or "done" (a complete store of the same plan, with --resume).
    """
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other", hint="pick one")
    if not path.exists():
        return "fresh"
    if overwrite:
        if not is_ours(path):
            raise InputDataError(
                "refusing to overwrite a folder that is not a specdm store",
                path,
                "remove it yourself",
            )
        remove_tree(path)
        return "fresh"
    if not resume:
        raise InputDataError(
            "output already exists", path, "pass --resume, --overwrite or another --out"
        )
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
        return "fresh"
    manifest = load_manifest(path / MANIFEST_NAME)
    if manifest.plan != plan:
        changed = "; ".join(plan_differences(manifest.plan, plan)[:4])
        raise InputDataError(
            f"cannot resume: the store was made with other inputs or options ({changed})",
            path,
            "use the original command, or --overwrite",
        )
    return "done" if manifest.complete else "resume"


def plan_differences(old: dict[str, object], new: dict[str, object], prefix: str = "") -> list[str]:
    """What differs between a stored plan and this run's, one `--option: store X, now Y` each."""
    found = []
    for key in sorted(set(old) | set(new)):
        before, now = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(now, dict):
            found += plan_differences(before, now)
        elif before != now:
            name = _PLAN_NAMES.get(key, f"--{key.replace('_', '-')}")
            found.append(f"{name}: store {_shown(before)}, now {_shown(now)}")
    return found


# Plan keys that are not spelled as their option.
_PLAN_NAMES = {"raw": "RAW", "source": "SOURCE", "stage": "command"}


def _shown(value: object) -> str:
    return "unset" if value is None else json.dumps(value)
