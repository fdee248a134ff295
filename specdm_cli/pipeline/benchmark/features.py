"""The metrics' feature extractor: the trained feature network, cached on disk by data and config."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from specdm_cli.config import Progress
from specdm_cli.errors import InputDataError
from specdm_cli.fs.atomic import atomic_write_text, remove_tree
from specdm_cli.fs.paths import file_sha256
from specdm_cli.metrics.masks import mask_features
from specdm_cli.models.feature_net import FeatureNetConfig, build_network
from specdm_cli.pipeline.benchmark.feature_training import train_network
from specdm_cli.stores import StoreReader, store_sha256

__all__ = ["FeatureNetwork", "default_cache_dir", "load_or_train"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Feature standardisation tensors live in the weights file beside the state dict (so the
# feature hash covers them), under this key prefix.
SCALE_PREFIX = "standardise."


def default_cache_dir() -> Path:
    """`<SPECDM_HOME>/cache/features` if SPECDM_HOME is set, else the user cache dir's."""
    home = os.environ.get("SPECDM_HOME")
    if home:
        return Path(home) / "cache" / "features"
    return Path(platformdirs.user_cache_dir("specdm")) / "features"


def manifest_sha256(reader: StoreReader) -> str:
    """sha256 of a store's `manifest.json`: what identifies the reference data."""
    return store_sha256(reader.root)


