"""`specdm fit-vae`, `fit-diffusion`, `distill` and `fit-detail`: options -> config -> a driver."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from specdm_cli.cli.options import (
    GpusOption,
    JsonOption,
    OneDeviceOption,
    OverwriteOption,
    PrecisionOption,
    QuietOption,
    ResumeOption,
    ThreadsOption,
    config_or_usage_error,
    parse_counts,
    preset_option,
    require_inputs,
    train_config,
)
from specdm_cli.cli.output import (
    Warnings,
    domain_errors,
    emit_json,
    progress_reporter,
    stderr,
)
from specdm_cli.config import Devices, Prediction, TrainPreset
from specdm_cli.presets import DIFFUSION_PRESETS, VAE_PRESETS


def _train(
    name: str,
    stage: Callable[..., Any],
    request: Any,
    threads: int | None,
    quiet: bool,
    json_output: bool,
    done_line: Callable[[Any], str],
) -> None:
    """A training stage under Ctrl-C handling, the thread count and a progress bar; then its
    one-line outcome on stderr and, with --json, its summary on stdout."""
    from specdm_cli.pipeline.devices import torch_threads
    from specdm_cli.pipeline.runs.registry import read_registry
    from specdm_cli.pipeline.signals import graceful_stop

    # The run is registered when training ends: a registry that cannot be read is refused now,
    # not after hours of training.
    read_registry()
    warnings = Warnings(quiet)
    precision = request.config.precision
    if precision != "fp32" and request.devices.kind == "cpu":
        # Recorded as asked (a resume must match it), so the run's record alone would mislead.
        warnings(f"warning: --precision {precision} applies on CUDA; the CPU trains in fp32")
    with graceful_stop() as stop, torch_threads(threads), progress_reporter(name, quiet) as bar:
        summary = stage(request, stop, bar, warnings, notice=_notice(quiet))
    if not quiet:
        stderr.print(done_line(summary), markup=False)
    if json_output:
        emit_json({**asdict(summary), "warnings": list(warnings)})


def _notice(quiet: bool) -> Callable[[str], None]:
    """Where a stage's progress lines (the time estimate) go: stderr unless --quiet, never
    --json's `warnings`, so that a pipeline can take a warning there as a signal."""

    def notice(line: str) -> None:
        if not quiet:
            stderr.print(line, markup=False)

    return notice


def _vae_validation(figures: dict[str, Any] | None) -> str:
    """` (val: RMSE 0.412 normalised, SAD 0.052 rad, mask mIoU 0.870)`: the round trip's figures, as
    fit-diffusion's line gives its val loss; empty where the run was not validated."""
    if not figures or "rmse" not in figures:
        return ""
    return (
        f" (val: RMSE {figures['rmse']:.3f} normalised, SAD {figures['sad']:.3f} rad, "
        f"mask mIoU {figures['miou']:.3f})"
    )


def _val_loss(value: float | None, digits: int) -> str:
    return "" if value is None else f", val loss {value:.{digits}f}"


