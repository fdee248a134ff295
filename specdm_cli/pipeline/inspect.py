"""`specdm inspect`: validate a store against its manifest and summarise it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from specdm_cli.config import Progress
from specdm_cli.errors import InputDataError, LockHeldError
from specdm_cli.fs.lock import ReadLock, live_writer
from specdm_cli.manifest import Manifest, manifest_schema
from specdm_cli.stores import (
    StoreReader,
    check_layout,
    content_sha256,
    incomplete_store,
    open_store,
    verify_store,
)


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
        reader = open_store(path, allow_incomplete=True)
        if not (allow_incomplete or reader.manifest.complete):
            _refuse_incomplete(path, reader.manifest)
        return _inspect(reader, verify, progress)


def _refuse_incomplete(path: Path, manifest: Manifest) -> None:
    """An incomplete store a live process writes is told as such, not as "its writer stopped
    early, --resume", which that writer's lock would refuse."""
    writer = live_writer(path)
    if writer is None:
        raise incomplete_store(path, manifest)
    raise LockHeldError(
        f"store is being written by {writer}",
        path,
        "wait for it to finish, or pass --allow-incomplete to see what is written so far",
    )


def _inspect(reader: StoreReader, verify: bool, progress: Progress | None) -> dict[str, Any]:
    path = reader.root
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
