"""A U-Net's training state in a checkpoint folder, shared by `fit-diffusion` and `distill`:
the EMA U-Net (what sampling loads, `unet/`), the raw one (`train_unet/`), the optimizer, the
loss scaler and the EMA's update count with the step (`ema.json`)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Protocol

import torch

from specdm_cli.errors import ModelError
from specdm_cli.models.diffusion import EMA
from specdm_cli.pipeline.runs.checkpoints import (
    load_module,
    load_optimizer,
    save_module,
    save_optimizer,
)
from specdm_cli.pipeline.train.common import LossScaler


class UNetTraining(Protocol):
    """What a stage training a U-Net holds."""

    unet: Any
    ema: EMA
    optimizer: Any  # replaced on restore: an AdamW over the restored U-Net
    scaler: LossScaler
    config: Any  # the stage's config, with learning_rate()


def ema_copy(trainer: UNetTraining) -> Any:
    """A copy of the U-Net carrying the EMA weights."""
    ema_unet = copy.deepcopy(trainer.unet)
    trainer.ema.copy_to(ema_unet)
    return ema_unet


def save_unet_training(folder: Path, trainer: UNetTraining, step: int) -> None:
    """EMA and training U-Nets, optimizer, scaler and EMA count into `folder`."""
    save_module(ema_copy(trainer), folder / "unet")
    save_module(trainer.unet, folder / "train_unet")
    save_optimizer(trainer.optimizer, folder)
    trainer.scaler.save(folder)
    state = {"updates": trainer.ema.updates, "step": step}
    (folder / "ema.json").write_text(json.dumps(state))


def restore_unet_training(folder: Path, trainer: UNetTraining, device: torch.device) -> int:
    """The state `save_unet_training` wrote, back into `trainer`; returns its step."""
    from diffusers import UNet2DModel

    trainer.unet = load_module(UNet2DModel, folder / "train_unet").to(device).train()
    ema_unet = load_module(UNet2DModel, folder / "unet")
    trainer.ema.shadow = {k: v.detach().clone().float() for k, v in ema_unet.state_dict().items()}
    state = _ema_state(folder / "ema.json")
    trainer.ema.updates = state["updates"]
    trainer.optimizer = torch.optim.AdamW(
        trainer.unet.parameters(), lr=trainer.config.learning_rate()
    )
    load_optimizer(trainer.optimizer, folder)
    trainer.scaler.load(folder)
    return state["step"]


def _ema_state(path: Path) -> dict[str, int]:
    """The EMA's update count and step of a checkpoint; damage is a model error (exit 4)."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        return {key: int(state[key]) for key in ("updates", "step")}
    except (OSError, ValueError, TypeError, KeyError):
        raise ModelError(
            "the checkpoint's EMA state is missing or damaged", path, "resume from another run"
        ) from None
