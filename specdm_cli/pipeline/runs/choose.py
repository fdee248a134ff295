"""Which model `synthesize` uses: a run directory, the newest registered run, or a shipped demo."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from specdm_cli.errors import ModelError, UsageError
from specdm_cli.pipeline.runs.registry import newest_run
from specdm_cli.pipeline.runs.run_manifest import RunManifest, load_run


@dataclass(frozen=True)
class ChosenModel:
    """A run that can sample, how it was chosen, and the sha256 that identifies its weights."""

    path: Path
    kind: str  # "run", "registry" or "demo"
    manifest: RunManifest
    sha256: str


def demo_model_path(task: str) -> Path:
    """The demo run shipped inside the package for `task`."""
    return Path(str(resources.files("specdm_cli") / "assets" / f"demo-{task}"))


def model_sha256(manifest: RunManifest) -> str:
    """One digest over the sha256 of every weights file of both stages."""
    digests = {name: stage.weights for name, stage in sorted(manifest.stages.items())}
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def choose_model(model: str | None, task: str | None) -> ChosenModel:
    """`--model PATH`, `--model demo`, or (no --model) the newest run of the task, else the demo."""
    if model not in (None, "demo"):
        return _loaded(Path(str(model)), "run")
    if task is None:
        raise UsageError(
            "without --model, --task is needed to pick a model", hint="pass --task ss or --task cd"
        )
    if model is None:
        newest = newest_run(task)
        if newest is not None:
            return _loaded(newest, "registry")
    demo = demo_model_path(task)
    if not (demo / "run.json").is_file():
        raise ModelError(
            f"no demo model for task {task} is shipped", demo, "train one and pass --model"
        )
    return _loaded(demo, "demo")


def _loaded(path: Path, kind: str) -> ChosenModel:
    manifest = load_run(path)
    if not manifest.can_sample():
        raise ModelError(
            "the run cannot sample yet", path, "finish `specdm fit-vae` and `specdm fit-diffusion`"
        )
    return ChosenModel(path, kind, manifest, model_sha256(manifest))
