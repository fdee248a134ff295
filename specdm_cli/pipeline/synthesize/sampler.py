"""Sampling with a trained run: the U-Net's joint latents decoded into physical-unit pairs.

`synthesize` writes what this draws; the benchmark times it. Sample i depends only on
(model, seed, i): every draw has its own generator (DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from specdm_cli.config import Precision, SamplerName
from specdm_cli.manifest import IMAGE_ARRAYS, LABEL_ARRAY
from specdm_cli.models.diffusion import ScheduleConfig
from specdm_cli.models.samplers import sample_generator, sample_latents
from specdm_cli.pipeline.runs.checkpoints import load_module
from specdm_cli.pipeline.runs.choose import ChosenModel
from specdm_cli.pipeline.runs.vae_io import load_vae
from specdm_cli.pipeline.synthesize.masks import GivenMasks, conditioned, given_condition
from specdm_cli.pipeline.train.common import autocast


@dataclass(frozen=True)
class SamplingPlan:
    """How to draw: the solver, the seed of sample 0's generator, the batch grid B, precision."""

    sampler: SamplerName = "dpmpp"
    seed: int = 0
    batch_size: int = 16
    precision: Precision = "fp32"


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
        stage = manifest.stages["diffusion"]
        self.unet = load_module(UNet2DModel, run / str(stage.checkpoint) / "unet").to(device).eval()
        self.vae = load_vae(run, manifest, device)
        details = manifest.diffusion_details()
        self.scale = torch.tensor(details.latent_scale, device=device)[None, :, None, None]
        self.shift = torch.tensor(details.shift(), device=device)[None, :, None, None]
        self.schedule = ScheduleConfig.model_validate(details.schedule)
        self.mean = torch.tensor(manifest.normalization.mean, device=device)[:, None, None]
        self.std = torch.tensor(manifest.normalization.std, device=device)[:, None, None]
        self.side = manifest.height // self.vae.config.downsample
        self.channels = int(self.scale.shape[1])
        self.plan, self.device, self.task = plan, device, manifest.task
        self.dtype = np.dtype(manifest.dtype)
        self.classes = len(manifest.classes)
        self.condition, self.masks = details.mask_condition, masks
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
        latents = sample_latents(
            self.unet, self.plan.sampler, self.schedule, steps, (self.channels, self.side, self.side),
            generators, self.device, lambda: autocast(self.device, self.plan.precision),
        )  # fmt: skip
        decoded = self.vae.decode_joint(latents / self.scale + self.shift)
        arrays: dict[str, np.ndarray] = {}
        clipped = np.zeros(keep, dtype=np.int64)
        for name in IMAGE_ARRAYS[self.task]:
            physical = (decoded[name][:keep].float() * self.std + self.mean).cpu().numpy()
            arrays[name], count = to_dtype(physical, self.dtype)
            clipped += count
        label = decoded[LABEL_ARRAY[self.task]][:keep].argmax(dim=1)
        arrays[LABEL_ARRAY[self.task]] = label.to(torch.uint8).cpu().numpy()
        if given is not None:  # the label is the mask given, not its decoded echo
            arrays[LABEL_ARRAY[self.task]] = given[:keep]
        return arrays, clipped


def to_dtype(values: np.ndarray, dtype: np.dtype[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Round (integer stores) and clip to the dtype's range; returns the array and the values
    clipped in each sample (axis 0)."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = np.rint(values)
        low, high = float(info.min), float(info.max)
    else:
        finfo = np.finfo(dtype)
        low, high = float(finfo.min), float(finfo.max)
    outside = (values < low) | (values > high)
    clipped = outside.reshape(len(values), -1).sum(axis=1)
    return np.clip(values, low, high).astype(dtype), clipped
