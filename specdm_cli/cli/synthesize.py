"""`specdm synthesize`: a model's samples -> a store."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from specdm_cli.cli.options import (
    GpusOption,
    JsonOption,
    OverwriteOption,
    PrecisionOption,
    QuietOption,
    ThreadsOption,
    require_inputs,
)
from specdm_cli.cli.output import (
    Warnings,
    domain_errors,
    emit_json,
    progress_reporter,
    stderr,
)
from specdm_cli.config import Devices, SamplerChoice, StoreFormat, Task

if TYPE_CHECKING:
    from specdm_cli.pipeline.synthesize.quality import JudgeMaker
    from specdm_cli.pipeline.synthesize.synthesize import SynthesizeSummary


def _quality_judge() -> JudgeMaker:
    """The benchmark's judge, for `synthesize --min-quality` (synthesis may not import it)."""
    from specdm_cli.pipeline.benchmark.judge import QualityJudge

    return QualityJudge


def synthesize(
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output store (required unless --finalize).")
    ] = None,
    n: Annotated[
        int | None, typer.Option("--n", help="Number of pairs (required unless --finalize).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Run directory, or 'demo' [newest run of --task, else demo].")
    ] = None,
    task: Annotated[
        Task | None,
        typer.Option(
            help="ss or cd: which demo model, or the newest run of which task (needed with --model demo or without --model)."
        ),
    ] = None,
    sampler: Annotated[
        SamplerChoice,
        typer.Option(
            help="auto (the run's distilled student if it has one, else dpmpp), ddpm (1000 "
            "steps, paper), ddim, dpmpp, unipc, distilled (specdm distill)."
        ),
    ] = "auto",
    steps: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Denoising steps [ddpm 1000, ddim 20, dpmpp 10, unipc 10; distilled: the student's].",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed: sample i depends only on (model, seed, i).")] = 0,
    batch_size: Annotated[
        str,
        typer.Option(
            help="B: the batch grid, fixed when the store is created; auto = the store's, else 16 on CPU, 64 on CUDA; at most --n unless --require/--min-quality filter draws."
        ),
    ] = "auto",
    precision: PrecisionOption = None,
    store_format: Annotated[StoreFormat, typer.Option("--format", help="Store format.")] = "zarr",
    shard: Annotated[
        str | None, typer.Option(help="Write shard i of N (i/N), on batch-grid lines.")
    ] = None,
    finalize: Annotated[
        Path | None, typer.Option(help="Merge the shard records of a store and finish it.")
    ] = None,
    overwrite: OverwriteOption = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue an interrupted store (same options); a store with the same plan is joined anyway, as shards do.",
        ),
    ] = False,
    preview: Annotated[
        Path | None, typer.Option(help="Write a PNG grid of the first samples.")
    ] = None,
    require: Annotated[
        str | None,
        typer.Option(
            help="CLASS:MINFRAC[,...]: keep only samples with at least that fraction of each class."
        ),
    ] = None,
    masks: Annotated[
        Path | None,
        typer.Option(
            help="Draw images for the label maps of this store (same task, classes and size): "
            "sample i gets mask i mod M, written as given. Needs a model trained with "
            "--mask-condition-rate."
        ),
    ] = None,
    masks_split: Annotated[
        str | None, typer.Option(help="Only the --masks store's samples of this split [all].")
    ] = None,
    mask_guidance: Annotated[
        float | None,
        typer.Option(
            help="Classifier-free guidance weight with --masks; 1 = plain conditional, one "
            "U-Net pass a step instead of two [2, measured]."
        ),
    ] = None,
    min_quality: Annotated[
        float | None,
        typer.Option(
            help="Keep only samples whose quality score (benchmark's: 1 = as good as the typical "
            "real pair) reaches this, judged against --real; scores are written into the store."
        ),
    ] = None,
    real: Annotated[
        Path | None,
        typer.Option(help="With --min-quality: the real store the scores are calibrated on."),
    ] = None,
    feature_steps: Annotated[
        int | None,
        typer.Option(
            min=1, help="With --min-quality: the feature network's steps (as benchmark's)."
        ),
    ] = None,
    label_confidence: Annotated[
        float,
        typer.Option(
            help="Write mask pixels whose decoded class is less probable than this as "
            "unlabelled (255), so a segmenter trained on the pairs skips the mask decoder's "
            "guesses; 0 labels every pixel.",
        ),
    ] = 0.0,
    detail: Annotated[
        bool | None,
        typer.Option(
            "--detail/--no-detail",
            help="Add the run's retrieved detail (built by `specdm fit-detail`) to the decoded "
            "images: fine detail the VAE's decoder loses, taken from real scenes of the class "
            "the mask draws. Default: where the run has a bank (a store begun before: as it "
            "began).",
            show_default=False,
        ),
    ] = None,
    gpus: GpusOption = Devices(),  # noqa: B008 (an immutable value)
    threads: ThreadsOption = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Synthesize labelled pairs with a trained (or the shipped demo) model."""
    with domain_errors():
        from specdm_cli.errors import UsageError

        if finalize is None and (out is None or n is None or n <= 0):
            # Before the heavy imports below: a usage error comes at once.
            raise UsageError(
                "synthesize needs --out and --n >= 1", hint="e.g. --n 1000 --out syn.zarr"
            )
        if finalize is not None and (out is not None or n is not None):
            raise UsageError(
                "--finalize finishes the store its shards wrote and takes no --out or --n",
                hint="e.g. specdm synthesize --finalize syn.zarr",
            )
        if finalize is None:
            require_inputs(stores={"--masks": masks, "--real": real}, models=(model,))
            from specdm_cli.pipeline.synthesize.arguments import refuse_at_once

            refuse_at_once(model, task, batch_size, shard, preview, out)
        from specdm_cli.pipeline.devices import torch_threads
        from specdm_cli.pipeline.signals import graceful_stop
        from specdm_cli.pipeline.synthesize.command import SynthesizeOptions, synthesize_store
        from specdm_cli.pipeline.synthesize.shards import finalize as finalize_store

        if finalize is not None:
            finalize_store(finalize, required=True)
            stderr.print(f"complete: {finalize}", markup=False)
            return
        assert out is not None and n is not None
        warnings = Warnings(quiet)
        options = SynthesizeOptions(
            out=out, n=n, model=model, task=task, sampler=sampler, steps=steps, seed=seed,
            batch_size=batch_size, precision=precision or "fp32", format=store_format,
            shard=shard, devices=gpus, require=require, overwrite=overwrite, preview=preview,
            masks=masks, masks_split=masks_split, mask_guidance=mask_guidance,
            min_quality=min_quality, real=real, feature_steps=feature_steps,
            label_confidence=label_confidence, detail=detail,
            judge_maker=_quality_judge() if min_quality is not None else None,
        )  # fmt: skip
        with (
            graceful_stop() as stop,
            torch_threads(threads),
            progress_reporter("synthesize", quiet) as bar,
        ):
            summary = synthesize_store(options, stop, bar, warnings)
        if not quiet:
            stderr.print(_done_line(summary), markup=False)
        if json_output:
            emit_json({**asdict(summary), "warnings": list(warnings)})


def _done_line(summary: SynthesizeSummary) -> str:
    """What the call did; a store found complete gets no rate (no pair was made)."""
    preview = f"; preview {summary.preview}" if summary.preview else ""
    if summary.already_complete:
        return f"already complete: {summary.out}: {summary.written}/{summary.n} pairs{preview}"
    state = "complete" if summary.complete else "shard done, store not complete yet"
    kept = f" (kept from {summary.draws} draws)" if summary.draws > summary.written else ""
    return (
        f"{state}: {summary.out}: {summary.written}/{summary.n} pairs{kept}, "
        f"{summary.pairs_per_second} pairs/s{preview}"
    )
