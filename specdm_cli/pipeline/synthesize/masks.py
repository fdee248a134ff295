"""`synthesize --masks STORE`: the given label maps a mask-conditioned U-Net draws images for.

Sample i is conditioned on the (i mod M)-th of the store's M written samples (of `--masks-split`,
else all), so `--n` beyond M cycles through them with new seeds: more images per mask. The
written label is the given mask itself, never the decoded one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specdm_cli.errors import InputDataError, UsageError
from specdm_cli.manifest import LABEL_ARRAY
from specdm_cli.models.diffusion import ConditionedUNet, mask_condition
from specdm_cli.models.vae import SpecDMVAE
from specdm_cli.pipeline.runs.run_manifest import MaskCondition, RunManifest, check_store_fits
from specdm_cli.stores import open_store, store_sha256

# Classifier-free guidance weight. On the 64 px ss demo (2,500 U-Net steps at rate 0.5, 256
# samples for the 55 test masks) pair mIoU was 0.398 at w 1, 0.483 at 2 and 0.481 at 4, and
# spectral FD 53.3, 32.6, 30.9, band Wasserstein 0.124, 0.077, 0.120 (ours, 2026-12-03;
# README, synthesize): 2. Guidance needs a second U-Net pass (no mask) per step.
DEFAULT_GUIDANCE = 2.0


@dataclass(frozen=True)
class MaskSource:
    """Where the given masks come from (picklable: device ranks open it themselves)."""

    path: Path
    split: str | None = None  # None: every written sample
    guidance: float = DEFAULT_GUIDANCE

    def plan(self) -> dict[str, Any]:
        """What a resume or shard must match: the store's path and manifest, the split and
        the guidance weight."""
        return {
            "masks": str(self.path.resolve()),
            "masks_sha256": store_sha256(self.path),
            "masks_split": self.split,
            "mask_guidance": self.guidance,
        }


def require_conditioned(manifest: RunManifest, path: Path, demo: bool = False) -> MaskCondition:
    """The run's mask condition, or a usage error: an unconditioned U-Net cannot take masks
    (`demo`: the shipped demo model, which is read-only, at `path` or a cached copy of it)."""
    condition = manifest.diffusion_details().mask_condition
    if condition is None:
        if demo:
            raise UsageError(
                "the shipped demo model was trained without mask conditioning, so it cannot "
                "take --masks",
                hint=_conditioned_demo_hint(manifest.task),
            )
        raise UsageError(
            "the model was trained without mask conditioning, so it cannot take --masks",
            path,
            f"train its U-Net again with `specdm fit-diffusion {path} --mask-condition-rate 0.5 "
            "--overwrite` (or drop --masks)",
        )
    return condition


def _conditioned_demo_hint(task: str) -> str:
    """The shipped model is read-only and its training store is not shipped: a copy is trained
    on a demo store of the same 64 px scenes (what examples/train_demo_models.sh made)."""
    return (
        f"copy the package's specdm_cli/assets/demo-{task} folder to COPY, then "
        f"`specdm prepare demo --task {task} --out demo.zarr` and `specdm fit-diffusion COPY "
        "--store demo.zarr --mask-condition-rate 0.5 --overwrite`, and pass --model COPY "
        "(or train your own run; or drop --masks)"
    )


class GivenMasks:
    """The label maps of a store of the run's task, classes and size, read by sample index."""

    def __init__(self, source: MaskSource, run: RunManifest):
        self.source = source
        self.reader = open_store(source.path)
        check_store_fits(self.reader, run, "--masks")
        self.indices = self.reader.indices(source.split)
        if not len(self.indices):
            shown = f"in split {source.split!r}" if source.split else "written"
            raise InputDataError(
                f"the --masks store has no samples {shown}",
                source.path,
                "choose another --masks-split or store",
            )
        self.name = LABEL_ARRAY[run.task]

    def labels(self, samples: range) -> np.ndarray:
        """(len, H, W) uint8 label maps for output samples `samples` (cycling through M)."""
        chosen = self.indices[np.arange(samples.start, samples.stop) % len(self.indices)]
        return np.stack([self.reader.read(int(i))[self.name] for i in chosen]).astype(np.uint8)


@torch.no_grad()
def mask_latents(
    vae: SpecDMVAE, labels: np.ndarray, shift: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Label maps -> the scaled label latent the U-Net was trained with: the mask encoder's
    posterior mean, centred and scaled like the latent cache (the joint latent's last block)."""
    assert vae.mask_vae is not None, "mask conditioning needs the two-stream VAE"
    device = shift.device
    hot = vae.one_hot(torch.from_numpy(labels).to(device))
    mean: torch.Tensor = vae.mask_vae.encode(hot).latent_dist.mean.float()
    channels = mean.shape[1]
    scaled: torch.Tensor = (mean - shift[:, -channels:]) * scale[:, -channels:]
    return scaled


def conditioned(
    unet: Any,
    condition: MaskCondition,
    grid: tuple[int, int],
    masks: GivenMasks | None,
    device: torch.device,
) -> ConditionedUNet:
    """A mask-conditioned U-Net as samplers call it, for batches of `grid` = (B, latent side):
    its input is zeros (no mask: joint sampling) until `given_condition` sets given masks."""
    batch, side = grid
    zeros = torch.zeros((batch, condition.channels + 1, side, side), device=device)
    return ConditionedUNet(unet, zeros, masks.source.guidance if masks is not None else 1.0)


def given_condition(
    vae: SpecDMVAE, labels: np.ndarray, shift: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """The conditioned U-Net's input for given label maps: their latents, flagged as given."""
    latent = mask_latents(vae, labels, shift, scale)
    return mask_condition(latent, torch.ones(len(labels), dtype=torch.bool))
