"""The built-in `demo` source: synthetic Sentinel-2-like land-cover scenes, no download needed.

A scene is painted as regions (field parcels, forest stands, a town, water, roads); each region
is a linear mixture of endmember spectra (`demo_spectra`). The image is that mixture rendered at
the band set (the 10 SpecDM Sentinel-2 bands, or a 211-band 400-2500 nm grid) with texture, a
soft sensor PSF, an acquisition gain/haze and sensor noise, as L2A-like reflectance x 10000
(uint16). Pixels are 10 m. Sample i depends only on (seed, i).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from specdm_cli.errors import UsageError
from specdm_cli.manifest import Band
from specdm_cli.sources.base import Candidate, PrepareOptions, RawSample, SourcePlan, SourceSpec
from specdm_cli.sources.demo_spectra import (
    BAND_SETS,
    CD_CLASSES,
    CROP,
    FOREST,
    GRASS,
    GREEN,
    ROAD,
    ROUGHNESS,
    SOIL,
    SPECTRA_SOURCE,
    SS_CLASSES,
    STANDARD,
    URBAN,
    VARIANTS,
    VIGOUR,
    WATER,
    BandTable,
    Regions,
    Variant,
    band_table,
    mixtures,
    regions,
    turbid_water,
)
from specdm_cli.sources.sentinel2 import S2_RGB_BANDS, s2_bands

# Mean land-cover change events per 64 x 64 pair (Poisson): ~20% of pairs have none and the
# changed share averages about 2.5% of pixels (OSCD: ~2.3%).
CHANGE_EVENTS_PER_64PX = 1.6


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) relative to the scene centre."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - (size - 1) / 2
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def _frame(size: int, angle: float, cx: float = 0.0, cy: float = 0.0) -> tuple[np.ndarray, ...]:
    """Coordinates (along, across) in a frame rotated by `angle` around (cx, cy)."""
    yy, xx = _grid(size)
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
    u, v = _frame(size, theta)
    half = 0.72 * size  # |u|, |v| <= size / sqrt(2)
    edges = -half - rng.uniform(0, 28) + np.cumsum(rng.uniform(8, 28, int(half / 4) + 2))
    strip = np.searchsorted(edges, u)
    k = int((2 * half + 45) / 10) + 1
    start = -half - rng.uniform(0, 45, (edges.size + 1, 1))
    cuts = start + np.cumsum(rng.uniform(10, 45, (edges.size + 1, k)), axis=1)
    field = (cuts[strip] < v[..., None]).sum(axis=-1)
    return _compact(strip * (k + 1) + field)


def _rect(size: int, centre: tuple[float, float], angle: float, a: float, b: float) -> np.ndarray:
    u, v = _frame(size, angle, *centre)
    return np.asarray((np.abs(u) < a) & (np.abs(v) < b))


def _blocks(size: int, mask: np.ndarray, angle: float, cell: float) -> tuple[np.ndarray, int]:
    """Ids 0..n-1 of the `cell`-sized squares of a rotated grid (buildings, plots) in `mask`."""
    u, v = _frame(size, angle)
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
    local, n = _blocks(size, meadow, rng.uniform(0, np.pi), 24.0)
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
    u, v = _frame(size, angle, *centre)
    ra, rb = rng.uniform(8, 28), rng.uniform(6, 20)
    town = (u / ra) ** 2 + (v / rb) ** 2 < 1 + 0.35 * smooth_noise(rng, size, 4.0)
    spacing = rng.uniform(6, 11, 2)
    streets = town & ((np.mod(u, spacing[0]) < 1.1) | (np.mod(v, spacing[1]) < 1.1))
    local, n = _blocks(size, town, angle, float(spacing.mean()) / 2)
    cls = np.where(rng.random(n) < 0.82, URBAN, GRASS)
    scene.paint(town, scene.regions(rng, cls), local)
    scene.paint(streets, scene.regions(rng, [ROAD]))


def _add_water(rng: np.random.Generator, scene: Scene) -> None:
    """A meandering river (40%) and/or a lake (25%)."""
    size = scene.rid.shape[0]
    if rng.random() < 0.4:
        u, v = _frame(size, rng.uniform(0, np.pi))
        amp, wave, phase = rng.uniform(2, 10), rng.uniform(40, 120), rng.uniform(0, 2 * np.pi)
        wiggle = rng.uniform(0, 3) * np.sin(2 * np.pi * u / rng.uniform(12, 25) + phase)
        centre = rng.uniform(-0.3, 0.3) * size + amp * np.sin(2 * np.pi * u / wave + phase)
        scene.paint(np.abs(v - centre - wiggle) < rng.uniform(1.5, 4), scene.regions(rng, [WATER]))
    if rng.random() < 0.25:
        yy, xx = _grid(size)
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
        scene.paint(np.abs(_frame(size, angle)[1] - offset) < width / 2, scene.regions(rng, [ROAD]))
    return scene


def _psf(a: np.ndarray) -> np.ndarray:
    """Blur the first two axes with [w, 1-2w, w] (edges repeated): a soft sensor PSF."""
    w = 0.11
    for axis in (0, 1):
        a = np.moveaxis(a, axis, 0)
        out = a * (1 - 2 * w)
        out[1:] += w * a[:-1]
        out[:-1] += w * a[1:]
        out[0] += w * a[0]
        out[-1] += w * a[-1]
        a = np.moveaxis(out, 0, axis)
    return a


def render(rng: np.random.Generator, scene: Scene, table: BandTable) -> np.ndarray:
    """One acquisition of `scene`: reflectance x 10000 as uint16 (C, H, W), clipped to 1..10000."""
    t, rid, size = scene.table, scene.rid, scene.rid.shape[0]
    cls = t.cls[rid]
    abund = t.abund[rid]
    vigour = (VIGOUR[cls] * scene.vigour)[..., None]
    abund = np.maximum(abund + vigour * (GREEN - abund), 0)
    gain = t.gain[rid] * (1 + ROUGHNESS[cls] * scene.bright)
    mixed = _psf(abund * gain[..., None]).reshape(-1, abund.shape[-1])
    tilt = _psf(t.tilt[rid][..., None]).reshape(-1, 1)
    # One matrix product gives mixture x spectra, the per-region spectral tilt and the
    # acquisition (calibration gain with a slight slope, residual Rayleigh-like haze), in DN.
    ramp = (table.wavelength_nm - 1000) / 1500
    band_gain = 10_000 * rng.normal(1.0, 0.03) * (1 + rng.normal(0.0, 0.02) * ramp)
    haze = 10_000 * rng.uniform(0.0, 0.01) * (490 / table.wavelength_nm) ** 4
    spectra = table.endmembers * band_gain
    design = np.concatenate([mixed, mixed * tilt, np.ones_like(tilt)], axis=1)
    weights = np.concatenate([spectra, spectra * ramp, haze[None]], axis=0)
    # einsum, not `@`: a BLAS product sums in an order that depends on its thread count, and
    # that moved ~3 values per 64 px scene by 1 DN between 1 and 2 threads (ours).
    dn = np.einsum("kc,pk->cp", weights, design).astype(np.float32)  # (C, H * W)
    # Sensor noise: 20 DN plus 1% of the signal, more in the low-SNR water-vapour windows.
    noise = _unit_noise(rng, dn.shape)
    noise *= (0.01 * dn + 20) * table.noise[:, None]
    dn += noise
    np.clip(dn, 1, 10_000, out=dn)
    dn += 0.5  # round half up on the cast
    return np.asarray(dn.astype(np.uint16).reshape(-1, size, size))


def _unit_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-mean, unit-std triangular noise: the sum of two uniform bytes, 4x faster than
    `standard_normal` and close enough to Gaussian for sensor noise."""
    pair = np.frombuffer(rng.bytes(2 * int(np.prod(shape))), dtype=np.int8).reshape(2, *shape)
    return np.asarray((pair[0].astype(np.int16) + pair[1] + 1) * np.float32(1 / 104.5))