def fit_vae(
    store: Annotated[Path, typer.Argument(help="A prepared store.")],
    run: Annotated[
        Path | None, typer.Option(help="Run directory [<user data>/runs/<store name>-<time>].")
    ] = None,
    preset: Annotated[TrainPreset | None, preset_option(VAE_PRESETS)] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Batch size [cpu 16, gpu 16, paper 48].")
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="Learning rate [cpu 1e-3; else 4.5e-6 x batch, LDM].")
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Training steps [the preset's].")] = None,
    kl_weight: Annotated[float | None, typer.Option(help="KL weight, LDM scale [1e-6].")] = None,
    sad_weight: Annotated[float | None, typer.Option(help="SAD weight [0.1, paper Eq. 1].")] = None,
    gradient_weight: Annotated[
        float | None,
        typer.Option(help="Weight of the L1 of the images' spatial differences; 0 = off [0]."),
    ] = None,
    class_weights: Annotated[str | None, typer.Option(help="none or auto [auto].")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed [0].")] = None,
    precision: PrecisionOption = None,
    gpus: GpusOption = Devices(),  # noqa: B008 (an immutable value)
    workers: Annotated[
        int | None, typer.Option(help="Reader threads for the training batches [4].")
    ] = None,
    threads: ThreadsOption = None,
    val_every: Annotated[
        int | None, typer.Option(help="Validate every N steps [cpu 250, else 1000].")
    ] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="Checkpoint every N steps [cpu 250, else 1000].")
    ] = None,
    resume: ResumeOption = False,
    overwrite: OverwriteOption = False,
    split: Annotated[str | None, typer.Option(help="Split to train on [train].")] = None,
    limit: Annotated[
        int | None, typer.Option(help="Train on the first N pairs (paper protocol).")
    ] = None,
    downsample: Annotated[
        int | None, typer.Option(help="Downsampling factor 2, 4 or 8 [4].")
    ] = None,
    image_latent_channels: Annotated[
        int | None, typer.Option(help="Image latent channels [4; paper 3, LDM kl-f4].")
    ] = None,
    mask_latent_channels: Annotated[
        int | None, typer.Option(help="Mask latent channels [3; the cd demo model 8].")
    ] = None,
    image_blocks: Annotated[
        str | None, typer.Option(help="Image VAE widths, e.g. 64,128,256 [the preset's].")
    ] = None,
    mask_blocks: Annotated[
        str | None, typer.Option(help="Mask VAE widths, e.g. 32,64,128 [the preset's].")
    ] = None,
    norm_groups: Annotated[
        int | None, typer.Option(help="GroupNorm groups [cpu 8, else 32].")
    ] = None,
    single_stream: Annotated[
        bool, typer.Option("--single-stream", help="LDM baseline: one VAE on image + one-hot mask.")
    ] = False,
    mask_aware_decoder: Annotated[
        bool,
        typer.Option(
            "--mask-aware-decoder", help="The image decoder also reads the mask latent [off]."
        ),
    ] = False,
    unlabelled_class: Annotated[
        bool,
        typer.Option(
            "--unlabelled-class",
            help="Sparse labels: learn where labels are absent (255), so synthesized masks "
            "leave it unlabelled rather than guess a class [off].",
        ),
    ] = False,
    augment: Annotated[str | None, typer.Option(help="d4 or none [d4].")] = None,
    semantic_weight: Annotated[
        float | None,
        typer.Option(
            help="Weight of a frozen segmenter's CE on decoded images; 0 = off [cpu 0.3, else 0]."
        ),
    ] = None,
    semantic_steps: Annotated[
        int | None, typer.Option(help="Training steps of that segmenter [300].")
    ] = None,
    adversarial_weight: Annotated[
        float | None, typer.Option(help="Patch-GAN weight (x LDM's adaptive weight); 0 = off [0].")
    ] = None,
    adversarial_start: Annotated[
        int | None, typer.Option(help="Step the patch-GAN term starts at [0].")
    ] = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Train the two-stream VAE (image and mask branches) on a store."""
    with domain_errors():
        require_inputs(stores={"": store})
        from specdm_cli.config import VAETrainConfig
        from specdm_cli.pipeline.train.fit_vae import FitVAERequest
        from specdm_cli.pipeline.train.fit_vae import fit_vae as run_fit_vae

        config = train_config(VAETrainConfig, "vae", dict(
            batch_size=batch_size, lr=lr, steps=steps, kl_weight=kl_weight, sad_weight=sad_weight,
            gradient_weight=gradient_weight,
            class_weights=class_weights, seed=seed, precision=precision,
            val_every=val_every, checkpoint_every=checkpoint_every, split=split, limit=limit,
            workers=workers,
            downsample=downsample, image_latent_channels=image_latent_channels,
            mask_latent_channels=mask_latent_channels, norm_num_groups=norm_groups,
            image_block_out_channels=parse_counts(image_blocks, "--image-blocks", "16,32,32"),
            mask_block_out_channels=parse_counts(mask_blocks, "--mask-blocks", "8,16,16"),
            single_stream=single_stream or None, augment=augment,
            mask_aware_decoder=mask_aware_decoder or None,
            unlabelled_class=unlabelled_class or None,
            semantic_weight=semantic_weight, semantic_steps=semantic_steps,
            adversarial_weight=adversarial_weight, adversarial_start=adversarial_start,
        ), run=run, resume=resume, presets=VAE_PRESETS, preset=preset, devices=gpus)  # fmt: skip
        request = FitVAERequest(
            store=store, run=run, config=config, resume=resume, overwrite=overwrite, devices=gpus
        )
        _train("fit-vae", run_fit_vae, request, threads, quiet, json_output,
               lambda done: f"{done.state}: {done.run} at step {done.step}"
               + _vae_validation(done.validation))  # fmt: skip


def fit_diffusion(
    run: Annotated[Path, typer.Argument(help="A run directory with a trained VAE.")],
    store: Annotated[Path | None, typer.Option(help="Store to encode [the VAE's store].")] = None,
    preset: Annotated[TrainPreset | None, preset_option(DIFFUSION_PRESETS)] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Batch size [cpu 32, gpu 32, paper 48].")
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="Learning rate [cpu 1e-3; else 2e-6 x batch, LDM].")
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Training steps [the preset's].")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed [0].")] = None,
    precision: PrecisionOption = None,
    ema_decay: Annotated[float | None, typer.Option(help="EMA decay [0.9999, LDM].")] = None,
    snr_gamma: Annotated[
        float | None,
        typer.Option(
            help="Min-SNR loss weights; 0 = LDM's plain mean [5, Hang et al. 2023; paper 0]."
        ),
    ] = None,
    prediction: Annotated[
        Prediction | None,
        typer.Option(help="epsilon or v_prediction [cpu v_prediction; else epsilon, LDM]."),
    ] = None,
    unet_blocks: Annotated[
        str | None, typer.Option(help="U-Net widths [cpu 32,64,64; else by latent size].")
    ] = None,
    layers_per_block: Annotated[
        int | None, typer.Option(help="Res blocks per level [cpu 1, else 2].")
    ] = None,
    norm_groups: Annotated[
        int | None, typer.Option(help="GroupNorm groups [cpu 16, else 32].")
    ] = None,
    head_dim: Annotated[int | None, typer.Option(help="Attention head width [32].")] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="Checkpoint every N steps [1000].")
    ] = None,
    val_every: Annotated[
        int | None, typer.Option(help="EMA loss on the val latents every N steps [1000].")
    ] = None,
    val_samples: Annotated[int | None, typer.Option(help="Val samples encoded [256].")] = None,
    mask_condition_rate: Annotated[
        float | None,
        typer.Option(
            help="Fraction of training samples that also see their clean mask, so `synthesize "
            "--masks` can draw images for given masks; 0 = unconditioned [0]."
        ),
    ] = None,
    gpus: GpusOption = Devices(),  # noqa: B008 (an immutable value)
    threads: ThreadsOption = None,
    resume: ResumeOption = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Train a new U-Net in place of the run's (kept until the new one's first "
            "checkpoint).",
        ),
    ] = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Train the denoising U-Net on the joint latents of a run's VAE."""
    with domain_errors():
        require_inputs(stores={"--store": store}, runs=(run,))
        from specdm_cli.config import DiffusionTrainConfig
        from specdm_cli.pipeline.train.fit_diffusion import FitDiffusionRequest
        from specdm_cli.pipeline.train.fit_diffusion import fit_diffusion as run_fit_diffusion

        config = train_config(DiffusionTrainConfig, "diffusion", dict(
            batch_size=batch_size, lr=lr, steps=steps, seed=seed, precision=precision,
            ema_decay=ema_decay, snr_gamma=snr_gamma, prediction=prediction,
            block_out_channels=parse_counts(unet_blocks, "--unet-blocks", "32,64,64"),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_groups, attention_head_dim=head_dim, checkpoint_every=checkpoint_every,
            val_every=val_every, val_samples=val_samples, mask_condition_rate=mask_condition_rate,
        ), run=run, resume=resume, presets=DIFFUSION_PRESETS, preset=preset,
           devices=gpus)  # fmt: skip
        request = FitDiffusionRequest(
            run=run, config=config, resume=resume, devices=gpus, store=store, overwrite=overwrite
        )
        _train("fit-diffusion", run_fit_diffusion, request, threads, quiet, json_output,
               lambda done: f"{done.state}: {done.run} at step {done.step} "
               f"(latent cache {done.cache}{_val_loss(done.val_loss, 4)})")  # fmt: skip


