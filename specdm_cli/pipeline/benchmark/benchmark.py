"""The `benchmark` stage: quality, generator, downstream utility -> report.json, report.md, PNGs."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from specdm_cli import __version__
from specdm_cli.config import (
    METRICS_BATCH_SIZE,
    THROUGHPUT_BATCHES,
    Devices,
    DownstreamOptions,
    MetricsOptions,
    Progress,
)
from specdm_cli.errors import InputDataError, UsageError
from specdm_cli.fs.atomic import atomic_write_text, remove_tree
from specdm_cli.fs.lock import DirLock, ReadLock
from specdm_cli.fs.paths import refuse_overlap
from specdm_cli.manifest import QualityScores, load_manifest
from specdm_cli.pipeline.benchmark.features import (
    FeatureNetwork,
    default_config,
    load_or_train,
    manifest_sha256,
)
from specdm_cli.pipeline.benchmark.quality import (
    QualityReport,
    compare_stores,
    require_samples_to_compare,
    split_indices,
)
from specdm_cli.pipeline.devices import torch_devices
from specdm_cli.pipeline.runs.choose import ChosenModel, choose_model
from specdm_cli.pipeline.runs.detail_io import load_bank
from specdm_cli.pipeline.signals import StopFlag
from specdm_cli.pipeline.synthesize.preview import rgb_note
from specdm_cli.pipeline.train.demo_detail import demo_with_bank
from specdm_cli.stores import StoreReader, content_sha256, open_store, refuse_stream_out
from specdm_cli.stores.base import MANIFEST_NAME
from specdm_cli.stores.hints import held_out_hint, prepare_again
from specdm_cli.stores.quality import write_quality

from . import generator as gen
from .downstream import run_downstream
from .downstream_rows import (
    curve_pairs,
    evaluation_split,
    oracle_pairs,
    real_train,
    stopping_split,
)
from .render import cautions, markdown
from .report import (
    MARKDOWN_NAME,
    REPORT_NAME,
    BenchmarkReport,
    ClosePair,
    Downstream,
    ScoreSummary,
    StoreRef,
    check_comparable,
    compare,
    load_report,
    report_json,
)
from .scores import SampleTraits, Scores, quality_scores, sample_traits

CLOSEST_SHOWN = 5


@dataclass(frozen=True)
class BenchmarkRequest:
    """A validated `specdm benchmark` invocation."""

    real: Path
    synthetic: Path
    out: Path | None = None
    model: str | None = None
    downstream: DownstreamOptions | None = None
    write_scores: bool = False
    compare: Path | None = None
    overwrite: bool = False
    feature_steps: int | None = None  # None: the feature network's default budget
    label: str | None = None
    devices: Devices = field(default_factory=Devices)
    throughput_batches: int = THROUGHPUT_BATCHES
    batch_size: int = METRICS_BATCH_SIZE


def default_out(synthetic: Path) -> Path:
    """`syn.zarr` -> `syn-benchmark/` beside it (resolved first: `.` has no name)."""
    synthetic = synthetic.resolve()
    return synthetic.with_name(f"{synthetic.name.split('.')[0] or synthetic.name}-benchmark")


def open_pair(real_path: Path, synthetic_path: Path) -> tuple[StoreReader, StoreReader]:
    """Both stores, complete, of one task, band count and class count."""
    real, synthetic = open_store(real_path), open_store(synthetic_path)
    a, b = real.manifest, synthetic.manifest
    if a.model is not None:  # its samples have no held-out split to compare against
        raise UsageError(
            f"--real {real_path} is a synthetic store (made by {a.model.path or a.model.run_id}); --real takes a "
            "store `specdm prepare` made",
            hint="swap --real and --synthetic"
            if b.model is None
            else "pass the prepared store the model's samples should be compared with",
        )
    if a.task != b.task:
        raise InputDataError(
            f"task mismatch: the real store is {a.task}, the synthetic store {b.task}",
            synthetic_path,
            f"benchmark a synthetic {a.task} store against it",
        )
    _require_same_shape(real, synthetic)
    _require_same_names(
        "bands", [x.name for x in a.bands], [x.name for x in b.bands], synthetic_path
    )
    _require_same_names(
        "classes", [x.name for x in a.classes], [x.name for x in b.classes], synthetic_path
    )
    return real, synthetic


def _require_same_shape(real: StoreReader, synthetic: StoreReader) -> None:
    """Band count, sample size and class count alike, each difference named (bands first: no
    prepare option mends that one); the fix for a size alone is the real store's own source's
    prepare command at the synthetic store's size, into a new store beside it."""
    a, b = real.manifest, synthetic.manifest
    differ = [
        f"{what} ({x} vs {y})"
        for what, x, y in (
            ("bands", len(a.bands), len(b.bands)),
            ("size", f"{a.height}x{a.width}", f"{b.height}x{b.width}"),
            ("classes", len(a.classes), len(b.classes)),
        )
        if x != y
    ]
    if not differ:
        return
    reason = f"the stores differ in {', '.join(differ)}, real vs synthetic"
    if not differ[0].startswith("size") or len(differ) > 1 or b.height != b.width:
        model = f" ({b.model.path})" if b.model is not None and b.model.path else ""
        raise InputDataError(
            reason,
            synthetic.root,
            f"benchmark against the real store the generator{model} was trained on",
        )
    _require_same_names(
        "bands", [x.name for x in a.bands], [x.name for x in b.bands], synthetic.root
    )
    _require_same_names(
        "classes", [x.name for x in a.classes], [x.name for x in b.classes], synthetic.root
    )
    root = real.root
    suffix = ".zarr" if root.suffix == ".zarr" else ""
    name = f"{root.name.removesuffix('.zarr')}-{b.height}px{suffix}"
    command = prepare_again(root, a, b.height, out=root.with_name(name))
    raise InputDataError(
        reason,
        synthetic.root,
        f"prepare the real store at the synthetic store's {b.height} px: {command}",
    )


