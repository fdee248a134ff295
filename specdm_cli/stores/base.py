"""The store interface shared by the Zarr and GeoTIFF formats: write by sample index, read back."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from specdm_cli.manifest import SPLITS, Manifest

MANIFEST_NAME = "manifest.json"
Bounds = tuple[float, float, float, float]


@dataclass(frozen=True)
class SampleMeta:
    """Per-sample facts beside the rasters."""

    split: str
    class_fraction: np.ndarray
    source_id: str | None = None
    bounds: Bounds | None = None
    candidate: int | None = None  # synthetic stores: the sampler draw this sample came from


def split_code(split: str) -> int:
    """The uint8 code of a split name (CF flag_values order of SPLITS)."""
    return SPLITS.index(split)


class StoreWriter(ABC):
    """Writes samples by index; `written` flags are set only after a sample's rasters are on disk."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = root
        self.manifest = manifest

    @abstractmethod
    def write_arrays(
        self, index: int, arrays: dict[str, np.ndarray], bounds: Bounds | None = None
    ) -> None:
        """Write the raster arrays (`image`, `mask`, ...) of sample `index`.

        `bounds` (in the manifest's CRS) georeferences formats that carry it per file.
        """

    def write_batch(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Write samples start, start + 1, ...: each array's first axis runs over them."""
        count = len(next(iter(arrays.values())))
        for offset in range(count):
            self.write_arrays(start + offset, {name: v[offset] for name, v in arrays.items()})

    @abstractmethod
    def mark_written(self, start: int, metas: list[SampleMeta]) -> None:
        """Record the metadata of samples start.. and flag them written (rasters already flushed)."""

    @abstractmethod
    def written(self) -> np.ndarray:
        """The per-sample written flags (bool, length = capacity)."""

    @abstractmethod
    def forget_from(self, index: int) -> None:
        """Clear the written flag of every sample at or after `index` (resume rewrites them)."""

    @abstractmethod
    def save_manifest(self, manifest: Manifest) -> None:
        """Store the manifest (attributes and `manifest.json`) atomically."""

    @abstractmethod
    def truncate(self, count: int) -> None:
        """Shrink the store to its first `count` samples."""


class StoreReader(ABC):
    """Reads samples of a store of either format by index."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = root
        self.manifest = manifest

    def __len__(self) -> int:
        return self.manifest.count

    @abstractmethod
    def read(self, index: int) -> dict[str, np.ndarray]:
        """The raster arrays of sample `index`, keyed by array name."""

    @abstractmethod
    def splits(self) -> np.ndarray:
        """Split name of every sample (object array of str)."""

    @abstractmethod
    def class_fractions(self) -> np.ndarray:
        """(N, K) fraction of labelled pixels per class."""

    @abstractmethod
    def written(self) -> np.ndarray:
        """Per-sample written flags."""

    @abstractmethod
    def source_ids(self) -> list[str] | None:
        """Source id of every sample (real data), else None."""

    @abstractmethod
    def candidates(self) -> np.ndarray | None:
        """Synthetic stores: the draw index of every sample (-1 unwritten), else None."""

    @abstractmethod
    def bounds(self) -> np.ndarray | None:
        """Georeferenced stores: (N, 4) bounds of every sample in the manifest's CRS (NaN where
        unknown), else None."""

    @abstractmethod
    def sample_checksums(self) -> np.ndarray | None:
        """(N, arrays) crc32 of every sample's arrays in `manifest.arrays` order (0 where
        unwritten); None for a store written before checksums existed."""

    def indices(self, split: str | None = None) -> np.ndarray:
        """Indices of the written samples of `split` (all splits when None)."""
        keep = self.written()
        if split is not None:
            keep = keep & (self.splits() == split)
        return np.flatnonzero(keep)
