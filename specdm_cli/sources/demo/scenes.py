"""Land-cover scenes of the demo: a region id per pixel over fields, meadows, forest, a town,
water and roads, each region a mixture of the endmember spectra (`spectra`)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from specdm_cli.sources.demo.spectra import (
    CROP,
    FOREST,
    GRASS,
    ROAD,
    SOIL,
    STANDARD,
    URBAN,
    WATER,
    Regions,
    Variant,
    regions,
)


@lru_cache(maxsize=8)
def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) relative to the scene centre."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - (size - 1) / 2
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def frame(size: int, angle: float, cx: float = 0.0, cy: float = 0.0) -> tuple[np.ndarray, ...]:
    """Coordinates (along, across) in a frame rotated by `angle` around (cx, cy)."""
    yy, xx = grid(size)
    c, s = np.cos(angle), np.sin(angle)
    return (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c


@lru_cache(maxsize=32)
def _lowpass(size: int, sigma: float) -> np.ndarray:
    fy, fx = np.fft.fftfreq(size), np.fft.rfftfreq(size)
    return np.exp(-2 * (np.pi * sigma) ** 2 * (fy[:, None] ** 2 + fx[None, :] ** 2))


def smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Gaussian-blurred white noise (periodic, via FFT), rescaled to zero mean and unit std."""
    white = rng.standard_normal((size, size), dtype=np.float32)
    field = np.fft.irfft2(np.fft.rfft2(white) * _lowpass(size, sigma), s=(size, size))
    return np.asarray((field - field.mean()) / (field.std() + 1e-8), dtype=np.float32)


@dataclass
class Scene:
    """A land-cover scene: a region id per pixel, the region table and surface texture."""

    rid: np.ndarray
    table: Regions
    theta: float  # orientation of the field grid (rad)
    vigour: np.ndarray
    bright: np.ndarray
    variant: Variant = STANDARD

    def regions(self, rng: np.random.Generator, classes: np.ndarray | list[int]) -> Regions:
        """New regions of `classes`, varying as the scene's variant does."""
        return regions(rng, classes, self.variant)

    def paint(self, mask: np.ndarray, new: Regions, local: np.ndarray | None = None) -> None:
        """Cover `mask` with the regions `new` (pixel -> row `local`, or row 0)."""
        self.rid[mask] = self.table.cls.size + (local[mask] if local is not None else 0)
        self.table = self.table + new

    def labels(self) -> np.ndarray:
        """The class of every pixel, uint8 (H, W)."""
        return np.asarray(self.table.cls[self.rid], dtype=np.uint8)


def _compact(ids: np.ndarray) -> tuple[np.ndarray, int]:
    unique, inverse = np.unique(ids, return_inverse=True)
    return inverse.reshape(ids.shape), unique.size


def _parcels(rng: np.random.Generator, size: int, theta: float) -> tuple[np.ndarray, int]:
    """Field parcels 80-450 m across: strips of the rotated frame, each cut into fields."""
    u, v = frame(size, theta)
    half = 0.72 * size  # |u|, |v| <= size / sqrt(2)
    edges = -half - rng.uniform(0, 28) + np.cumsum(rng.uniform(8, 28, int(half / 4) + 2))
    strip = np.searchsorted(edges, u)
    k = int((2 * half + 45) / 10) + 1
    start = -half - rng.uniform(0, 45, (edges.size + 1, 1))
    cuts = start + np.cumsum(rng.uniform(10, 45, (edges.size + 1, k)), axis=1)
    field = (cuts[strip] < v[..., None]).sum(axis=-1)
    return _compact(strip * (k + 1) + field)


def rect(size: int, centre: tuple[float, float], angle: float, a: float, b: float) -> np.ndarray:
    u, v = frame(size, angle, *centre)
    return np.asarray((np.abs(u) < a) & (np.abs(v) < b))


def blocks(size: int, mask: np.ndarray, angle: float, cell: float) -> tuple[np.ndarray, int]:
    """Ids 0..n-1 of the `cell`-sized squares of a rotated grid (buildings, plots) in `mask`."""
    u, v = frame(size, angle)
    ids = np.floor(u / cell).astype(np.int64) * 10_000 + np.floor(v / cell).astype(np.int64)
    local = np.zeros(mask.shape, dtype=np.int64)
    unique, local[mask] = np.unique(ids[mask], return_inverse=True)
    return local, unique.size


def _add_forest(rng: np.random.Generator, scene: Scene, parcels: np.ndarray, n: int) -> None:
    share = 0.0 if rng.random() < 0.3 else rng.uniform(0.05, 0.6)
    size = scene.rid.shape[0]  # woods of 100 m to 1 km, with ragged edges
    noise = smooth_noise(rng, size, 9.0) + 0.35 * smooth_noise(rng, size, 2.5)
    if share > 0:  # stands follow the parcel grid, so neighbouring stands differ a little
        scene.paint(
            noise > np.quantile(noise, 1 - share), scene.regions(rng, [FOREST] * n), parcels
        )


