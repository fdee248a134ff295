"""`--preview PNG`: a grid of the first samples (RGB with a robust stretch beside coloured masks)."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from specdm_cli.fs.atomic import atomic_write_bytes
from specdm_cli.manifest import IMAGE_ARRAYS, LABEL_ARRAY, Manifest


def rgb_indices(manifest: Manifest) -> list[int]:
    """Band indices shown as red, green, blue: `rgb_bands`, else the bands nearest 665/560/490 nm."""
    names = [band.name for band in manifest.bands]
    if manifest.rgb_bands and all(name in names for name in manifest.rgb_bands):
        return [names.index(name) for name in manifest.rgb_bands]
    wavelengths = np.array([b.wavelength_nm or np.nan for b in manifest.bands], dtype=np.float64)
    if np.isnan(wavelengths).all():
        return [min(i, len(names) - 1) for i in (0, 1, 2)]
    return [int(np.nanargmin(np.abs(wavelengths - target))) for target in (665.0, 560.0, 490.0)]


def rgb_note(manifest: Manifest) -> str | None:
    """A warning line when the store cannot say which bands are red, green and blue."""
    if manifest.rgb_bands or any(band.wavelength_nm for band in manifest.bands):
        return None
    shown = ", ".join(manifest.bands[i].name for i in rgb_indices(manifest))
    return (
        "warning: the store names no red, green and blue bands (no rgb_bands, no wavelengths): "
        f"pictures show {shown} as red, green, blue"
    )


def stretch(image: np.ndarray, bands: list[int]) -> np.ndarray:
    """(C, H, W) -> (H, W, 3) uint8 with a 2-98 percentile stretch per band."""
    rgb = image[bands].astype(np.float64)
    low = np.percentile(rgb, 2, axis=(1, 2), keepdims=True)
    high = np.percentile(rgb, 98, axis=(1, 2), keepdims=True)
    scaled = np.clip((rgb - low) / np.maximum(high - low, 1e-9), 0, 1)
    return (scaled.transpose(1, 2, 0) * 255).astype(np.uint8)


def colour_mask(label: np.ndarray, manifest: Manifest) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 in the manifest's class colours (ignore = grey)."""
    palette = np.full((256, 3), 128, dtype=np.uint8)
    for info in manifest.classes:
        palette[info.index] = info.colour
    coloured: np.ndarray = palette[label]
    return coloured


def preview_row(sample: dict[str, np.ndarray], manifest: Manifest) -> np.ndarray:
    """One row of the grid: ss image | mask; cd t1 | t2 | change."""
    bands = rgb_indices(manifest)
    tiles = [stretch(sample[name], bands) for name in IMAGE_ARRAYS[manifest.task]]
    tiles.append(colour_mask(sample[LABEL_ARRAY[manifest.task]], manifest))
    gap = np.full((manifest.height, 2, 3), 255, dtype=np.uint8)
    return np.concatenate([part for tile in tiles for part in (tile, gap)][:-1], axis=1)


def write_preview(path: Path, samples: list[dict[str, np.ndarray]], manifest: Manifest) -> None:
    """Write a PNG grid of `samples` (rows of `preview_row`, two rows side by side)."""
    rows = [preview_row(sample, manifest) for sample in samples]
    if len(rows) % 2:
        rows.append(np.full_like(rows[0], 255))
    pairs = [
        np.concatenate([a, np.full((a.shape[0], 6, 3), 255, np.uint8), b], axis=1)
        for a, b in zip(rows[::2], rows[1::2], strict=True)
    ]
    spaced = [part for row in pairs for part in (row, np.full((2, row.shape[1], 3), 255, np.uint8))]
    grid = np.concatenate(spaced[:-1], axis=0)
    scale = max(1, 256 // manifest.height)
    picture = Image.fromarray(grid).resize(
        (grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST
    )
    buffer = BytesIO()
    picture.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
