"""What a `specdm prepare` invocation asks for, validated by the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from specdm_cli.config import MAX_BLANK
from specdm_cli.manifest import Task
from specdm_cli.sources.base import PrepareOptions


@dataclass(frozen=True)
class PrepareRequest:
    """A validated `specdm prepare` invocation."""

    source: str
    raw: Path | None
    out: Path
    format: Literal["zarr", "geotiff"]
    options: PrepareOptions
    max_blank: float = MAX_BLANK
    max_unlabelled: float | None = None
    max_background: float | None = None
    resume: bool = False
    overwrite: bool = False
    workers: int = 4
    # --task as given: the demo's task, for the other sources a check of what the data holds.
    task_asked: Task | None = None
    # Samples per block of per-sample tables and per progress record: small enough that a
    # resume loses little, large enough that the tables are not rewritten per sample.
    batch_grid: int = 64
