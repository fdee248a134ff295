"""Downstream utility (paper Tables 3, 5, 6): train a compact segmenter / siamese change detector
on real, synthetic and real + synthetic pairs with one seed and budget, and test it on real data."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from specdm_cli.config import DownstreamOptions, Progress
from specdm_cli.errors import InputDataError
from specdm_cli.manifest import IGNORE_INDEX, IMAGE_ARRAYS, LABEL_ARRAY
from specdm_cli.metrics.stats import class_iou, mean_iou
from specdm_cli.models.feature_net import FeatureNetConfig
from specdm_cli.pipeline.benchmark.collect import batches
from specdm_cli.pipeline.benchmark.feature_training import TrainData, class_weights, fit
from specdm_cli.pipeline.benchmark.features import band_statistics, default_config
from specdm_cli.stores import StoreReader

from .report import Downstream, DownstreamRow

# The paper limits the real training set to 2k pairs for SS and 100 for CD (Sec. 4.3).
PAPER_REAL_LIMIT = {"ss": 2000, "cd": 100}
F1_DEFINITION = {
    "ss": "macro F1 over the classes present in truth or prediction",
    "cd": "F1 of the change class",
}
NETWORK = {
    "ss": "compact U-Net segmenter (metrics.network.SegmentationNet)",
    "cd": "siamese U-Net change detector, shared encoder on t1/t2 (metrics.network.SiameseChangeNet)",
}


@dataclass(frozen=True)
class Configuration:
    name: str
    real: np.ndarray
    synthetic: np.ndarray


def configurations(
    real: StoreReader, synthetic: StoreReader, options: DownstreamOptions
) -> list[Configuration]:
    """Real only (the first `real_limit` train pairs, as `fit-vae --limit`), synthetic only
    (as many as the largest ratio asks for) and real + ratio x synthetic for each ratio."""
    limit = options.real_limit or PAPER_REAL_LIMIT[real.manifest.task]
    train = real.indices("train")[:limit]
    if train.size == 0:
        raise InputDataError("the real store has no train split", real.root, "re-prepare it")
    pool = synthetic.indices(None)
    none = np.zeros(0, np.int64)
    rows = [Configuration("real", train, none)]
    rows.append(Configuration("synthetic", none, pool[: max(options.ratios) * train.size]))
    for ratio in options.ratios:
        rows.append(Configuration(f"real+synthetic x{ratio}", train, pool[: ratio * train.size]))
    return rows


def evaluation_split(real: StoreReader) -> tuple[np.ndarray, str]:
    """The real test split, else val (SegMunich and OSCD ship none: val is their test)."""
    for split in ("test", "val"):
        indices = real.indices(split)
        if indices.size:
            return indices, split
    raise InputDataError(
        "the real store has no test or val split to evaluate on",
        real.root,
        "prepare it with --test-fraction or --val-fraction",
    )


def run_downstream(
    real: StoreReader,
    synthetic: StoreReader,
    options: DownstreamOptions,
    device: str = "cpu",
    progress: Progress | None = None,
) -> Downstream:
    """Train one network per configuration (same seed, steps, batch) and test each on real data."""
    config = default_config(
        real, steps=options.steps, batch_size=options.batch_size, lr=options.lr,
        seed=options.seed, width=options.width,
    )  # fmt: skip
    mean, std = band_statistics(real)
    weights = class_weights(real, config.classes)
    test, split = evaluation_split(real)
    rows = []
    for row in configurations(real, synthetic, options):
        sources = [(r, i) for r, i in ((real, row.real), (synthetic, row.synthetic)) if i.size]
        if not sources:
            continue
        start = time.perf_counter()
        model, losses = fit(
            config, TrainData(sources, mean, std), weights, device, progress, row.name
        )
        confusion = confusion_on(model, real, test, (mean, std), config, device)
        rows.append(_row(row, confusion, real, losses, time.perf_counter() - start))
    return Downstream(
        network=NETWORK[real.manifest.task], config=config.model_dump(),
        real_limit=options.real_limit or PAPER_REAL_LIMIT[real.manifest.task], eval_split=split,
        eval_count=int(test.size), f1_definition=F1_DEFINITION[real.manifest.task], rows=rows,
    )  # fmt: skip


@torch.inference_mode()
def confusion_on(
    model: nn.Module,
    reader: StoreReader,
    indices: np.ndarray,
    stats: tuple[np.ndarray, np.ndarray],
    config: FeatureNetConfig,
    device: str,
) -> np.ndarray:
    """(K, K) confusion of truth (rows) vs prediction over the labelled pixels of `indices`."""
    model.eval()
    mean, std = stats[0][:, None, None], stats[1][:, None, None]
    task, classes = reader.manifest.task, config.classes
    confusion = np.zeros((classes, classes), np.int64)
    for arrays in batches(reader, indices, config.batch_size):
        images = [
            torch.from_numpy(((arrays[name] - mean) / std).astype(np.float32)).to(device)
            for name in IMAGE_ARRAYS[task]
        ]
        _features, logits = model(images)
        predicted = logits.argmax(dim=1).cpu().numpy().astype(np.int64)
        truth = arrays[LABEL_ARRAY[task]].astype(np.int64)
        valid = truth != IGNORE_INDEX
        code = truth[valid] * classes + predicted[valid]
        confusion += np.bincount(code, minlength=classes * classes).reshape(classes, classes)
    return confusion


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


def _class_names(reader: StoreReader) -> list[str]:
    if reader.manifest.task == "cd":
        return ["no change", "change"]
    return [c.name for c in sorted(reader.manifest.classes, key=lambda c: c.index)]


def _row(
    row: Configuration,
    confusion: np.ndarray,
    real: StoreReader,
    losses: list[float],
    seconds: float,
) -> DownstreamRow:
    miou, f1, iou = scores_of(confusion, real.manifest.task)
    tail = losses[-max(1, len(losses) // 10) :]
    return DownstreamRow(
        name=row.name, real_count=int(row.real.size), synthetic_count=int(row.synthetic.size),
        miou=miou, f1=f1,
        iou_per_class={n: float(v) for n, v in zip(_class_names(real), iou, strict=True) if np.isfinite(v)},
        final_loss=float(np.mean(tail)), seconds=round(seconds, 2),
    )  # fmt: skip
