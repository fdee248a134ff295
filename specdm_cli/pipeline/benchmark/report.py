"""What `specdm benchmark` reports: the pydantic models of `report.json` and its JSON Schema."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from specdm_cli.errors import InputDataError
from specdm_cli.metrics.stats import mean_interval
from specdm_cli.pipeline.benchmark.quality import QualityReport

REPORT_SCHEMA_VERSION = 1
REPORT_NAME = "report.json"
MARKDOWN_NAME = "report.md"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StoreRef(_Strict):
    """A store the benchmark read."""

    path: str
    manifest_sha256: str
    content_sha256: str | None = Field(
        None,
        description="sha256 of the samples' checksums and splits: equal for stores of the same "
        "data (the manifest's also records when it was made); None: written before checksums",
    )
    task: str
    count: int
    split_counts: dict[str, int]


class ClosePair(_Strict):
    """A synthetic sample and its nearest real train sample in feature space."""

    synthetic_index: int
    real_index: int
    feature_distance: float
    pixel_distance: float
    near_duplicate: bool


class ScoreSummary(_Strict):
    """Distribution of the per-sample quality scores (see `definition`)."""

    definition: str
    count: int
    mean: float
    quantiles: dict[str, float] = Field(description="q05, q25, median, q75, q95")
    share_at_least: dict[str, float] = Field(description="share of samples scoring >= 0.1/0.25/0.5")
    real_mean: float = Field(description="mean score of the real held-out samples themselves")
    mean_consistency: float
    mean_spectral_angle: float = Field(description="rad, finite samples")
    written: bool = Field(description="written into the synthetic store (--write-scores)")


class TileSizes(_Strict):
    """--model's tile size and the real store's, (height, width) in pixels."""

    model: tuple[int, int]
    real: tuple[int, int]


class GeneratorInfo(_Strict):
    """The model behind the synthetic store and the real data it saw."""

    run_id: str
    kind: str
    path: str | None
    train_split: str | None = None
    train_limit: int | None = None
    real_pairs_seen: int | None = Field(None, description="real pairs the VAE and U-Net trained on")
    source_manifest_sha256: str | None = None
    real_store_is_source: bool = Field(description="--real is the very store it was trained on")
    heldout_in_training: int | None = Field(
        None,
        description="--real's held-out pairs that are among the pairs the generator trained on "
        "(the same source ids in its training store); None: not checked",
    )
    synthetic_made_by: str | None = Field(
        None,
        description="the model that made the synthetic store where --model did not (its run id "
        "and model_sha256's first 12 digits, from the store's manifest); None: --model made it, "
        "or no --model was given, or the store names no model",
    )
    tile_sizes: TileSizes | None = Field(
        None,
        description="where --model learned tiles of another size than the real store's: its "
        "reconstruction and round trips then run on tiles of a size it did not train on; "
        "None: the same size, or no --model",
    )


class Reconstruction(_Strict):
    """VAE reconstruction of the real val split through the posterior means (paper Table 4)."""

    split: str
    count: int
    rmse: float = Field(description="normalised units")
    rmse_physical: float
    sad: float = Field(description="mean spectral angle, rad")
    ce: float = Field(description="mask cross-entropy, nats per pixel")
    miou: float
    iou: list[float | None]


class Throughput(_Strict):
    """Sampling speed of the run: whole batches timed after one warm-up batch."""

    pairs_per_second: float
    pairs: int
    batch_size: int
    sampler: str
    steps: int
    precision: str
    device: str
    detail: bool = Field(False, description="retrieved detail added to each decoded pair")


class SeedRun(_Strict):
    """One seed of one configuration: its test scores and how its training stopped."""

    seed: int
    miou: float
    f1: float
    iou_per_class: dict[str, float]
    steps: int = Field(description="optimiser steps run, all phases")
    best_steps: list[int] = Field(description="step of the best val mIoU, per phase")
    phase_steps: list[int] = Field(default_factory=list, description="steps run, per phase")
    best_val_miou: float = Field(description="val mIoU of the tested weights")
    val_curve: list[list[float]] = Field(description="[step, val mIoU] per evaluation, all phases")
    seconds: float = Field(
        description="training time, all phases (real -> real: its first phase is the real row's)"
    )
    kept_share: float | None = Field(
        None, description="agreement rows: share of generated label pixels kept"
    )


class DownstreamRow(_Strict):
    """One training configuration of the downstream network, evaluated on real data.

    `miou` and `f1` are means over the seeds; `*_std` their standard deviation (ddof 1),
    `*_min`/`*_max` their range. Reports of the earlier one-seed, fixed-steps protocol lack them.
    """

    name: str
    protocol: str = Field(
        "fixed-steps",
        description="real, real-twice, round-trip (-images, -labels), synthetic, mixed, pretrain "
        "(-agree: relabelled; -oracle: real pairs in place of the synthetic ones; "
        "-oracle-round-trip: their VAE round trips)",
    )
    real_count: int
    synthetic_count: int
    miou: float
    f1: float
    miou_std: float | None = None
    f1_std: float | None = None
    miou_min: float | None = None
    miou_max: float | None = None
    iou_per_class: dict[str, float]
    final_loss: float | None = None
    seconds: float
    seeds: list[SeedRun] = Field(default_factory=list)
    kept_share: float | None = Field(
        None, description="agreement rows: mean over seeds of the label pixels kept"
    )


class Downstream(_Strict):
    """Downstream utility (paper Tables 3, 5, 6): one network, stopping rule and seeds per row."""

    network: str
    config: dict[str, Any]
    real_limit: int = Field(
        description="the real train pairs the real rows trained on (reports before 2026-12-07: "
        "the limit asked for, which a smaller store cut short; rows' real_count is right in both)"
    )
    real_limit_asked: int | None = Field(
        None, description="the limit asked for, where the store had fewer train pairs"
    )
    eval_split: str
    eval_count: int
    f1_definition: str
    rows: list[DownstreamRow]
    protocol: str = Field("", description="how every row was trained and tested, in words")
    stop_split: str = Field("", description="the real pairs early stopping watched")
    stop_count: int = 0
    stopping: dict[str, int] | None = Field(
        None,
        description="the stopping rule beside config's budget: eval_every, patience, lr_drops "
        "(None: reports before 2026-12-07, whose protocol says it in words)",
    )
    seeds: list[int] = Field(default_factory=list)
    real_share: float | None = Field(None, description="share of real pairs in a mixed batch")
    spread: str = Field("", description="what the +- of a row is")
    round_trip: str | None = Field(None, description="the VAE the round-trip row decoded with")
    device: str = Field("", description="torch device the rows trained on")
    threads: int | None = Field(
        None,
        description="torch CPU threads the rows trained with: float sums run in another order "
        "with another count, so figures repeat bit for bit only with the same device and count",
    )


class ComparedFigure(_Strict):
    name: str
    this: float | None
    other: float | None


class PairedGain(_Strict):
    """One downstream row's test mIoU less another's, seed by seed, over the seeds both ran."""

    row: str
    against: str
    seeds: list[int]
    gains: list[float]
    mean: float
    low: float = Field(description="two-sided 95% t-interval of the mean gain (ddof 1)")
    high: float


def paired_gain(row: DownstreamRow, base: DownstreamRow, against: str) -> PairedGain | None:
    """`row` against `base` seed by seed; None where they share fewer than two seeds."""
    theirs = {run.seed: run.miou for run in base.seeds}
    shared = [run for run in row.seeds if run.seed in theirs]
    if len(shared) < 2:
        return None
    gains = [run.miou - theirs[run.seed] for run in shared]
    mean, low, high = mean_interval(gains)
    return PairedGain(row=row.name, against=against, seeds=[run.seed for run in shared],
                      gains=gains, mean=mean, low=low, high=high)  # fmt: skip


class Comparison(_Strict):
    """This report beside another computed with the same feature network."""

    other: str
    this_label: str
    other_label: str
    figures: list[ComparedFigure]
    paired: list[PairedGain] = Field(
        default_factory=list,
        description="downstream rows of the same name against the other report's, seed by "
        "seed; only where both trained on the same real store with the same protocol",
    )


class BenchmarkReport(_Strict):
    """Everything `specdm benchmark` measured; `figures` name PNGs beside the report."""

    schema_version: int = REPORT_SCHEMA_VERSION
    tool_version: str
    created: str
    command: str
    label: str = Field(description="short name of the synthetic side (tables, --compare)")
    task: str
    real: StoreRef
    synthetic: StoreRef
    feature_hash: str
    quality: QualityReport
    closest_pairs: list[ClosePair]
    scores: ScoreSummary
    generator: GeneratorInfo | None = None
    reconstruction: Reconstruction | None = None
    throughput: Throughput | None = None
    downstream: Downstream | None = None
    comparison: Comparison | None = None
    figures: dict[str, str] = Field(default_factory=dict, description="name -> PNG file")
    cautions: list[str] = Field(
        default_factory=list,
        description="what limits the figures, as sentences (also warned of on stderr): the "
        "real reference is the train split (`quality.reference.split` 'train': the store has no "
        "val or test split), held-out pairs the generator trained on, too few samples",
    )

    def headline(self) -> dict[str, float | None]:
        """The figures a table shows and `--compare` lines up, by name."""
        q = self.quality
        rows: dict[str, float | None] = {
            "fd_spectral": q.fd_spectral, "fd_mask": q.fd_mask, "fd_joint": q.fd_joint,
            "kid_spectral": q.kid_spectral, "msad": q.msad, "js_class": q.js_class,
            "wasserstein_mean_std": q.wasserstein_mean_std, "pair_miou": q.pair_miou,
            "pair_miou_reference": q.pair_miou_reference,
            "near_duplicate_fraction_feature": q.near_duplicate_fraction_feature,
            "nn_feature_distance_median": q.nn_feature_distance_median,
            "quality_score_mean": self.scores.mean,
        }  # fmt: skip
        if q.change_sample_fraction_candidate is not None:
            rows["change_sample_fraction_candidate"] = q.change_sample_fraction_candidate
            rows["change_sample_fraction_reference"] = q.change_sample_fraction_reference
            rows["change_angle_auc_candidate"] = q.change_angle_auc_candidate
        if self.reconstruction is not None:
            for key in ("rmse", "rmse_physical", "sad", "ce", "miou"):
                rows[f"vae_{key}"] = getattr(self.reconstruction, key)
        if self.throughput is not None:
            rows["pairs_per_second"] = self.throughput.pairs_per_second
        for row in self.downstream.rows if self.downstream else []:
            rows[f"downstream[{row.name}].miou"] = row.miou
            rows[f"downstream[{row.name}].f1"] = row.f1
        return rows


def _finite_or_text(value: Any) -> Any:
    """Non-finite floats as the strings "NaN", "Infinity", "-Infinity" (pydantic reads them back)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _finite_or_text(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_text(v) for v in value]
    return value


