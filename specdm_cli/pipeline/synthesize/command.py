"""`specdm synthesize` as one call: choose the model, clear an old store, sample, preview."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast, get_args

from specdm_cli.config import (
    Devices,
    Precision,
    Progress,
    SamplerChoice,
    SamplerName,
    StoreFormat,
    Task,
)
from specdm_cli.errors import InputDataError, UsageError, missing_store
from specdm_cli.fs.lock import ReadLock
from specdm_cli.fs.paths import refuse_overlap
from specdm_cli.fs.space import require_disk, require_memory
from specdm_cli.manifest import array_names, load_manifest
from specdm_cli.pipeline.devices import torch_devices
from specdm_cli.pipeline.runs.choose import ChosenModel, choose_model
from specdm_cli.pipeline.runs.detail_io import has_bank, require_bank
from specdm_cli.pipeline.signals import StopFlag
from specdm_cli.pipeline.synthesize.masks import (
    DEFAULT_GUIDANCE,
    GivenMasks,
    MaskSource,
    require_conditioned,
)
from specdm_cli.pipeline.synthesize.preview import check_preview_path, rgb_note, write_preview
from specdm_cli.pipeline.synthesize.quality import Judge, JudgeMaker, QualityBar
from specdm_cli.pipeline.synthesize.require import parse_require
from specdm_cli.pipeline.synthesize.sampler import resolve_sampler
from specdm_cli.pipeline.synthesize.shards import Shard, parse_batch_size, parse_shard
from specdm_cli.pipeline.synthesize.synthesize import (
    SynthesizeRequest,
    SynthesizeSummary,
    check_steps,
    filter_options,
    refuse_split,
    resolve_batch_size,
    synthesize,
)
from specdm_cli.pipeline.train.demo_detail import demo_with_bank
from specdm_cli.stores import open_store, refuse_stream_out, remove_own, stored_sample_bytes
from specdm_cli.stores.base import MANIFEST_NAME

PREVIEW_SAMPLES = 8


@dataclass(frozen=True)
class SynthesizeOptions:
    """`specdm synthesize`'s options, typed but not yet resolved (model, B, shard, --require)."""

    out: Path
    n: int
    model: str | None = None
    task: Task | None = None
    sampler: SamplerChoice = "auto"
    steps: int | None = None
    seed: int = 0
    batch_size: str = "auto"
    precision: Precision = "fp32"
    format: StoreFormat = "zarr"
    shard: str | None = None
    devices: Devices = field(default_factory=Devices)
    require: str | None = None
    overwrite: bool = False
    preview: Path | None = None
    masks: Path | None = None  # a store whose label maps the samples are drawn for
    masks_split: str | None = None
    mask_guidance: float | None = None  # None: DEFAULT_GUIDANCE with --masks
    min_quality: float | None = None  # keep only draws scoring at least this against --real
    real: Path | None = None
    feature_steps: int | None = None  # the judge's feature network (as benchmark's option)
    label_confidence: float = 0.0  # decoded mask pixels less sure than this: unlabelled
    detail: bool | None = None  # the run's retrieved detail (fit-detail); None: if it has a bank
    judge_maker: JudgeMaker | None = None  # with --min-quality: the benchmark's QualityJudge

    def filters(self) -> str:
        """The options that filter draws, as typed; "" for none."""
        return filter_options(self.require, self.min_quality)