def _add_meadows(rng: np.random.Generator, scene: Scene, share: float) -> None:
    """Grassland as ragged meadows across the parcel grid, split into 240 m patches that each
    have their own mixture: their shape, not their spectrum, tells them from cropland."""
    size = scene.rid.shape[0]
    noise = smooth_noise(rng, size, 6.0) + 0.5 * smooth_noise(rng, size, 1.5)
    meadow = noise > np.quantile(noise, 1 - share)
    local, n = blocks(size, meadow, rng.uniform(0, np.pi), 24.0)
    scene.paint(meadow, scene.regions(rng, [GRASS] * n), local)


def _add_town(rng: np.random.Generator, scene: Scene, roads: list[tuple[float, ...]]) -> None:
    """A settlement beside the first road: street grid, building blocks, a few gardens."""
    if rng.random() > 0.45:
        return
    size = scene.rid.shape[0]
    angle, offset, _ = roads[0] if roads else (scene.theta, 0.0, 0.0)
    along, side = rng.uniform(-0.3, 0.3) * size, offset + rng.uniform(-8, 8)
    centre = (
        np.cos(angle) * along - np.sin(angle) * side,
        np.sin(angle) * along + np.cos(angle) * side,
    )
    u, v = frame(size, angle, *centre)
    ra, rb = rng.uniform(8, 28), rng.uniform(6, 20)
    town = (u / ra) ** 2 + (v / rb) ** 2 < 1 + 0.35 * smooth_noise(rng, size, 4.0)
    spacing = rng.uniform(6, 11, 2)
    streets = town & ((np.mod(u, spacing[0]) < 1.1) | (np.mod(v, spacing[1]) < 1.1))
    local, n = blocks(size, town, angle, float(spacing.mean()) / 2)
    cls = np.where(rng.random(n) < 0.82, URBAN, GRASS)
    scene.paint(town, scene.regions(rng, cls), local)
    scene.paint(streets, scene.regions(rng, [ROAD]))


def _add_water(rng: np.random.Generator, scene: Scene) -> None:
    """A meandering river (40%) and/or a lake (25%)."""
    size = scene.rid.shape[0]
    if rng.random() < 0.4:
        u, v = frame(size, rng.uniform(0, np.pi))
        amp, wave, phase = rng.uniform(2, 10), rng.uniform(40, 120), rng.uniform(0, 2 * np.pi)
        wiggle = rng.uniform(0, 3) * np.sin(2 * np.pi * u / rng.uniform(12, 25) + phase)
        centre = rng.uniform(-0.3, 0.3) * size + amp * np.sin(2 * np.pi * u / wave + phase)
        scene.paint(np.abs(v - centre - wiggle) < rng.uniform(1.5, 4), scene.regions(rng, [WATER]))
    if rng.random() < 0.25:
        yy, xx = grid(size)
        (cx, cy), radius = rng.uniform(-0.35, 0.35, 2) * size, rng.uniform(5, 14)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / radius**2)
        scene.paint(
            blob * (1 + 0.4 * smooth_noise(rng, size, 3.0)) > 0.5, scene.regions(rng, [WATER])
        )


def _road_lines(rng: np.random.Generator, size: int, theta: float) -> list[tuple[float, ...]]:
    """(angle, offset, width) of 0-3 straight roads, mostly along the field grid."""
    lines: list[tuple[float, ...]] = []
    for _ in range(rng.choice(4, p=[0.2, 0.4, 0.25, 0.15])):
        grid_aligned = rng.random() < 0.75
        angle = theta + rng.choice([0, np.pi / 2]) if grid_aligned else rng.uniform(0, np.pi)
        lines.append((float(angle), rng.uniform(-0.4, 0.4) * size, rng.uniform(1.0, 2.2)))
    return lines


def make_scene(rng: np.random.Generator, size: int, variant: Variant = STANDARD) -> Scene:
    """Fields (and meadows), then forest, a town, water and roads painted over each other."""
    theta = rng.uniform(0, np.pi)
    parcels, n = _parcels(rng, size, theta)
    p_grass, p_soil = rng.uniform(0.1, 0.5), rng.uniform(0.03, 0.15)
    fields = [CROP, SOIL] if variant.meadows else [CROP, GRASS, SOIL]
    shares = [1 - p_soil, p_soil] if variant.meadows else [1 - p_grass - p_soil, p_grass, p_soil]
    cls = rng.choice(fields, size=n, p=shares)
    vigour, bright = smooth_noise(rng, size, 2.0), smooth_noise(rng, size, 0.7)
    scene = Scene(parcels.copy(), regions(rng, cls, variant), theta, vigour, bright, variant)
    roads = _road_lines(rng, size, theta)
    if variant.meadows:
        _add_meadows(rng, scene, p_grass)
    _add_forest(rng, scene, parcels, n)
    _add_town(rng, scene, roads)
    _add_water(rng, scene)
    for angle, offset, width in roads:
        scene.paint(np.abs(frame(size, angle)[1] - offset) < width / 2, scene.regions(rng, [ROAD]))
    return scene
