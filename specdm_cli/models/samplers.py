"""Sampling the joint latent with one RNG per sample, so sample i depends only on (model, seed, i)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch

from specdm_cli.config import SamplerName
from specdm_cli.models.diffusion import ScheduleConfig, make_scheduler

# DDPM is the paper's 1000-step reference. dpmpp 10 and ddim 20 were the fewest steps of the
# ladder 10/20/50 whose KID and mSAD were within 10% of DDPM-1000's on both demo models (64
# samples; 2026-12-02). At 256 samples (2026-12-03) dpmpp passes on ss from 8 steps and no ODE
# sampler passes on cd within 10 steps; unipc 10 matches dpmpp 10 there (README, synthesize;
# examples/choose_sampler_steps.py). The CLI's --steps help repeats these.
DEFAULT_STEPS: dict[str, int] = {"ddpm": 1000, "ddim": 20, "dpmpp": 10, "unipc": 10}
# What `--sampler auto` takes for a model without a distilled student.
DEFAULT_SAMPLER: SamplerName = "dpmpp"


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of sample `index` (CPU so every device draws the same numbers)."""
    digest = hashlib.blake2b(f"specdm-sample/{seed}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def initial_noise(generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """(B, *shape) standard normal noise, row i from generator i."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


@torch.no_grad()
def sample_latents(
    unet: Any,
    sampler: SamplerName,
    schedule: ScheduleConfig,
    steps: int,
    shape: tuple[int, int, int],
    generators: list[torch.Generator],
    device: torch.device,
    autocast: Callable[[], Any],
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Denoise one batch of joint latents (DDPM, Ho et al. 2020; DDIM, Song et al. 2021;
    DPM-Solver++, Lu et al. 2022), drawing every random number from each sample's generator.

    Returns (B, C, h, w) float32 latents in the scaled latent space the U-Net was trained on.
    """
    scheduler = make_scheduler(sampler, schedule)
    scheduler.set_timesteps(steps)
    latents = (initial_noise(generators, shape) * scheduler.init_noise_sigma).to(device)
    for number, timestep in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(latents, timestep)
        with autocast():
            prediction = unet(model_input, timestep).sample
        extra = {"generator": generators} if sampler == "ddpm" else {}
        latents = scheduler.step(prediction.float(), timestep, latents, **extra).prev_sample
        if callback:
            callback(number + 1, len(scheduler.timesteps))
    result: torch.Tensor = latents.float()
    return result
