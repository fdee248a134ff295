"""The denoising U-Net, LDM's noise schedule and EMA weights (paper Sec. 3.2, 3.4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UNet2DModel,
    UniPCMultistepScheduler,
)
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from specdm_cli.config import SamplerName, require_groups_divide


class UNetConfig(BaseModel):
    """A diffusers UNet2DModel over the joint latent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: int = Field(ge=1)  # joint latent channels (the VAE's latent layout)
    sample_size: int = Field(ge=1)  # latent height = width
    # Our presets follow LDM's latent U-Nets (channel multipliers 1-2-2/3-4, attention at the
    # coarser levels) at a width of 128, smaller than LDM's 224 for our 10-200 band latents.
    block_out_channels: tuple[int, ...] = (128, 256, 256)
    attention: tuple[bool, ...] = (False, True, True)
    layers_per_block: int = Field(2, ge=1)  # LDM num_res_blocks
    norm_num_groups: int = Field(32, ge=1)  # LDM / diffusers
    attention_head_dim: int = Field(32, ge=1)  # LDM num_head_channels
    # Extra input channels after the noisy latent: a mask-conditioned U-Net's clean mask latent
    # and keep flag (`mask_condition`); 0 = the unconditioned U-Net.
    condition_channels: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _levels_fit(self) -> UNetConfig:
        # Every level but the last halves the latent: it must stay whole down to the bottom.
        halvings = len(self.block_out_channels) - 1
        if len(self.attention) != len(self.block_out_channels):
            raise ValueError("one attention flag per U-Net level is needed")
        require_groups_divide(self.block_out_channels, self.norm_num_groups)
        if self.sample_size % 2**halvings:
            raise ValueError(
                f"{len(self.block_out_channels)} U-Net levels need a latent side divisible by "
                f"{2**halvings}, not {self.sample_size}: use fewer levels (--unet-blocks)"
            )
        return self

    @classmethod
    def for_latent(cls, channels: int, size: int, **overrides: Any) -> UNetConfig:
        """Presets for 16x16, 32x32 and 64x64 latents (deeper for larger latents)."""
        presets: dict[int, dict[str, Any]] = {
            16: {"block_out_channels": (128, 256, 256), "attention": (False, True, True)},
            32: {
                "block_out_channels": (128, 256, 256, 512),
                "attention": (False, False, True, True),
            },
            64: {
                "block_out_channels": (128, 256, 384, 512),
                "attention": (False, False, True, True),
            },
        }
        preset = presets[min(presets, key=lambda s: abs(s - size))]
        levels = len(preset["block_out_channels"])
        while levels > 1 and size % 2 ** (levels - 1):  # tiny latents: fewer halvings
            levels -= 1
        preset = {key: value[:levels] for key, value in preset.items()}
        return cls(channels=channels, sample_size=size, **{**preset, **overrides})


def build_unet(config: UNetConfig) -> Any:
    """The U-Net of `config` (epsilon or v prediction: output channels = input channels)."""
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in config.attention]
    up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention)]
    unet: Any = UNet2DModel  # untyped constructor
    return unet(
        sample_size=config.sample_size,
        in_channels=config.channels + config.condition_channels,
        out_channels=config.channels,
        layers_per_block=config.layers_per_block,
        block_out_channels=config.block_out_channels,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=config.norm_num_groups,
        attention_head_dim=config.attention_head_dim,
    )


