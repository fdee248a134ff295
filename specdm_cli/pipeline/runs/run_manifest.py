"""`run.json`: what a run directory holds, how it was made, the sha256 of every weights file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from specdm_cli import __version__
from specdm_cli.errors import InputDataError, ModelError, missing_run
from specdm_cli.fs.atomic import atomic_write_text
from specdm_cli.manifest import Band, ClassInfo, Normalization, Task
from specdm_cli.pipeline.runs.checkpoints import unlisted_weights, verify_digests
from specdm_cli.stores import StoreReader
from specdm_cli.stores.open import manifest_in

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


class VAEDetails(BaseModel):
    """What a finished VAE checkpoint records beside its weights (run.json, stages.vae.details)."""

    model_config = ConfigDict(extra="allow")  # older and newer runs add fields: keep them

    model: dict[str, Any]  # VAEConfig, as JSON
    latent_layout: Any = None
    learning_rate: float | None = None
    train_samples: int | None = None
    validation: dict[str, Any] | None = None


class MaskCondition(BaseModel):
    """A mask-conditioned U-Net (fit-diffusion --mask-condition-rate): its input is the noisy
    joint latent, then the clean label latent x keep and the keep flag (models/diffusion.py)."""

    model_config = ConfigDict(extra="forbid")

    rate: float = Field(ge=0, le=1)  # the fraction of training samples that saw their mask
    channels: int = Field(ge=1)  # the label latent's channels: the joint latent's last ones
    array: str  # the label array conditioned on: mask (ss) or change (cd)


class DiffusionDetails(BaseModel):
    """What a diffusion checkpoint records (run.json, stages.diffusion.details)."""

    model_config = ConfigDict(extra="allow")

    schedule: dict[str, Any]  # ScheduleConfig, as JSON
    latent_scale: list[float]
    # Runs trained before the latents were centred have none: it is zero.
    latent_shift: list[float] | None = None
    unet: dict[str, Any] = Field(default_factory=dict)
    learning_rate: float | None = None
    cached_views: int | None = None
    mask_condition: MaskCondition | None = None  # None: an unconditioned U-Net (older runs too)
    # The VAE stage's weights whose latents it learned; None in runs made before it was kept.
    vae_weights: dict[str, str] | None = None

    def shift(self) -> list[float]:
        return (
            self.latent_shift if self.latent_shift is not None else [0.0] * len(self.latent_scale)
        )


class DistillDetails(BaseModel):
    """What a distilled student's checkpoint records (run.json, stages.distill.details)."""

    model_config = ConfigDict(extra="allow")

    timesteps: list[int]  # the student's, first to last; the step after the last is clean
    teacher_weights: dict[str, str]  # the diffusion stage's weights it was distilled from
    unet: dict[str, Any] = Field(default_factory=dict)


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
    # The store's samples and splits (stores.content_sha256): a store prepared again by the
    # same command is the same data, though its manifest's digest differs. None: older runs.
    source_content_sha256: str | None = None
    bands: list[Band]
    classes: list[ClassInfo]
    dtype: str
    height: int
    width: int
    normalization: Normalization
    stages: dict[str, StageState] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)

    def trained_on(self, manifest_sha256: str, content: str | None) -> bool:
        """A store of that manifest digest, or of the same samples and splits, is the run's
        own training data."""
        same_content = content is not None and content == self.source_content_sha256
        return manifest_sha256 == self.source_manifest_sha256 or same_content

    def vae_details(self) -> VAEDetails:
        """The VAE stage's typed details (a ValidationError if the run has none usable)."""
        return VAEDetails.model_validate(self.stages["vae"].details)

    def diffusion_details(self) -> DiffusionDetails:
        """The diffusion stage's typed details (a ValidationError if the run has none usable)."""
        return DiffusionDetails.model_validate(self.stages["diffusion"].details)

    def distill_details(self) -> DistillDetails:
        """The distilled student's details (the caller checked that the stage exists)."""
        return DistillDetails.model_validate(self.stages["distill"].details)

    def vae_finished(self) -> bool:
        """The VAE trained to its end: the run can encode and decode (round trips)."""
        return "vae" in self.stages and self.stages["vae"].finished

    def can_sample(self) -> bool:
        """Both stages finished, the U-Net on the VAE's latents: the run can synthesize."""
        finished = all(
            name in self.stages and self.stages[name].finished for name in ("vae", "diffusion")
        )
        return finished and not self.stale_unet()

    def stale_unet(self) -> bool:
        """The U-Net learned the latents of an earlier VAE of this run (fit-vae went on after
        fit-diffusion), so its samples would decode through a VAE it never saw."""
        if "vae" not in self.stages or "diffusion" not in self.stages:
            return False
        learned = self.stages["diffusion"].details.get("vae_weights")
        return learned is not None and learned != self.stages["vae"].weights


def _no_run(run: Path) -> ModelError:
    """What a path without run.json is: nothing there (or the name `demo`), or another folder."""
    if not run.exists():
        return missing_run(run)
    store = manifest_in(run)
    if store is not None:  # a store where a run was asked for
        made_by = store.model.path if store.model is not None else None
        return ModelError(
            "not a run directory: a store (manifest.json), no run.json",
            run,
            f"pass the run that made it ({made_by})"
            if made_by
            else f"train a run on it (specdm fit-vae {run} --run RUN) and pass the run",
        )
    return ModelError("not a run directory: no run.json", run, "run `specdm fit-vae` first")


