"""The `synthesize` stage: sample joint latents, decode both streams, stream them into a store."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specdm_cli import __version__
from specdm_cli.config import Devices, Precision, Progress, SamplerName, StoreFormat
from specdm_cli.errors import UsageError
from specdm_cli.faults import fault_point
from specdm_cli.manifest import (
    IMAGE_ARRAYS,
    LABEL_ARRAY,
    Manifest,
    ModelInfo,
    array_names,
    load_manifest,
    rgb_bands,
)
from specdm_cli.models.diffusion import ScheduleConfig
from specdm_cli.models.samplers import DEFAULT_STEPS
from specdm_cli.pipeline.devices import cpu_threads_per_process, torch_devices
from specdm_cli.pipeline.runs.choose import ChosenModel
from specdm_cli.pipeline.runs.detail_io import STAGE as DETAIL_STAGE
from specdm_cli.pipeline.runs.provenance import provenance
from specdm_cli.pipeline.signals import StopFlag
from specdm_cli.pipeline.synthesize.draws import Drawn, Draws
from specdm_cli.pipeline.synthesize.masks import GivenMasks, MaskSource
from specdm_cli.pipeline.synthesize.quality import Judge
from specdm_cli.pipeline.synthesize.ranks import run_on_devices
from specdm_cli.pipeline.synthesize.require import Requirement, resume_draw
from specdm_cli.pipeline.synthesize.sampler import Sampler, SamplingPlan, distilled_timesteps
from specdm_cli.pipeline.synthesize.shards import (
    Shard,
    finalize,
    join_or_create,
    mark_sharded,
    shard_batches,
    shard_lock,
    write_record,
)
from specdm_cli.pipeline.synthesize.writer import BackgroundWriter
from specdm_cli.sources.base import class_fraction
from specdm_cli.stores import SampleMeta, forget_damaged, open_store, open_writer, remove_own
from specdm_cli.stores.base import MANIFEST_NAME


@dataclass(frozen=True)
class SynthesizeRequest:
    """A validated `specdm synthesize` invocation."""

    model: ChosenModel
    out: Path
    n: int
    sampler: SamplerName = "dpmpp"
    steps: int | None = None
    seed: int = 0
    batch_size: int = 16
    precision: Precision = "fp32"
    format: StoreFormat = "zarr"
    shard: Shard = field(default_factory=Shard)
    devices: Devices = field(default_factory=Devices)
    require: tuple[Requirement, ...] = ()
    masks: MaskSource | None = None  # --masks: sample i drawn for the given mask i mod M
    quality: Judge | None = None  # --min-quality: only draws scoring at least its bar
    label_confidence: float = 0.0  # decoded mask pixels less sure than this: unlabelled (255)
    detail: bool = False  # add the run's retrieved detail (fit-detail) to decoded images

    def filtered(self) -> bool:
        """Whether sample i is the i-th accepted draw rather than draw i."""
        return bool(self.require) or self.quality is not None

    def asked(self) -> str:
        """The filtering options, as typed."""
        bar = self.quality.bar.min_quality if self.quality is not None else None
        return filter_options(",".join(r.text() for r in self.require), bar)


def filter_options(require: str | None, min_quality: float | None) -> str:
    """The options that filter draws (--require, --min-quality) as typed; "" for none."""
    parts = [f"--require {require}"] if require else []
    if min_quality is not None:
        parts.append(f"--min-quality {min_quality:g}")
    return " ".join(parts)


@dataclass
class SynthesizeSummary:
    out: str
    model: str
    model_kind: str
    n: int
    written: int
    batches: int
    seconds: float
    pairs_per_second: float
    complete: bool
    draws: int = 0  # sampler draws this call made (more than pairs written with --require)
    write_seconds: float = 0.0  # this process's writer busy time (overlaps sampling; 0 with ranks)
    write_wait_seconds: float = 0.0  # time sampling waited for the writer: what I/O added
    cuda_peak_bytes: int | None = None  # one CUDA device: torch's peak allocated memory
    already_complete: bool = False  # the store was complete before and this call wrote nothing
    preview: str | None = None  # the PNG of the first pairs, where --preview asked for one


# Ours: on 2 CPU cores pairs/s stops growing beyond about 16; on CUDA a larger grid keeps the
# GPU busy (not measured on a GPU yet).
AUTO_BATCH = {"cpu": 16, "cuda": 64}


def resolve_batch_size(
    given: int | None, out: Path | None, devices: Devices, n: int, filtered: bool
) -> int:
    """B as given, or for `auto` the grid of the store at `out` when it exists (so a resume or
    another shard needs no B; None: a store there is to be replaced), else a default for the
    device; at most n when every draw is kept (no --require/--min-quality), since a batch
    always computes B samples."""
    if given is None and out is not None and (out / MANIFEST_NAME).is_file():
        return load_manifest(out / MANIFEST_NAME).batch_grid
    grid = AUTO_BATCH[devices.kind] if given is None else given
    return grid if filtered else min(grid, n)


def _plan(request: SynthesizeRequest, steps: int) -> dict[str, Any]:
    """What every shard and resume must agree on (DESIGN.md's shard protocol)."""
    return {
        "stage": "synthesize",
        "model_sha256": request.model.sha256,
        "seed": request.seed,
        "n": request.n,
        "sampler": request.sampler,
        "steps": steps,
        "precision": request.precision,
        "batch_size": request.batch_size,
        "format": request.format,
        **({"require": [r.text() for r in request.require]} if request.require else {}),
        **(request.masks.plan() if request.masks is not None else {}),
        **(request.quality.plan() if request.quality is not None else {}),
        **({"label_confidence": request.label_confidence} if request.label_confidence else {}),
        **({"detail": _bank_weights(request.model)} if request.detail else {}),
        **(
            {"threads": cpu_threads_per_process(request.devices)}
            if request.devices.kind == "cpu"
            else {}
        ),
    }


def _manifest(request: SynthesizeRequest, steps: int, device: torch.device) -> Manifest:
    run = request.model.manifest
    diffusion = run.stages["diffusion"]
    return Manifest(
        tool_version=__version__,
        format=request.format,
        task=run.task,
        count=request.n,
        height=run.height,
        width=run.width,
        dtype=run.dtype,
        arrays=list(array_names(run.task)),
        bands=run.bands,
        rgb_bands=rgb_bands(run.bands),
        classes=run.classes,
        batch_grid=request.batch_size,
        normalization=run.normalization,
        model=ModelInfo(
            run_id=run.run_id,
            kind=request.model.kind,
            path=str(request.model.path),
            checkpoint_sha256={
                k: v for stage in run.stages.values() for k, v in stage.weights.items()
            },
            sampler=request.sampler,
            steps=steps,
            seed=request.seed,
            precision=request.precision,
            details={
                "model_sha256": request.model.sha256,
                "schedule": diffusion.details.get("schedule"),
                "latent_shift": diffusion.details.get("latent_shift"),
                "latent_scale": diffusion.details.get("latent_scale"),
                "source_manifest_sha256": run.source_manifest_sha256,
                "source_dataset": run.dataset,  # what the values mean (stores/cf.py)
                "device": str(device),
                **({"mask_source": request.masks.plan()} if request.masks is not None else {}),
                **(
                    {"label_confidence": request.label_confidence}
                    if request.label_confidence
                    else {}
                ),
                **({"detail": _bank_details(request.model)} if request.detail else {}),
                **(
                    {"quality_scores": request.quality.info(request.n).model_dump()}
                    if request.quality is not None
                    else {}
                ),
            },
        ),
        plan=_plan(request, steps),
        provenance=provenance(),
    )


def _bank_weights(model: ChosenModel) -> dict[str, str]:
    """The detail bank's file digests: a resume or shard must add the same detail."""
    return dict(model.manifest.stages[DETAIL_STAGE].weights)


def _bank_details(model: ChosenModel) -> dict[str, Any]:
    """How the bank was built (fit-detail's options and the store), for the manifest."""
    stage = model.manifest.stages[DETAIL_STAGE]
    identity = {k: v for k, v in stage.config.items() if k != "vae_weights"}  # in checkpoint_sha256
    return {**identity, **stage.details}


def _sampler(request: SynthesizeRequest, plan: SamplingPlan, device: torch.device) -> Sampler:
    """The run's sampler, drawing for the given masks with --masks."""
    given = GivenMasks(request.masks, request.model.manifest) if request.masks else None
    return Sampler(request.model, plan, device, given)


def synthesize(
    request: SynthesizeRequest, stop: StopFlag, progress: Progress | None = None
) -> SynthesizeSummary:
    """Write this shard's batches (skipping written ones), record them, finalize when all are in."""
    return _synthesize(request, stop, progress, sharded=request.shard.count > 1)


def _synthesize(
    request: SynthesizeRequest,
    stop: StopFlag,
    progress: Progress | None = None,
    sharded: bool = False,
) -> SynthesizeSummary:
    """`synthesize`; `sharded`: the user gave --shard i/N (a rank's sub-shard is not that)."""
    started = time.monotonic()
    if request.n <= 0:
        raise UsageError("--n must be at least 1", hint="e.g. --n 1000")
    refuse_split(request.asked(), request.shard, request.devices)
    steps = check_steps(request)
    devices = torch_devices(request.devices)
    fresh = not (request.out / MANIFEST_NAME).exists()
    manifest = join_or_create(request.out, _manifest(request, steps, devices[0]))
    if sharded:
        mark_sharded(request.out, request.shard)
    batches = shard_batches(request.n, request.batch_size, request.shard)
    if request.devices.ranks > 1:  # each rank writes a sub-shard, unmarked: --resume finishes it
        done = run_on_devices(request, _synthesize, stop, progress)
        return _summary(request, started, Written(done), len(batches), 0, None, manifest.complete)
    try:
        with shard_lock(request.out, request.n, request.batch_size, request.shard):
            loop, draws = _write_shard(
                request, manifest, batches, steps, devices[0], stop, progress
            )
    except UsageError:  # filtered draws that found nothing: no empty store left to trip over
        if fresh and not open_store(request.out, allow_incomplete=True).written().any():
            remove_own(request.out, "store", "synthesize")
        raise
    cuda_peak = torch.cuda.max_memory_allocated(devices[0]) if devices[0].type == "cuda" else None
    return _summary(
        request, started, loop, len(batches), draws.count if draws else 0, cuda_peak,
        manifest.complete,
    )  # fmt: skip


def _write_shard(
    request: SynthesizeRequest,
    manifest: Manifest,
    batches: list[range],
    steps: int,
    device: torch.device,
    stop: StopFlag,
    progress: Progress | None,
) -> tuple[Written, Draws | None]:
    """Draw and write this shard's batches not written yet (the caller holds the shard lock)."""
    if forget_damaged(request.out, (i for b in batches for i in b)):
        manifest = load_manifest(request.out / MANIFEST_NAME)
    writer = open_writer(request.out, manifest)
    written = writer.written()
    todo = [b for b in batches if not written[b.start : b.stop].all()]
    plan = SamplingPlan(
        request.sampler, request.seed, request.batch_size, request.precision,
        label_confidence=request.label_confidence,
        detail=request.detail,
    )  # fmt: skip
    draws = Draws(_sampler(request, plan, device), steps, stop) if todo else None
    if draws is not None and request.filtered():
        candidates = open_store(request.out, allow_incomplete=True).candidates()
        next_draw = resume_draw(candidates, todo[0].start)
        draws.filter(request.require, request.quality, request.asked(), next_draw)
    # Progress counts pairs, as the summary's rate does (batches made "3.77/s" read as pairs).
    pairs = sum(map(len, batches))
    loop = _run(draws, writer, todo, stop, progress, pairs - sum(map(len, todo)), pairs)
    return loop, draws


def refuse_split(asked: str, shard: Shard, devices: Devices) -> None:
    """Filtered draws (`asked`: their options) cannot be split: sample i is the i-th accepted."""
    if asked and (shard.count > 1 or devices.ranks > 1):
        raise UsageError(
            f"{asked} cannot be split over shards or devices: sample i is the i-th accepted draw",
            hint="run it on one device (--resume continues an interrupted run)",
        )


def check_steps(request: SynthesizeRequest) -> int:
    """The request's step count (`sampler_steps`)."""
    return sampler_steps(request.sampler, request.steps, request.model)


def sampler_steps(sampler: SamplerName, steps: int | None, model: ChosenModel) -> int:
    """The sampler's step count: `steps` (--steps), else its default; a distilled student's own."""
    if sampler != "distilled":
        steps = steps or DEFAULT_STEPS[sampler]
        _require_steps_within_schedule(sampler, steps, model)
        return steps
    student = len(distilled_timesteps(model))
    if steps not in (None, student):
        raise UsageError(
            f"the run's distilled student takes {student} steps, not {steps}",
            hint="drop --steps, or distill another student with --student-steps",
        )
    return student


def _require_steps_within_schedule(sampler: SamplerName, steps: int, model: ChosenModel) -> None:
    """At most the schedule's T steps (ddpm) or T - 1 (the others): diffusers then indexes
    past the schedule (ddim, ddpm: a crash) or divides by a zero sigma (dpmpp, unipc: NaN
    latents, written as all-zero images)."""
    schedule = model.manifest.diffusion_details().schedule
    train_steps = int(schedule.get("num_train_timesteps", ScheduleConfig().num_train_timesteps))
    most = train_steps if sampler == "ddpm" else train_steps - 1
    if steps > most:
        raise UsageError(
            f"--steps {steps}: {sampler} takes at most {most} steps on this model "
            f"(trained over {train_steps} timesteps)",
            hint=f"e.g. --steps {DEFAULT_STEPS[sampler]} (the default), or --sampler ddpm",
        )


def _summary(
    request: SynthesizeRequest,
    started: float,
    loop: Written,
    batches: int,
    draws: int,
    cuda_peak_bytes: int | None,
    was_complete: bool,
) -> SynthesizeSummary:
    """Finalize the store if every part is in, and say what this call did (`was_complete`: the
    store was complete when this call began)."""
    complete = finalize(request.out)
    seconds = time.monotonic() - started
    return SynthesizeSummary(
        str(request.out), str(request.model.path), request.model.kind, request.n,
        int(open_store(request.out, allow_incomplete=True).written().sum()), batches,
        round(seconds, 3), round(loop.samples / max(seconds, 1e-9), 3), complete,
        draws or loop.samples, round(loop.busy_seconds, 3), round(loop.blocked_seconds, 3),
        cuda_peak_bytes, was_complete and complete and loop.samples == 0,
    )  # fmt: skip


@dataclass
class Written:
    """What one process's writing loop did: samples, and the writer's time (see BackgroundWriter)."""

    samples: int = 0
    busy_seconds: float = 0.0
    blocked_seconds: float = 0.0


def _run(
    draws: Draws | None,
    writer: Any,
    todo: list[range],
    stop: StopFlag,
    progress: Progress | None,
    already: int,
    total: int,
) -> Written:
    """Sample on this thread, write on the background writer."""
    samples = 0
    manifest = writer.manifest
    classes = len(manifest.classes)
    label_name = LABEL_ARRAY[manifest.task]

    def write(item: tuple[range, Drawn]) -> None:
        indices, (arrays, clipped, drawn, scores) = item
        writer.write_batch(indices.start, arrays)
        metas = [
            SampleMeta(
                "synthetic", class_fraction(arrays[label_name][k], classes), candidate=int(drawn[k])
            )
            for k in range(len(indices))
        ]
        # The record first: a kill between the two leaves the batch unwritten, so it is redone.
        record: dict[str, Any] = {
            "clipped_values": int(clipped.sum()),
            "image_values": _values(manifest, indices),
        }
        if not np.isnan(scores).all():
            record["quality"] = [float(score) for score in scores]
        write_record(writer.root, [indices], record)
        writer.mark_written(indices.start, metas)
        fault_point("synthesize.after_batch")

    with BackgroundWriter(write) as background:
        for indices in todo:
            assert draws is not None
            background.submit((indices, draws.take(indices)))
            samples += len(indices)
            if progress:
                progress("synthesize", already + samples, total)
            stop.check()
    return Written(samples, background.busy_seconds, background.blocked_seconds)


def _values(manifest: Manifest, batch: range) -> int:
    return (
        len(batch)
        * len(IMAGE_ARRAYS[manifest.task])
        * len(manifest.bands)
        * manifest.height
        * manifest.width
    )
