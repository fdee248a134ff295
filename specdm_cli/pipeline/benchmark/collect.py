"""One streaming pass over a set of store samples, accumulating everything the metrics need."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)

from specdm_cli.config import Progress
from specdm_cli.manifest import IGNORE_INDEX, IMAGE_ARRAYS, LABEL_ARRAY
from specdm_cli.metrics.masks import mask_feature_dims
from specdm_cli.metrics.sets import SetStats
from specdm_cli.metrics.stats import MomentAccumulator, mean_iou, spectral_angle
from specdm_cli.pipeline.benchmark.features import FeatureNetwork
from specdm_cli.stores import StoreReader

# Spectral angles of non-negative spectra lie in [0, pi/2]; 4096 bins make ties in the
# histogram AUC negligible (bin width 0.4 mrad).
ANGLE_BINS = 4096
ANGLE_MAX = math.pi / 2
CHANGE_RATIO_EDGES = np.linspace(0.0, 1.0, 11)
# Pixel-space neighbours compare at most this many band groups (see `_thumbnails`).
THUMBNAIL_BANDS = 16


@dataclass
class CollectOptions:
    """What a pass computes and with which resolution (sizes from MetricsOptions)."""

    band_edges: np.ndarray  # (bands, bins + 1) value histogram edges, shared by both stores
    batch_size: int
    pixel_grid: int  # thumbnail cells per side for pixel-space neighbours
    full: bool = True  # False: only the neighbour banks (features, thumbnails)


def batches(reader: StoreReader, indices: np.ndarray, size: int) -> Iterator[dict[str, np.ndarray]]:
    """Stacked arrays of consecutive chunks of `indices`, read sample by sample."""
    for start in range(0, indices.size, size):
        arrays = [reader.read(int(i)) for i in indices[start : start + size]]
        yield {name: np.stack([a[name] for a in arrays]) for name in arrays[0]}


def collect(
    reader: StoreReader,
    indices: np.ndarray,
    network: FeatureNetwork,
    options: CollectOptions,
    progress: Progress | None = None,
    stage: str = "metrics",
) -> SetStats:
    """Run the feature network over `indices` of `reader` and accumulate the set's statistics.

    With `options.full` False only the neighbour banks (features, thumbnails) are kept, which
    is all the reference train split is needed for.
    """
    task, classes = reader.manifest.task, network.config.classes
    names, label_name = IMAGE_ARRAYS[task], LABEL_ARRAY[task]
    features: list[list[np.ndarray]] = [[] for _ in names]
    thumbnails: list[np.ndarray] = []
    shape = (len(names), classes, len(reader.manifest.bands), network.config.feature_dim)
    stats = _empty(indices, shape, options)
    done = 0
    for arrays in batches(reader, indices, options.batch_size):
        images = [arrays[name].astype(np.float32) for name in names]
        labels = arrays[label_name]
        phase_features, predicted = network.run(images)
        for bank, values in zip(features, phase_features, strict=True):
            bank.append(values)
        thumbnails.append(_thumbnails(network, images, options.pixel_grid))
        if options.full:
            _accumulate(stats, network, (images, labels, predicted), phase_features, options)
        done += labels.shape[0]
        if progress is not None:
            progress(stage, done, indices.size)
    dims = network.config.feature_dim
    stats.features = [np.concatenate(f) if f else np.zeros((0, dims)) for f in features]
    stats.thumbnails = np.concatenate(thumbnails) if thumbnails else np.zeros((0, 1), np.float32)
    return stats


def _empty(
    indices: np.ndarray, shape: tuple[int, int, int, int], options: CollectOptions
) -> SetStats:
    """Zeroed accumulators for `shape` = (phases, classes, bands, feature dims)."""
    phases, classes, bands, dims = shape
    stats = SetStats(indices=indices, features=[], thumbnails=np.zeros((0, 1), np.float32))
    if not options.full:
        return stats
    mask_dims = mask_feature_dims(classes)
    stats.image_moments = [MomentAccumulator(dims) for _ in range(phases)]
    stats.mask_moments = MomentAccumulator(mask_dims)
    stats.joint_moments = MomentAccumulator(phases * dims + mask_dims)
    stats.class_pixels = np.zeros(classes, np.int64)
    stats.class_spectra = np.zeros((phases, classes, bands), np.float64)
    stats.band_hist = np.zeros((bands, options.band_edges.shape[1] - 1), np.int64)
    stats.confusion = np.zeros((classes, classes), np.int64)
    stats.sample_miou = np.zeros(0)
    stats.change_ratio = np.zeros(0)
    stats.angle_hist = np.zeros((2, ANGLE_BINS), np.int64)
    return stats


def _accumulate(
    stats: SetStats,
    network: FeatureNetwork,
    batch: tuple[list[np.ndarray], np.ndarray, np.ndarray],
    phase_features: list[np.ndarray],
    options: CollectOptions,
) -> None:
    """Fold one batch (images, labels, predicted labels) into every full-mode accumulator."""
    images, labels, predicted = batch
    classes = network.config.classes
    assert stats.mask_moments is not None and stats.joint_moments is not None
    assert stats.class_pixels is not None
    for moments, values in zip(stats.image_moments, phase_features, strict=True):
        moments.add(values)
    masks = network.mask_features(labels)
    stats.mask_moments.add(masks)
    # Image and mask features side by side: their cross-covariance is what pairs them.
    stats.joint_moments.add(np.concatenate([*phase_features, masks], axis=1))
    valid = labels != IGNORE_INDEX
    stats.class_pixels += np.bincount(labels[valid].astype(np.int64), minlength=classes)[:classes]
    _add_spectra(stats, images, labels, valid, classes)
    _add_band_histograms(stats, images, valid, options.band_edges)
    _add_consistency(stats, labels, predicted, valid, classes)
    if len(images) == 2:
        _add_change(stats, images, labels, valid)


def _add_spectra(
    stats: SetStats, images: list[np.ndarray], labels: np.ndarray, valid: np.ndarray, classes: int
) -> None:
    """Per phase and class, the sum of pixel spectra in physical units (for mean spectra)."""
    assert stats.class_spectra is not None
    codes = labels[valid].astype(np.int64)
    for phase, image in enumerate(images):
        pixels = np.moveaxis(image, 1, 0)[:, valid]
        for band in range(pixels.shape[0]):
            stats.class_spectra[phase, :, band] += np.bincount(
                codes, weights=pixels[band].astype(np.float64), minlength=classes
            )[:classes]


def _add_band_histograms(
    stats: SetStats, images: list[np.ndarray], valid: np.ndarray, edges: np.ndarray
) -> None:
    """Per-band value histograms on the shared bins; values outside fall in the end bins."""
    assert stats.band_hist is not None
    bands, bins = stats.band_hist.shape
    low, width = edges[:, :1], (edges[:, -1:] - edges[:, :1]) / bins
    for image in images:
        pixels = np.moveaxis(image, 1, 0)[:, valid].astype(np.float64)
        position = np.floor((pixels - low) / width)
        stats.outside += int(((position < 0) | (position >= bins)).sum())
        stats.values += pixels.size
        code = np.clip(position, 0, bins - 1).astype(np.int64) + np.arange(bands)[:, None] * bins
        stats.band_hist += np.bincount(code.ravel(), minlength=bands * bins).reshape(bands, bins)


def _add_consistency(
    stats: SetStats, labels: np.ndarray, predicted: np.ndarray, valid: np.ndarray, classes: int
) -> None:
    """Confusion of the network's prediction against the sample's own mask, overall and per sample."""
    assert stats.confusion is not None and stats.sample_miou is not None
    batch = labels.shape[0]
    sample = np.broadcast_to(np.arange(batch)[:, None, None], labels.shape)
    code = (sample * classes + labels.astype(np.int64)) * classes + predicted.astype(np.int64)
    per_sample = np.bincount(code[valid], minlength=batch * classes * classes)
    per_sample = per_sample.reshape(batch, classes, classes)
    stats.confusion += per_sample.sum(axis=0)
    stats.sample_miou = np.concatenate([stats.sample_miou, mean_iou(per_sample)])


def _add_change(
    stats: SetStats, images: list[np.ndarray], labels: np.ndarray, valid: np.ndarray
) -> None:
    """cd: per-sample change ratio and the histograms of t1->t2 angles of changed/unchanged pixels."""
    assert stats.change_ratio is not None and stats.angle_hist is not None
    changed = (labels == 1) & valid
    counted = valid.sum(axis=(1, 2))
    ratio = changed.sum(axis=(1, 2)) / np.maximum(counted, 1)
    stats.change_ratio = np.concatenate([stats.change_ratio, np.where(counted > 0, ratio, np.nan)])
    angle = spectral_angle(np.moveaxis(images[0], 1, -1), np.moveaxis(images[1], 1, -1))
    position = np.clip((angle / ANGLE_MAX * ANGLE_BINS).astype(np.int64), 0, ANGLE_BINS - 1)
    for row, selected in enumerate((changed, valid & ~changed)):
        stats.angle_hist[row] += np.bincount(position[selected], minlength=ANGLE_BINS)


def _thumbnails(network: FeatureNetwork, images: list[np.ndarray], grid: int) -> np.ndarray:
    """Band-normalised images area-averaged to grid x grid, phases side by side: (B, P) float32.

    Hyperspectral stores are also averaged over contiguous band groups down to THUMBNAIL_BANDS,
    so the neighbour bank stays a few kB per sample whatever the band count.
    """
    parts = []
    for image in images:
        x = network.normalise(image).unsqueeze(1)  # (B, 1, C, H, W): pool bands like space
        size = (min(x.shape[2], THUMBNAIL_BANDS), grid, grid)
        parts.append(F.adaptive_avg_pool3d(x, size).flatten(1).cpu().numpy())
    return np.concatenate(parts, axis=1).astype(np.float32)
