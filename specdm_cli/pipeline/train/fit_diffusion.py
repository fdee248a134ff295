"""The `fit-diffusion` stage: a denoising U-Net on the joint latents (paper Sec. 3.2, 3.4)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from pydantic import ValidationError

from specdm_cli.config import Devices, DiffusionTrainConfig, Progress
from specdm_cli.errors import ModelError, UsageError
from specdm_cli.fs.lock import ReadLock
from specdm_cli.models.diffusion import (
    EMA,
    ScheduleConfig,
    UNetConfig,
    alphas_cumprod,
    build_unet,
    mask_condition,
)
from specdm_cli.pipeline.runs import rundirs as runs
from specdm_cli.pipeline.runs.run_manifest import RunManifest, load_run
from specdm_cli.pipeline.runs.vae_io import load_vae, vae_config
from specdm_cli.pipeline.signals import StopFlag
from specdm_cli.pipeline.train.common import (
    LossScaler,
    autocast,
    check_batch_divides,
    step_seed,
    torch_devices,
    validation_indices,
)
from specdm_cli.pipeline.train.distributed import data_parallel
from specdm_cli.pipeline.train.driver import Schedule, estimating, launch, train_loop
from specdm_cli.pipeline.train.latent_cache import (
    LatentCache,
    cache_key,
    encode_means,
    open_cache,
    open_or_build,
)
from specdm_cli.pipeline.train.unet_state import (
    ema_copy,
    restore_unet_training,
    save_unet_training,
)
from specdm_cli.stores import open_store, store_sha256


@dataclass(frozen=True)
class FitDiffusionRequest:
    run: Path
    config: DiffusionTrainConfig
    resume: bool = False
    devices: Devices = field(default_factory=Devices)
    store: Path | None = None  # default: the store the VAE was trained on


@dataclass
class FitDiffusionSummary:
    run: str
    state: str
    step: int
    steps: int
    seconds: float
    steps_per_second: float
    cache: str
    loss: float | None = None
    latent_shift: list[float] = field(default_factory=list)
    latent_scale: list[float] = field(default_factory=list)
    val_loss: float | None = None
    val_loss_given_mask: float | None = None  # mask-conditioned U-Nets


def unet_config(
    config: DiffusionTrainConfig, channels: int, size: int, condition_channels: int = 0
) -> UNetConfig:
    overrides: dict[str, Any] = {
        "layers_per_block": config.layers_per_block,
        "norm_num_groups": config.norm_num_groups,
        "attention_head_dim": config.attention_head_dim,
        "condition_channels": condition_channels,
    }
    if config.block_out_channels:
        levels = len(config.block_out_channels)
        overrides["block_out_channels"] = config.block_out_channels
        overrides["attention"] = tuple(level >= levels // 2 for level in range(levels))
    try:
        return UNetConfig.for_latent(channels, size, **overrides)
    except ValidationError as error:
        reason = error.errors()[0]["msg"].removeprefix("Value error, ")
        raise UsageError(f"the U-Net does not fit the {size}x{size} latent: {reason}") from None


def condition_input_channels(manifest: RunManifest, config: DiffusionTrainConfig) -> int:
    """The U-Net's extra input channels: the label latent and a keep flag when the run trains
    mask-conditioned, else none. The label latent is the joint latent's last block."""
    if config.mask_condition_rate == 0:
        return 0
    vae = vae_config(manifest)
    if vae.single_stream:
        raise UsageError(
            "--mask-condition-rate needs the two-stream VAE (a separate mask latent)",
            hint="train the VAE without --single-stream, or drop --mask-condition-rate",
        )
    return vae.mask_latent_channels + 1


def mask_condition_details(manifest: RunManifest, unet: UNetConfig, rate: float) -> dict[str, Any]:
    """run.json's record of a mask-conditioned U-Net (empty for an unconditioned one): what
    `synthesize --masks` reads to build the same input."""
    if not unet.condition_channels:
        return {}
    label = vae_config(manifest).label_name
    channels = unet.condition_channels - 1
    return {"mask_condition": {"rate": rate, "channels": channels, "array": label}}


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


@dataclass(frozen=True)
class _Job:
    """What every rank needs (picklable: ranks may be separate processes)."""

    run: Path
    config: DiffusionTrainConfig
    unet: UNetConfig
    checkpoint: str | None
    start: int
    val: np.ndarray  # validation latents (posterior means), possibly empty
    # run.json's details that the training does not change: the VAE weights whose latents the
    # U-Net learns (a later fit-vae makes it stale) and mask_condition_details.
    recorded: dict[str, Any] = field(default_factory=dict)