def _pick(rng: np.random.Generator, eligible: np.ndarray) -> tuple[float, float] | None:
    """Centred (x, y) of a random pixel of `eligible`, or None when there is none."""
    flat = np.flatnonzero(eligible)
    if flat.size == 0:
        return None
    i = flat[rng.integers(flat.size)]
    yy, xx = _grid(eligible.shape[0])
    return float(xx.flat[i]), float(yy.flat[i])


def _build(rng: np.random.Generator, scene: Scene) -> bool:
    """New buildings (and a construction plot) on farmland."""
    label = scene.labels()
    eligible = np.isin(label, (CROP, GRASS, SOIL))
    near = eligible & _dilate(np.isin(label, (ROAD, URBAN)), 6)
    centre = _pick(rng, near if near.any() and rng.random() < 0.7 else eligible)  # towns grow
    if centre is None:
        return False
    size, angle = eligible.shape[0], scene.theta + rng.choice([0, np.pi / 2])
    mask = _rect(size, centre, angle, rng.uniform(3, 7), rng.uniform(2.5, 6)) & eligible
    local, n = _blocks(size, mask, angle, 3.0)
    scene.paint(mask, scene.regions(rng, np.where(rng.random(n) < 0.8, URBAN, SOIL)), local)
    return True


def _clear(rng: np.random.Generator, scene: Scene) -> bool:
    """A forest clear-cut: a rectangle of forest becomes bare soil."""
    eligible = scene.labels() == FOREST
    centre = _pick(rng, eligible)
    if centre is None:
        return False
    size, angle = eligible.shape[0], scene.theta + rng.uniform(-0.3, 0.3)
    mask = _rect(size, centre, angle, rng.uniform(3, 8), rng.uniform(2, 6)) & eligible
    scene.paint(mask, scene.regions(rng, [SOIL]))
    return True


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        mask = grown
    return mask


