"""A few-step student of the U-Net: trajectory distillation (after Salimans & Ho 2022).

The teacher (the run's EMA U-Net) solves the probability-flow ODE with DPM-Solver++ on a fine
grid that passes through the student's K timesteps; the student learns, at each of them, the
prediction whose deterministic DDIM step lands where the teacher's trajectory is at the next
one (the clean latent after the last). Sampling is then K DDIM steps of the student.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from specdm_cli.models.diffusion import ScheduleConfig, make_scheduler


def student_timesteps(count: int, train_timesteps: int = 1000) -> list[int]:
    """K timesteps spaced evenly from the last ("trailing", Lin et al. 2024): a few-step
    sampler must start at pure noise, which DDIM's "leading" spacing never reaches."""
    if not 1 <= count <= train_timesteps:
        raise ValueError(f"a student takes 1 to {train_timesteps} steps, not {count}")
    return [train_timesteps - 1 - k * train_timesteps // count for k in range(count)]


def teacher_grid(timesteps: list[int], substeps: int) -> list[int]:
    """The teacher's timesteps: `substeps` evenly spaced per student step, through every one of
    the student's timesteps (the last segment ends at 0, then the solver's final clean step)."""
    ends = [*timesteps[1:], 0]
    grid: list[int] = []
    for start, end in zip(timesteps, ends, strict=True):
        points = np.linspace(start, end, substeps + 1)[:-1].round().astype(int).tolist()
        grid += [p for p in points if not grid or p < grid[-1]]
    return grid


@torch.no_grad()
def teacher_trajectories(
    teacher: Any, schedule: ScheduleConfig, noise: torch.Tensor, timesteps: list[int], substeps: int
) -> torch.Tensor:
    """(B, K + 1, C, h, w): the teacher's latents at each student timestep, then the clean one."""
    scheduler = make_scheduler("dpmpp", schedule)
    scheduler.set_timesteps(timesteps=teacher_grid(timesteps, substeps))
    wanted = set(timesteps)
    states: list[torch.Tensor] = []
    latents = noise * scheduler.init_noise_sigma
    for timestep in scheduler.timesteps:
        if int(timestep) in wanted:
            states.append(latents)
        prediction = teacher(scheduler.scale_model_input(latents, timestep), timestep).sample
        latents = scheduler.step(prediction.float(), timestep, latents).prev_sample
    return torch.stack([*states, latents.float()], dim=1)


def predicted_clean(
    prediction: str, output: torch.Tensor, noisy: torch.Tensor, alpha_bar: torch.Tensor
) -> torch.Tensor:
    """The clean latent a U-Net output implies (epsilon or v targets)."""
    if prediction == "v_prediction":
        return alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * output
    return (noisy - (1 - alpha_bar).sqrt() * output) / alpha_bar.sqrt()


def ddim_step(
    noisy: torch.Tensor, clean: torch.Tensor, alpha_bar: torch.Tensor, alpha_bar_next: torch.Tensor
) -> torch.Tensor:
    """The deterministic DDIM step (eta 0) from alpha_bar to alpha_bar_next (1: clean)."""
    noise = (noisy - alpha_bar.sqrt() * clean) / (1 - alpha_bar).sqrt()
    return alpha_bar_next.sqrt() * clean + (1 - alpha_bar_next).sqrt() * noise


def clean_target(
    noisy: torch.Tensor,
    target_next: torch.Tensor,
    alpha_bar: torch.Tensor,
    alpha_bar_next: torch.Tensor,
) -> torch.Tensor:
    """The clean latent whose `ddim_step` from `noisy` gives `target_next` (ddim_step solved for
    `clean`; after the last student step, alpha_bar_next = 1 and it is `target_next` itself)."""
    ratio = (1 - alpha_bar_next).sqrt() / (1 - alpha_bar).sqrt()
    return (target_next - ratio * noisy) / (alpha_bar_next.sqrt() - ratio * alpha_bar.sqrt())


@torch.no_grad()
def sample_student(
    student: Any,
    prediction: str,
    alphas_cumprod: torch.Tensor,
    timesteps: list[int],
    noise: torch.Tensor,
    autocast: Any,
) -> torch.Tensor:
    """K deterministic DDIM steps of the student from `noise` to a clean latent."""
    latents = noise
    one = torch.ones((), dtype=alphas_cumprod.dtype, device=alphas_cumprod.device)
    for number, timestep in enumerate(timesteps):
        alpha_bar = alphas_cumprod[timestep]
        following = timesteps[number + 1] if number + 1 < len(timesteps) else None
        alpha_bar_next = alphas_cumprod[following] if following is not None else one
        t = torch.full((len(latents),), timestep, device=latents.device)
        with autocast():
            output = student(latents, t).sample.float()
        clean = predicted_clean(prediction, output, latents, alpha_bar)
        latents = ddim_step(latents, clean, alpha_bar, alpha_bar_next)
    return latents.float()
