"""Save and load a run's detail bank (`specdm fit-detail`; models/detail.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from safetensors import SafetensorError

from specdm_cli.errors import ModelError, UsageError
from specdm_cli.models.detail import Bank, check_bank_file
from specdm_cli.pipeline.runs.run_manifest import RunManifest

STAGE = "detail"
BANK_FILE = "bank.safetensors"
T = TypeVar("T")


def has_bank(manifest: RunManifest) -> bool:
    """Whether the run has a detail bank built (fitting its VAE or not)."""
    stage = manifest.stages.get(STAGE)
    return stage is not None and stage.finished


def require_bank(run: Path, manifest: RunManifest) -> Path:
    """The bank file of a run whose bank fits its VAE and this lookup; exit 2 without one, 4 if
    stale or damaged."""
    stage = manifest.stages.get(STAGE)
    if stage is None or not stage.finished or stage.checkpoint is None:
        raise UsageError(
            "the model has no detail bank for --detail", run,
            "build one with `specdm fit-detail RUN STORE` (the cd demo model has none)",
        )  # fmt: skip
    if stage.config.get("vae_weights") != dict(manifest.stages["vae"].weights):
        raise ModelError(
            "the run's detail bank was built with an earlier VAE", run,
            "rebuild it: specdm fit-detail RUN STORE --overwrite (or synthesize --no-detail)",
        )  # fmt: skip
    path = run / stage.checkpoint / BANK_FILE
    _readable(lambda: check_bank_file(path), path)
    return path


def load_bank(run: Path, manifest: RunManifest) -> Bank:
    """The run's detail bank (see `require_bank`)."""
    path = require_bank(run, manifest)
    return _readable(lambda: Bank.load(path), path)


def _readable(read: Callable[[], T], path: Path) -> T:
    """What `read` returns; a damaged bank or one of an earlier kind is exit 4 with the fix."""
    try:
        return read()
    except (OSError, KeyError, ValueError, TypeError, SafetensorError) as exc:
        raise ModelError(
            f"cannot load the detail bank ({exc})".splitlines()[0], path,
            "rebuild it: specdm fit-detail RUN STORE --overwrite (or synthesize --no-detail)",
        ) from None  # fmt: skip
