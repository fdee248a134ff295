"""The `fit-vae` stage: train the two-stream VAE (paper Sec. 3.1, 3.4) into a run directory."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from specdm_cli.errors import InputDataError
from specdm_cli.manifest import Manifest
from specdm_cli.models.losses import class_weights_auto
from specdm_cli.models.vae import SpecDMVAE, VAEConfig
from specdm_cli.pipeline import rundirs as runs
from specdm_cli.pipeline.provenance import provenance
from specdm_cli.pipeline.signals import StopFlag
from specdm_cli.pipeline.training import (
    Precision,
    autocast,
    load_batch,
    parse_device,
    step_seed,
    to_tensors,
)
from specdm_cli.pipeline.vae_io import load_branches, save_vae
from specdm_cli.pipeline.vae_validation import validate
from specdm_cli.stores import StoreReader, open_store

Progress = Callable[[int, int, dict[str, float]], None]


class VAETrainConfig(BaseModel):
    """How to train the VAE; every default says where it comes from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Our choice for one 24-80 GB GPU at 128 px; LDM's kl-f4 config uses 12 per GPU.
    batch_size: int = Field(16, ge=1)
    # None = LDM's base_learning_rate 4.5e-6 x batch size (its scale_lr); the paper's is blank.
    lr: float | None = Field(None, gt=0)
    # Our choice: LDM trains its autoencoders far longer; enough for 10-band 128 px tiles.
    steps: int = Field(20_000, ge=1)
    # LDM's KL weight, relative to a reconstruction loss summed over pixels (applied / C*H*W).
    kl_weight: float = Field(1e-6, ge=0)
    sad_weight: float = Field(0.1, ge=0)  # paper Eq. 1, Sec. 3.4
    class_weights: Literal["none", "auto"] = "auto"  # ours: rare classes and rare change
    seed: int = Field(0, ge=0)
    precision: Precision = "fp32"
    augment: Literal["d4", "none"] = "d4"  # ours: OSCD has a few hundred pairs
    limit: int | None = Field(None, ge=1)  # paper's limited-data protocol (first N pairs)
    split: str = "train"
    val_every: int = Field(1000, ge=1)  # ours
    val_samples: int = Field(256, ge=1)  # ours: enough for a stable mIoU, cheap on CPU
    checkpoint_every: int = Field(1000, ge=1)  # ours
    downsample: Literal[4, 8] = 4  # LDM kl-f4; the paper's f is blank in our copy
    image_latent_channels: int = Field(4, ge=1)  # see VAEConfig
    mask_latent_channels: int = Field(3, ge=1)  # see VAEConfig
    image_block_out_channels: tuple[int, ...] = ()  # () = VAEConfig's default for f
    mask_block_out_channels: tuple[int, ...] = ()
    layers_per_block: int = Field(2, ge=1)  # LDM kl-f4
    norm_num_groups: int = Field(32, ge=1)  # LDM / diffusers
    single_stream: bool = False  # LDM baseline of Tables 1, 2, 5

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 4.5e-6 * self.batch_size

    def training_identity(self) -> dict[str, Any]:
        """What a resume must match: everything but the schedule of steps, checks and saves."""
        return self.model_dump(
            exclude={"steps", "val_every", "checkpoint_every", "val_samples"}, mode="json"
        )


@dataclass(frozen=True)
class FitVAERequest:
    """A validated `specdm fit-vae` invocation."""

    store: Path
    run: Path | None
    config: VAETrainConfig
    resume: bool = False
    overwrite: bool = False
    gpus: str | None = None


@dataclass
class FitVAESummary:
    """What `fit-vae` did, for the terminal and `--json`."""

    run: str
    state: str
    step: int
    steps: int
    seconds: float
    steps_per_second: float
    losses: dict[str, float] = field(default_factory=dict)
    validation: dict[str, Any] | None = None


def model_config(config: VAETrainConfig, manifest: Manifest) -> VAEConfig:
    """The VAE architecture for a store's bands and classes."""
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
    )


def training_indices(reader: StoreReader, config: VAETrainConfig) -> np.ndarray:
    """The training samples: the chosen split, cut to `--limit` (paper's limited-data protocol)."""
    indices = reader.indices(config.split)
    if len(indices) == 0:
        raise InputDataError(
            f"the store has no {config.split!r} samples",
            reader.root,
            "prepare a train split or pass --split",
        )
    return indices[: config.limit] if config.limit else indices


def validation_indices(
    reader: StoreReader, config: VAETrainConfig, warn: Callable[[str], None]
) -> np.ndarray:
    """Up to `val_samples` of `val`, else of `test` (with a warning), else none."""
    for split in ("val", "test"):
        indices = reader.indices(split)
        if len(indices):
            if split == "test":
                warn("warning: the store has no val split; validating on test")
            return indices[: config.val_samples]
    warn("warning: the store has no val or test split; no validation")
    return np.array([], dtype=np.int64)


