"""The `fit-vae` stage: train the two-stream VAE (paper Sec. 3.1, 3.4) into a run directory."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from specdm_cli.errors import InputDataError, UsageError
from specdm_cli.manifest import Manifest
from specdm_cli.models.losses import class_weights_auto
from specdm_cli.models.vae import SpecDMVAE, VAEConfig
from specdm_cli.pipeline import rundirs as runs
from specdm_cli.pipeline.distributed import data_parallel, launched_by_torchrun, run_ranks
from specdm_cli.pipeline.provenance import provenance
from specdm_cli.pipeline.run_manifest import load_run
from specdm_cli.pipeline.signals import StopFlag
from specdm_cli.pipeline.training import (
    LossScaler,
    Precision,
    autocast,
    check_finite_loss,
    load_batch,
    parse_devices,
    step_seed,
    to_tensors,
    validation_indices,
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
    # Ours: Zarr decompression releases the GIL, so a few reader threads keep up with a GPU.
    workers: int = Field(4, ge=1)
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
            exclude={"steps", "val_every", "checkpoint_every", "val_samples", "workers"},
            mode="json",
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


class VAETrainer:
    """One training run: model, optimizer, data and the deterministic step."""

    def __init__(
        self,
        reader: StoreReader,
        config: VAETrainConfig,
        device: torch.device,
        rank: int = 0,
        world: int = 1,
    ):
        manifest = reader.manifest
        if manifest.normalization is None:
            raise InputDataError(
                "the store has no normalisation statistics (no train split)",
                reader.root,
                "re-run prepare",
            )
        self.reader, self.config, self.device = reader, config, device
        self.rank, self.world = rank, world
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
        self.losses: nn.Module = _Losses(self)

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
        batch, valid = to_tensors(arrays, self.task, self.mean, self.std, self.device)
        stream = f"posterior/{self.rank}" if self.world > 1 else "posterior"
        generator = torch.Generator().manual_seed(step_seed(self.config.seed, step, stream))
        with autocast(self.device, self.config.precision):
            losses: dict[str, torch.Tensor] = self.losses(batch, valid, generator)
        self.scaler.step(losses["total"], self.optimizer)
        return {name: float(value.detach()) for name, value in losses.items()}


class _Losses(nn.Module):
    """forward() = the VAE's losses, so DistributedDataParallel can wrap the training step."""

    def __init__(self, trainer: VAETrainer):
        super().__init__()
        self.model = trainer.model
        self.trainer = [trainer]  # a list: not registered as a submodule

    def forward(
        self, batch: dict[str, torch.Tensor], valid: torch.Tensor, generator: torch.Generator
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
        )


def _append_metrics(run: Path, record: dict[str, Any]) -> None:
    with (run / "metrics.jsonl").open("a", encoding="utf-8") as stream:
        stream.write(json.dumps(record) + "\n")


@dataclass(frozen=True)
class _Job:
    """What every rank needs to train (picklable: ranks may be separate processes)."""

    run: Path
    store: Path
    config: VAETrainConfig
    checkpoint: str | None
    start: int
    val: np.ndarray


def fit_vae(
    request: FitVAERequest,
    stop: StopFlag,
    progress: Progress | None = None,
    warn: Callable[[str], None] = print,
) -> FitVAESummary:
    """Train (or resume) the VAE of a run; checkpoints are atomic and resume is bit-exact."""
    started = time.monotonic()
    reader = open_store(request.store)
    devices = parse_devices(request.gpus)
    if request.config.batch_size % len(devices):
        raise UsageError(
            f"--batch-size must be a multiple of the {len(devices)} ranks",
            hint="e.g. --batch-size 16",
        )
    dataset = reader.manifest.source.dataset if reader.manifest.source else "synthetic"
    run = request.run or runs.default_run_dir(dataset)
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
        checkpoint = stage.checkpoint if stage is not None else None
        start = stage.step if stage is not None and checkpoint else 0
        job = _Job(
            run,
            request.store,
            request.config,
            checkpoint,
            start,
            validation_indices(reader, request.config.val_samples, warn),
        )
        if len(devices) == 1 and not launched_by_torchrun():
            summary = _rank_main(0, 1, devices[0], job, stop, progress)
        else:
            run_ranks(_rank_main, devices, job)
            summary = _summary_from_run(job)
    runs.register(run, manifest.task, "vae", can_sample=False)
    summary.seconds = round(time.monotonic() - started, 3)
    summary.state = "resumed" if start else "trained"
    return summary


def _rank_main(
    rank: int,
    world: int,
    device: torch.device,
    job: _Job,
    stop: StopFlag | None = None,
    progress: Progress | None = None,
) -> FitVAESummary:
    """One rank: build the model, load the checkpoint, wrap for data parallelism, train."""
    trainer = VAETrainer(open_store(job.store), job.config, device, rank, world)
    if job.checkpoint is not None:
        load_branches(trainer.model, job.run / job.checkpoint)
        trainer.model.to(device).train()  # from_pretrained hands back eval-mode modules
    trainer.wrap()
    if job.checkpoint is not None:
        runs.load_optimizer_state(trainer.optimizer, job.run / job.checkpoint)
        trainer.scaler.load(job.run / job.checkpoint)
    return _train(job.run, trainer, job.start, job.val, job.config, stop or StopFlag(), progress)


def _summary_from_run(job: _Job) -> FitVAESummary:
    stage = load_run(job.run).stages["vae"]
    validation = stage.details.get("validation")
    return FitVAESummary(str(job.run), "", stage.step, job.config.steps, 0.0, 0.0, {}, validation)


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
    writer = trainer.rank == 0
    tick = time.monotonic()
    for step in range(start, config.steps):
        losses = trainer.step(step)
        check_finite_loss(losses["total"], step, run)
        done = step + 1
        # Read once: a signal landing later in this step is seen at the next one, never half.
        stopping = stop.signum is not None
        if writer:
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
            if finished or done % config.checkpoint_every == 0 or stopping:
                _checkpoint(run, trainer, config, done, finished, validation)
        if progress:
            progress(done, config.steps, losses)
        if stopping:
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
        trainer.scaler.save(folder)

    details = {
        "model": trainer.model.config.model_dump(mode="json"),
        "latent_layout": trainer.model.latent_layout(),
        "learning_rate": config.learning_rate(),
        "train_samples": len(trainer.indices),
        "validation": validation,
    }
    runs.commit_checkpoint(run, "vae", step, write, config.training_identity(), finished, details)