def load_run(run: Path, verify: bool = True) -> RunManifest:
    """Read `run.json` and (by default) check the sha256 of every weights file it lists."""
    path = run / RUN_FILE
    try:
        manifest = RunManifest.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise _no_run(run) from None
    except (OSError, ValueError, ValidationError) as exc:
        first = str(exc).splitlines()[0]
        raise ModelError(
            f"unreadable run.json ({first})", path, "re-train or restore the run"
        ) from None
    try:
        check_consistent(manifest)
    except (KeyError, TypeError, ValueError) as exc:  # pydantic's ValidationError included
        first = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
        raise ModelError(
            f"inconsistent run.json ({first[:300]})", path, "re-train or restore the run"
        ) from None
    if verify:
        for stage in manifest.stages.values():
            verify_digests(run, stage.weights)
            _refuse_unlisted(run, stage)
    return manifest


def _refuse_unlisted(run: Path, stage: StageState) -> None:
    """Every weights file of a checkpoint must be listed, or it would load unverified."""
    if stage.checkpoint is None:
        return
    folder = (run / stage.checkpoint).resolve()
    if not folder.is_relative_to(run.resolve()):
        raise ModelError(
            "run.json names a checkpoint outside the run", folder, "re-train or restore the run"
        )
    unlisted = unlisted_weights(run.resolve(), folder, stage.weights)
    if unlisted:
        raise ModelError(
            f"weights file not listed in run.json: {unlisted[0]}",
            run / RUN_FILE,
            "re-train or restore the run",
        )


def check_consistent(manifest: RunManifest) -> None:
    """What the stages read from run.json beyond its schema: the VAE's model, the diffusion
    schedule and latent scales, one normalisation value per band, a usable dtype and size."""
    import numpy as np

    from specdm_cli.models.diffusion import ScheduleConfig
    from specdm_cli.models.vae_config import VAEConfig

    bands = len(manifest.bands)
    stats = manifest.normalization
    if len(stats.mean) != bands or len(stats.std) != bands:
        raise ValueError(f"normalization has not one value per band ({bands})")
    if np.dtype(manifest.dtype).kind not in "uif" or not manifest.classes:
        raise ValueError(f"dtype {manifest.dtype!r} or classes unusable")
    if sorted(c.index for c in manifest.classes) != list(range(len(manifest.classes))):
        raise ValueError("class indices must be 0..K-1, each once")  # as a store's manifest
    vae = manifest.stages.get("vae")
    if vae is not None and vae.checkpoint is not None:
        model = VAEConfig.model_validate(manifest.vae_details().model)
        if min(manifest.height, manifest.width) < model.downsample or (
            manifest.height % model.downsample or manifest.width % model.downsample
        ):
            raise ValueError(f"size {manifest.height}x{manifest.width} does not fit the VAE")
    diffusion = manifest.stages.get("diffusion")
    if diffusion is not None and diffusion.checkpoint is not None:
        details = manifest.diffusion_details()
        ScheduleConfig.model_validate(details.schedule)
        scale = details.latent_scale
        if not _numbers(scale) or not all(v > 0 for v in scale):
            raise ValueError("latent_scale is not a list of positive numbers")
        shift = details.shift()
        if not _numbers(shift) or len(shift) != len(scale):
            raise ValueError("latent_shift is not a list of numbers, one per latent channel")
        _check_unet_inputs(details)


def _check_unet_inputs(details: DiffusionDetails) -> None:
    """The U-Net takes the latent channels, plus the label latent and flag when conditioned."""
    condition = details.mask_condition
    wanted = len(details.latent_scale) + (condition.channels + 1 if condition else 0)
    given = details.unet.get("in_channels", wanted)  # details without the U-Net's config
    if given != wanted or (condition and condition.channels >= len(details.latent_scale)):
        raise ValueError(f"the U-Net takes {given} input channels, the latents need {wanted}")


def _numbers(values: Any) -> bool:
    """A non-empty list of finite ints or floats (not bools)."""
    return (
        isinstance(values, list)
        and bool(values)
        and all(
            isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)
            for v in values
        )
    )


def save_run(run: Path, manifest: RunManifest) -> None:
    """Write `run.json` atomically."""
    atomic_write_text(run / RUN_FILE, manifest.model_dump_json(indent=2))


def check_store_fits(reader: StoreReader, run: RunManifest, option: str) -> None:
    """The store's labels must mean what the run's do: same task, classes and size (exit 3)."""
    given = reader.manifest
    wanted = f"a {run.task} store of {run.height}x{run.width} px with the run's classes"
    if given.task != run.task:
        raise InputDataError(
            f"the {option} store is task {given.task}, the model {run.task}", reader.root, wanted
        )
    if (given.height, given.width) != (run.height, run.width):
        raise InputDataError(
            f"the {option} store's samples are {given.height}x{given.width} px, the model's "
            f"{run.height}x{run.width}",
            reader.root,
            wanted,
        )
    differ = class_difference(run.classes, given.classes, f"the {option} store")
    if differ is not None:
        raise InputDataError(differ, reader.root, wanted)


def class_difference(
    model: list[ClassInfo], store: list[ClassInfo], named: str = "the store"
) -> str | None:
    """Where a model's classes and a store's (`named`) part, by index and name, in words; None
    where they are the same (a mask's class index must mean one class in both)."""
    ours_by_index = {c.index: c.name for c in model}
    theirs_by_index = {c.index: c.name for c in store}
    for index in sorted(ours_by_index.keys() | theirs_by_index.keys()):
        ours, theirs = ours_by_index.get(index), theirs_by_index.get(index)
        if ours != theirs:
            return (
                f"class {index} is {theirs or 'missing'!r} in {named}, {ours or 'missing'!r} in "
                f"the model ({len(store)} and {len(model)} classes)"
            )
    return None