def _flood(rng: np.random.Generator, scene: Scene) -> bool:
    """Flooding: turbid water over the land next to a river or lake, within a disc."""
    label = scene.labels()
    water = label == WATER
    shore = _dilate(water, int(rng.integers(1, 4))) & ~water & (label != URBAN)
    centre = _pick(rng, shore)
    if centre is None:
        return False
    yy, xx = _grid(label.shape[0])
    disc = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 < rng.uniform(6, 14) ** 2
    scene.paint(shore & disc, turbid_water(rng))
    return True


CHANGE_EVENTS: list[tuple[float, Callable[[np.random.Generator, Scene], bool]]] = [
    (0.5, _build),
    (0.25, _clear),
    (0.25, _flood),
]


def evolve(rng: np.random.Generator, scene: Scene) -> None:
    """Between two dates: unlabelled crop phenology and brightness drift, then change events."""
    t = scene.table
    regrown = np.flatnonzero((t.cls == CROP) & (rng.random(t.cls.size) < 0.35))
    t.abund[regrown] = mixtures(rng, CROP, regrown.size, scene.variant)
    t.gain *= rng.normal(1.0, 0.02, t.gain.size).astype(np.float32)
    size = scene.rid.shape[0]
    for _ in range(rng.poisson(CHANGE_EVENTS_PER_64PX * (size / 64) ** 2)):
        _, event = CHANGE_EVENTS[rng.choice(len(CHANGE_EVENTS), p=[p for p, _ in CHANGE_EVENTS])]
        if not event(rng, scene):
            _build(rng, scene)  # nothing of that kind in the scene: build instead