def _require_same_names(what: str, real: list[str], synthetic: list[str], where: Path) -> None:
    """Counts alike, names or order apart: every figure would compare one band (or class)
    with another, and the report would look valid."""
    differ = [(r, s) for r, s in zip(real, synthetic, strict=True) if r != s]
    if differ:
        first_real, first_synthetic = differ[0]
        raise InputDataError(
            f"the stores' {what} differ: {len(differ)} of {len(real)} by name or order (real "
            f"{first_real!r} where the synthetic store has {first_synthetic!r})",
            where,
            "benchmark against the real store the generator was trained on",
        )


def rgb_notice(real: Path) -> str | None:
    """The line saying the report's sample pictures guess their red, green and blue bands."""
    return rgb_note(load_manifest(real / MANIFEST_NAME))


def check_out(out: Path, overwrite: bool) -> None:
    """An existing non-empty output is refused, unless --overwrite and it is one of our reports."""
    if not out.exists():
        return
    empty = out.is_dir() and not any(out.iterdir())
    ours = out.is_dir() and (out / REPORT_NAME).is_file()
    if not (empty or ours):
        raise InputDataError(
            "output exists and is not a benchmark report", out, "choose another --out"
        )
    if ours and not overwrite:
        raise InputDataError("output already exists", out, "pass --overwrite or another --out")


def benchmark(
    request: BenchmarkRequest, progress: Progress | None = None
) -> tuple[BenchmarkReport, Path]:
    """Measure, write the report folder atomically; returns the report and the folder.

    Both stores are claimed for reading meanwhile: `--overwrite` elsewhere refuses to replace them.
    """
    request.devices.one("benchmark")  # refused before any work
    with ReadLock(request.real), ReadLock(request.synthetic):
        return _measure(request, progress)


