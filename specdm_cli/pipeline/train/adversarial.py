"""`fit-vae --adversarial-weight`: LDM's patch-GAN discriminator, its optimizer and the warm-up,
saved in every VAE checkpoint (safetensors + JSON) and restored on resume (issue 20 §2)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from specdm_cli.config import VAETrainConfig
from specdm_cli.errors import ModelError, UsageError
from specdm_cli.fs.atomic import atomic_write_text
from specdm_cli.models.image_critics import (
    DiscriminatorConfig,
    PatchDiscriminator,
    adaptive_weight,
    hinge_discriminator_loss,
    patch_layers,
)
from specdm_cli.pipeline.runs.checkpoints import (
    AGAIN_FROM_THE_START,
    load_optimizer,
    save_optimizer,
)
from specdm_cli.pipeline.train.common import LossScaler, step_seed

FOLDER = "discriminator"  # inside a checkpoint folder
# LDM's autoencoder configs train the discriminator with Adam(lr, betas=(0.5, 0.9)) at the
# autoencoder's learning rate.
BETAS = (0.5, 0.9)


class Adversary:
    """The discriminator of one run: its generator term for the VAE and its own update."""

    def __init__(self, bands: int, size: int, config: VAETrainConfig, device: torch.device):
        self.weight, self.start = config.adversarial_weight, config.adversarial_start
        layers = patch_layers(size)
        if not layers:
            raise UsageError(
                f"--adversarial-weight needs scenes of at least 6 px, the store's are {size}",
                hint="drop the term for this store",
            )
        # Fewer levels than LDM's 3 only where its patches would outgrow the scene (< 24 px).
        self.config = DiscriminatorConfig(bands=bands, layers=layers)
        # Its own seed stream: turning the term on leaves the VAE's initialisation as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(step_seed(config.seed, 0, "discriminator"))
            self.network = PatchDiscriminator(self.config).to(device)
        self.optimizer = torch.optim.Adam(
            self.network.parameters(), lr=config.learning_rate(), betas=BETAS
        )
        self.scaler = LossScaler(device, config.precision)
        self.pending: Tensor | None = None  # the discriminator loss of the step in hand

    def active(self, step: int) -> bool:
        """LDM's disc_start: no adversarial term (for either side) before `start`."""
        return step >= self.start

    def term(
        self, recon: Tensor, images: Tensor, nll: Tensor, last_layer: Tensor
    ) -> dict[str, Tensor]:
        """The VAE's adversarial term (hinge generator loss, LDM's adaptive weight x weight);
        keeps the discriminator's loss on these images for `update`."""
        generator_loss = -self.network(recon).mean()
        weight = adaptive_weight(nll, generator_loss, last_layer) * self.weight
        self.pending = hinge_discriminator_loss(
            self.network(images.detach()), self.network(recon.detach())
        )
        return {
            "adversarial": generator_loss,
            "adversarial_weight": weight,
            "discriminator": self.pending.detach(),
            "total": weight * generator_loss,
        }

    def update(self) -> None:
        """One discriminator step on the loss `term` kept (after the VAE's own step)."""
        if self.pending is not None:
            self.scaler.step(self.pending, self.optimizer)
            self.pending = None

    def save(self, checkpoint: Path) -> None:
        folder = checkpoint / FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()}
        save_file(state, folder / "model.safetensors")
        atomic_write_text(folder / "config.json", self.config.model_dump_json(indent=2) + "\n")
        save_optimizer(self.optimizer, folder)
        self.scaler.save(folder)

    def load(self, checkpoint: Path) -> None:
        """Restore the discriminator, its optimizer and loss scaler from a checkpoint."""
        folder = checkpoint / FOLDER
        try:
            saved = DiscriminatorConfig.model_validate(
                json.loads((folder / "config.json").read_text(encoding="utf-8"))
            )
            if saved != self.config:
                raise ValueError(f"discriminator {saved} is not {self.config}")
            self.network.load_state_dict(load_file(folder / "model.safetensors"))
        except (OSError, SafetensorError, ValueError, ValidationError, RuntimeError) as exc:
            raise ModelError(
                f"unreadable discriminator ({type(exc).__name__})",
                folder,
                AGAIN_FROM_THE_START,
            ) from None
        load_optimizer(self.optimizer, folder)
        self.scaler.load(folder)