def synthesize_store(
    options: SynthesizeOptions,
    stop: StopFlag,
    progress: Progress | None = None,
    notice: Callable[[str], None] = lambda line: None,
) -> SynthesizeSummary:
    """Resolve the options into a request, write the store (or this shard of it), preview it."""
    if options.n <= 0:
        raise UsageError("synthesize needs --n >= 1", hint="e.g. --n 1000 --out syn.zarr")
    refuse_stream_out(options.out)
    if options.precision != "fp32" and options.devices.kind == "cpu":
        # The CPU samples in fp32 whatever is asked; the manifest must say what ran.
        notice(f"warning: --precision {options.precision} applies on CUDA; the CPU samples in fp32")
        options = replace(options, precision="fp32")
    _check_label_confidence(options)
    shard = parse_shard(options.shard)
    grid = parse_batch_size(options.batch_size)
    chosen = _model(options)
    wanted = _wanted_detail(options)
    if wanted is not False:  # the ss demo model's bank, built on its first use
        chosen = demo_with_bank(chosen, stop, progress, notice)
    options = replace(options, detail=_detail(options, wanted, chosen, notice))
    if options.detail:
        require_bank(chosen.path, chosen.manifest)
    inputs = {"--model": chosen.path, "--masks": options.masks, "--real": options.real}
    refuse_overlap(options.out, inputs)
    if options.preview is not None:
        check_preview_path(options.preview, {**inputs, "--out": options.out})
    bar = _quality_bar(options)
    refuse_split(options.filters(), shard, options.devices)  # before a judge is trained
    masks = _mask_source(options, chosen)
    notice(model_line(chosen))
    if chosen.kind == "demo":  # shipped inside the package: no claim files written there
        with _reading(masks), _reading_real(bar):
            return _write(options, chosen, shard, grid, (masks, bar), stop, progress, notice)
    # A run is claimed while it is used: `--overwrite` elsewhere refuses to replace it.
    with ReadLock(chosen.path, refuse_writer=False), _reading(masks), _reading_real(bar):
        return _write(options, chosen, shard, grid, (masks, bar), stop, progress, notice)


def _check_label_confidence(options: SynthesizeOptions) -> None:
    """`--label-confidence` in [0, 1) (1 would leave no pixel labelled), and only where the
    masks are decoded."""
    if not 0.0 <= options.label_confidence < 1.0:
        raise UsageError(
            f"--label-confidence {options.label_confidence:g} is outside [0, 1)",
            hint="e.g. --label-confidence 0.7 (0 labels every pixel)",
        )
    if options.label_confidence and options.masks is not None:
        raise UsageError(
            "--label-confidence thresholds decoded masks; with --masks the masks are given",
            hint="drop --label-confidence",
        )


def _store_plan(options: SynthesizeOptions) -> dict[str, Any] | None:
    """The plan of the store `--out` begun before (None: none, or --overwrite replaces it)."""
    manifest = options.out / MANIFEST_NAME
    if options.overwrite or not manifest.is_file():
        return None
    return load_manifest(manifest).plan


def _store_sampler(options: SynthesizeOptions) -> SamplerName | None:
    """`--sampler auto` on a store begun before: the sampler it was begun with, so a resume or
    another shard goes on as it began even after the run gained a distilled student."""
    plan = _store_plan(options) if options.sampler == "auto" else None
    sampler = plan.get("sampler") if plan is not None else None
    return cast(SamplerName, sampler) if sampler in get_args(SamplerName) else None


def _wanted_detail(options: SynthesizeOptions) -> bool | None:
    """--detail/--no-detail; by default as a store begun before began (so a resume or shard
    goes on alike after the run gained a bank); None: where the run has a detail bank."""
    if options.detail is not None:
        return options.detail
    plan = _store_plan(options)
    return None if plan is None else "detail" in plan


def _detail(
    options: SynthesizeOptions,
    wanted: bool | None,
    chosen: ChosenModel,
    notice: Callable[[str], None],
) -> bool:
    """Whether the images get the run's retrieved detail (`_wanted_detail`); said when it is
    on without --detail."""
    detail = has_bank(chosen.manifest) if wanted is None else wanted
    if detail and options.detail is None:
        notice(
            "detail: the run's retrieved detail (its fit-detail bank; --no-detail leaves it out)"
        )
    return detail


def _why_sampler(request: SynthesizeRequest, options: SynthesizeOptions, stored: bool) -> str:
    if stored:
        return "the store's, begun with it"
    if request.sampler == "distilled":
        return "the run's distilled student"
    if options.steps is not None:
        return "--steps asks for a step count"
    return "--masks: students are joint only" if request.masks else "no current student"