def distill(
    run: Annotated[Path, typer.Argument(help="A run directory with a trained U-Net.")],
    student_steps: Annotated[
        int | None, typer.Option(min=1, help="U-Net evaluations per sample of the student [4].")
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Training steps [1000].")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size [32].")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate [1e-4].")] = None,
    trajectories: Annotated[
        int | None, typer.Option(help="Teacher ODE trajectories to learn from [512].")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed [0].")] = None,
    precision: PrecisionOption = None,
    gpus: OneDeviceOption = Devices(),  # noqa: B008 (an immutable value)
    threads: ThreadsOption = None,
    resume: ResumeOption = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the run's distilled student.")
    ] = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Distill the run's U-Net into a few-step student (synthesize --sampler distilled)."""
    with domain_errors():
        require_inputs(runs=(run,))
        from specdm_cli.config import DistillTrainConfig
        from specdm_cli.pipeline.train.distill import DistillRequest
        from specdm_cli.pipeline.train.distill import distill as run_distill

        given = dict(student_steps=student_steps, steps=steps, batch_size=batch_size, lr=lr,
                     trajectories=trajectories, seed=seed, precision=precision)  # fmt: skip
        config = train_config(DistillTrainConfig, "distill", given, run=run, resume=resume)
        request = DistillRequest(
            run=run, config=config, resume=resume, overwrite=overwrite, devices=gpus
        )
        _train("distill", run_distill, request, threads, quiet, json_output,
               lambda done: f"{done.state}: {done.run}, a {done.student_steps}-step student at "
               f"step {done.step}{_val_loss(done.val_loss, 5)}")  # fmt: skip


def fit_detail(
    run: Annotated[Path, typer.Argument(help="A run directory with a trained VAE (ss or cd).")],
    store: Annotated[Path, typer.Argument(help="A real store of the run's bands and classes.")],
    scenes: Annotated[
        int | None,
        typer.Option(min=1, help="Train scenes of the bank [as many as make 76,800 blocks]."),
    ] = None,
    block: Annotated[
        int | None, typer.Option(min=1, help="Pixels per retrieved block [4].")
    ] = None,
    context: Annotated[
        int | None, typer.Option(min=1, help="Pixels of surroundings a block is matched by [8].")
    ] = None,
    dims: Annotated[
        int | None, typer.Option(min=1, help="Principal components of the surroundings [48].")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a bank built with other options.")
    ] = False,
    gpus: OneDeviceOption = Devices(),  # noqa: B008 (an immutable value)
    threads: ThreadsOption = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Build a bank of real detail for `synthesize --detail` (fine detail the VAE loses)."""
    with domain_errors():
        require_inputs(stores={"": store}, runs=(run,))
        from specdm_cli.config import DetailConfig
        from specdm_cli.pipeline.devices import torch_threads
        from specdm_cli.pipeline.signals import graceful_stop
        from specdm_cli.pipeline.train.fit_detail import FitDetailRequest
        from specdm_cli.pipeline.train.fit_detail import fit_detail as build

        config = config_or_usage_error(
            DetailConfig, scenes=scenes, block=block, context=context, dims=dims
        )
        request = FitDetailRequest(run, store, config, overwrite, gpus)
        warnings = Warnings(quiet)
        with (
            graceful_stop() as stop,
            torch_threads(threads),
            progress_reporter("fit-detail", quiet) as bar,
        ):
            done = build(request, stop, bar, warnings)
        if not quiet:
            stderr.print(
                f"{done.state}: {done.run}, {done.blocks} blocks of {done.scenes} scenes "
                f"({done.bank_bytes / 2**20:.1f} MiB)",
                markup=False,
            )
        if json_output:
            emit_json({**asdict(done), "warnings": list(warnings)})
