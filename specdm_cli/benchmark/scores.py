"""Per-sample quality scores: label consistency and spectral plausibility, calibrated on real data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from specdm_cli.manifest import IGNORE_INDEX, IMAGE_ARRAYS, LABEL_ARRAY
from specdm_cli.metrics.collect import batches, mean_iou
from specdm_cli.metrics.features import FeatureNetwork, Progress
from specdm_cli.metrics.stats import spectral_angle
from specdm_cli.stores import StoreReader

SCORE_DEFINITION = (
    "min(share of real held-out samples whose pair consistency (mIoU of the feature network's "
    "prediction vs the sample's own mask) is at most the sample's, share of real held-out "
    "samples whose spectral angle to the real class-mean spectra is at least the sample's)"
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
    task, classes = reader.manifest.task, network.config.classes
    consistency, sums, pixels = [], [], []
    done = 0
    for arrays in batches(reader, indices, batch_size):
        images = [arrays[name].astype(np.float64) for name in IMAGE_ARRAYS[task]]
        labels = arrays[LABEL_ARRAY[task]].astype(np.int64)
        _features, predicted = network.run(images)
        consistency.append(_consistency(labels, predicted.astype(np.int64), classes))
        one_hot = (labels[:, None] == np.arange(classes)[None, :, None, None]).astype(np.float64)
        # (B, K, H, W) x (B, C, H, W) -> (B, K, C) per phase: class sums of spectra.
        sums.append(np.stack([np.einsum("bkhw,bchw->bkc", one_hot, x) for x in images], axis=1))
        pixels.append(one_hot.sum(axis=(2, 3)))
        done += labels.shape[0]
        if progress is not None:
            progress(stage, done, indices.size)
    return SampleTraits(
        indices, np.concatenate(consistency), np.concatenate(sums), np.concatenate(pixels)
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


def share_at_most(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """For each value, the share of `reference` values <= it (ties count as matched)."""
    ordered = np.sort(reference)
    result: np.ndarray = np.searchsorted(ordered, values, side="right") / max(ordered.size, 1)
    return result


def share_at_least(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """For each value, the share of `reference` values >= it (ties count as matched)."""
    ordered = np.sort(reference)
    below = np.searchsorted(ordered, values, side="left")
    result: np.ndarray = (ordered.size - below) / max(ordered.size, 1)
    return result


@dataclass
class Scores:
    """Per-sample quality of a candidate set and the same score of the real samples."""

    quality: np.ndarray  # (N,) candidate scores in [0, 1]
    consistency: np.ndarray
    spectral_angle: np.ndarray
    real_quality: np.ndarray  # the real held-out samples scored the same way (about uniform)


def quality_scores(real: SampleTraits, candidate: SampleTraits) -> Scores:
    """Score candidate samples against the real held-out set (see SCORE_DEFINITION).

    Each term is the share of real samples the candidate matches or beats, so 0.5 means "as
    good as the median real sample" on that term; the score is the weaker term, as a pair
    with a fine image but a wrong mask (or the reverse) is not a good pair.
    """
    means = real.class_means()
    real_angle, cand_angle = spectral_angles(real, means), spectral_angles(candidate, means)

    def score(consistency: np.ndarray, angle: np.ndarray) -> np.ndarray:
        labels = share_at_most(consistency, real.consistency)
        spectra = share_at_least(angle, real_angle)
        combined: np.ndarray = np.minimum(labels, spectra)
        return combined

    return Scores(
        quality=score(candidate.consistency, cand_angle),
        consistency=candidate.consistency,
        spectral_angle=cand_angle,
        real_quality=score(real.consistency, real_angle),
    )
