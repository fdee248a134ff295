"""Compare a candidate store with a reference store: the QualityReport of SpecDM's Tables 1-2 and more."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from specdm_cli.config import MetricsOptions, Progress
from specdm_cli.errors import InputDataError, UsageError
from specdm_cli.metrics.masks import MASK_FEATURES
from specdm_cli.metrics.memorisation import memorisation
from specdm_cli.metrics.sets import SetStats
from specdm_cli.metrics.stats import (
    jensen_shannon,
    kid,
    mean_iou,
    roc_auc_from_histograms,
    spectral_angle,
    wasserstein1,
)
from specdm_cli.pipeline.benchmark.collect import (
    CHANGE_RATIO_EDGES,
    CollectOptions,
    collect,
)
from specdm_cli.pipeline.benchmark.features import FeatureNetwork, manifest_sha256
from specdm_cli.stores import StoreReader

# Comparison splits. The reference's held-out samples (val + test) by default: the feature
# network was fitted on train, so train features are tighter than those of unseen data and
# would flatter a generator that copies train. The candidate: all its samples.
SPLIT_CHOICES = ("heldout", "train", "val", "test", "synthetic", "all")


class StoreSide(BaseModel):
    """Which samples of a store were compared."""

    path: str
    manifest_sha256: str
    split: str
    count: int


class PerSample(BaseModel):
    """Per candidate sample scores, aligned with `index` (usable to filter pairs)."""

    index: list[int]
    pair_miou: list[float] = Field(description="mIoU of the network's prediction vs own mask")
    nn_feature_distance: list[float]
    nn_feature_index: list[int] = Field(description="reference store index of the neighbour")
    nn_pixel_distance: list[float] = Field(description="RMS over normalised thumbnail values")
    nn_pixel_index: list[int]
    near_duplicate: list[bool]


class QualityReport(BaseModel):
    """Every figure of one comparison; all of them computed with the network `feature_hash`."""

    task: str
    feature_hash: str = Field(description="sha256 of the feature network weights")
    feature_config: dict[str, Any]
    mask_features: str = MASK_FEATURES
    reference: StoreSide
    candidate: StoreSide
    train_count: int = Field(description="reference train samples (network fit, neighbours)")
    fd_spectral: float = Field(description="Fréchet distance of image features (cd: mean of t1/t2)")
    fd_spectral_t1: float | None = None
    fd_spectral_t2: float | None = None
    fd_mask: float = Field(description="Fréchet distance of the fixed mask features")
    fd_joint: float = Field(description="Fréchet distance of image and mask features together")
    kid_spectral: float
    kid_spectral_std: float = Field(description="std of the subset estimates (KID's error bar)")
    msad: float = Field(description="mean over classes of the angle between mean spectra, rad")
    sad_per_class: dict[str, float]
    wasserstein_per_band: dict[str, float] = Field(description="physical units of the store")
    wasserstein_mean_std: float = Field(description="mean over bands of W1 / reference std")
    histogram_outside_fraction: float
    class_fraction_reference: dict[str, float]
    class_fraction_candidate: dict[str, float]
    js_class: float = Field(description="Jensen-Shannon divergence (bits) of class fractions")
    pair_miou: float = Field(description="network prediction vs candidate masks")
    pair_miou_reference: float = Field(description="the same on the reference: the ceiling")
    pair_iou_per_class: dict[str, float]
    change_sample_fraction_reference: float | None = None
    change_sample_fraction_candidate: float | None = None
    change_ratio_bin_edges: list[float] | None = None
    change_ratio_hist_reference: list[int] | None = None
    change_ratio_hist_candidate: list[int] | None = None
    change_angle_auc_reference: float | None = None
    change_angle_auc_candidate: float | None = None
    near_duplicate_percentile: float
    near_duplicate_threshold_feature: float
    near_duplicate_threshold_pixel: float
    near_duplicate_fraction_feature: float
    near_duplicate_fraction_pixel: float
    nn_feature_distance_median: float
    nn_pixel_distance_median: float
    nn_feature_distance_median_reference: float = Field(description="held-out real -> train")
    nn_pixel_distance_median_reference: float
    per_sample: PerSample

    def figures(self) -> list[tuple[str, float, str]]:
        """Every scalar figure as (name, value, feature_hash): what a table or benchmark cites.

        Dict fields become `name.key` rows; None fields (the other task's) are left out.
        """
        rows: list[tuple[str, float, str]] = []
        skip = {"per_sample", "feature_config", "reference", "candidate", "train_count"}
        for name, value in self.model_dump(exclude=skip).items():
            if isinstance(value, dict):
                rows += [(f"{name}.{k}", float(v), self.feature_hash) for k, v in value.items()]
            elif isinstance(value, int | float) and not isinstance(value, bool):
                rows.append((name, float(value), self.feature_hash))
        return rows


def split_indices(reader: StoreReader, split: str) -> tuple[np.ndarray, str]:
    """Indices of `split` ("heldout" = val + test, "all"); held-out falls back to train if empty.

    Returns:
        (indices, the split actually used).
    """
    if split not in SPLIT_CHOICES:
        raise UsageError(f"unknown split {split!r}", hint=f"use one of {', '.join(SPLIT_CHOICES)}")
    if split == "all":
        return reader.indices(None), "all"
    if split != "heldout":
        return reader.indices(split), split
    heldout = np.union1d(reader.indices("val"), reader.indices("test"))
    if heldout.size:
        return heldout, "heldout"
    return reader.indices("train"), "train"


def compare_stores(
    reference: StoreReader,
    candidate: StoreReader,
    network: FeatureNetwork,
    reference_split: str = "heldout",
    candidate_split: str = "all",
    reference_indices: np.ndarray | None = None,
    candidate_indices: np.ndarray | None = None,
    options: MetricsOptions | None = None,
    progress: Progress | None = None,
) -> QualityReport:
    """Compare `candidate` (synthetic or real) with `reference` (real), streaming by batches.

    Args:
        reference: the real store the network was fitted on (its train split).
        candidate: the store to judge; same task, bands and classes.
        network: from `load_or_train(reference)`.
        reference_split: reference samples the distributions are compared with (see
            SPLIT_CHOICES; default held-out val + test, else train).
        candidate_split: candidate samples to judge (default all).
        reference_indices: explicit reference samples, overriding `reference_split`.
        candidate_indices: explicit candidate samples, overriding `candidate_split`.
        options: resolutions and seeds.
        progress: called as progress(stage, done, total).
    """
    options = options or MetricsOptions()
    _check_compatible(reference, candidate, network)
    ref_idx, ref_split = _resolve(reference, reference_split, reference_indices)
    cand_idx, cand_split = _resolve(candidate, candidate_split, candidate_indices)
    train_idx = reference.indices("train")
    collect_options = CollectOptions(
        band_edges=_band_edges(reference, options.histogram_bins),
        batch_size=options.batch_size,
        pixel_grid=options.pixel_grid,
    )
    ref = collect(reference, ref_idx, network, collect_options, progress, "reference")
    cand = collect(candidate, cand_idx, network, collect_options, progress, "candidate")
    if np.array_equal(train_idx, ref_idx):
        train = ref
    else:
        train = _train_bank(reference, train_idx, network, collect_options, progress)
    report: dict[str, Any] = {
        "task": reference.manifest.task,
        "feature_hash": network.feature_hash,
        "feature_config": network.config.model_dump(),
        "reference": _side(reference, ref_split, ref_idx),
        "candidate": _side(candidate, cand_split, cand_idx),
        "train_count": int(train_idx.size),
    }
    report |= _distribution_metrics(ref, cand, options)
    report |= _spectral_metrics(reference, ref, cand, collect_options.band_edges)
    report |= _label_metrics(reference, ref, cand)
    report |= memorisation(ref, cand, train, options.near_duplicate_percentile)
    assert cand.sample_miou is not None
    report["per_sample"] |= {
        "index": cand.indices.astype(int).tolist(),
        "pair_miou": cand.sample_miou.tolist(),
    }
    return QualityReport.model_validate(report)


# The neighbour bank of the reference train split is the same for every candidate judged
# against one reference with one network, and a benchmark or a model check judges several in one
# process: the last bank is kept (about 10 MB for 4,000 samples).
_last_train_bank: tuple[tuple[object, ...], SetStats] | None = None


def _train_bank(
    reference: StoreReader,
    indices: np.ndarray,
    network: FeatureNetwork,
    options: CollectOptions,
    progress: Progress | None,
) -> SetStats:
    global _last_train_bank
    key = (str(reference.root), manifest_sha256(reference), network.feature_hash,
           options.pixel_grid, options.batch_size, indices.tobytes())  # fmt: skip
    if _last_train_bank is None or _last_train_bank[0] != key:
        bank_options = replace(options, full=False)
        bank = collect(reference, indices, network, bank_options, progress, "train")
        _last_train_bank = (key, bank)
    return _last_train_bank[1]


def _resolve(
    reader: StoreReader, split: str, explicit: np.ndarray | None
) -> tuple[np.ndarray, str]:
    indices, used = (
        (np.asarray(explicit, np.int64), "explicit")
        if explicit is not None
        else split_indices(reader, split)
    )
    if indices.size < 2:
        raise InputDataError(
            f"too few samples to compare ({indices.size} in split {used!r})",
            reader.root,
            "a real store needs 2 or more val + test samples (prepare's --val-fraction, "
            "--test-fraction); a synthetic one, 2 or more samples",
        )
    return indices, used


def require_samples_to_compare(reference: StoreReader, candidate: StoreReader) -> None:
    """compare_stores' default sample sets hold enough, told before a feature network trains."""
    _resolve(reference, "heldout", None)
    _resolve(candidate, "all", None)


def _check_compatible(reference: StoreReader, candidate: StoreReader, net: FeatureNetwork) -> None:
    ref, cand = reference.manifest, candidate.manifest
    if (ref.task, len(ref.bands), len(ref.classes)) != (
        cand.task,
        len(cand.bands),
        len(cand.classes),
    ):
        raise InputDataError(
            "stores differ in task, band count or class count and cannot be compared",
            candidate.root,
            f"compare it with a store like {reference.root}",
        )
    if manifest_sha256(reference) != net.reference_manifest_sha256:
        raise UsageError(
            "the feature network was fitted on another reference store",
            reference.root,
            "load the network with load_or_train(reference)",
        )


def _side(reader: StoreReader, split: str, indices: np.ndarray) -> StoreSide:
    return StoreSide(
        path=str(reader.root),
        manifest_sha256=manifest_sha256(reader),
        split=split,
        count=int(indices.size),
    )


def _band_edges(reference: StoreReader, bins: int) -> np.ndarray:
    """(bands, bins + 1) histogram edges: the reference train range padded by 10% each side."""
    norm = reference.manifest.normalization
    assert norm is not None  # checked when the network was loaded
    low, high = np.asarray(norm.minimum, np.float64), np.asarray(norm.maximum, np.float64)
    pad = np.maximum(0.1 * (high - low), 1e-6 * np.maximum(np.abs(high), 1.0))
    return np.linspace(low - pad, high + pad, bins + 1, axis=1)


def _distribution_metrics(ref: SetStats, cand: SetStats, options: MetricsOptions) -> dict[str, Any]:
    """Fréchet distances of image and mask features, and KID of the image features."""
    assert ref.mask_moments is not None and cand.mask_moments is not None
    assert ref.joint_moments is not None and cand.joint_moments is not None
    per_phase = [
        a.frechet_to(b) for a, b in zip(ref.image_moments, cand.image_moments, strict=True)
    ]
    kid_mean, kid_std = kid(
        ref.joint_features,
        cand.joint_features,
        options.kid_subsets,
        options.kid_subset_size,
        options.seed,
    )
    out: dict[str, Any] = {
        "fd_spectral": float(np.mean(per_phase)),
        "fd_mask": ref.mask_moments.frechet_to(cand.mask_moments),
        "fd_joint": ref.joint_moments.frechet_to(cand.joint_moments),
        "kid_spectral": kid_mean,
        "kid_spectral_std": kid_std,
    }
    if len(per_phase) == 2:
        out |= {"fd_spectral_t1": per_phase[0], "fd_spectral_t2": per_phase[1]}
    return out


def _class_keys(reference: StoreReader) -> list[str]:
    manifest = reference.manifest
    if manifest.task == "cd":
        return ["no change", "change"]
    return [c.name for c in sorted(manifest.classes, key=lambda c: c.index)]


def _spectral_metrics(
    reference: StoreReader, ref: SetStats, cand: SetStats, edges: np.ndarray
) -> dict[str, Any]:
    """mSAD per class (paper Table 1, Fig. 3) and per-band Wasserstein-1 of values."""
    assert ref.class_spectra is not None and cand.class_spectra is not None
    assert ref.class_pixels is not None and cand.class_pixels is not None
    assert ref.band_hist is not None and cand.band_hist is not None
    keys, phases = _class_keys(reference), ref.class_spectra.shape[0]
    per_class: dict[str, float] = {}
    for phase in range(phases):
        for k, key in enumerate(keys):
            if ref.class_pixels[k] == 0 or cand.class_pixels[k] == 0:
                continue
            mean_ref = ref.class_spectra[phase, k] / ref.class_pixels[k]
            mean_cand = cand.class_spectra[phase, k] / cand.class_pixels[k]
            name = key if phases == 1 else f"t{phase + 1}:{key}"
            per_class[name] = float(spectral_angle(mean_ref, mean_cand))
    distances = wasserstein1(ref.band_hist, cand.band_hist, np.arange(edges.shape[1]))
    distances = distances * (edges[:, 1] - edges[:, 0])  # unit bins -> physical units per band
    norm = reference.manifest.normalization
    assert norm is not None
    std = np.where(np.asarray(norm.std) > 0, np.asarray(norm.std), 1.0)
    outside = (ref.outside + cand.outside) / max(ref.values + cand.values, 1)
    return {
        "msad": float(np.mean(list(per_class.values()))) if per_class else math.nan,
        "sad_per_class": per_class,
        "wasserstein_per_band": {
            b.name: float(d) for b, d in zip(reference.manifest.bands, distances, strict=True)
        },
        "wasserstein_mean_std": float(np.mean(distances / std)),
        "histogram_outside_fraction": float(outside),
    }


def _fractions(keys: list[str], pixels: np.ndarray) -> dict[str, float]:
    total = max(int(pixels.sum()), 1)
    return {key: float(count / total) for key, count in zip(keys, pixels, strict=True)}


def _label_metrics(reference: StoreReader, ref: SetStats, cand: SetStats) -> dict[str, Any]:
    """Class balance (Fig. 4) with JS, pair consistency, and for cd the change statistics."""
    assert ref.class_pixels is not None and cand.class_pixels is not None
    assert ref.confusion is not None and cand.confusion is not None
    keys = _class_keys(reference)
    tp = np.diagonal(cand.confusion).astype(np.float64)
    union = cand.confusion.sum(axis=0) + cand.confusion.sum(axis=1) - tp
    both = ref.class_pixels.sum() > 0 and cand.class_pixels.sum() > 0
    out: dict[str, Any] = {
        "class_fraction_reference": _fractions(keys, ref.class_pixels),
        "class_fraction_candidate": _fractions(keys, cand.class_pixels),
        "js_class": jensen_shannon(ref.class_pixels, cand.class_pixels) if both else math.nan,
        "pair_miou": float(mean_iou(cand.confusion)),
        "pair_miou_reference": float(mean_iou(ref.confusion)),
        "pair_iou_per_class": {
            key: float(tp[k] / union[k]) for k, key in enumerate(keys) if union[k] > 0
        },
    }
    if reference.manifest.task == "cd":
        out |= _change_metrics(ref, cand)
    return out


def _change_metrics(ref: SetStats, cand: SetStats) -> dict[str, Any]:
    """cd: share of samples with any change, change-ratio histogram, angle -> change AUC."""
    out: dict[str, Any] = {"change_ratio_bin_edges": CHANGE_RATIO_EDGES.tolist()}
    for name, stats in (("reference", ref), ("candidate", cand)):
        out |= {f"{key}_{name}": value for key, value in _change_side(stats).items()}
    return out


def _change_side(stats: SetStats) -> dict[str, Any]:
    assert stats.change_ratio is not None and stats.angle_hist is not None
    ratio = stats.change_ratio[np.isfinite(stats.change_ratio)]
    # np.histogram's last bin includes 1.0: fully changed samples are counted.
    hist = np.histogram(ratio, bins=CHANGE_RATIO_EDGES)[0]
    return {
        "change_sample_fraction": float((ratio > 0).mean()) if ratio.size else math.nan,
        "change_ratio_hist": hist.astype(int).tolist(),
        "change_angle_auc": roc_auc_from_histograms(stats.angle_hist[0], stats.angle_hist[1]),
    }
