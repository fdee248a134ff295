"""The latent cache of fit-diffusion: the train split encoded once by the frozen VAE.

Each entry keeps the posterior mean and std (so every step samples a fresh z) for one of the 8
D4 views of a sample (or the sample itself without augmentation): encoding once is far cheaper
than encoding every batch again (examples/bench_latent_cache.py measures the ratio). The cache
is keyed by the VAE weights, the store's manifest and the augmentation: reused when all match,
rebuilt otherwise, never silently stale. Images are normalised by the run's band statistics,
those the VAE learnt with, whatever store they come from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import zarr

from specdm_cli.config import Progress
from specdm_cli.faults import fault_point
from specdm_cli.fs.atomic import remove_tree
from specdm_cli.manifest import Normalization
from specdm_cli.models.vae import SpecDMVAE
from specdm_cli.pipeline.train.common import d4, load_batch, to_tensors
from specdm_cli.stores import StoreReader

CACHE = "latents.zarr"
VIEWS = [(rotations, flip) for flip in (False, True) for rotations in range(4)]


def cache_key(
    vae_weights: dict[str, str],
    store_sha256: str,
    augment: str,
    statistics: Normalization | None = None,
) -> str:
    """What the cache depends on, hashed; `statistics`: the run's, where they are not the
    store's own (caches of a store the VAE trained on keep their key)."""
    parts: dict[str, Any] = {"vae": vae_weights, "store": store_sha256, "augment": augment}
    if statistics is not None:
        parts["statistics"] = statistics.model_dump(mode="json")
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@dataclass
class LatentCache:
    """Posterior means and stds of every cached view, plus per-channel statistics of the means:
    the U-Net sees (z - shift) * scale, each channel centred and of unit variance."""

    mean: Any
    std: Any
    shift: np.ndarray
    scale: np.ndarray
    reused: bool

    def __len__(self) -> int:
        return int(self.mean.shape[0])


def open_or_build(
    run: Path,
    vae: SpecDMVAE,
    reader: StoreReader,
    statistics: Normalization,
    indices: np.ndarray,
    key: str,
    augment: bool,
    batch_size: int,
    progress: Progress | None = None,
) -> LatentCache:
    """The run's cache for `key`, built now if missing, stale or unfinished."""
    path = run / CACHE
    if path.exists():
        group = zarr.open_group(path, mode="r")
        attrs = group.attrs
        # Caches written before the shift was recorded are rebuilt (they only lack the means).
        if attrs.get("key") == key and attrs.get("complete") and "shift" in attrs:
            return _loaded(group, reused=True)
        remove_tree(path)
    return _build(path, vae, reader, statistics, indices, key, augment, batch_size, progress)


def open_cache(run: Path) -> LatentCache:
    """A finished cache, opened for reading (each training rank opens its own)."""
    return _loaded(zarr.open_group(run / CACHE, mode="r"), reused=True)


def _loaded(group: zarr.Group, reused: bool) -> LatentCache:
    shift = np.asarray(group.attrs["shift"], dtype=np.float32)
    scale = np.asarray(group.attrs["scale"], dtype=np.float32)
    return LatentCache(group["mean"], group["std"], shift, scale, reused)


@torch.no_grad()
def _build(
    path: Path,
    vae: SpecDMVAE,
    reader: StoreReader,
    statistics: Normalization,
    indices: np.ndarray,
    key: str,
    augment: bool,
    batch_size: int,
    progress: Progress | None,
) -> LatentCache:
    views = VIEWS if augment else VIEWS[:1]
    channels = sum(size for _, size in vae.latent_layout())
    side = reader.manifest.height // vae.config.downsample
    total = len(indices) * len(views)
    group = zarr.open_group(path, mode="w")
    shape, chunks = (total, channels, side, side), (batch_size, channels, side, side)
    mean_a = group.create_array("mean", shape=shape, chunks=chunks, dtype="float32")
    std_a = group.create_array("std", shape=shape, chunks=chunks, dtype="float32")
    sums = np.zeros((2, channels), dtype=np.float64)
    done = 0
    # "304/304" for 38 samples read as if the store had 304: the views are said.
    stage = f"encode latents ({len(indices)} samples x {len(views)} views)"
    for start in range(0, total, batch_size):
        entries = range(start, min(start + batch_size, total))
        chosen = [views[e % len(views)] for e in entries]
        means, stds = _encode(vae, reader, statistics, indices, chosen, entries, len(views))
        mean_a[entries.start : entries.stop] = means
        std_a[entries.start : entries.stop] = stds
        sums += [means.sum(axis=(0, 2, 3)), (means**2).sum(axis=(0, 2, 3))]
        done += len(entries)
        fault_point("latent_cache.after_batch")
        if progress:
            progress(stage, done, total)
    count = total * side * side
    shift = sums[0] / count
    variance = np.maximum(sums[1] / count - shift**2, 1e-12)
    scale = (1.0 / np.sqrt(variance)).astype(np.float32)
    latent_statistics = {"shift": shift.astype(np.float32).tolist(), "scale": scale.tolist()}
    group.attrs.update({"key": key, **latent_statistics, "views": len(views), "complete": True})
    return _loaded(group, reused=False)


@torch.no_grad()
def encode_means(
    vae: SpecDMVAE,
    reader: StoreReader,
    statistics: Normalization,
    indices: np.ndarray,
    batch_size: int,
) -> np.ndarray:
    """Posterior means of `indices` as they are (no augmentation): validation latents."""
    parts = []
    for start in range(0, len(indices), batch_size):
        entries = range(start, min(start + batch_size, len(indices)))
        identity = [VIEWS[0]] * len(entries)
        parts.append(_encode(vae, reader, statistics, indices, identity, entries, 1)[0])
    return np.concatenate(parts) if parts else np.zeros((0,), dtype=np.float32)


def _encode(
    vae: SpecDMVAE,
    reader: StoreReader,
    statistics: Normalization,
    indices: np.ndarray,
    views: list[tuple[int, bool]],
    entries: range,
    views_per_sample: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Posterior means and stds of cache entries (entry e = view e % V of sample e // V)."""
    device = next(vae.parameters()).device
    samples = load_batch(reader, indices[[e // views_per_sample for e in entries]], None)
    for row, view in enumerate(views):
        for name in samples:
            samples[name][row] = d4(samples[name][row], *view)
    mean_t = torch.tensor(statistics.mean, device=device)
    std_t = torch.tensor(statistics.std, device=device)
    batch, _ = to_tensors(samples, reader.manifest.task, mean_t, std_t, device)
    posts = vae.encode(batch)
    means = vae.join_latent({k: p.mean for k, p in posts.items()}).float().cpu().numpy()
    stds = vae.join_latent({k: cast(Any, p).std for k, p in posts.items()}).float().cpu().numpy()
    return means, stds