def mask_condition(mask_latent: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """A mask-conditioned U-Net's extra input: [clean mask latent x keep, keep flag], with
    `keep` 1 or 0 per sample; all zeros is "no mask given" (classifier-free style)."""
    flag = keep.to(device=mask_latent.device, dtype=mask_latent.dtype)[:, None, None, None]
    ones = torch.ones_like(mask_latent[:, :1])
    return torch.cat([mask_latent * flag, ones * flag], dim=1)


@dataclass
class UNetOutput:
    """What diffusers' U-Net returns, as far as samplers read it."""

    sample: torch.Tensor


class ConditionedUNet:
    """A mask-conditioned U-Net called like an unconditioned one: `unet(x, t)` gets the fixed
    condition appended on the channel axis, so samplers need not know about it.

    With `guidance` w != 1, classifier-free guidance (Ho & Salimans 2022): the output is
    free + w * (conditioned - free), `free` the same U-Net given zeros (no mask); linear in
    the output, so it serves epsilon and v targets alike. Two U-Net passes per step."""

    def __init__(self, unet: Any, condition: torch.Tensor, guidance: float = 1.0):
        self.unet, self.condition, self.guidance = unet, condition, guidance

    def __call__(self, sample: torch.Tensor, timestep: Any) -> Any:
        condition = self.condition.to(device=sample.device, dtype=sample.dtype)
        given = self.unet(torch.cat([sample, condition], dim=1), timestep)
        if self.guidance == 1:
            return given
        free = self.unet(torch.cat([sample, torch.zeros_like(condition)], dim=1), timestep)
        return UNetOutput(free.sample + self.guidance * (given.sample - free.sample))


class ScheduleConfig(BaseModel):
    """LDM's "linear" schedule: beta linear in sqrt(beta) from 0.0015 to 0.0155 (paper Sec. 3.4)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_train_timesteps: int = 1000  # LDM's T; blank in our copy of the paper
    beta_start: float = 0.0015  # paper Sec. 3.4
    beta_end: float = 0.0155  # paper Sec. 3.4
    beta_schedule: str = "scaled_linear"  # diffusers' name for LDM's "linear"
    # LDM predicts epsilon; "v_prediction" (Salimans & Ho 2022) is the option for small budgets.
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"


def ldm_betas(config: ScheduleConfig) -> torch.Tensor:
    """The betas from the formula, in float64: linspace(sqrt(b0), sqrt(b1), T) ** 2."""
    roots = torch.linspace(
        config.beta_start**0.5,
        config.beta_end**0.5,
        config.num_train_timesteps,
        dtype=torch.float64,
    )
    return roots**2


def alphas_cumprod(config: ScheduleConfig) -> torch.Tensor:
    """alpha_bar_t = prod(1 - beta), in float64 as LDM registers it."""
    return torch.cumprod(1 - ldm_betas(config), dim=0)


def make_scheduler(name: SamplerName, config: ScheduleConfig) -> Any:
    """A diffusers scheduler on the schedule; LDM never clips latents, so nothing clips."""
    common = {**config.model_dump()}
    ddpm: Any = DDPMScheduler  # diffusers' schedulers are untyped
    ddim: Any = DDIMScheduler
    dpmpp: Any = DPMSolverMultistepScheduler
    unipc: Any = UniPCMultistepScheduler
    if name == "ddpm":
        return ddpm(**common, clip_sample=False, variance_type="fixed_small")
    if name == "ddim":
        return ddim(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if name == "unipc":
        # Order 3 (diffusers' advice for unconditional sampling) and linspace timesteps, which
        # start at T: measured closest to the converged ODE sample at 4-10 steps of the solvers
        # diffusers has (examples/choose_sampler_steps.py).
        return unipc(**common, solver_order=3, solver_type="bh2", lower_order_final=True)
    return dpmpp(
        **common,
        algorithm_type="dpmsolver++",
        solver_order=2,
        thresholding=False,
        lower_order_final=True,
    )


class EMA:
    """Exponential moving average of parameters, with LDM's warm-up: min(decay, (1+n)/(10+n))."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):  # LDM's LitEma decay
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        """The decay the next update uses (LitEma counts the update first: 2/11 for the first)."""
        upcoming = self.updates + 1
        return min(self.decay, (1 + upcoming) / (10 + upcoming))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        self.updates += 1
        for name, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[name].mul_(decay).add_(value.detach().float(), alpha=1 - decay)
            else:
                self.shadow[name].copy_(value)

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(
            {k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()}
        )
