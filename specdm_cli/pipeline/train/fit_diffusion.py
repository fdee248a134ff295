"""The `fit-diffusion` stage: a denoising U-Net on the joint latents (paper Sec. 3.2, 3.4)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from specdm_cli.config import Devices, DiffusionTrainConfig, Progress
from specdm_cli.errors import InputDataError, ModelError, UsageError, refuse_resume_with_overwrite
from specdm_cli.fs.lock import ReadLock
from specdm_cli.models.diffusion import (
    UNetConfig,
)
from specdm_cli.pipeline.devices import torch_devices
from specdm_cli.pipeline.runs import rundirs as runs
from specdm_cli.pipeline.runs.run_manifest import RunManifest, load_run
from specdm_cli.pipeline.runs.vae_io import load_vae, vae_config
from specdm_cli.pipeline.signals import StopFlag, stoppable
from specdm_cli.pipeline.train.common import check_batch_divides, validation_indices
from specdm_cli.pipeline.train.diffusion_trainer import DiffusionTrainer
from specdm_cli.pipeline.train.driver import (
    Schedule,
    check_resume_steps,
    estimating,
    launch,
    train_loop,
)
from specdm_cli.pipeline.train.latent_cache import (
    LatentCache,
    cache_key,
    encode_means,
    open_cache,
    open_or_build,
)
from specdm_cli.pipeline.train.unet_state import (
    restore_unet_training,
)
from specdm_cli.stores import content_sha256, open_store, store_sha256


@dataclass(frozen=True)
class FitDiffusionRequest:
    run: Path
    config: DiffusionTrainConfig
    resume: bool = False
    devices: Devices = field(default_factory=Devices)
    store: Path | None = None  # default: the store the VAE was trained on
    overwrite: bool = False  # a new U-Net; the run's own is kept until the new one's checkpoint


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
    notice: Callable[[str], None] = lambda line: None,
) -> FitDiffusionSummary:
    """Encode the latent cache (once), then train the U-Net with EMA; resume is bit-exact.
    `warn` takes warnings, `notice` progress lines such as the time estimate."""
    started = time.monotonic()
    refuse_resume_with_overwrite(request.resume, request.overwrite)
    check_batch_divides(request.config.batch_size, request.devices)
    devices = torch_devices(request.devices)
    run = request.run
    load_run(run, verify=False)  # a clear error before the lock creates anything
    with runs.RunLock(run):
        # Read and verified under the lock: another writer may be committing a checkpoint.
        manifest = load_run(run)
        stage = _check_stages(run, manifest, request, warn)
        if stage is not None and stage.finished and stage.step >= request.config.steps:
            runs.ensure_registered(run, manifest.task, "diffusion", can_sample=True)
            return FitDiffusionSummary(
                str(run), "already complete", stage.step, request.config.steps, 0.0, 0.0, "kept"
            )
        if stage is not None and stage.checkpoint:
            check_resume_steps(stage.step, request.config.steps, "U-Net")
        extra = condition_input_channels(manifest, request.config)  # refused before encoding
        store = request.store or Path(manifest.source_store)
        store_sha, content = _check_store(run, manifest, store, stage)
        cache, val = _latents(
            run, manifest, request, (store, store_sha), devices[0], stop, progress, warn
        )
        size = manifest.height // vae_config(manifest).downsample
        checkpoint = stage.checkpoint if stage is not None else None
        start = stage.step if checkpoint else 0
        unet = unet_config(request.config, cache.mean.shape[1], size, extra)
        recorded = {
            "vae_weights": manifest.stages["vae"].weights,
            "latent_store": {
                "path": str(store.resolve()),
                "sha256": store_sha,
                "content_sha256": content,
            },
            **mask_condition_details(manifest, unet, request.config.mask_condition_rate),
        }
        job = _Job(run, request.config, unet, checkpoint, start, val, recorded)
        steps = request.config.steps
        told = estimating(progress, notice, "fit-diffusion", f"preset {request.config.preset}")
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
    return runs.stage_to_resume(
        run, stage, request.config.training_identity(), request.config.steps,
        resume=request.resume, overwrite=request.overwrite, what=("a diffusion model", "train a new one"),
    )  # fmt: skip


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


# What a store shares with the run's VAE for its latents to be the VAE's kind: the VAE reads
# these bands in this order, and its label branch one channel per class.
def _check_store(
    run: Path, manifest: RunManifest, store: Path, stage: Any
) -> tuple[str, str | None]:
    """The store's manifest and content digests, after checking its samples fit the run's VAE (exit 3) and that a
    resumed U-Net learned this store's latents (exit 4): another store's swapped in under a
    trained U-Net rescaled the latents it had learned."""
    reader = open_store(store)
    theirs = reader.manifest
    differ = [
        name
        for name, ours, found in (
            ("task", manifest.task, theirs.task),
            ("bands", [b.name for b in manifest.bands], [b.name for b in theirs.bands]),
            ("classes", [c.name for c in manifest.classes], [c.name for c in theirs.classes]),
            ("size", (manifest.height, manifest.width), (theirs.height, theirs.width)),
        )
        if ours != found
    ]
    if differ:
        raise InputDataError(
            f"the store's {', '.join(differ)} differ from those the run's VAE was trained on",
            store,
            "pass a store prepared like the run's (or drop --store)",
        )
    store_sha, content = store_sha256(store), content_sha256(reader)
    learned = (stage.details.get("latent_store") or {}) if stage is not None else {}
    # A store prepared again by the same command holds the same latents (content digest).
    same_data = content is not None and learned.get("content_sha256") == content
    if learned.get("sha256") not in (None, store_sha) and not same_data:
        raise ModelError(
            f"the run's U-Net learned the latents of another store ({learned.get('path')})",
            run,
            "drop --store to resume it, or train a new run",
        )
    return store_sha, content


def _latents(
    run: Path,
    manifest: RunManifest,
    request: FitDiffusionRequest,
    store_and_sha: tuple[Path, str],  # checked by _check_store, its manifest's digest
    device: torch.device,
    stop: StopFlag,
    progress: Progress | None,
    warn: Callable[[str], None],
) -> tuple[LatentCache, np.ndarray]:
    """The training latent cache (built once) and the validation latents (encoded now)."""
    vae_stage = manifest.stages["vae"]
    store, store_sha = store_and_sha
    reader = open_store(store)
    augment = vae_stage.config.get("augment", "none") == "d4"
    statistics = manifest.normalization  # the VAE's inputs, whatever store they come from
    own = None if reader.manifest.normalization == statistics else statistics
    key = cache_key(vae_stage.weights, store_sha, "d4" if augment else "none", own)
    split = str(vae_stage.config.get("split", "train"))
    limit = vae_stage.config.get("limit")
    indices = reader.indices(split)[: limit or None]
    if len(indices) == 0:
        raise InputDataError(
            f"the store has no {split!r} samples to encode (the split the run's VAE trained on)",
            store,
            "pass a prepared store of the same bands and classes with --store",
        )
    vae = load_vae(run, manifest, device)
    batch = max(1, min(64, request.config.batch_size))

    with ReadLock(store):
        # A stop leaves an unfinished cache, which the next run builds again.
        report = stoppable(progress, stop)
        cache = open_or_build(run, vae, reader, statistics, indices, key, augment, batch, report)
        val = validation_indices(reader, request.config.val_samples, warn)
        return cache, encode_means(vae, reader, statistics, val, batch)
