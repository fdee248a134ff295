"""Which model `synthesize` uses: a run directory, the best registered run, or a shipped demo."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from specdm_cli.errors import ModelError, task_needed
from specdm_cli.pipeline.runs.registry import registered_runs
from specdm_cli.pipeline.runs.run_manifest import RunManifest, load_run
from specdm_cli.presets import DIFFUSION_PRESETS, VAE_PRESETS

# The recipe a stage's recorded preset stands for (runs record it in details.options).
_RECIPES = {"vae": (VAE_PRESETS, "VAE"), "diffusion": (DIFFUSION_PRESETS, "U-Net")}


@dataclass(frozen=True)
class ChosenModel:
    """A run that can sample, how it was chosen, and the sha256 that identifies its weights."""

    path: Path
    kind: str  # "run", "registry" or "demo"
    manifest: RunManifest
    sha256: str
    why: str = ""  # for a model nobody named: why this one (stderr)


def demo_model_path(task: str) -> Path:
    """The demo run shipped inside the package for `task`."""
    return Path(str(resources.files("specdm_cli") / "assets" / f"demo-{task}"))


def model_sha256(manifest: RunManifest) -> str:
    """One digest over the sha256 of every weights file of both stages."""
    digests = {name: stage.weights for name, stage in sorted(manifest.stages.items())}
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def choose_model(
    model: str | None, task: str | None, for_masks: bool = False, vae_only: bool = False
) -> ChosenModel:
    """`--model PATH`, `--model demo`, or (no --model) the newest registered run of the task
    that trained its whole recipe, else the newest that can sample, else the demo. `for_masks`
    (`synthesize --masks`): only mask-conditioned registered runs can sample. `vae_only`: a run
    named by PATH needs only its VAE (round trips; `benchmark` before a U-Net is trained)."""
    if model not in (None, "demo"):
        path = Path(str(model))
        if path.is_file():
            raise ModelError(
                "--model names a file, not a run folder",
                path,
                "pass the folder holding run.json (fit-vae's --run), or demo",
            )
        return _loaded(path, "run", vae_only=vae_only)
    if task is None:
        raise task_needed(model)
    passed_over: list[str] = []
    if model is None:
        chosen = _from_registry(task, passed_over, for_masks)
        if chosen is not None:
            return chosen
    demo = demo_model_path(task)
    if not (demo / "run.json").is_file():
        raise ModelError(
            f"no demo model for task {task} is shipped", demo, "train one and pass --model"
        )
    why = "the shipped demo model"
    if passed_over:
        why += f"; no registered {task} run can sample ({'; '.join(passed_over)})"
    return _loaded(demo, "demo", why)


def _from_registry(task: str, passed_over: list[str], for_masks: bool) -> ChosenModel | None:
    """The newest registered run that trained its whole recipe, else the newest that can
    sample; `passed_over` gets a reason for each newer run that was not taken."""
    found = [(path, _shortfall(path, for_masks)) for path in registered_runs(task)]
    whole = [n for n, (_, shortfall) in enumerate(found) if shortfall is None]
    usable = [n for n, (_, shortfall) in enumerate(found) if shortfall is None or shortfall[0]]
    chosen = whole[0] if whole else usable[0] if usable else len(found)
    passed_over += [f"{path.name}: {short[1]}" for path, short in found[:chosen] if short]
    if chosen == len(found):
        return None
    path, shortfall = found[chosen]
    if shortfall is None:
        why = f"the newest registered {task} run that trained its whole recipe"
    else:
        why = (
            f"the newest registered {task} run that can sample, though it {shortfall[1]}: "
            "expect rough samples"
        )
    if passed_over:
        why += f"; passed over {len(passed_over)} newer ({'; '.join(passed_over)})"
    return _loaded(path, "registry", f"{why}; --model demo for the shipped model")


def _shortfall(run: Path, for_masks: bool = False) -> tuple[bool, str] | None:
    """None for a run that can sample and trained every step of its preset; else whether it
    can sample at all (with `for_masks`: for given masks), and why it falls short."""
    try:
        manifest = load_run(run, verify=False)
    except ModelError:
        return False, "unreadable run.json"
    for name in ("vae", "diffusion"):
        stage = manifest.stages.get(name)
        if stage is None or not stage.finished:
            step = stage.step if stage is not None else 0
            return False, f"unfinished ({name} stopped at step {step})"
    if manifest.stale_unet():
        return False, "its U-Net learned an earlier VAE's latents (run fit-diffusion again)"
    if for_masks and manifest.diffusion_details().mask_condition is None:
        return False, "not mask-conditioned"
    for name, (presets, label) in _RECIPES.items():
        stage = manifest.stages[name]
        options = stage.details.get("options")
        preset = options.get("preset") if isinstance(options, dict) else None
        recipe = {str(key): values["steps"] for key, values in presets.items()}.get(str(preset))
        if isinstance(recipe, int) and stage.step < recipe:
            return (
                True,
                f"trained only {stage.step} of the {preset} preset's {recipe} {label} steps",
            )
    return None


def _next_stage(manifest: RunManifest) -> str:
    """What the run needs before it can sample, as the command to type."""
    for stage, command in (("vae", "fit-vae STORE --run RUN"), ("diffusion", "fit-diffusion RUN")):
        state = manifest.stages.get(stage)
        if state is None:
            return f"run `specdm {command}`"
        if not state.finished:
            return f"finish it: `specdm {command} --resume` (stopped at step {state.step})"
    return "run `specdm fit-diffusion RUN`"


def _loaded(path: Path, kind: str, why: str = "", vae_only: bool = False) -> ChosenModel:
    manifest = load_run(path)
    if vae_only and manifest.vae_finished():
        return ChosenModel(path, kind, manifest, model_sha256(manifest), why)
    if vae_only:
        raise ModelError("the run's VAE is not trained yet", path, _next_stage(manifest))
    if manifest.stale_unet():
        raise ModelError(
            "the run's U-Net learned the latents of an earlier VAE (fit-vae went on after it)",
            path,
            "run `specdm fit-diffusion RUN` again",
        )
    if not manifest.can_sample():
        raise ModelError("the run cannot sample yet", path, _next_stage(manifest))
    return ChosenModel(path, kind, manifest, model_sha256(manifest), why)
