"""One U-Net training run over the latent cache: the model, its EMA and the deterministic
denoising step (what every rank of `fit-diffusion` builds)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from specdm_cli.config import DiffusionTrainConfig
from specdm_cli.models.diffusion import (
    EMA,
    ScheduleConfig,
    UNetConfig,
    alphas_cumprod,
    build_unet,
    mask_condition,
)
from specdm_cli.pipeline.devices import autocast
from specdm_cli.pipeline.runs import rundirs as runs
from specdm_cli.pipeline.train.common import LossScaler, step_seed
from specdm_cli.pipeline.train.distributed import data_parallel
from specdm_cli.pipeline.train.latent_cache import (
    LatentCache,
)
from specdm_cli.pipeline.train.unet_state import (
    ema_copy,
    save_unet_training,
)


def snr_weights(alphas_cumprod: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Per-timestep loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon
    targets, / (SNR + 1) for v targets; ones for gamma 0."""
    if gamma == 0:
        return torch.ones_like(alphas_cumprod)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return snr.clamp(max=gamma) / (snr if prediction == "epsilon" else snr + 1)


class DiffusionTrainer:
    """The U-Net, its EMA, the optimizer and the deterministic step over the latent cache."""

    def __init__(
        self,
        cache: LatentCache,
        config: DiffusionTrainConfig,
        unet_cfg: UNetConfig,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
        run: Path | None = None,
        val: np.ndarray | None = None,
        recorded: dict[str, Any] | None = None,  # details fixed for the whole training
    ):
        self.cache, self.config, self.device = cache, config, device
        self.rank, self.world = rank, world
        self.run = run
        self.val = val if val is not None else np.zeros((0,), dtype=np.float32)
        self.mask_channels = max(0, unet_cfg.condition_channels - 1)
        self.recorded = recorded or {}
        torch.manual_seed(config.seed)
        self.unet = build_unet(unet_cfg).to(device).train()
        self.net: Any = self.unet
        self.ema = EMA(self.unet, config.ema_decay)
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=config.learning_rate())
        self.scaler = LossScaler(device, config.precision)
        self.shift = torch.from_numpy(cache.shift).to(device)[None, :, None, None]
        self.scale = torch.from_numpy(cache.scale).to(device)[None, :, None, None]
        # Products in float64, as LDM registers them, then float32 for the step.
        acp = alphas_cumprod(ScheduleConfig())
        self.alphas_cumprod = acp.to(device=device, dtype=torch.float32)
        weights = snr_weights(acp, config.snr_gamma, config.prediction)
        self.loss_weight = weights.to(device=device, dtype=torch.float32)

    def wrap(self) -> None:
        """Data-parallel across ranks (after any checkpoint is loaded)."""
        self.net = data_parallel(self.unet, self.device, self.world)

    def step(self, step: int) -> dict[str, float]:
        """One denoising step; the batch, z, noise and t depend only on (seed, step)."""
        rng = np.random.default_rng(step_seed(self.config.seed, step, "batch"))
        replace = len(self.cache) < self.config.batch_size
        chosen = rng.choice(len(self.cache), self.config.batch_size, replace=replace)
        # Every rank draws the whole batch the same way, then trains on its own rows.
        rows = np.sort(chosen[self.rank :: self.world])
        stream = f"noise/{self.rank}" if self.world > 1 else "noise"
        generator = torch.Generator().manual_seed(step_seed(self.config.seed, step, stream))
        mean = torch.from_numpy(np.asarray(self.cache.mean.get_orthogonal_selection((rows,))))
        std = torch.from_numpy(np.asarray(self.cache.std.get_orthogonal_selection((rows,))))
        z = (mean + std * torch.randn(mean.shape, generator=generator)).to(self.device)
        z = (z - self.shift) * self.scale
        noise = torch.randn(z.shape, generator=generator).to(self.device)
        t = torch.randint(0, len(self.alphas_cumprod), (z.shape[0],), generator=generator).to(
            self.device
        )
        a = self.alphas_cumprod[t][:, None, None, None]
        # diffusers' add_noise / get_velocity / compute_snr do this maths on float32 cumprods;
        # ours come from LDM's float64 buffers. Parity within float32 rounding is
        # tests/test_diffusion_maths.py::test_forward_process_matches_diffusers_helpers.
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        if self.mask_channels:  # drawn after t: an unconditioned run draws what it always drew
            keep = torch.rand(z.shape[0], generator=generator) < self.config.mask_condition_rate
            noisy = self.conditioned(noisy, (mean.to(self.device) - self.shift) * self.scale, keep)
        with autocast(self.device, self.config.precision):
            predicted = self.net(noisy, t).sample
        target = (
            noise if self.config.prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * z
        )
        per_sample = (predicted.float() - target).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * self.loss_weight[t]).mean()
        self.scaler.step(loss, self.optimizer)
        self.ema.update(self.unet)
        return {"loss": float(loss.detach())}

    def conditioned(self, noisy: torch.Tensor, clean: torch.Tensor, keep: torch.Tensor) -> Any:
        """The U-Net's input: the noisy latent, then for a mask-conditioned U-Net the clean
        (scaled) label latent of the samples where `keep` is true, zeros elsewhere."""
        if not self.mask_channels:
            return noisy
        condition = mask_condition(clean[:, -self.mask_channels :], keep.to(self.device))
        return torch.cat([noisy, condition], dim=1)

    def validate(self) -> dict[str, Any]:
        """The EMA weights' loss on the val latents, as the record's "val_loss" field; a
        mask-conditioned U-Net's also given the val masks, as "val_loss_given_mask"."""
        if not len(self.val):
            return {}
        fields = {"val_loss": self.val_loss(self.val)}
        if self.mask_channels:
            fields["val_loss_given_mask"] = self.val_loss(self.val, given_mask=True)
        return fields

    def checkpoint(self, step: int, finished: bool) -> None:
        """EMA and training U-Nets, optimizer, scaler and EMA count, committed atomically."""
        assert self.run is not None, "a trainer that checkpoints knows its run"

        def write(folder: Path) -> None:
            save_unet_training(folder, self, step)

        details = {
            "unet": dict(self.unet.config),
            "schedule": ScheduleConfig(prediction_type=self.config.prediction).model_dump(),
            "latent_shift": self.cache.shift.tolist(),
            "latent_scale": self.cache.scale.tolist(),
            "learning_rate": self.config.learning_rate(),
            "cached_views": len(self.cache),
            "options": self.config.model_dump(mode="json"),  # what a --resume starts from
            **self.recorded,
        }
        identity = self.config.training_identity()
        plain = json.loads(json.dumps(details, default=str))
        runs.commit_checkpoint(self.run, "diffusion", step, write, identity, finished, plain)

    @torch.no_grad()
    def val_loss(self, latents: np.ndarray, given_mask: bool = False) -> float:
        """The EMA weights' denoising loss on fixed val latents, noise and t (comparable across
        steps); a mask-conditioned U-Net sees no mask unless `given_mask`."""
        ema_unet = ema_copy(self).eval()
        generator = torch.Generator().manual_seed(step_seed(self.config.seed, 0, "val"))
        total = 0.0
        for start in range(0, len(latents), self.config.batch_size):
            z = torch.from_numpy(latents[start : start + self.config.batch_size]).to(self.device)
            z = (z - self.shift) * self.scale
            noise = torch.randn(z.shape, generator=generator).to(self.device)
            t = torch.randint(0, len(self.alphas_cumprod), (z.shape[0],), generator=generator)
            a = self.alphas_cumprod[t.to(self.device)][:, None, None, None]
            noisy = a.sqrt() * z + (1 - a).sqrt() * noise
            keep = torch.full((z.shape[0],), given_mask)
            with autocast(self.device, self.config.precision):
                unet_input = self.conditioned(noisy, z, keep)
                predicted = ema_unet(unet_input, t.to(self.device)).sample.float()
            if self.config.prediction == "v_prediction":  # the epsilon it implies
                predicted = (1 - a).sqrt() * noisy + a.sqrt() * predicted
            total += float(F.mse_loss(predicted, noise, reduction="sum"))
        return total / max(1, latents.size)
