"""Streaming statistics of a prepared store: band moments, class pixels, filter counts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from specdm_cli.manifest import IGNORE_INDEX, Normalization

# The tally of an unfinished prepare, rewritten after every block: the point a resume starts from.
PROGRESS_FILE = ".specdm/prepare-progress.json"


@dataclass
class PrepareTally:
    """Everything `prepare` accumulates; JSON-serialisable so a resume continues exactly."""

    candidates_done: int = 0
    kept: int = 0
    split_counts: dict[str, int] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=dict)
    nodata_pixels: int = 0
    class_pixels: dict[str, list[int]] = field(default_factory=dict)
    band_sum: list[float] = field(default_factory=list)
    band_sumsq: list[float] = field(default_factory=list)
    band_min: list[float] = field(default_factory=list)
    band_max: list[float] = field(default_factory=list)
    band_pixels: int = 0
    # Train pixels whose image is real but whose label is 255: missing labels, not nodata.
    unlabelled_train_pixels: int = 0
    # What the raw data decided when the store was begun (classes, bands, patches listed...):
    # a resume over changed raw data would mix two datasets. Empty in tallies older than it.
    source: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PrepareTally:
        return cls(**raw)

    def add_class_pixels(self, split: str, label: np.ndarray, num_classes: int) -> None:
        counts = np.bincount(label[label != IGNORE_INDEX].ravel(), minlength=num_classes)
        previous = self.class_pixels.get(split, [0] * num_classes)
        self.class_pixels[split] = [a + int(b) for a, b in zip(previous, counts, strict=False)]

    def add_band_moments(self, images: list[np.ndarray], valid: np.ndarray) -> None:
        """Accumulate per-band moments over the valid pixels of one sample's images."""
        for image in images:
            pixels = image.reshape(image.shape[0], -1)
            if not valid.all():
                pixels = pixels[:, valid.ravel()]
            if pixels.shape[1] == 0:
                continue
            as_double = pixels.astype(np.float64)
            if not self.band_sum:
                bands = pixels.shape[0]
                self.band_sum, self.band_sumsq = [0.0] * bands, [0.0] * bands
                self.band_min, self.band_max = [np.inf] * bands, [-np.inf] * bands
            # One pass each, in float64: sums of millions of reflectances lose digits in float32.
            self.band_sum = (np.asarray(self.band_sum) + as_double.sum(axis=1)).tolist()
            sumsq = np.einsum("ij,ij->i", as_double, as_double)
            self.band_sumsq = (np.asarray(self.band_sumsq) + sumsq).tolist()
            self.band_min = np.minimum(self.band_min, pixels.min(axis=1)).tolist()
            self.band_max = np.maximum(self.band_max, pixels.max(axis=1)).tolist()
            self.band_pixels += pixels.shape[1]

    def normalization(self, split: str) -> Normalization | None:
        """Mean and std of the accumulated pixels (None when no pixel was seen)."""
        if not self.band_pixels:
            return None
        mean = np.asarray(self.band_sum) / self.band_pixels
        variance = np.maximum(np.asarray(self.band_sumsq) / self.band_pixels - mean**2, 0.0)
        # A constant band would divide by zero when normalised; 1 keeps it unchanged.
        std = np.where(variance > 0, np.sqrt(variance), 1.0)
        return Normalization(
            split=split,
            mean=mean.tolist(),
            std=std.tolist(),
            minimum=list(self.band_min),
            maximum=list(self.band_max),
            pixels=self.band_pixels,
        )

    def class_fractions(self) -> dict[str, list[float]]:
        """Per split and over all splits, the fraction of labelled pixels per class."""
        result: dict[str, list[float]] = {}
        totals: np.ndarray | None = None
        for split, counts in sorted(self.class_pixels.items()):
            array = np.asarray(counts, dtype=np.float64)
            totals = array if totals is None else totals + array
            result[split] = (array / max(array.sum(), 1.0)).tolist()
        if totals is not None:
            result["all"] = (totals / max(totals.sum(), 1.0)).tolist()
        return result