def fit_diffusion(
    request: FitDiffusionRequest,
    stop: StopFlag,
    progress: Progress | None = None,
    warn: Callable[[str], None] = lambda line: None,
) -> FitDiffusionSummary:
    """Encode the latent cache (once), then train the U-Net with EMA; resume is bit-exact."""
    started = time.monotonic()
    check_batch_divides(request.config.batch_size, request.devices)
    devices = torch_devices(request.devices)
    run = request.run
    load_run(run, verify=False)  # a clear error before the lock creates anything
    with runs.RunLock(run):
        # Read and verified under the lock: another writer may be committing a checkpoint.
        manifest = load_run(run)
        stage = _check_stages(run, manifest, request, warn)
        if stage is not None and stage.finished and stage.step >= request.config.steps:
            return FitDiffusionSummary(
                str(run), "already complete", stage.step, request.config.steps, 0.0, 0.0, "kept"
            )
        extra = condition_input_channels(manifest, request.config)  # refused before encoding
        cache, val = _latents(run, manifest, request, devices[0], stop, progress, warn)
        size = manifest.height // vae_config(manifest).downsample
        checkpoint = stage.checkpoint if stage is not None else None
        start = stage.step if checkpoint else 0
        unet = unet_config(request.config, cache.mean.shape[1], size, extra)
        recorded = {
            "vae_weights": manifest.stages["vae"].weights,
            **mask_condition_details(manifest, unet, request.config.mask_condition_rate),
        }
        job = _Job(run, request.config, unet, checkpoint, start, val, recorded)
        steps = request.config.steps
        told = estimating(progress, warn, "fit-diffusion", f"preset {request.config.preset}")
        summary = launch(devices, _rank_main, job, stop, told) or FitDiffusionSummary(
            str(run), "", steps, steps, 0.0, 0.0, ""
        )
    runs.register(run, manifest.task, "diffusion", can_sample=True)
    summary.seconds = round(time.monotonic() - started, 3)
    summary.state = "resumed" if start else "trained"
    summary.cache = "reused" if cache.reused else "built"
    summary.latent_shift = cache.shift.tolist()
    summary.latent_scale = cache.scale.tolist()
    return summary


def _check_stages(
    run: Path, manifest: RunManifest, request: FitDiffusionRequest, warn: Callable[[str], None]
) -> Any:
    """The diffusion stage to resume (or None); refusals for a missing VAE or a wrong resume."""
    vae_stage = manifest.stages.get("vae")
    if vae_stage is None or not vae_stage.finished:
        raise ModelError(
            "the run has no finished VAE", run, "run `specdm fit-vae` to the end first"
        )
    stage = manifest.stages.get("diffusion")
    if stage is None or stage.checkpoint is None:
        return None
    if manifest.stale_unet():
        # Nothing of it carries over to the new latents; its checkpoint goes at the first new one.
        warn("the run's U-Net learned the latents of an earlier VAE: training a new one")
        return None
    identity = request.config.training_identity()
    if stage.finished and stage.step >= request.config.steps and stage.config == identity:
        return stage  # the same command again: already complete (exit 0), resume or not
    if not request.resume:
        raise ModelError(
            "the run already has a diffusion model", run, "pass --resume to continue it"
        )
    runs.check_resume(run, stage.config, request.config.training_identity())
    return stage


def _rank_main(
    rank: int,
    world: int,
    device: torch.device,
    job: _Job,
    stop: StopFlag | None = None,
    progress: Progress | None = None,
) -> FitDiffusionSummary:
    """One rank: open the cache, build or restore the U-Net, wrap for data parallelism, train."""
    cache = open_cache(job.run)
    trainer = DiffusionTrainer(
        cache, job.config, job.unet, device, rank, world, job.run, job.val, job.recorded
    )
    if job.checkpoint is not None:
        restore_unet_training(job.run / job.checkpoint, trainer, device)
    trainer.wrap()
    config = job.config
    schedule = Schedule(
        config.steps,
        config.val_every,
        config.checkpoint_every,
        "fit-diffusion",
        "loss",
        (("stage", "diffusion"),),
    )
    trained = train_loop(job.run, trainer, job.start, schedule, stop or StopFlag(), progress)
    return FitDiffusionSummary(
        str(job.run), "", config.steps, config.steps, 0.0, trained.steps_per_second, "",
        trained.last.get("loss"), val_loss=trained.validation.get("val_loss"),
        val_loss_given_mask=trained.validation.get("val_loss_given_mask"),
    )  # fmt: skip


def _latents(
    run: Path,
    manifest: RunManifest,
    request: FitDiffusionRequest,
    device: torch.device,
    stop: StopFlag,
    progress: Progress | None,
    warn: Callable[[str], None],
) -> tuple[LatentCache, np.ndarray]:
    """The training latent cache (built once) and the validation latents (encoded now)."""
    vae_stage = manifest.stages["vae"]
    store = request.store or Path(manifest.source_store)
    reader = open_store(store)
    store_sha = store_sha256(store)
    augment = vae_stage.config.get("augment", "none") == "d4"
    key = cache_key(vae_stage.weights, store_sha, "d4" if augment else "none")
    vae = load_vae(run, manifest, device)
    split = str(vae_stage.config.get("split", "train"))
    limit = vae_stage.config.get("limit")
    indices = reader.indices(split)[: limit or None]
    batch = max(1, min(64, request.config.batch_size))

    def report(stage: str, done: int, total: int) -> None:
        if progress:
            progress(stage, done, total)
        stop.check()  # an unfinished cache is rebuilt on the next run

    with ReadLock(store):
        cache = open_or_build(run, vae, reader, indices, key, augment, batch, report)
        val = validation_indices(reader, request.config.val_samples, warn)
        return cache, encode_means(vae, reader, val, batch)
