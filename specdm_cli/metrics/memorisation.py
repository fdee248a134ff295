"""Memorisation: each candidate's nearest reference-train neighbour, and a calibrated duplicate rate."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from specdm_cli.metrics.sets import SetStats


def nearest(
    queries: np.ndarray,
    bank: np.ndarray,
    exclude: np.ndarray | None = None,
    chunk: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each query to its nearest bank row, in chunks (no N x M matrix).

    Args:
        queries: (Q, d).
        bank: (M, d).
        exclude: (Q,) bank row each query may not match (itself), -1 for none.
        chunk: queries per chunk; memory is chunk x M.

    Returns:
        (distances (Q,), bank rows (Q,)); inf and -1 when the bank is empty.
    """
    q, b = np.asarray(queries, np.float64), np.asarray(bank, np.float64)
    distances, rows = np.full(q.shape[0], np.inf), np.full(q.shape[0], -1, np.int64)
    if b.shape[0] == 0:
        return distances, rows
    bank_sq = (b * b).sum(axis=1)
    for start in range(0, q.shape[0], chunk):
        part = q[start : start + chunk]
        squared = (part * part).sum(axis=1)[:, None] + bank_sq[None, :] - 2.0 * part @ b.T
        if exclude is not None:
            own = exclude[start : start + chunk]
            hit = own >= 0
            squared[np.flatnonzero(hit), own[hit]] = np.inf
        best = squared.argmin(axis=1)
        finite = np.isfinite(squared[np.arange(part.shape[0]), best])
        # Distances recomputed directly: the expanded form above loses digits near zero.
        exact = np.linalg.norm(part - b[best], axis=1)
        rows[start : start + part.shape[0]] = best
        distances[start : start + part.shape[0]] = np.where(finite, exact, np.inf)
    rows[np.isinf(distances)] = -1
    return distances, rows


def _percentile(distances: np.ndarray, q: float) -> float:
    finite = distances[np.isfinite(distances)]
    return float(np.percentile(finite, q)) if finite.size else math.nan


def memorisation(ref: SetStats, cand: SetStats, train: SetStats, q: float) -> dict[str, Any]:
    """Nearest reference-train neighbours in feature and pixel space; calibrated duplicate rate.

    Pixel distances are RMS over the normalised thumbnails (Euclidean / sqrt(dims)). The
    near-duplicate thresholds are the q-th percentiles of the same distances from the real
    comparison samples to train (leave-one-out where they are train samples): a candidate that
    is as new as real held-out data is flagged q% of the time.

    Returns:
        Report fields, and under "per_sample" the per-candidate lists (aligned with cand.indices).
    """
    # Real held-out -> train distances calibrate the threshold; a sample never matches itself.
    position = {int(i): row for row, i in enumerate(train.indices)}
    own = np.array([position.get(int(i), -1) for i in ref.indices], np.int64)
    pixel_scale = math.sqrt(train.thumbnails.shape[1])
    ref_feat, _ = nearest(ref.joint_features, train.joint_features, own)
    ref_pix, _ = nearest(ref.thumbnails, train.thumbnails, own)
    cand_feat, feat_rows = nearest(cand.joint_features, train.joint_features)
    cand_pix, pix_rows = nearest(cand.thumbnails, train.thumbnails)
    ref_pix, cand_pix = ref_pix / pixel_scale, cand_pix / pixel_scale
    threshold_feat, threshold_pix = _percentile(ref_feat, q), _percentile(ref_pix, q)
    dup_feat, dup_pix = cand_feat <= threshold_feat, cand_pix <= threshold_pix
    per_sample = {
        "nn_feature_distance": cand_feat.tolist(),
        "nn_feature_index": [int(train.indices[r]) if r >= 0 else -1 for r in feat_rows],
        "nn_pixel_distance": cand_pix.tolist(),
        "nn_pixel_index": [int(train.indices[r]) if r >= 0 else -1 for r in pix_rows],
        "near_duplicate": (dup_feat | dup_pix).tolist(),
    }
    return {
        "near_duplicate_percentile": q,
        "near_duplicate_threshold_feature": threshold_feat,
        "near_duplicate_threshold_pixel": threshold_pix,
        "near_duplicate_fraction_feature": float(dup_feat.mean()),
        "near_duplicate_fraction_pixel": float(dup_pix.mean()),
        "nn_feature_distance_median": float(np.median(cand_feat)),
        "nn_pixel_distance_median": float(np.median(cand_pix)),
        "nn_feature_distance_median_reference": float(np.median(ref_feat)),
        "nn_pixel_distance_median_reference": float(np.median(ref_pix)),
        "per_sample": per_sample,
    }
