"""The accumulated statistics of one sample set, as the metrics read them (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from specdm_cli.metrics.stats import MomentAccumulator


@dataclass
class SetStats:
    """Accumulated statistics of one sample set; memory O(N x (feature + thumbnail dims))."""

    indices: np.ndarray
    features: list[np.ndarray]
    thumbnails: np.ndarray
    image_moments: list[MomentAccumulator] = field(default_factory=list)
    mask_moments: MomentAccumulator | None = None
    joint_moments: MomentAccumulator | None = None
    class_pixels: np.ndarray | None = None
    class_spectra: np.ndarray | None = None
    band_hist: np.ndarray | None = None
    outside: int = 0
    values: int = 0
    confusion: np.ndarray | None = None
    sample_miou: np.ndarray | None = None
    change_ratio: np.ndarray | None = None
    angle_hist: np.ndarray | None = None

    @property
    def joint_features(self) -> np.ndarray:
        """(N, phases x D): the phases' features side by side (what KID and neighbours use)."""
        return np.concatenate(self.features, axis=1)
