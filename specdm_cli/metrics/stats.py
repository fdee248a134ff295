"""Pure statistics of the quality metrics (Fréchet distance, KID, SAD, Wasserstein-1, JS, AUC) and
of seed-paired comparisons (a mean's 95% t-interval)."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

F64 = NDArray[np.float64]


def sqrtm_psd(matrix: ArrayLike) -> F64:
    """Square root of a symmetric positive semi-definite matrix via its eigendecomposition.

    The matrix is symmetrised first and negative eigenvalues (round-off of a PSD matrix) are
    clamped to 0, so the result is real and symmetric even for rank-deficient covariances.
    """
    a = np.asarray(matrix, dtype=np.float64)
    a = 0.5 * (a + a.T)
    values, vectors = np.linalg.eigh(a)
    roots = np.sqrt(np.clip(values, 0.0, None))
    result: F64 = (vectors * roots) @ vectors.T
    return result


def frechet_distance(mu1: ArrayLike, cov1: ArrayLike, mu2: ArrayLike, cov2: ArrayLike) -> float:
    """Fréchet (2-Wasserstein) distance between two Gaussians, as in FID (Heusel et al. 2017).

    d^2 = |mu1 - mu2|^2 + tr(C1) + tr(C2) - 2 tr((C1^1/2 C2 C1^1/2)^1/2). The trace of the
    cross term is the sum of square roots of the eigenvalues of the symmetric PSD matrix
    C1^1/2 C2 C1^1/2 (it has the eigenvalues of C1 C2), so eigh suffices: no complex
    `scipy.linalg.sqrtm`, no NaN when covariances are singular (fewer samples than dims).

    Returns:
        The squared distance (the number FID reports), float64, >= 0.
    """
    m1, m2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    c1, c2 = (
        np.atleast_2d(np.asarray(cov1, np.float64)),
        np.atleast_2d(np.asarray(cov2, np.float64)),
    )
    if m1.shape != m2.shape or c1.shape != c2.shape or c1.shape != (m1.size, m1.size):
        raise ValueError(f"shape mismatch: mu {m1.shape}/{m2.shape}, cov {c1.shape}/{c2.shape}")
    root1 = sqrtm_psd(c1)
    cross = root1 @ (0.5 * (c2 + c2.T)) @ root1
    cross_values = np.linalg.eigvalsh(0.5 * (cross + cross.T))
    trace_cross = float(np.sqrt(np.clip(cross_values, 0.0, None)).sum())
    diff = m1 - m2
    value = float(diff @ diff + np.trace(c1) + np.trace(c2) - 2.0 * trace_cross)
    # Round-off can take identical moments a hair below zero; a distance is never negative.
    return max(value, 0.0)


class MomentAccumulator:
    """Streaming mean and covariance of feature vectors in float64 (Chan et al.'s pairwise update).

    Adding batch by batch keeps memory at O(dim^2) whatever the number of samples, and the
    pairwise update avoids the cancellation of the naive sum-of-squares formula.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0
        self._mean = np.zeros(dim, np.float64)
        self._scatter = np.zeros((dim, dim), np.float64)

    def add(self, batch: ArrayLike) -> None:
        """Add an (n, dim) batch of feature vectors."""
        x = np.asarray(batch, dtype=np.float64).reshape(-1, self.dim)
        n = x.shape[0]
        if n == 0:
            return
        batch_mean = x.mean(axis=0)
        centred = x - batch_mean
        total = self.count + n
        delta = batch_mean - self._mean
        self._scatter += centred.T @ centred + np.outer(delta, delta) * (self.count * n / total)
        self._mean += delta * (n / total)
        self.count = total

    @property
    def mean(self) -> F64:
        """The mean vector (zeros before any sample)."""
        return self._mean.copy()

    def covariance(self) -> F64:
        """The unbiased (n - 1) covariance; zeros with fewer than two samples."""
        if self.count < 2:
            return np.zeros((self.dim, self.dim), np.float64)
        result: F64 = self._scatter / (self.count - 1)
        return result

    def frechet_to(self, other: MomentAccumulator) -> float:
        """Fréchet distance between the Gaussians fitted to this and `other`."""
        return frechet_distance(self.mean, self.covariance(), other.mean, other.covariance())


def _polynomial_kernel(x: F64, y: F64) -> F64:
    """KID's cubic kernel k(x, y) = (x.y / d + 1)^3 (Bińkowski et al. 2018)."""
    result: F64 = (x @ y.T / x.shape[1] + 1.0) ** 3
    return result


def _mmd2_unbiased(x: F64, y: F64) -> float:
    """Unbiased MMD^2 estimate between equal-sized sets x and y under the cubic kernel."""
    m = x.shape[0]
    kxx, kyy, kxy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.mean())