def _quality_bar(options: SynthesizeOptions) -> QualityBar | None:
    """`--min-quality` with the `--real` store it is judged against, or None."""
    if options.min_quality is None:
        if options.real is not None or options.feature_steps is not None:
            raise UsageError(
                "--real and --feature-steps only serve --min-quality",
                hint="e.g. --min-quality 0.6 --real data.zarr",
            )
        return None
    if options.real is None:
        raise UsageError(
            "--min-quality needs --real: the real store the scores are calibrated on",
            hint="e.g. --min-quality 0.6 --real data.zarr",
        )
    if options.masks is not None:
        raise UsageError(
            "--min-quality with --masks would skip masks: sample i is drawn for mask i",
            hint="filter afterwards: `specdm benchmark --write-scores`, then `specdm filter`",
        )
    return QualityBar(options.min_quality, options.real, _feature_steps(options))


def _feature_steps(options: SynthesizeOptions) -> int | None:
    """--feature-steps; by default the store's begun before. A resume without it trained the
    judge for minutes at the default, then refused the plan; another value is refused now."""
    plan = _store_plan(options) or {}
    if "feature_steps" not in plan:
        return options.feature_steps
    recorded = plan["feature_steps"]
    if options.feature_steps not in (None, recorded):
        raise InputDataError(
            f"--feature-steps {options.feature_steps}: the store was begun with "
            f"{recorded or 'the default'}",
            options.out,
            "drop --feature-steps to go on as it began, or choose another --out",
        )
    return cast(int | None, recorded)


def _judge(
    options: SynthesizeOptions,
    bar: QualityBar | None,
    chosen: ChosenModel,
    progress: Progress | None,
) -> Judge | None:
    if bar is None:
        return None
    if options.judge_maker is None:
        raise TypeError("SynthesizeOptions.judge_maker is needed with --min-quality")
    device = str(torch_devices(options.devices)[0])
    return options.judge_maker(bar, chosen.manifest, device, progress)


def _reading_real(bar: QualityBar | None) -> AbstractContextManager[object]:
    return ReadLock(bar.real) if bar is not None else nullcontext()


def _mask_source(options: SynthesizeOptions, chosen: ChosenModel) -> MaskSource | None:
    """`--masks`: refused for an unconditioned model, with --require, or a store that does
    not fit the run (checked now, before the output exists)."""
    if options.masks is None:
        if options.masks_split is not None or options.mask_guidance is not None:
            raise UsageError(
                "--masks-split and --mask-guidance need --masks", hint="e.g. --masks data.zarr"
            )
        return None
    guidance = DEFAULT_GUIDANCE if options.mask_guidance is None else options.mask_guidance
    if not guidance >= 1:
        raise UsageError(
            f"--mask-guidance {guidance} is below 1", hint="1 = the plain conditional model"
        )
    if not options.masks.exists():  # told before what the model can do with masks
        raise missing_store(options.masks, "--masks")
    require_conditioned(chosen.manifest, chosen.path, demo=chosen.kind == "demo")
    if options.require is not None:
        raise UsageError(
            "--require filters decoded masks; with --masks the masks are given",
            hint="choose the masks you want in the --masks store instead",
        )
    source = MaskSource(options.masks, options.masks_split, guidance)
    GivenMasks(source, chosen.manifest)
    return source


def _reading(masks: MaskSource | None) -> AbstractContextManager[object]:
    """The --masks store is claimed while it is read (`--overwrite` elsewhere waits)."""
    return ReadLock(masks.path) if masks is not None else nullcontext()


