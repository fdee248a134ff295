"""What identifies a store's data: the sha256 of its manifest, and of its samples and splits."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from specdm_cli.fs.paths import file_sha256
from specdm_cli.stores.base import MANIFEST_NAME, StoreReader


def store_sha256(root: Path) -> str:
    """sha256 of a store's `manifest.json`: what identifies the data a run or report used."""
    return file_sha256(root / MANIFEST_NAME)


def content_sha256(reader: StoreReader) -> str | None:
    """sha256 of a store's samples (their checksums) and splits: equal for two stores of the
    same data, which `store_sha256` is not (a manifest records when it was made). None for a
    store written before checksums existed."""
    sums = reader.sample_checksums()
    if sums is None:
        return None
    digest = hashlib.sha256(np.ascontiguousarray(sums, dtype="<u4").tobytes())
    digest.update("\n".join(map(str, reader.splits())).encode())
    return digest.hexdigest()