def kid(
    features_a: ArrayLike,
    features_b: ArrayLike,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018) on any features: mean unbiased MMD^2.

    As in the reference implementation, MMD^2 is averaged over `subsets` random subsets of
    `subset_size` samples drawn without replacement from each set. The subset size is capped at
    half the smaller set, so subsets differ even for tiny sets and their spread means something.

    Returns:
        (mean, std_error): the mean over subsets and the standard deviation of the subset
        estimates, i.e. the standard error of one estimate at that subset size (conservative for
        the mean, as subsets overlap). Both NaN when a set has fewer than 4 samples.
    """
    a = np.asarray(features_a, np.float64)
    b = np.asarray(features_b, np.float64)
    size = min(subset_size, min(a.shape[0], b.shape[0]) // 2)
    if size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    values = np.array(
        [
            _mmd2_unbiased(
                a[rng.choice(a.shape[0], size, replace=False)],
                b[rng.choice(b.shape[0], size, replace=False)],
            )
            for _ in range(subsets)
        ]
    )
    spread = float(values.std(ddof=1)) if subsets > 1 else math.nan
    return float(values.mean()), spread


def spectral_angle(a: ArrayLike, b: ArrayLike, eps: float = 1e-12) -> F64:
    """Spectral angle in radians between spectra along the last axis (broadcasting), float64.

    Kahan's form 2 atan2(|u - v|, |u + v|) of unit vectors u, v is exact for parallel spectra,
    where acos of the cosine loses half the digits. A spectrum of norm <= `eps` counts as zero:
    two zero spectra make angle 0, a zero and a non-zero one pi/2 (the convention of the SAD
    loss in `specdm_cli.models.losses`).
    """
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norm_x = np.linalg.norm(x, axis=-1, keepdims=True)
    norm_y = np.linalg.norm(y, axis=-1, keepdims=True)
    zero_x, zero_y = norm_x <= eps, norm_y <= eps
    u = np.where(zero_x, 0.0, x / np.where(zero_x, 1.0, norm_x))
    v = np.where(zero_y, 0.0, y / np.where(zero_y, 1.0, norm_y))
    angle = 2.0 * np.arctan2(np.linalg.norm(u - v, axis=-1), np.linalg.norm(u + v, axis=-1))
    result: F64 = np.where((zero_x & zero_y)[..., 0], 0.0, angle)
    return result


def wasserstein1(hist_a: ArrayLike, hist_b: ArrayLike, bin_edges: ArrayLike) -> F64:
    """Wasserstein-1 distance between 1-D distributions given as histograms on shared bins.

    Each bin's mass sits at its centre; W1 is then exactly the integral of |F_a - F_b| between
    consecutive centres. Histograms are normalised to unit mass; leading axes are batched (e.g.
    one histogram per band: shape (bands, bins)). Units are those of `bin_edges`.

    Args:
        hist_a: (..., bins) non-negative counts.
        hist_b: (..., bins) non-negative counts, same shape.
        bin_edges: (bins + 1,) increasing edges shared by every histogram.

    Returns:
        (...,) distances; NaN where a histogram is empty.
    """
    ha, hb = np.asarray(hist_a, np.float64), np.asarray(hist_b, np.float64)
    edges = np.asarray(bin_edges, np.float64)
    if ha.shape != hb.shape or ha.shape[-1] != edges.size - 1:
        raise ValueError(f"histograms {ha.shape}/{hb.shape} do not match {edges.size} edges")
    with np.errstate(invalid="ignore", divide="ignore"):
        pa = ha / ha.sum(axis=-1, keepdims=True)
        pb = hb / hb.sum(axis=-1, keepdims=True)
    centres = 0.5 * (edges[1:] + edges[:-1])
    gaps = np.diff(centres)
    cdf_gap = np.abs(np.cumsum(pa, axis=-1) - np.cumsum(pb, axis=-1))[..., :-1]
    result: F64 = (cdf_gap * gaps).sum(axis=-1)
    return result


def jensen_shannon(p: ArrayLike, q: ArrayLike) -> float:
    """Jensen-Shannon divergence in bits (base 2, so in [0, 1]) of two discrete distributions.

    Inputs are normalised to unit mass (counts are fine); 0 log 0 counts as 0.
    """
    a, b = np.asarray(p, np.float64), np.asarray(q, np.float64)
    if a.shape != b.shape or a.sum() <= 0 or b.sum() <= 0 or (a < 0).any() or (b < 0).any():
        raise ValueError("distributions must have the same shape, be >= 0 and not all 0")
    a, b = a / a.sum(), b / b.sum()
    middle = 0.5 * (a + b)

    def _kl(x: F64) -> float:
        keep = x > 0
        return float((x[keep] * np.log2(x[keep] / middle[keep])).sum())

    return float(np.clip(0.5 * _kl(a) + 0.5 * _kl(b), 0.0, 1.0))


def _average_ranks(values: F64) -> F64:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], sorted_values.size]
    mean_rank = 0.5 * (starts + ends + 1)
    ranks = np.empty_like(values)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve by the Mann-Whitney rank statistic; ties count one half.

    Args:
        scores: higher means "more likely positive".
        labels: truthy for positives.

    Returns:
        AUC in [0, 1]; NaN when either class is absent.
    """
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    positives, negatives = int(y.sum()), int((~y).sum())
    if positives == 0 or negatives == 0:
        return math.nan
    rank_sum = float(_average_ranks(s)[y].sum())
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def roc_auc_from_histograms(positive: ArrayLike, negative: ArrayLike) -> float:
    """AUC from score histograms of positives and negatives on the same bins (streaming form).

    Scores in the same bin count as ties (one half), so it equals `roc_auc` of the binned scores.
    NaN when either histogram is empty.
    """
    pos, neg = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    total_pos, total_neg = pos.sum(), neg.sum()
    if total_pos <= 0 or total_neg <= 0:
        return math.nan
    negatives_below = np.cumsum(neg) - neg
    wins = float((pos * (negatives_below + 0.5 * neg)).sum())
    return float(wins / (total_pos * total_neg))