def _write(
    options: SynthesizeOptions,
    chosen: ChosenModel,
    shard: Shard,
    grid: int | None,
    given: tuple[MaskSource | None, QualityBar | None],
    stop: StopFlag,
    progress: Progress | None,
    notice: Callable[[str], None],
) -> SynthesizeSummary:
    masks, bar = given
    requirements = parse_require(options.require, chosen.manifest.classes)  # before any judge
    # Judged before an old store is removed: a --real that does not fit leaves it in place.
    judge = _judge(options, bar, chosen, progress)
    stored_sampler = _store_sampler(options)
    request = SynthesizeRequest(
        model=chosen,
        out=options.out,
        n=options.n,
        sampler=stored_sampler
        or resolve_sampler(options.sampler, options.steps, chosen, masks is not None),
        steps=options.steps,
        seed=options.seed,
        batch_size=resolve_batch_size(
            grid,
            None if options.overwrite else options.out,
            options.devices,
            options.n,
            bool(options.filters()),
        ),
        precision=options.precision,
        format=options.format,
        shard=shard,
        devices=options.devices,
        require=requirements,
        masks=masks,
        quality=judge,
        label_confidence=options.label_confidence,
        detail=bool(options.detail),  # resolved by _detail
    )
    # Every option checked before --overwrite removes the old store: a refusal leaves it.
    check_steps(request)
    _require_room(request, replacing=options.overwrite)
    if options.overwrite and options.out.exists():
        remove_own(options.out, "store", "synthesize")
    if options.sampler == "auto":  # the same command samples otherwise once a run is distilled
        why = _why_sampler(request, options, stored_sampler is not None)
        notice(f"sampler: {request.sampler} ({why}; --sampler auto)")
    summary = synthesize(request, stop, progress)
    if options.preview is not None:
        reader = open_store(options.out, allow_incomplete=True)
        note = rgb_note(reader.manifest)
        if note is not None:
            notice(note)
        first = [int(i) for i in reader.indices()[:PREVIEW_SAMPLES]]
        write_preview(options.preview, [reader.read(i) for i in first], reader.manifest)
        summary = replace(summary, preview=str(options.preview))
    return summary


# Working memory per sample in a batch, in float32 values per pixel beyond its own arrays: the
# decoders' full-resolution activations (demo widths 16-32, up to 128 at the paper's; our
# estimate, generous). Told as "about": it only has to catch sizes that cannot work.
_DECODER_VALUES_PER_PIXEL = 256


def _require_room(request: SynthesizeRequest, replacing: bool) -> None:
    """Refuse (exit 5) at once what cannot fit: a batch the memory cannot hold, a new store the
    disk cannot hold (`--n 10**12` used to run two minutes before disk full); `replacing`, the
    store at `out` is to be removed first (its space not counted free: a refusal keeps it)."""
    manifest = request.model.manifest
    pixels = manifest.height * manifest.width
    images = len(array_names(manifest.task)) - 1
    values = images * len(manifest.bands) + len(manifest.classes) + _DECODER_VALUES_PER_PIXEL
    require_memory(
        float(request.batch_size) * pixels * values * 4,
        f"a batch of {request.batch_size}",
        "use a smaller --batch-size (e.g. 16)",
    )
    if replacing or not (request.out / MANIFEST_NAME).exists():
        per_sample = stored_sample_bytes(
            manifest.task, len(manifest.bands), manifest.dtype, manifest.height, manifest.width
        )
        require_disk(
            float(request.n) * per_sample,
            request.out,
            f"the store ({request.n} samples of {manifest.height}x{manifest.width})",
            "free space, choose another --out or a smaller --n",
        )


def model_line(chosen: ChosenModel) -> str:
    """Which model samples: a run by its folder; the demo by name, its folder being inside the
    package, or a cache folder named after the shipped model's digest where it has its bank."""
    why = f"; {chosen.why}" if chosen.why else ""  # for a model nobody named: how to choose another
    sha = chosen.sha256[:12]
    if chosen.kind != "demo":
        return f"model: {chosen.path} ({chosen.kind}, sha256 {sha}){why}"
    if has_bank(chosen.manifest):
        task = chosen.manifest.task
        return (
            f"model: demo ({task} with its detail bank, sha256 {sha}; cached in {chosen.path}){why}"
        )
    return f"model: demo ({chosen.manifest.task}, sha256 {sha}){why}"


def _model(options: SynthesizeOptions) -> ChosenModel:
    chosen = choose_model(options.model, options.task, for_masks=options.masks is not None)
    if options.task is not None and chosen.manifest.task != options.task:
        raise UsageError(
            f"the model is for task {chosen.manifest.task}, not {options.task}",
            hint="drop --task or pick another --model",
        )
    return chosen
