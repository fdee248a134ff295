"""Sampling with a trained run: the U-Net's joint latents decoded into physical-unit pairs.

`synthesize` writes what this draws; the benchmark times it. Sample i depends only on
(model, seed, i): every draw has its own generator (DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specdm_cli.config import Precision, SamplerChoice, SamplerName
from specdm_cli.errors import ModelError
from specdm_cli.manifest import IGNORE_INDEX, IMAGE_ARRAYS, LABEL_ARRAY
from specdm_cli.models.detail import add_detail
from specdm_cli.models.diffusion import ScheduleConfig, alphas_cumprod
from specdm_cli.models.distillation import sample_student
from specdm_cli.models.samplers import (
    DEFAULT_SAMPLER,
    initial_noise,
    sample_generator,
    sample_latents,
)
from specdm_cli.pipeline.devices import autocast
from specdm_cli.pipeline.runs.checkpoints import load_module
from specdm_cli.pipeline.runs.choose import ChosenModel
from specdm_cli.pipeline.runs.detail_io import load_bank
from specdm_cli.pipeline.runs.vae_io import load_vae
from specdm_cli.pipeline.synthesize.masks import GivenMasks, conditioned, given_condition

# On the CPU, decoding 64 samples at once cost 1.6-2.4x per sample what 16 did (the activations
# leave the cache), while the U-Net gains from big batches; so decoding goes in chunks of 16
# samples whatever B is (examples/bench_synthesize.py measures it). A constant, so every run
# decodes a batch alike and sample i stays a function of (model, seed, B, i).
CPU_DECODE_CHUNK = 16


@dataclass(frozen=True)
class SamplingPlan:
    """How to draw: the solver, the seed of sample 0's generator, the batch grid B, precision."""

    sampler: SamplerName = "dpmpp"
    seed: int = 0
    batch_size: int = 16
    precision: Precision = "fp32"
    decode_chunk: int | None = None  # samples per decoder call; None: CPU_DECODE_CHUNK on the CPU
    label_confidence: float = 0.0  # pixels whose decoded class is less sure than this: 255
    detail: bool = False  # add the run's retrieved detail (fit-detail) to decoded images