def class_iou(confusion: np.ndarray) -> np.ndarray:
    """Per-class IoU of (..., K, K) confusion counts (truth x prediction); NaN for a class in
    neither truth nor prediction."""
    tp = np.diagonal(confusion, axis1=-2, axis2=-1).astype(np.float64)
    union = confusion.sum(axis=-1) + confusion.sum(axis=-2) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou: np.ndarray = np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)
    return iou


def mean_iou(confusion: np.ndarray) -> np.ndarray:
    """mIoU over the classes present in truth or prediction; (..., K, K) -> (...); NaN if none."""
    iou = class_iou(confusion)
    present = np.isfinite(iou)
    with np.errstate(invalid="ignore", divide="ignore"):
        result: np.ndarray = np.where(present, iou, 0.0).sum(axis=-1) / present.sum(axis=-1)
    return result


# Student's t two-sided 95% quantiles for 1-30 degrees of freedom (seeds - 1).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def t_quantile_975(degrees: int) -> float:
    """The 0.975 quantile of Student's t; past the table, its Cornish-Fisher expansion in
    1/degrees (within 1e-4 there)."""
    if degrees < 1:
        raise ValueError("a t quantile needs at least one degree of freedom")
    if degrees <= len(_T975):
        return _T975[degrees - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * degrees) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * degrees**2)


def mean_interval(values: ArrayLike) -> tuple[float, float, float]:
    """Mean of two or more `values` and the two ends of its two-sided 95% t-interval (ddof 1):
    how a gain paired by seed is judged above zero beyond the seeds' scatter."""
    data = np.asarray(values, dtype=np.float64)
    if data.size < 2:
        raise ValueError("an interval needs two or more values")
    mean = float(data.mean())
    half = t_quantile_975(data.size - 1) * float(data.std(ddof=1)) / math.sqrt(data.size)
    return mean, mean - half, mean + half