class VAETrainer:
    """One training run: model, optimizer, data and the deterministic step."""

    def __init__(self, reader: StoreReader, config: VAETrainConfig, device: torch.device):
        manifest = reader.manifest
        if manifest.normalization is None:
            raise InputDataError(
                "the store has no normalisation statistics (no train split)",
                reader.root,
                "re-run prepare",
            )
        self.reader, self.config, self.device = reader, config, device
        self.task = manifest.task
        self.mean = torch.tensor(manifest.normalization.mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(manifest.normalization.std, dtype=torch.float32, device=device)
        self.indices = training_indices(reader, config)
        torch.manual_seed(config.seed)
        self.model = SpecDMVAE(model_config(config, manifest)).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.learning_rate())
        fractions = manifest.class_pixel_fraction.get("train")
        auto = config.class_weights == "auto" and fractions is not None
        self.class_weights = (
            class_weights_auto(fractions).to(device) if auto and fractions else None
        )
        pixels = len(manifest.bands) * manifest.height * manifest.width
        self.kl_weight = config.kl_weight / pixels

    def step(self, step: int) -> dict[str, float]:
        """Train on batch `step`: its samples, symmetries and posterior noise depend only on (seed, step)."""
        rng = np.random.default_rng(step_seed(self.config.seed, step, "batch"))
        chosen = rng.choice(
            self.indices, self.config.batch_size, replace=len(self.indices) < self.config.batch_size
        )
        augment = rng if self.config.augment == "d4" else None
        batch, valid = to_tensors(
            load_batch(self.reader, chosen, augment), self.task, self.mean, self.std, self.device
        )
        generator = torch.Generator().manual_seed(step_seed(self.config.seed, step, "posterior"))
        with autocast(self.device, self.config.precision):
            losses = self.model.forward_losses(
                batch,
                self.mean,
                self.std,
                self.config.sad_weight,
                self.kl_weight,
                self.class_weights,
                valid,
                generator,
            )
        self.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        return {name: float(value.detach()) for name, value in losses.items()}


def _append_metrics(run: Path, record: dict[str, Any]) -> None:
    with (run / "metrics.jsonl").open("a", encoding="utf-8") as stream:
        stream.write(json.dumps(record) + "\n")


def fit_vae(
    request: FitVAERequest,
    stop: StopFlag,
    progress: Progress | None = None,
    warn: Callable[[str], None] = print,
) -> FitVAESummary:
    """Train (or resume) the VAE of a run; checkpoints are atomic and resume is bit-exact."""
    started = time.monotonic()
    reader = open_store(request.store)
    device = parse_device(request.gpus)
    run = request.run or runs.default_run_dir(
        reader.manifest.source.dataset if reader.manifest.source else "synthetic"
    )
    state = runs.prepare_run_dir(run, request.resume, request.overwrite)
    with runs.RunLock(run):
        manifest = runs.open_or_create_run(
            run, reader, state, runs.store_sha256(request.store), provenance()
        )
        stage = manifest.stages.get("vae")
        if stage is not None:
            runs.check_resume(run, stage.config, request.config.training_identity())
            if stage.finished and stage.step >= request.config.steps:
                return FitVAESummary(
                    str(run), "already complete", stage.step, request.config.steps, 0.0, 0.0
                )
        trainer = VAETrainer(reader, request.config, device)
        start = 0
        if stage is not None and stage.checkpoint is not None:
            load_branches(trainer.model, run / stage.checkpoint)
            trainer.model.to(device).train()  # from_pretrained hands back eval-mode modules
            trainer.optimizer = torch.optim.AdamW(
                trainer.model.parameters(), lr=request.config.learning_rate()
            )
            runs.load_optimizer_state(trainer.optimizer, run / stage.checkpoint)
            start = stage.step
        val = validation_indices(reader, request.config, warn)
        summary = _train(run, trainer, start, val, request.config, stop, progress)
    runs.register(run, manifest.task, "vae", can_sample=False)
    summary.seconds = round(time.monotonic() - started, 3)
    summary.state = "resumed" if start else "trained"
    return summary


def _train(
    run: Path,
    trainer: VAETrainer,
    start: int,
    val: np.ndarray,
    config: VAETrainConfig,
    stop: StopFlag,
    progress: Progress | None,
) -> FitVAESummary:
    losses: dict[str, float] = {}
    validation: dict[str, Any] | None = None
    tick = time.monotonic()
    for step in range(start, config.steps):
        losses = trainer.step(step)
        done = step + 1
        record: dict[str, Any] = {"step": done, **losses}
        if len(val) and (done % config.val_every == 0 or done == config.steps):
            validation = validate(
                trainer.model,
                trainer.reader,
                val,
                trainer.task,
                trainer.mean,
                trainer.std,
                config.batch_size,
            )
            record["val"] = validation
        _append_metrics(run, record)
        finished = done == config.steps
        if finished or done % config.checkpoint_every == 0 or stop.signum is not None:
            _checkpoint(run, trainer, config, done, finished, validation)
        if progress:
            progress(done, config.steps, losses)
        stop.check()
    rate = (config.steps - start) / max(time.monotonic() - tick, 1e-9)
    return FitVAESummary(
        str(run), "", config.steps, config.steps, 0.0, round(rate, 3), losses, validation
    )


def _checkpoint(
    run: Path,
    trainer: VAETrainer,
    config: VAETrainConfig,
    step: int,
    finished: bool,
    validation: dict[str, Any] | None,
) -> None:
    def write(folder: Path) -> None:
        save_vae(trainer.model, folder)
        runs.save_optimizer_state(trainer.optimizer, folder)

    details = {
        "model": trainer.model.config.model_dump(mode="json"),
        "latent_layout": trainer.model.latent_layout(),
        "learning_rate": config.learning_rate(),
        "train_samples": len(trainer.indices),
        "validation": validation,
    }
    runs.commit_checkpoint(run, "vae", step, write, config.training_identity(), finished, details)