def _measure(request: BenchmarkRequest, progress: Progress | None) -> tuple[BenchmarkReport, Path]:
    if request.out is not None:
        refuse_stream_out(request.out)
    real, synthetic = open_pair(request.real, request.synthetic)
    require_samples_to_compare(real, synthetic)
    if request.downstream is not None:  # the real pairs it asks for exist, before any training
        train = real_train(real, request.downstream)
        stopping_split(real, evaluation_split(real)[1], request.downstream)
        curve_pairs(real, request.downstream, train.size)
        if request.downstream.oracle:
            oracle_pairs(real, request.downstream, train)
    other = load_report(request.compare) if request.compare is not None else None
    out = request.out or default_out(request.synthetic)
    inputs = {
        "--real": request.real,
        "--synthetic": request.synthetic,
        "--compare": request.compare,
    }
    # Round trips and reconstruction need only the VAE: a run can be judged before its U-Net.
    chosen = (
        choose_model(request.model, real.manifest.task, vae_only=True) if request.model else None
    )
    # A report inside the run (or the installed demo model) would be taken for part of it.
    refuse_overlap(out, {**inputs, "--model": chosen.path if chosen else None})
    check_out(out, request.overwrite)
    if chosen is not None:
        gen.check_model_fits(chosen, real)
        if not gen.made_by(synthetic, chosen):  # a store of `--no-detail` is judged without it
            chosen = demo_with_bank(chosen, StopFlag(), progress)  # as synthesize samples it
    device = torch_devices(request.devices)[0]
    overrides = {"steps": request.feature_steps} if request.feature_steps else {}
    network = load_or_train(
        real, default_config(real, **overrides), device=str(device), progress=progress
    )
    if other is not None:
        check_comparable(network.feature_hash, other, request.compare or Path())
    synthetic_sha, real_sha = manifest_sha256(synthetic), manifest_sha256(real)
    options = MetricsOptions(batch_size=request.batch_size)
    quality = compare_stores(real, synthetic, network, options=options, progress=progress)
    traits, scores = _score(real, synthetic, network, request.batch_size, progress)
    if request.write_scores:
        _write_scores(synthetic, scores, network, real)
    real_ref = _ref(real, real_sha)
    report = BenchmarkReport(
        tool_version=__version__, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        command=" ".join(sys.argv), label=request.label or synthetic.root.name.split(".")[0],
        task=real.manifest.task, real=real_ref,
        synthetic=_ref(synthetic, synthetic_sha), feature_hash=network.feature_hash,
        quality=quality, closest_pairs=closest(quality),
        scores=summarise(scores, request.write_scores),
        generator=gen.generator_info(synthetic, real, real_ref, chosen),
    )  # fmt: skip
    if chosen is not None:
        report.reconstruction = gen.reconstruction(chosen, real, device)
        if chosen.manifest.can_sample():
            report.throughput = gen.throughput(
                chosen, synthetic, device, request.throughput_batches
            )
    if request.downstream is not None:
        report.downstream = _downstream(
            request.downstream, real, synthetic, chosen, device, progress
        )
    if other is not None:
        report.comparison = compare(report, other, request.compare or Path())
    report.cautions = cautions(report, held_out_hint(real.manifest))
    means = (traits[0].class_means(), traits[1].class_means())
    write_report_folder(out, report, real, synthetic, means)
    return report, out


def _downstream(
    options: DownstreamOptions,
    real: StoreReader,
    synthetic: StoreReader,
    chosen: ChosenModel | None,
    device: torch.device,
    progress: Progress | None,
) -> Downstream:
    """The utility table; with --model, its round-trip row decodes through that run's VAE, and
    its detail bank where the store was sampled with it (`gen.with_detail`)."""
    if chosen is None:
        return run_downstream(real, synthetic, options, str(device), progress)
    name = f"{chosen.manifest.run_id} ({chosen.kind}, sha256 {chosen.sha256[:12]})"
    detail = gen.with_detail(synthetic, chosen)
    bank = load_bank(chosen.path, chosen.manifest) if detail else None
    if bank is not None:
        name += " + retrieved detail (its fit-detail bank)"
    return run_downstream(
        real, synthetic, options, str(device), progress,
        round_trip=lambda indices: gen.round_trip(chosen, real, indices, device, bank=bank),
        round_trip_name=name,
    )  # fmt: skip