def report_json(report: BenchmarkReport, per_sample: bool = True) -> str:
    """Strict JSON (no NaN tokens: KID of a tiny set is NaN); `per_sample` False drops the lists."""
    exclude = None if per_sample else {"quality": {"per_sample"}}
    return json.dumps(_finite_or_text(report.model_dump(mode="python", exclude=exclude)), indent=2)


def report_schema() -> dict[str, Any]:
    """The JSON Schema of `report.json`."""
    return BenchmarkReport.model_json_schema()


def load_report(path: Path) -> BenchmarkReport:
    """Read and validate a `report.json` (or the folder holding one) as an input-data error."""
    file = path / REPORT_NAME if path.is_dir() else path
    try:
        return BenchmarkReport.model_validate(json.loads(file.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise InputDataError("no benchmark report here", file, "pass a report.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputDataError(f"unreadable report ({exc})", file, "pass a report.json") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InputDataError(
            f"not a specdm benchmark report: {where}: {first['msg']}", file, "re-run benchmark"
        ) from None


def check_comparable(feature_hash: str, other: BenchmarkReport, other_path: Path) -> None:
    """Figures of two reports compare only when one feature network made both."""
    if feature_hash != other.feature_hash:
        raise InputDataError(
            f"the reports' feature networks differ ({feature_hash[:12]} vs "
            f"{other.feature_hash[:12]}), so their figures are not comparable",
            other_path,
            "benchmark both against the same --real store with the same feature options",
        )


def compare(this: BenchmarkReport, other: BenchmarkReport, other_path: Path) -> Comparison:
    """Line up the headline figures of two reports; refused unless one feature network made both."""
    check_comparable(this.feature_hash, other, other_path)
    mine, theirs = this.headline(), other.headline()
    names = list(mine) + [name for name in theirs if name not in mine]
    figures = [ComparedFigure(name=n, this=mine.get(n), other=theirs.get(n)) for n in names]
    other_label = other.label if other.label != this.label else f"{other.label} (other)"
    return Comparison(other=str(other_path), this_label=this.label, other_label=other_label,
                      figures=figures, paired=_paired_across(this, other, other_label))  # fmt: skip


def _paired_across(
    this: BenchmarkReport, other: BenchmarkReport, other_label: str
) -> list[PairedGain]:
    """This report's downstream rows against the other's of the same name, seed by seed: a
    pairing only where a seed means the same training (the same real store and protocol)."""
    mine, theirs = this.downstream, other.downstream
    if mine is None or theirs is None or this.real.content_sha256 is None:
        return []
    if this.real.content_sha256 != other.real.content_sha256 or not _same_rule(mine, theirs):
        return []
    bases = {row.name: row for row in theirs.rows}
    pairs = (paired_gain(row, bases[row.name], f"{row.name} ({other_label})")
             for row in mine.rows
             if row.name in bases and row.real_count == bases[row.name].real_count)  # fmt: skip
    return [pair for pair in pairs if pair is not None]


def _same_rule(mine: Downstream, theirs: Downstream) -> bool:
    """One training rule: network and budget, stopping pairs, real share, and the stopping rule
    (evaluation interval, patience, rate drops). A report from before `stopping` was recorded
    says it in its protocol's rule clause (before the clauses on pretrain rows and seeds, which
    may differ between reports whose common rows still pair)."""
    recorded = mine.stopping is not None and theirs.stopping is not None

    def rule(d: Downstream) -> tuple[object, ...]:
        stopping = d.stopping if recorded else d.protocol.split("; 'pretrain' rows")[0]
        return (d.config, d.stop_split, d.stop_count, d.real_share, stopping)

    return rule(mine) == rule(theirs)
