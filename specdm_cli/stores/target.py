"""A stage's output store: fresh, resume or done (a resume refused where the plan changed).

Also its default name, `--out -` refused, and the room one sample takes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np

from specdm_cli.config import PREPARE_FLAGS, StoreFormat
from specdm_cli.errors import InputDataError, UsageError, refuse_resume_with_overwrite
from specdm_cli.manifest import Task, array_names, load_manifest
from specdm_cli.stores.base import MANIFEST_NAME
from specdm_cli.stores.damage import forget_damaged
from specdm_cli.stores.ownership import remove_own

TargetState = Literal["fresh", "resume", "done"]


def stored_sample_bytes(task: Task, bands: int, dtype: str, height: int, width: int) -> int:
    """Bytes one sample's arrays take uncompressed: its images in `dtype`, its uint8 label.

    Planning uses it uncompressed: Blosc-zstd saves only about 10% on reflectance (the demo
    store: 157 of 176 MB).
    """
    images = len(array_names(task)) - 1
    return height * width * (images * bands * np.dtype(dtype).itemsize + 1)


def default_store_path(stem: str, store_format: StoreFormat) -> Path:
    """`demo.zarr` for a Zarr store, `demo` for a folder of GeoTIFF tiles (not a Zarr store)."""
    return Path(f"{stem}.zarr") if store_format == "zarr" else Path(stem)


def refuse_stream_out(path: Path, option: str = "--out") -> None:
    """`--out -` would make a folder named `-`: outputs are folders, never stdout (exit 2)."""
    if str(path) == "-":
        raise UsageError(
            f"{option} - is not supported: specdm writes a folder, not a stream",
            hint=f"name a folder, e.g. {option} demo.zarr (use --json for a summary on stdout)",
        )


def resolve_target(
    path: Path, plan: dict[str, object], resume: bool, overwrite: bool, resumable: bool = True
) -> TargetState:
    """Decide what to do with an output path, per DESIGN.md's resume/overwrite rules.

    Returns "fresh" (nothing there, or removed by --overwrite), "resume" (an incomplete store
    of the same plan) or "done" (a complete store of the same plan, with --resume).
    """
    refuse_stream_out(path)
    refuse_resume_with_overwrite(resume, overwrite)
    if not path.exists():
        return "fresh"
    if overwrite:
        remove_own(path, "store", plan.get("stage"))
        return "fresh"
    if not resume:
        raise InputDataError(
            "output already exists",
            path,
            "pass --resume, --overwrite or another --out"
            if resumable
            else "pass --overwrite or another --out",
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
    if manifest.complete and forget_damaged(path):
        return "resume"  # complete on paper only: its damaged samples are written again
    return "done" if manifest.complete else "resume"


def plan_differences(
    old: dict[str, object], new: dict[str, object], flags: dict[str, str] | None = None
) -> list[str]:
    """What differs between a stored plan and this run's, one `--option: store X, now Y` each;
    `flags` names keys not spelled as their option (a prepare plan's `options`: PREPARE_FLAGS)."""
    found = []
    for key in sorted(set(old) | set(new)):
        before, now = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(now, dict):
            prepare_options = key == "options" and old.get("stage") == "prepare"
            found += plan_differences(before, now, _PREPARE_FLAG if prepare_options else None)
        elif before != now:
            name = (flags or _PLAN_NAMES).get(key, f"--{key.replace('_', '-')}")
            found.append(f"{name}: store {_shown(before)}, now {_shown(now)}")
    return found


_PREPARE_FLAG = {field: flag for field, (flag, _readers) in PREPARE_FLAGS.items()}
# Plan keys that are not spelled as their option.
_PLAN_NAMES = {
    "raw": "RAW",
    "source": "SOURCE",
    "stage": "command",
    "model_sha256": "--model",
    "masks_sha256": "--masks (its manifest)",
}


def _shown(value: object) -> str:
    return "unset" if value is None else json.dumps(value)