def make_sample(
    seed: int, index: int, task: str, size: int, band_set: str, variant: str = "standard"
) -> dict[str, np.ndarray]:
    """The arrays of demo sample `index`: a function of (seed, index) and the options only.

    The first acquisition of a `cd` pair is the `ss` image of the same (seed, index).
    """
    rng = np.random.default_rng([seed, index])
    table = band_table(band_set)
    scene = make_scene(rng, size, VARIANTS[variant])
    image, label = render(rng, scene, table), scene.labels()
    if task == "ss":
        return {"image": image, "mask": label}
    evolve(rng, scene)
    image_t2 = render(rng, scene, table)
    change = (scene.labels() != label).astype(np.uint8)
    return {"image_t1": image, "image_t2": image_t2, "change": change}


def split_of(seed: int, index: int, val_fraction: float, test_fraction: float) -> str:
    """train/val/test from a hash of (seed, index): stable whatever n is."""
    digest = hashlib.blake2b(f"demo:{seed}:{index}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def _validate(options: PrepareOptions) -> None:
    checks = [
        (options.task in ("ss", "cd"), f"unknown task {options.task!r}", "use ss or cd"),
        (options.band_set in BAND_SETS, f"unknown band set {options.band_set!r}", "use s2 or hsi"),
        (options.n >= 1, f"--n must be at least 1 (got {options.n})", "pass --n 1 or more"),
        (
            options.size >= 8 and options.size % 8 == 0,
            f"--size must be a positive multiple of 8 (got {options.size})",
            "e.g. --size 64",
        ),
        (options.seed >= 0, f"--seed must be >= 0 (got {options.seed})", "pass a seed >= 0"),
    ]
    for ok, message, hint in checks:
        if not ok:
            raise UsageError(message, hint=hint)


def spec_of(options: PrepareOptions) -> SourceSpec:
    """The SourceSpec of a demo store with these options."""
    table = band_table(options.band_set)
    if options.band_set == "s2":
        bands, rgb = s2_bands(table.names), list(S2_RGB_BANDS)
    else:
        bands = [
            Band(name=n, wavelength_nm=float(w), fwhm_nm=float(f))
            for n, w, f in zip(table.names, table.wavelength_nm, table.fwhm_nm, strict=True)
        ]
        rgb = [
            table.names[int(np.argmin(np.abs(table.wavelength_nm - w)))] for w in (665, 560, 490)
        ]
    details = {
        "band_set": options.band_set,
        "variant": options.demo_variant or "standard",
        "spectra": SPECTRA_SOURCE,
        "pixel_size_m": 10,
        "splits": "hash of (seed, index) against val_fraction and test_fraction",
    }
    return SourceSpec(
        dataset="demo",
        task=options.task,
        bands=bands,
        classes=SS_CLASSES if options.task == "ss" else CD_CLASSES,
        dtype="uint16",
        height=options.size,
        width=options.size,
        rgb_bands=rgb,
        band_order_source=table.band_source,
        details=details,
    )


def read_demo(raw: Path | None, options: PrepareOptions) -> SourcePlan:
    """Plan `options.n` synthetic land-cover samples; `raw` is not used (nothing to read).

    Uses task, n, size, seed, band_set ("s2" or "hsi"), val_fraction and test_fraction; sample
    i is drawn from `np.random.default_rng([seed, i])` and its split from a hash of (seed, i).

    Raises:
        UsageError: n < 1, size not a positive multiple of 8, an unknown task or band set,
            a negative seed, or split fractions out of range.
    """
    _validate(options)
    candidates = [
        Candidate(
            f"demo/{i:06d}",
            split_of(options.seed, i, options.val_fraction, options.test_fraction),
            i,
        )
        for i in range(options.n)
    ]

    def load(candidate: Candidate) -> RawSample:
        arrays = make_sample(
            options.seed, int(candidate.ref), options.task, options.size, options.band_set,
            options.demo_variant or "standard",
        )  # fmt: skip
        return RawSample(candidate.source_id, candidate.split, arrays)

    return SourcePlan(spec=spec_of(options), candidates=candidates, load=load)
