"""Parts of a partial download a store left out: recorded in its manifest, and a rerun told
once RAW holds them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from specdm_cli.errors import InputDataError
from specdm_cli.manifest import Manifest
from specdm_cli.sources.base import LeftOut

LEFT_OUT = "left_out"  # source.details' list of what the raw data lacked when the store was made


def refuse_left_out_now_present(out: Path, manifest: Manifest | None) -> None:
    """Refuse (exit 3) to keep, or resume, a complete store (`manifest`, read from `out`) that
    left out part of a partial download which RAW now holds: its --resume would be a silent no-op
    ("already complete") and the store would still lack that part; --overwrite prepares it
    whole."""
    if manifest is None or not manifest.complete or manifest.source is None:
        return
    parts = manifest.source.details.get(LEFT_OUT)
    for part in parts if isinstance(parts, list) else []:
        watched = part.get("restored_by") if isinstance(part, dict) else None
        present = [p for p in watched or [] if isinstance(p, str) and Path(p).exists()]
        if present:
            raise InputDataError(
                f"the store left out {part.get('part')} ({part.get('reason')}), and RAW now "
                f"holds {present[0]}",
                out,
                "rerun with --overwrite to prepare the whole dataset",
            )


def left_out_records(parts: Sequence[LeftOut]) -> list[dict[str, Any]]:
    """The manifest's `source.details.left_out` entries."""
    return [part.record() for part in parts]