def band_statistics(reader: StoreReader) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and std (physical units) the network normalises with; std 0 becomes 1."""
    norm = reader.manifest.normalization
    if norm is None:
        raise InputDataError(
            "reference store has no normalisation statistics", reader.root, "re-prepare it"
        )
    mean, std = np.asarray(norm.mean, np.float64), np.asarray(norm.std, np.float64)
    return mean, np.where(std > 0, std, 1.0)


@dataclass(frozen=True)
class FeatureNetwork:
    """A trained feature network with what it needs to run: normalisation, scales and its hash."""

    model: nn.Module
    config: FeatureNetConfig
    band_mean: np.ndarray
    band_std: np.ndarray
    feature_hash: str  # sha256 of the weights file (scales included)
    reference_manifest_sha256: str
    scales: dict[str, np.ndarray]
    path: Path | None = None
    device: str = "cpu"

    def normalise(self, images: np.ndarray) -> Tensor:
        """(B, C, H, W) physical units -> band-normalised float32 tensor on the device."""
        mean, std = self.band_mean[:, None, None], self.band_std[:, None, None]
        x = (np.asarray(images, np.float64) - mean) / std
        return torch.from_numpy(x.astype(np.float32)).to(self.device)

    @torch.inference_mode()
    def run(self, images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        """Standardised features and predicted labels of one batch.

        Args:
            images: one (B, C, H, W) batch per phase in physical units (ss: [image]; cd: [t1, t2]).

        Returns:
            (features per phase, each (B, feature_dim) float64; predicted labels (B, H, W) uint8).
        """
        self.model.eval()
        features, logits = self.model([self.normalise(x) for x in images])
        labels = logits.argmax(dim=1).to(torch.uint8).cpu().numpy()
        mean, std = self.scales["image_mean"], self.scales["image_std"]
        return [(f.double().cpu().numpy() - mean) / std for f in features], labels

    def mask_features(self, masks: np.ndarray) -> np.ndarray:
        """Standardised fixed mask features (see `masks.mask_features`) of (B, H, W) labels."""
        values = mask_features(masks, self.config.classes)
        result: np.ndarray = (values - self.scales["mask_mean"]) / self.scales["mask_std"]
        return result


def load_or_train(
    reference: StoreReader,
    config: FeatureNetConfig | None = None,
    cache_dir: Path | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
) -> FeatureNetwork:
    """The feature network of `reference`, from the cache or trained on its train split.

    Cached under `cache_dir/<manifest sha256[:16]>-<config sha256[:16]>/` as safetensors + JSON;
    an entry whose weights do not match their recorded sha256 is retrained.

    Args:
        reference: the real store; its train split trains the network.
        config: network and training options; None = defaults for the store's task and shape.
        cache_dir: cache root; None = `default_cache_dir()`.
        device: torch device to train and run on (weights differ slightly across devices;
            the feature hash tells them apart).
        progress: called as progress("train features", step, steps).
    """
    config = config or default_config(reference)
    _check_config(reference, config)
    manifest_sha = manifest_sha256(reference)
    config_sha = hashlib.sha256(config.model_dump_json().encode()).hexdigest()
    entry = (cache_dir or default_cache_dir()) / f"{manifest_sha[:16]}-{config_sha[:16]}"
    band_mean, band_std = band_statistics(reference)
    with torch.random.fork_rng(devices=[]):
        # Built only to receive cached weights; forked so the caller's RNG stream is untouched.
        model: nn.Module = build_network(config).to(device)
    cached = _load_cached(entry, model, config)
    if cached is None:
        model, scales, summary = train_network(
            reference, config, band_mean, band_std, device, progress
        )
        _save(entry, model, scales, config, {"reference_manifest_sha256": manifest_sha, **summary})
        # Another process may have won the race to the cache: use whatever is on disk.
        cached = _load_cached(entry, model, config)
        if cached is None:
            raise InputDataError("feature cache unreadable after writing", entry, "remove it")
    feature_hash, scales = cached
    model.eval()
    return FeatureNetwork(
        model, config, band_mean, band_std, feature_hash, manifest_sha, scales, entry, device
    )


def default_config(reference: StoreReader, **overrides: Any) -> FeatureNetConfig:
    """Default network options for a store (bands, classes and task taken from its manifest)."""
    manifest = reference.manifest
    classes = 2 if manifest.task == "cd" else len(manifest.classes)
    return FeatureNetConfig(
        task=manifest.task, bands=len(manifest.bands), classes=max(classes, 2), **overrides
    )


def _check_config(reference: StoreReader, config: FeatureNetConfig) -> None:
    expected = default_config(reference)
    wanted = (expected.task, expected.bands, expected.classes)
    if (config.task, config.bands, config.classes) != wanted:
        raise InputDataError(
            "feature network options do not fit the reference store "
            f"(task/bands/classes {config.task}/{config.bands}/{config.classes})",
            reference.root,
            "use {}/{}/{}".format(*wanted),
        )


def _load_cached(
    entry: Path, model: nn.Module, config: FeatureNetConfig
) -> tuple[str, dict[str, np.ndarray]] | None:
    """Load a whole cache entry into `model`: (weights sha256, scales), or None if unusable."""
    try:
        record = json.loads((entry / CONFIG_NAME).read_text(encoding="utf-8"))
        weights = entry / WEIGHTS_NAME
        digest = file_sha256(weights)
        if record.get("config") != config.model_dump() or record.get("weights_sha256") != digest:
            return None
        tensors = load_file(weights, device="cpu")
        scales = {
            key.removeprefix(SCALE_PREFIX): tensors.pop(key).double().numpy()
            for key in list(tensors)
            if key.startswith(SCALE_PREFIX)
        }
        model.load_state_dict(tensors)
    except (OSError, ValueError, RuntimeError, KeyError):
        return None
    return digest, scales


def _save(
    entry: Path,
    model: nn.Module,
    scales: dict[str, np.ndarray],
    config: FeatureNetConfig,
    extra: dict[str, Any],
) -> None:
    """Write the weights and config.json into a temporary sibling, then rename it into place."""
    temp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
    remove_tree(temp)
    temp.mkdir(parents=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors |= {SCALE_PREFIX + k: torch.from_numpy(v.astype(np.float64)) for k, v in scales.items()}
    save_file(tensors, str(temp / WEIGHTS_NAME))
    record = {
        "specdm_feature_network": 1,
        "config": config.model_dump(),
        "weights_sha256": file_sha256(temp / WEIGHTS_NAME),
        **extra,
    }
    atomic_write_text(temp / CONFIG_NAME, json.dumps(record, indent=2))
    remove_tree(entry)
    try:
        temp.rename(entry)
    except OSError:
        # Someone else renamed theirs into place first; theirs is as good as ours.
        remove_tree(temp)
