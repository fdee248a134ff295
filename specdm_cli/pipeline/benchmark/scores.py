"""Per-sample quality scores: label consistency and spectral plausibility, calibrated on real data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from specdm_cli.config import Progress
from specdm_cli.manifest import IGNORE_INDEX, IMAGE_ARRAYS, LABEL_ARRAY
from specdm_cli.metrics.stats import mean_iou, spectral_angle
from specdm_cli.pipeline.benchmark.collect import batches
from specdm_cli.pipeline.benchmark.features import FeatureNetwork
from specdm_cli.stores import StoreReader


def score_definition(real_split: str) -> str:
    """What a score means, with the real samples it is relative to: `real_split` is the split
    `split_indices(real, "heldout")` used ("heldout", or "train" where there is none)."""
    real = (
        "the real store's train samples (it has no val or test split)"
        if real_split == "train"
        else "the real held-out samples"
    )
    return (
        "min(consistency / median real consistency, median real spectral angle / spectral "
        "angle), each capped at 1; consistency = mIoU of the feature network's prediction vs the "
        "sample's own mask, spectral angle = pixel-weighted angle between the sample's and the "
        f"real class-mean spectra; real = {real}"
    )


@dataclass
class SampleTraits:
    """What each sample of a set contributes to its score, and the set's class spectra."""

    indices: np.ndarray
    consistency: np.ndarray  # (N,) mIoU of the network's prediction vs the own mask
    class_sums: np.ndarray  # (N, phases, K, bands) sums of pixel spectra per class
    class_pixels: np.ndarray  # (N, K) labelled pixels per class

    def class_means(self) -> np.ndarray:
        """(phases, K, bands) mean spectrum per class over the whole set (0 where absent)."""
        pixels = self.class_pixels.sum(axis=0)[None, :, None]
        means: np.ndarray = self.class_sums.sum(axis=0) / np.maximum(pixels, 1)
        return means


def sample_traits(
    reader: StoreReader,
    indices: np.ndarray,
    network: FeatureNetwork,
    batch_size: int = 32,
    progress: Progress | None = None,
    stage: str = "scores",
) -> SampleTraits:
    """One pass over `indices`: consistency and per-class spectral sums of every sample."""
    task = reader.manifest.task
    consistency, sums, pixels = [], [], []
    done = 0
    for arrays in batches(reader, indices, batch_size):
        traits = batch_traits(arrays, task, network)
        consistency.append(traits.consistency)
        sums.append(traits.class_sums)
        pixels.append(traits.class_pixels)
        done += traits.indices.size
        if progress is not None:
            progress(stage, done, indices.size)
    return SampleTraits(
        indices, np.concatenate(consistency), np.concatenate(sums), np.concatenate(pixels)
    )


def batch_traits(arrays: dict[str, np.ndarray], task: str, network: FeatureNetwork) -> SampleTraits:
    """The traits of one batch of samples (a store's arrays, stacked), indexed 0..B-1."""
    classes = network.config.classes
    images = [arrays[name].astype(np.float64) for name in IMAGE_ARRAYS[task]]
    labels = arrays[LABEL_ARRAY[task]].astype(np.int64)
    _features, predicted = network.run(images)
    one_hot = (labels[:, None] == np.arange(classes)[None, :, None, None]).astype(np.float64)
    return SampleTraits(
        indices=np.arange(labels.shape[0]),
        consistency=_consistency(labels, predicted.astype(np.int64), classes),
        # (B, K, H, W) x (B, C, H, W) -> (B, K, C) per phase: class sums of spectra.
        class_sums=np.stack([np.einsum("bkhw,bchw->bkc", one_hot, x) for x in images], axis=1),
        class_pixels=one_hot.sum(axis=(2, 3)),
    )


def _consistency(labels: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """Per-sample mIoU of prediction vs mask over labelled pixels; 0 for a sample with none."""
    batch = labels.shape[0]
    valid = labels != IGNORE_INDEX
    sample = np.broadcast_to(np.arange(batch)[:, None, None], labels.shape)
    code = (sample * classes + np.where(valid, labels, 0)) * classes + predicted
    confusion = np.bincount(code[valid], minlength=batch * classes * classes)
    result: np.ndarray = np.nan_to_num(mean_iou(confusion.reshape(batch, classes, classes)))
    return result


def spectral_angles(traits: SampleTraits, reference_means: np.ndarray) -> np.ndarray:
    """(N,) per sample: the pixel-weighted mean, over its classes and phases, of the angle
    between its class-mean spectrum and the reference's; inf for a sample with no labels."""
    pixels = traits.class_pixels  # (N, K)
    own = traits.class_sums / np.maximum(pixels, 1)[:, None, :, None]
    angles = spectral_angle(own, reference_means[None])  # (N, phases, K)
    weights = pixels[:, None, :] * np.ones_like(angles)
    total = weights.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean: np.ndarray = np.where(total > 0, (angles * weights).sum(axis=(1, 2)) / total, np.inf)
    return mean


def relative_to_typical(value: np.ndarray, typical: float, higher_is_better: bool) -> np.ndarray:
    """value / typical (or typical / value when lower is better), capped at 1 and floored at 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = value / typical if higher_is_better else typical / value
    result: np.ndarray = np.clip(np.nan_to_num(ratio, nan=0.0, posinf=1.0), 0.0, 1.0)
    return result


@dataclass
class Scores:
    """Per-sample quality of a candidate set and the same score of the real samples."""

    quality: np.ndarray  # (N,) candidate scores in [0, 1]
    consistency: np.ndarray
    spectral_angle: np.ndarray
    real_quality: np.ndarray  # the real held-out samples scored the same way
    definition: str  # score_definition of the real split they are relative to


@dataclass(frozen=True)
class Calibration:
    """What scores are relative to: the real held-out set's class-mean spectra and its typical
    (median) consistency and spectral angle."""

    class_means: np.ndarray  # (phases, K, bands)
    typical_consistency: float
    typical_angle: float

    @classmethod
    def of(cls, real: SampleTraits) -> Calibration:
        means = real.class_means()
        angles = spectral_angles(real, means)
        return cls(
            means, float(np.median(real.consistency)), float(np.median(angles[np.isfinite(angles)]))
        )

    def score(self, traits: SampleTraits) -> tuple[np.ndarray, np.ndarray]:
        """(quality in [0, 1], spectral angle) of each sample: the weaker of its two terms, as a
        pair with a fine image but a wrong mask (or the reverse) is not a good pair."""
        angle = spectral_angles(traits, self.class_means)
        labels = relative_to_typical(
            traits.consistency, self.typical_consistency, higher_is_better=True
        )
        spectra = relative_to_typical(angle, self.typical_angle, higher_is_better=False)
        quality: np.ndarray = np.minimum(labels, spectra)
        return quality, angle


def quality_scores(real: SampleTraits, candidate: SampleTraits, real_split: str) -> Scores:
    """Score candidate samples against the real held-out set, or train where `real_split` says
    so (see `score_definition`).

    Each term compares the sample with the typical (median) real sample, so 1 means "at least as
    good as the typical real pair" on that term and 0.5 "half as good", whatever the dataset,
    band count or class count.
    """
    calibration = Calibration.of(real)
    quality, angle = calibration.score(candidate)
    return Scores(
        quality=quality,
        consistency=candidate.consistency,
        spectral_angle=angle,
        real_quality=calibration.score(real)[0],
        definition=score_definition(real_split),
    )
