"""What `prepare --resume` checks: the raw data's fingerprint is the one recorded at the start."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from specdm_cli.errors import InputDataError
from specdm_cli.manifest import Manifest
from specdm_cli.pipeline.prepare.request import PrepareRequest
from specdm_cli.sources.base import Candidate, SourceSpec


def source_fingerprint(spec: SourceSpec, candidates: Sequence[Candidate]) -> dict[str, Any]:
    """What the raw data decides about the samples: a resume must find the same, or the ones
    written before would sit under another class list, band order or patch grid."""
    listed = "\n".join(f"{candidate.split}\t{candidate.source_id}" for candidate in candidates)
    digest = hashlib.sha256(listed.encode()).hexdigest()
    return {**_described(spec, len(candidates)), "patches listed": digest}


def manifest_fingerprint(manifest: Manifest) -> dict[str, Any]:
    """The fingerprint's fields a store's manifest holds: what a resume that has no samples
    yet compares (the manifest was written from the raw data when the store was begun)."""
    return _described(manifest, manifest.source.candidates if manifest.source else None)


def _described(what: SourceSpec | Manifest, patches: int | None) -> dict[str, Any]:
    return {
        "task": what.task,
        "size": [what.height, what.width],
        "dtype": what.dtype,
        "bands": [band.name for band in what.bands],
        "classes": [[c.index, str(c.code)] for c in what.classes],
        "crs": what.crs,
        "patches": patches,
    }


def refuse_changed_source(
    request: PrepareRequest, begun: dict[str, Any], now: dict[str, Any]
) -> None:
    """Refuse (exit 3) to resume over raw data that changed since the store was begun; `begun`
    holds what was recorded then (nothing in progress records of earlier versions)."""
    changed = [key for key in now if key in begun and begun[key] != now[key]]
    if not changed:
        return
    shown = [
        f"patches {begun.get(key)} -> {now[key]}" if key == "patches" else key for key in changed
    ]
    if "patches" in changed:
        shown = [key for key in shown if key != "patches listed"]
    raise InputDataError(
        f"cannot resume: the raw data changed since the store was begun ({', '.join(shown)})",
        request.raw,
        "restore the raw data, or start again with --overwrite",
    )
