"""`run.json`: what a run directory holds, how it was made, the sha256 of every weights file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from specdm_cli import __version__
from specdm_cli.errors import ModelError
from specdm_cli.manifest import Band, ClassInfo, Normalization, Task
from specdm_cli.pipeline.checkpoints import verify_digests
from specdm_cli.stores.atomic import atomic_write_text

RUN_FILE = "run.json"


class StageState(BaseModel):
    """One training stage of a run (`vae` or `diffusion`)."""

    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any]
    step: int = 0
    finished: bool = False
    checkpoint: str | None = Field(None, description="folder of the latest checkpoint, relative")
    weights: dict[str, str] = Field(default_factory=dict, description="relative path -> sha256")
    details: dict[str, Any] = Field(default_factory=dict)


class RunManifest(BaseModel):
    """A run directory's manifest; `specdm_run` marks the folder as ours (for --overwrite)."""

    model_config = ConfigDict(extra="forbid")

    specdm_run: bool = True
    run_id: str
    tool_version: str = __version__
    task: Task
    dataset: str
    source_store: str
    source_manifest_sha256: str
    bands: list[Band]
    classes: list[ClassInfo]
    dtype: str
    height: int
    width: int
    normalization: Normalization
    stages: dict[str, StageState] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)

    def can_sample(self) -> bool:
        """Both stages finished: the run can synthesize."""
        return all(
            name in self.stages and self.stages[name].finished for name in ("vae", "diffusion")
        )


def load_run(run: Path, verify: bool = True) -> RunManifest:
    """Read `run.json` and (by default) check the sha256 of every weights file it lists."""
    path = run / RUN_FILE
    try:
        manifest = RunManifest.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise ModelError(
            "not a run directory: no run.json", run, "run `specdm fit-vae` first"
        ) from None
    except (OSError, ValueError, ValidationError) as exc:
        first = str(exc).splitlines()[0]
        raise ModelError(
            f"unreadable run.json ({first})", path, "re-train or restore the run"
        ) from None
    if verify:
        for stage in manifest.stages.values():
            verify_digests(run, stage.weights)
    return manifest


def save_run(run: Path, manifest: RunManifest) -> None:
    """Write `run.json` atomically."""
    atomic_write_text(run / RUN_FILE, manifest.model_dump_json(indent=2))
