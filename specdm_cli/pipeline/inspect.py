"""`specdm inspect`: validate a store against its manifest and summarise it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from specdm_cli.config import Progress
from specdm_cli.errors import InputDataError, LockHeldError
from specdm_cli.fs.lock import ReadLock, live_writer
from specdm_cli.manifest import Manifest, load_manifest, manifest_schema
from specdm_cli.stores import check_layout, content_sha256, open_store, verify_store
from specdm_cli.stores.base import MANIFEST_NAME


def store_schema() -> dict[str, Any]:
    """The JSON Schema of a store's manifest (`specdm inspect --schema`)."""
    return manifest_schema()


def inspect_store(
    path: Path,
    allow_incomplete: bool = False,
    verify: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Validate the store at `path` and return its summary (the `--json` payload); `verify`
    reads every written sample back against its checksums."""
    # Claimed while read (a --verify reads every sample); a store being written may be inspected.
    with ReadLock(path, refuse_writer=False):
        if not allow_incomplete:
            _refuse_while_written(path)
        return _inspect(path, allow_incomplete, verify, progress)


def _refuse_while_written(path: Path) -> None:
    """An incomplete store a live process writes: not "its writer stopped early, --resume",
    which that writer's lock would refuse."""
    writer = live_writer(path)
    if writer is None or not (path / MANIFEST_NAME).is_file():
        return
    if load_manifest(path / MANIFEST_NAME).complete:
        return  # complete, with scores or a repair being written: readable as it is
    raise LockHeldError(
        f"store is being written by {writer}",
        path,
        "wait for it to finish, or pass --allow-incomplete to see what is written so far",
    )


def _inspect(
    path: Path, allow_incomplete: bool, verify: bool, progress: Progress | None
) -> dict[str, Any]:
    reader = open_store(path, allow_incomplete)
    check_layout(reader)
    manifest = reader.manifest
    written = reader.written()
    if manifest.complete and not written.all():
        missing = np.flatnonzero(~written)[:5].tolist()
        raise InputDataError(
            f"store claims complete but samples {missing} are not written", path, "re-create it"
        )
    # Verified before the digest reads the tables, so damage is told in full (every table).
    verified = verify_store(reader, progress) if verify else None
    summary = _summary(path, manifest, int(written.sum()))
    summary["content_sha256"] = content_sha256(reader)
    if verified is not None:
        summary["verified"] = verified
    return summary


def _summary(path: Path, manifest: Manifest, written: int) -> dict[str, Any]:
    fractions = manifest.class_pixel_fraction.get("all", [])
    return {
        "path": str(path),
        "format": manifest.format,
        "task": manifest.task,
        "complete": manifest.complete,
        "count": manifest.count,
        "written": written,
        "shape": {"bands": len(manifest.bands), "height": manifest.height, "width": manifest.width},
        "dtype": manifest.dtype,
        "split_counts": manifest.split_counts,
        "bands": [b.model_dump() for b in manifest.bands],
        "classes": [
            {
                **c.model_dump(),
                "pixel_fraction": fractions[c.index] if c.index < len(fractions) else None,
            }
            for c in manifest.classes
        ],
        "crs": manifest.crs,
        "source": manifest.source.model_dump() if manifest.source else None,
        "model": manifest.model.model_dump() if manifest.model else None,
        "tool_version": manifest.tool_version,
        "created": manifest.provenance.get("created"),
    }
