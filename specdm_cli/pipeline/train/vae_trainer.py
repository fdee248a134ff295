"""One VAE training run: the model, its losses, critics and the deterministic step (what every
rank of `fit-vae` builds)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from specdm_cli.config import Progress, VAETrainConfig, trainable_side
from specdm_cli.errors import InputDataError, UsageError
from specdm_cli.manifest import IMAGE_ARRAYS, SPLITS, Manifest
from specdm_cli.models.image_critics import ImageCritic, semantic_loss
from specdm_cli.models.losses import class_weights_auto
from specdm_cli.models.vae import SpecDMVAE
from specdm_cli.models.vae_config import VAEConfig
from specdm_cli.pipeline.devices import autocast
from specdm_cli.pipeline.runs import rundirs as runs
from specdm_cli.pipeline.runs.checkpoints import save_optimizer
from specdm_cli.pipeline.runs.vae_io import save_vae
from specdm_cli.pipeline.train.adversarial import Adversary
from specdm_cli.pipeline.train.common import (
    LossScaler,
    image_pixels,
    load_batch,
    step_seed,
    to_tensors,
)
from specdm_cli.pipeline.train.distributed import data_parallel
from specdm_cli.pipeline.train.segmenter import (
    Segmenter,
    load_segmenter,
    segmenter_config,
    train_segmenter,
)
from specdm_cli.pipeline.train.vae_validation import validate
from specdm_cli.stores import StoreReader
from specdm_cli.stores.hints import prepare_again, train_split_hint


def model_config(config: VAETrainConfig, manifest: Manifest) -> VAEConfig:
    """The VAE architecture for a store's bands and classes; a shape that cannot be built is a
    usage error (exit 2), told before any training."""
    try:
        return VAEConfig(
            bands=len(manifest.bands),
            num_classes=len(manifest.classes),
            task=manifest.task,
            single_stream=config.single_stream,
            downsample=config.downsample,
            image_latent_channels=config.image_latent_channels,
            mask_latent_channels=config.mask_latent_channels,
            image_block_out_channels=config.image_block_out_channels,
            mask_block_out_channels=config.mask_block_out_channels,
            layers_per_block=config.layers_per_block,
            norm_num_groups=config.norm_num_groups,
            mask_aware_decoder=config.mask_aware_decoder,
            unlabelled_class=config.unlabelled_class,
        )
    except ValidationError as error:
        reason = error.errors()[0]["msg"].removeprefix("Value error, ")
        raise UsageError(
            f"bad VAE shape: {reason}",
            hint="e.g. --image-blocks 16,32,32 --mask-blocks 8,16,16 --norm-groups 8 (f = 4)",
        ) from None


def require_trainable_samples(reader: StoreReader, downsample: int) -> None:
    """Square samples whose side the VAE halves to a whole latent: another store (a SegMunich
    tree of odd patches, one prepared before sides were checked) is exit 3 before training."""
    height, width = reader.manifest.height, reader.manifest.width
    side = trainable_side(height, width)
    if height != width or height % downsample:
        raise InputDataError(
            f"the store's samples are {height}x{width}: the VAE trains on square samples whose "
            f"side is a multiple of {downsample} (--downsample)",
            reader.root,
            f"prepare it again: {prepare_again(reader.root, reader.manifest, side)}",
        )


def training_indices(reader: StoreReader, config: VAETrainConfig) -> np.ndarray:
    """The training samples: the chosen split, cut to `--limit` (paper's limited-data protocol).
    A store without a train split has no normalisation statistics (prepare computes them on
    train), so no other split can be trained on: its fix is a prepare with a train split."""
    manifest = reader.manifest
    if manifest.normalization is None and len(reader.indices("train")) == 0:
        raise InputDataError(
            "the store has no 'train' samples, so no normalisation statistics to train with",
            reader.root,
            train_split_hint(manifest),
        )
    indices = reader.indices(config.split)
    if len(indices) == 0:
        counts = manifest.split_counts
        held = ", ".join(f"{split} ({counts[split]})" for split in SPLITS if counts.get(split))
        raise InputDataError(
            f"the store has no {config.split!r} samples",
            reader.root,
            f"pass --split with a split it holds: {held}" if held else "prepare it again",
        )
    return indices[: config.limit] if config.limit else indices


class VAETrainer:
    """One training run: model, optimizer, data and the deterministic step."""

    def __init__(
        self,
        reader: StoreReader,
        config: VAETrainConfig,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
        run: Path | None = None,
        val: np.ndarray | None = None,
    ):
        manifest = reader.manifest
        if manifest.normalization is None:
            raise InputDataError(
                "the store has no normalisation statistics (no train split)",
                reader.root,
                train_split_hint(manifest),
            )
        self.reader, self.config, self.device = reader, config, device
        self.rank, self.world = rank, world
        self.run = run
        self.val = val if val is not None else np.array([], dtype=np.int64)
        self.validation: dict[str, Any] | None = None
        self.task = manifest.task
        self.mean = torch.tensor(manifest.normalization.mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(manifest.normalization.std, dtype=torch.float32, device=device)
        self.indices = training_indices(reader, config)
        torch.manual_seed(config.seed)
        self.model = SpecDMVAE(model_config(config, manifest)).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.learning_rate())
        self.scaler = LossScaler(device, config.precision)
        self.pool = ThreadPoolExecutor(config.workers) if config.workers > 1 else None
        fractions = manifest.class_pixel_fraction.get("train")
        auto = config.class_weights == "auto" and fractions is not None
        self.class_weights = (
            class_weights_auto(fractions).to(device) if auto and fractions else None
        )
        pixels = len(manifest.bands) * manifest.height * manifest.width
        self.kl_weight = config.kl_weight / pixels
        self.segmenter: Segmenter | None = None
        self.adversary: Adversary | None = None
        self.losses: nn.Module = _Losses(self)

    def prepare_critics(self, checkpoint: Path | None, progress: Progress | None = None) -> None:
        """The frozen segmenter (from the checkpoint, else trained now) and the discriminator
        (restored from the checkpoint), for the options that ask for them."""
        config, manifest = self.config, self.reader.manifest
        if config.semantic_weight > 0:
            saved = load_segmenter(checkpoint, self.device) if checkpoint else None
            self.segmenter = saved or train_segmenter(
                self.reader, self.indices, self.val, segmenter_config(manifest, config),
                (self.mean, self.std), self.class_weights, progress,
            )  # fmt: skip
        if config.adversarial_weight > 0:
            if self.world > 1:
                raise UsageError(  # torchrun's ranks, which fit_vae() cannot count
                    "--adversarial-weight trains on one device only",
                    hint="drop --gpus or the term",
                )
            size = min(manifest.height, manifest.width)
            self.adversary = Adversary(len(manifest.bands), size, config, self.device)
            if checkpoint is not None:
                self.adversary.load(checkpoint)

    def critic(self, step: int) -> ImageCritic | None:
        """The extra image terms of step `step` (None when no option asks for any)."""
        segmenter, adversary = self.segmenter, self.adversary
        if adversary is not None and not adversary.active(step):
            adversary = None
        if segmenter is None and adversary is None:
            return None
        weight, phases = self.config.semantic_weight, len(IMAGE_ARRAYS[self.task])
        vae = self.model.image_vae if self.model.image_vae is not None else self.model.joint_vae
        last_layer = vae.decoder.conv_out.weight

        def terms(
            recon: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, nll: torch.Tensor
        ) -> dict[str, torch.Tensor]:
            out: dict[str, torch.Tensor] = {"total": recon.new_zeros(())}
            if segmenter is not None:
                out["semantic"] = semantic_loss(
                    segmenter.network, recon, labels, phases, self.class_weights
                )
                out["total"] = out["total"] + weight * out["semantic"]
                nll = nll + weight * out["semantic"]
            if adversary is not None:
                extra = adversary.term(recon, images, nll, last_layer)
                out = {**out, **extra, "total": out["total"] + extra["total"]}
            return out

        return terms

    def wrap(self) -> None:
        """Data-parallel across ranks (after any checkpoint is loaded)."""
        self.losses = data_parallel(_Losses(self), self.device, self.world)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.config.learning_rate())

    def step(self, step: int) -> dict[str, float]:
        """Train on batch `step`: its samples, symmetries and posterior noise depend only on (seed, step)."""
        rng = np.random.default_rng(step_seed(self.config.seed, step, "batch"))
        chosen = rng.choice(
            self.indices, self.config.batch_size, replace=len(self.indices) < self.config.batch_size
        )
        augment = rng if self.config.augment == "d4" else None
        # Every rank draws the whole batch the same way, then trains on its own rows.
        arrays = {
            k: v[self.rank :: self.world]
            for k, v in load_batch(self.reader, chosen, augment, self.pool).items()
        }
        batch, labelled = to_tensors(arrays, self.task, self.mean, self.std, self.device)
        valid = image_pixels(labelled, self.config.unlabelled_class)
        stream = f"posterior/{self.rank}" if self.world > 1 else "posterior"
        generator = torch.Generator().manual_seed(step_seed(self.config.seed, step, stream))
        with autocast(self.device, self.config.precision):
            losses: dict[str, torch.Tensor] = self.losses(
                batch, valid, generator, self.critic(step)
            )
        self.scaler.step(losses["total"], self.optimizer)
        if self.adversary is not None:
            self.adversary.update()
        return {name: float(value.detach()) for name, value in losses.items()}

    def validate(self) -> dict[str, Any]:
        """Reconstruction metrics on the val samples, as the record's "val" field."""
        if not len(self.val):
            return {}
        self.validation = validate(
            self.model,
            self.reader,
            self.val,
            self.task,
            self.mean,
            self.std,
            self.config.batch_size,
        )
        return {"val": self.validation}

    def checkpoint(self, step: int, finished: bool) -> None:
        """Both branches, the optimizer and the loss scaler, committed atomically into the run."""
        assert self.run is not None, "a trainer that checkpoints knows its run"

        def write(folder: Path) -> None:
            save_vae(self.model, folder)
            save_optimizer(self.optimizer, folder)
            self.scaler.save(folder)
            for critic in (self.segmenter, self.adversary):
                if critic is not None:
                    critic.save(folder)

        details = {
            "model": self.model.config.model_dump(mode="json"),
            "latent_layout": self.model.latent_layout(),
            "learning_rate": self.config.learning_rate(),
            "train_samples": len(self.indices),
            "validation": self.validation,
            "options": self.config.model_dump(mode="json"),  # what a --resume starts from
        }
        if self.segmenter is not None:
            details["segmenter"] = {
                "config": self.segmenter.config.model_dump(mode="json"),
                **self.segmenter.summary,
            }
        identity = self.config.training_identity()
        runs.commit_checkpoint(self.run, "vae", step, write, identity, finished, details)


class _Losses(nn.Module):
    """forward() = the VAE's losses, so DistributedDataParallel can wrap the training step."""

    def __init__(self, trainer: VAETrainer):
        super().__init__()
        self.model = trainer.model
        self.trainer = [trainer]  # a list: not registered as a submodule

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        valid: torch.Tensor,
        generator: torch.Generator,
        critic: ImageCritic | None = None,
    ) -> dict[str, torch.Tensor]:
        t = self.trainer[0]
        return self.model.forward_losses(
            batch,
            t.mean,
            t.std,
            t.config.sad_weight,
            t.kl_weight,
            t.class_weights,
            valid,
            generator,
            critic,
            t.config.gradient_weight,
        )