def _ref(reader: StoreReader, sha: str) -> StoreRef:
    manifest = reader.manifest
    return StoreRef(
        path=str(reader.root), manifest_sha256=sha, content_sha256=content_sha256(reader),
        task=manifest.task,
        count=len(reader), split_counts=manifest.split_counts,
    )  # fmt: skip


def _score(
    real: StoreReader,
    synthetic: StoreReader,
    network: FeatureNetwork,
    batch_size: int,
    progress: Progress | None,
) -> tuple[tuple[SampleTraits, SampleTraits], Scores]:
    heldout, split = split_indices(real, "heldout")
    real_traits = sample_traits(real, heldout, network, batch_size, progress, "scores (real)")
    syn_traits = sample_traits(
        synthetic, synthetic.indices(None), network, batch_size, progress, "scores (synthetic)"
    )
    return (real_traits, syn_traits), quality_scores(real_traits, syn_traits, split)


def _write_scores(
    synthetic: StoreReader, scores: Scores, network: FeatureNetwork, real: StoreReader
) -> None:
    values = np.full(len(synthetic), np.nan)
    values[synthetic.indices(None)] = scores.quality
    info = QualityScores(
        definition=scores.definition, feature_hash=network.feature_hash, reference=str(real.root),
        reference_manifest_sha256=manifest_sha256(real), count=int(scores.quality.size),
    )  # fmt: skip
    with DirLock(synthetic.root):
        synthetic.manifest = write_quality(synthetic.root, synthetic.manifest, values, info)


def closest(quality: QualityReport, count: int = CLOSEST_SHOWN) -> list[ClosePair]:
    """The `count` synthetic samples nearest (feature space) to a real train sample."""
    per = quality.per_sample
    order = np.argsort(np.asarray(per.nn_feature_distance), kind="stable")[:count]
    return [
        ClosePair(
            synthetic_index=per.index[k],
            real_index=per.nn_feature_index[k],
            feature_distance=per.nn_feature_distance[k],
            pixel_distance=per.nn_pixel_distance[k],
            near_duplicate=per.near_duplicate[k],
        )
        for k in order
        if per.nn_feature_index[k] >= 0
    ]


def summarise(scores: Scores, written: bool) -> ScoreSummary:
    """Mean, quantiles and threshold shares of the scores."""
    q = scores.quality
    levels = {"q05": 5, "q25": 25, "median": 50, "q75": 75, "q95": 95}
    finite = scores.spectral_angle[np.isfinite(scores.spectral_angle)]
    return ScoreSummary(
        definition=scores.definition, count=int(q.size), mean=float(q.mean()),
        quantiles={k: float(np.percentile(q, v)) for k, v in levels.items()},
        share_at_least={str(t): float((q >= t).mean()) for t in (0.1, 0.25, 0.5)},
        real_mean=float(scores.real_quality.mean()),
        mean_consistency=float(scores.consistency.mean()),
        mean_spectral_angle=float(finite.mean()) if finite.size else float("nan"),
        written=written,
    )  # fmt: skip


def write_report_folder(
    out: Path,
    report: BenchmarkReport,
    real: StoreReader,
    synthetic: StoreReader,
    class_means: tuple[np.ndarray, np.ndarray],
) -> None:
    """Figures, report.json and report.md in a temporary sibling, renamed into place at the end."""
    from .figures import draw_all

    temp = out.with_name(f".{out.name}.writing-{os.getpid()}")
    remove_tree(temp)
    temp.mkdir(parents=True)
    try:
        report.figures = draw_all(temp, report, real, synthetic, class_means)
        atomic_write_text(temp / REPORT_NAME, report_json(report))
        atomic_write_text(temp / MARKDOWN_NAME, markdown(report))
        remove_tree(out)
        temp.rename(out)
    except BaseException:
        remove_tree(temp)
        raise
