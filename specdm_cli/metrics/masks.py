"""Fixed (not learned) mask features for `fd_mask`: a one-hot spatial pyramid and class adjacency."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from specdm_cli.manifest import IGNORE_INDEX

# What `fd_mask` is computed on, named in every report.
MASK_FEATURES = "onehot-pyramid(1x1,2x2)+class-adjacency, standardised by the reference train split"
MASK_GRIDS = (1, 2)


def mask_feature_dims(classes: int, grids: Sequence[int] = MASK_GRIDS) -> int:
    """Length of `mask_features` vectors for K classes."""
    return classes * sum(g * g for g in grids) + classes * (classes + 1) // 2


def mask_features(masks: np.ndarray, classes: int, grids: Sequence[int] = MASK_GRIDS) -> np.ndarray:
    """Fixed (not learned) per-mask features that `fd_mask` compares: see MASK_FEATURES.

    For each grid g in `grids`, the class fractions of each of the g x g cells (a spatial
    pyramid of the one-hot mask, average-pooled), then the class adjacency: the fraction of
    4-neighbour pixel pairs labelled (i, j), i <= j. The pyramid sees composition and coarse
    layout, the adjacency sees boundaries and fragmentation. Ignored pixels (255) count in no
    class. We chose fixed statistics over a learned mask encoder: masks are few-valued maps
    whose composition and boundaries these capture exactly, with no training of their own and
    nothing to overfit.

    Args:
        masks: (B, H, W) labels 0..classes-1, 255 = ignore.
        classes: K.
        grids: pyramid levels (cells per side).

    Returns:
        (B, K * sum(g^2) + K (K + 1) / 2) float64.
    """
    labels = np.asarray(masks).astype(np.int64)
    batch, height, width = labels.shape
    valid = labels != IGNORE_INDEX
    safe = np.where(valid, labels, 0)
    parts = []
    for grid in grids:
        cell_y = (np.arange(height) * grid) // height
        cell_x = (np.arange(width) * grid) // width
        cell = cell_y[:, None] * grid + cell_x[None, :]
        code = (np.arange(batch)[:, None, None] * grid * grid + cell) * classes + safe
        counts = np.bincount(code[valid], minlength=batch * grid * grid * classes)
        per_cell = np.bincount(cell.ravel(), minlength=grid * grid)
        fractions = counts.reshape(batch, grid * grid, classes) / per_cell[None, :, None]
        parts.append(fractions.reshape(batch, -1))
    parts.append(_adjacency(safe, valid, classes))
    return np.concatenate(parts, axis=1).astype(np.float64)


def _adjacency(labels: np.ndarray, valid: np.ndarray, classes: int) -> np.ndarray:
    """(B, K(K+1)/2) fraction of horizontal and vertical neighbour pairs per unordered class pair."""
    batch = labels.shape[0]
    rows, cols = np.triu_indices(classes)
    counts = np.zeros((batch, classes * classes), np.float64)
    pairs = 0
    for a, b, ok in (
        (labels[:, :, :-1], labels[:, :, 1:], valid[:, :, :-1] & valid[:, :, 1:]),
        (labels[:, :-1, :], labels[:, 1:, :], valid[:, :-1, :] & valid[:, 1:, :]),
    ):
        low, high = np.minimum(a, b), np.maximum(a, b)
        code = np.arange(batch)[:, None, None] * classes * classes + low * classes + high
        counts += np.bincount(code[ok], minlength=batch * classes * classes).reshape(batch, -1)
        pairs += a.shape[1] * a.shape[2]
    result: np.ndarray = counts.reshape(batch, classes, classes)[:, rows, cols] / max(pairs, 1)
    return result
