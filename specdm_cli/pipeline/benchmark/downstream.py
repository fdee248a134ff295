"""Downstream utility (paper Tables 3, 5, 6): train a compact segmenter / siamese change detector
on real, VAE round-trip, synthetic and real + synthetic pairs, each to its best real-val
checkpoint over several seeds, and test it on real data."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from specdm_cli.config import DownstreamOptions, Progress
from specdm_cli.manifest import IMAGE_ARRAYS, LABEL_ARRAY
from specdm_cli.metrics.stats import class_iou, mean_iou
from specdm_cli.models.feature_net import FeatureNetConfig
from specdm_cli.pipeline.benchmark.feature_training import (
    SampleSource,
    TrainData,
    class_weights,
)
from specdm_cli.pipeline.benchmark.features import band_statistics, default_config
from specdm_cli.stores import StoreReader

from .agreement import relabelled_data
from .downstream_rows import (
    AGREE,
    Configuration,
    asked_real_limit,
    configurations,
    evaluation_split,
    pretrains,
    real_train,
    stopping_split,
)
from .report import Downstream, DownstreamRow, SeedRun
from .utility_training import (
    Batches,
    Phase,
    batches_of,
    confusion,
    new_model,
    synthetic_per_batch,
    train_to_best,
)

F1_DEFINITION = {
    "ss": "macro F1 over the classes present in truth or prediction",
    "cd": "F1 of the change class",
}
NETWORK = {
    "ss": "compact U-Net segmenter (metrics.network.SegmentationNet)",
    "cd": "siamese U-Net change detector, shared encoder on t1/t2 (metrics.network.SiameseChangeNet)",
}
SPREAD = "standard deviation over the seeds (ddof 1); min-max in report.json"


@dataclass(frozen=True)
class Setup:
    """What every row shares: network config, stopping rule, data statistics, val and test."""

    config: FeatureNetConfig
    options: DownstreamOptions
    stats: tuple[np.ndarray, np.ndarray]
    weights: Tensor
    val: TrainData
    test: TrainData
    device: str
    progress: Progress | None
    eval_split: str = "test"
    stop_split: str = "val"


def make_setup(
    real: StoreReader, options: DownstreamOptions, device: str, progress: Progress | None = None
) -> Setup:
    """The network config, class weights, stopping and test pairs every row of `real` shares."""
    config = default_config(
        real, steps=options.max_steps, batch_size=options.batch_size, lr=options.lr,
        seed=options.seed, width=options.width,
    )  # fmt: skip
    stats = band_statistics(real)
    test, split = evaluation_split(real)
    val, stop_split = stopping_split(real, split, options)
    return Setup(
        config, options, stats, class_weights(real, config.classes),
        TrainData([(real, val)], *stats), TrainData([(real, test)], *stats), device, progress,
        split, stop_split,
    )  # fmt: skip


def run_downstream(
    real: StoreReader,
    synthetic: StoreReader,
    options: DownstreamOptions,
    device: str = "cpu",
    progress: Progress | None = None,
    round_trip: Callable[[np.ndarray], SampleSource] | None = None,
    round_trip_name: str | None = None,
) -> Downstream:
    """Train every configuration over `options.seeds` seeds to its best real-val checkpoint and
    test each on real data. `round_trip` (the run's VAE, given --model) adds the ceiling row."""
    setup = make_setup(real, options, device, progress)
    # The limit asked for is recorded only where the store had fewer train pairs.
    trained, asked = len(real_train(real, options)), asked_real_limit(real, options)
    rows, referees = [], Referees()
    trips: SampleSource | None = None  # decoded once for the round-trip rows
    oracle_trips: SampleSource | None = None  # and once for every decoded oracle row
    configured = configurations(real, synthetic, options, round_trip is not None)
    for row in configured:
        second: SampleSource = real if row.oracle else synthetic
        if row.protocol.startswith("round-trip") and round_trip is not None:
            trips = trips if trips is not None else round_trip(row.synthetic)
            second = trips if row.protocol == "round-trip" else HalfTrip(trips, real, row.protocol)
        if row.decoded and round_trip is not None:
            # Every decoded oracle row's pairs are a prefix of the largest one's.
            largest = max((r.synthetic for r in configured if r.decoded), key=len)
            oracle_trips = oracle_trips if oracle_trips is not None else round_trip(largest)
            second = oracle_trips
        rows.append(_run_row(row, setup, real, second, referees))
    return Downstream(
        network=NETWORK[real.manifest.task], config=setup.config.model_dump(),
        real_limit=trained, real_limit_asked=asked if asked > trained else None,
        eval_split=setup.eval_split, eval_count=len(setup.test),
        f1_definition=F1_DEFINITION[real.manifest.task], rows=rows,
        protocol=protocol_text(options), stop_split=setup.stop_split, stop_count=len(setup.val),
        stopping={"eval_every": options.eval_every, "patience": options.patience,
                  "lr_drops": options.lr_drops},
        seeds=seed_list(options), real_share=options.real_share, spread=SPREAD,
        round_trip=round_trip_name if round_trip is not None else None,
        device=device, threads=torch.get_num_threads(),
    )  # fmt: skip


class HalfTrip:
    """Round trips with one stream put back to the real one: decoded images with the real
    labels ("round-trip-images"), or the real images with the decoded labels ("round-trip-labels")."""

    def __init__(self, trips: SampleSource, real: StoreReader, protocol: str):
        self.manifest = real.manifest
        self.trips, self.real = trips, real
        self.real_names = (
            {LABEL_ARRAY[real.manifest.task]}
            if protocol == "round-trip-images"
            else set(IMAGE_ARRAYS[real.manifest.task])
        )

    def read(self, index: int) -> dict[str, np.ndarray]:
        decoded, truth = self.trips.read(index), self.real.read(index)
        return {name: truth[name] if name in self.real_names else decoded[name] for name in decoded}


def seed_list(options: DownstreamOptions) -> list[int]:
    return [options.seed + k for k in range(options.seeds)]


def protocol_text(options: DownstreamOptions) -> str:
    """The training rule every row follows, in words (report.md and report.json)."""
    o = options
    return (
        f"every row trains from scratch with AdamW (constant lr {o.lr:g}, batch {o.batch_size}), "
        f"is evaluated on the real stopping pairs every {o.eval_every} steps, stops after "
        f"{o.patience} evaluations without a better val mIoU (at most {o.max_steps} steps"
        + (
            f"; the first {o.lr_drops} such plateau(s) go back to the best-val weights at a "
            "tenth of the rate instead"
            if o.lr_drops
            else ""
        )
        + f") and is tested with its best-val weights; a mixed batch is {o.batch_size} real + "
        f"{synthetic_per_batch(o)} synthetic pairs (real share {o.real_share:g}), so every real "
        "pair is seen as often per step as in real-only training; 'pretrain' rows train on "
        "synthetic pairs to "
        "their best val checkpoint, then fine-tune on the real pairs by the same rule; "
        + (
            "'real -> real' (their control) trains the real pairs in the same two phases; "
            if pretrains(o)
            else ""
        )
        + f"{o.seeds} seeds (initialisation, batch order, augmentation) per row"
        + (
            "; 'agreement-relabelled' rows keep a synthetic label only where the same seed's "
            "real-only model (its best-val weights) predicts the same class, 255 (ignored) elsewhere"
            if any(p.endswith(AGREE) for p in o.protocols)
            else ""
        )
        + (
            "; '(oracle)' rows train as the mixed or pretrain row of their ratio (never "
            "relabelled) with real train pairs past the limit, and past the stopping pairs, in "
            "place of the synthetic ones: the most those could give, were they real (with --model, "
            "again on those pairs' round trips through its VAE: the most any generator decoding "
            "through it could give)"
            if o.oracle
            else ""
        )
    )


@dataclass(frozen=True)
class Trained:
    """One seed's trained model (its best-val weights) and the phases that trained it."""

    model: nn.Module
    phases: list[Phase] = field(default_factory=list)


class Referees(dict[int, Trained]):
    """The real-only row's run of each seed: its model is the judge agreement rows relabel with,
    and pretrain's control continues from a copy of it (its first phase is that run)."""


def _run_row(
    row: Configuration, setup: Setup, real: StoreReader, second: SampleSource, referees: Referees
) -> DownstreamRow:
    """Every seed of one row, then mean and spread."""
    real_data, second_data = row_data(row, setup, real, second)
    runs = [
        train_seed(row, setup, real_data, second_data, seed, referees)
        for seed in seed_list(setup.options)
    ]
    return _summarise(row, runs, real)


def row_data(
    row: Configuration, setup: Setup, real: StoreReader, second: SampleSource
) -> tuple[TrainData | None, TrainData | None]:
    """The row's real and second-source pairs (None where it uses none)."""
    real_data = TrainData([(real, row.real)], *setup.stats) if row.real.size else None
    second_data = TrainData([(second, row.synthetic)], *setup.stats) if row.synthetic.size else None
    return real_data, second_data


def train_seed(
    row: Configuration,
    setup: Setup,
    real_data: TrainData | None,
    second_data: TrainData | None,
    seed: int,
    referees: Referees,
) -> SeedRun:
    """One seed of one row, wired to the real row's run of the same seed: agreement rows
    relabel with its model, pretrain's control goes on from it; the real row records it."""
    trained_on, kept_share = second_data, None
    if row.relabelled and second_data is not None:
        trained_on, kept_share = relabelled_data(
            referees[seed].model, second_data, setup.config.batch_size, setup.device
        )
    before = referees.get(seed) if row.training == "real-twice" else None
    run, trained = run_seed(row, setup, real_data, trained_on, seed, before)
    if row.name == "real":  # the main real-only row (not a learning-curve point)
        referees[seed] = trained
    return run.model_copy(update={"kept_share": kept_share})


def run_seed(
    row: Configuration,
    setup: Setup,
    real_data: TrainData | None,
    second_data: TrainData | None,
    seed: int,
    before: Trained | None = None,
) -> tuple[SeedRun, Trained]:
    """One seed of one row: train (both phases for pretrain), test; the trained model too.

    `before`: a run of this row's first phases (the real row's for pretrain's control): training
    goes on from a copy of its model, which ends where training those phases again would, since
    every phase draws its randomness from the seed alone."""
    config, options = setup.config.model_copy(update={"seed": seed}), setup.options
    plan = _plan(row, real_data, second_data, options)
    if before is None:
        model, phases = new_model(config, setup.device), []
    else:
        model, phases = copy.deepcopy(before.model), list(before.phases)
    for k, batches in enumerate(plan[len(phases) :], start=len(phases)):
        stage = f"downstream {row.name} seed {seed}" + (f" phase {k + 1}" if len(plan) > 1 else "")
        report = (setup.progress, stage) if setup.progress else None
        phases.append(train_to_best(
            model, batches, setup.val, config, options, setup.weights, setup.device, report
        ))  # fmt: skip
    counts = confusion(model, setup.test, config.classes, config.batch_size, setup.device)
    run = _seed_run(seed, counts, phases, setup.config.task, real_data or second_data)
    return run, Trained(model, phases)


def _plan(
    row: Configuration,
    real_data: TrainData | None,
    second_data: TrainData | None,
    options: DownstreamOptions,
) -> list[Batches]:
    """Where each phase's batches come from."""
    if row.training == "pretrain":
        return [batches_of(None, second_data, options), batches_of(real_data, None, options)]
    if row.training == "real-twice":
        return [batches_of(real_data, None, options), batches_of(real_data, None, options)]
    return [batches_of(real_data, second_data, options)]


def _seed_run(
    seed: int, counts: np.ndarray, phases: list[Phase], task: str, data: TrainData | None
) -> SeedRun:
    assert data is not None
    miou, f1, iou = scores_of(counts, task)
    names = _class_names(data.readers[0])
    offsets = np.cumsum([0] + [p.steps for p in phases])
    return SeedRun(
        seed=seed, miou=miou, f1=f1,
        iou_per_class={n: float(v) for n, v in zip(names, iou, strict=True) if np.isfinite(v)},
        steps=int(offsets[-1]), best_steps=[p.best_step for p in phases],
        phase_steps=[p.steps for p in phases],
        best_val_miou=phases[-1].best_val,
        val_curve=[[float(o + s), v] for o, p in zip(offsets[:-1], phases, strict=True) for s, v in p.curve],
        seconds=round(sum(p.seconds for p in phases), 2),
    )  # fmt: skip


def scores_of(confusion: np.ndarray, task: str) -> tuple[float, float, np.ndarray]:
    """(mIoU over present classes, F1 as F1_DEFINITION says, per-class IoU with NaN if absent)."""
    tp = np.diagonal(confusion).astype(np.float64)
    predicted, actual = confusion.sum(axis=0), confusion.sum(axis=1)
    iou = class_iou(confusion)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(np.isfinite(iou), 2 * tp / (predicted + actual), np.nan)
    present = f1[np.isfinite(f1)]
    macro = float(present.mean()) if present.size else math.nan
    # cd: NaN when neither truth nor prediction has any change.
    f1_value = float(f1[1]) if task == "cd" else macro
    return float(mean_iou(confusion)), f1_value, iou


def _class_names(reader: SampleSource) -> list[str]:
    if reader.manifest.task == "cd":
        return ["no change", "change"]
    return [c.name for c in sorted(reader.manifest.classes, key=lambda c: c.index)]


def _summarise(row: Configuration, runs: list[SeedRun], real: StoreReader) -> DownstreamRow:
    """Mean, standard deviation (ddof 1; 0 for one seed) and range of the seeds' scores."""
    miou = np.array([r.miou for r in runs])
    f1 = np.array([r.f1 for r in runs])
    names = _class_names(real)
    iou = {
        n: float(np.mean(values))
        for n in names
        if (values := [r.iou_per_class[n] for r in runs if n in r.iou_per_class])
    }
    real_pairs = row.oracle and not row.decoded  # its second source: real pairs as they are
    return DownstreamRow(
        name=row.name, protocol=row.protocol + ("-round-trip" if row.decoded else ""),
        real_count=int(row.real.size + (row.synthetic.size if real_pairs else 0)),
        synthetic_count=0 if real_pairs else int(row.synthetic.size), miou=float(miou.mean()), f1=float(f1.mean()),
        miou_std=_std(miou), f1_std=_std(f1), miou_min=float(miou.min()),
        miou_max=float(miou.max()), iou_per_class=iou, kept_share=_mean_kept(runs),
        seconds=round(sum(r.seconds for r in runs), 2), seeds=runs,
    )  # fmt: skip


def _mean_kept(runs: list[SeedRun]) -> float | None:
    shares = [r.kept_share for r in runs if r.kept_share is not None]
    return float(np.mean(shares)) if shares else None


def _std(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) if values.size > 1 else 0.0