class Sampler:
    """The run's U-Net (EMA weights) and VAE decoders, producing physical-unit samples."""

    def __init__(
        self,
        model: ChosenModel,
        plan: SamplingPlan,
        device: torch.device,
        masks: GivenMasks | None = None,
    ):
        from diffusers import UNet2DModel

        run, manifest = model.path, model.manifest
        # The distilled student replaces the U-Net; it shares the teacher's latent space.
        self.student_timesteps = distilled_timesteps(model) if plan.sampler == "distilled" else []
        stage = manifest.stages["distill" if self.student_timesteps else "diffusion"]
        self.unet = load_module(UNet2DModel, run / str(stage.checkpoint) / "unet").to(device).eval()
        self.vae = load_vae(run, manifest, device)
        details = manifest.diffusion_details()
        self.scale = torch.tensor(details.latent_scale, device=device)[None, :, None, None]
        self.shift = torch.tensor(details.shift(), device=device)[None, :, None, None]
        self.schedule = ScheduleConfig.model_validate(details.schedule)
        self.alphas_cumprod = alphas_cumprod(self.schedule).to(device, torch.float32)
        self.mean = torch.tensor(manifest.normalization.mean, device=device)[:, None, None]
        self.std = torch.tensor(manifest.normalization.std, device=device)[:, None, None]
        self.floor = band_floor(manifest.normalization.minimum)
        self.side = manifest.height // self.vae.config.downsample
        self.channels = int(self.scale.shape[1])
        self.plan, self.device, self.task = plan, device, manifest.task
        self.dtype = np.dtype(manifest.dtype)
        self.classes = len(manifest.classes)
        self.condition, self.masks = details.mask_condition, masks
        self.bank = load_bank(run, manifest) if plan.detail else None
        if self.condition is not None:  # samplers call it as any U-Net; `_given` sets its input
            grid = (plan.batch_size, self.side)
            self.unet = conditioned(self.unet, self.condition, grid, masks, device)

    def _given(self, first: int) -> np.ndarray | None:
        """With --masks, the labels of batch `first` (B of them), whose latents become the
        conditioned U-Net's input; without, None (a conditioned U-Net keeps its zeros: no mask,
        it samples image and mask jointly)."""
        if self.masks is None:
            return None
        labels = self.masks.labels(range(first, first + self.plan.batch_size))
        self.unet.condition = given_condition(self.vae, labels, self.shift, self.scale)
        return labels

    @torch.no_grad()
    def batch(self, first: int, keep: int, steps: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Draws first.. (always B of them, so every batch computes alike), the first `keep`
        returned in the store's units with the values clipped per sample."""
        given = self._given(first)
        padded = range(first, first + self.plan.batch_size)
        generators = [sample_generator(self.plan.seed, i) for i in padded]
        shape = (self.channels, self.side, self.side)
        precision = lambda: autocast(self.device, self.plan.precision)  # noqa: E731
        if self.student_timesteps:
            noise = initial_noise(generators, shape).to(self.device)
            latents = sample_student(self.unet, self.schedule.prediction_type, self.alphas_cumprod,
                                     self.student_timesteps, noise, precision)  # fmt: skip
        else:
            latents = sample_latents(self.unet, self.plan.sampler, self.schedule, steps, shape,
                                     generators, self.device, precision)  # fmt: skip
        decoded = self.decode(latents / self.scale + self.shift)
        logits = decoded[LABEL_ARRAY[self.task]][:keep]
        label = confident_labels(self.vae.labels(logits), logits, self.plan.label_confidence)
        # With --masks the label is the mask given, not its decoded echo.
        labels = label.to(torch.uint8).cpu().numpy() if given is None else given[:keep]
        arrays: dict[str, np.ndarray] = {LABEL_ARRAY[self.task]: labels}
        names = IMAGE_ARRAYS[self.task]
        physical = [(decoded[name][:keep].float() * self.std + self.mean).cpu() for name in names]
        if self.bank is not None:  # a cd pair's phases take one lookup (models/detail.py)
            add_detail(self.bank, physical, torch.from_numpy(labels))
        clipped = np.zeros(keep, dtype=np.int64)
        for name, values in zip(names, physical, strict=True):
            arrays[name], count = to_dtype(values.numpy(), self.dtype, self.floor)
            clipped += count
        return arrays, clipped

    def decode(self, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both decoders over the batch, in chunks of the plan's decode_chunk samples."""
        chunk = self.plan.decode_chunk or (
            CPU_DECODE_CHUNK if self.device.type == "cpu" else len(latents)
        )
        parts = [self.vae.decode_joint(part) for part in torch.split(latents, chunk)]
        return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


def confident_labels(
    labels: torch.Tensor, logits: torch.Tensor, min_confidence: float
) -> torch.Tensor:
    """The decoded `labels`, unlabelled (255) where the probability of the class that won
    (softmax of `logits`) is below `min_confidence`: a segmenter trained on the pairs skips
    the pixels the mask decoder could not tell (class boundaries mostly) instead of learning
    its guesses there."""
    if min_confidence <= 0.0:
        return labels
    unsure = logits.float().softmax(dim=1).amax(dim=1) < min_confidence
    return torch.where(unsure, IGNORE_INDEX, labels)


def resolve_sampler(
    choice: SamplerChoice, steps: int | None, model: ChosenModel, given_masks: bool = False
) -> SamplerName:
    """`auto`: the model's distilled student where it has a current one, no --steps asks for
    a step count and no --masks are given (a student is joint only), else DEFAULT_SAMPLER. On
    the demo models the student's 4 steps match or beat dpmpp's 10 (README, synthesize)."""
    if choice != "auto":
        return choice
    student = steps is None and not given_masks and _student_problem(model) is None
    return "distilled" if student else DEFAULT_SAMPLER


def distilled_timesteps(model: ChosenModel) -> list[int]:
    """The timesteps of the run's distilled student; refused when there is none or when its
    teacher is no longer the run's U-Net (fit-diffusion ran again after distill)."""
    problem = _student_problem(model)
    if problem is not None:
        raise ModelError(*problem)
    return model.manifest.distill_details().timesteps


def _student_problem(model: ChosenModel) -> tuple[str, Path, str] | None:
    """Why the model's distilled student cannot sample (what, where, how to fix), or None."""
    manifest = model.manifest
    stage = manifest.stages.get("distill")
    if stage is None or not stage.finished or stage.checkpoint is None:
        return (
            "the model has no finished distilled student", model.path,
            "run `specdm distill RUN` to the end first, or pick another --sampler",
        )  # fmt: skip
    if manifest.distill_details().teacher_weights != manifest.stages["diffusion"].weights:
        return (
            "the distilled student was made from an earlier U-Net of this run", model.path,
            "run `specdm distill RUN` again (it distils a new student)",
        )  # fmt: skip
    return None


def to_dtype(
    values: np.ndarray, dtype: np.dtype[Any], floor: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Round (integer stores) and clip (N, C, ...) values to the dtype's range and to a per-band
    `floor` (C,); returns the array and the values clipped in each sample (axis 0). NaN or inf
    is the model's failure, never written: cast, it became a plausible 0 in a store marked
    complete."""
    if not np.isfinite(values).all():
        raise ModelError(
            "the model decoded NaN or inf values (a diverged U-Net or VAE, or a sampler "
            "setting the schedule cannot take)",
            hint="try the default --sampler and --steps; if it persists, retrain the run",
        )
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = np.rint(values)
        low, high = np.asarray(info.min, np.float64), float(info.max)
    else:
        finfo = np.finfo(dtype)
        low, high = np.asarray(finfo.min, np.float64), float(finfo.max)
    if floor is not None:
        low = np.maximum(low, floor.reshape(-1, *[1] * (values.ndim - 2)))
    outside = (values < low) | (values > high)
    clipped = outside.reshape(len(values), -1).sum(axis=1)
    return np.clip(values, low, high).astype(dtype), clipped


def band_floor(minimum: list[float]) -> np.ndarray:
    """0 for each band whose real train values are never negative (reflectance, radiance):
    samples of such a band stay >= 0 in a float or signed store as in an unsigned one."""
    return np.where(np.asarray(minimum) >= 0, 0.0, -np.inf)
