"""A demo scene between two dates: crop phenology, brightness drift and change events
(new buildings, clear-cuts, floods), for change-detection pairs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from specdm_cli.sources.demo.scenes import Scene, blocks, grid, rect
from specdm_cli.sources.demo.spectra import (
    CROP,
    FOREST,
    GRASS,
    ROAD,
    SOIL,
    URBAN,
    WATER,
    mixtures,
    turbid_water,
)

# Mean land-cover change events per 64 x 64 pair (Poisson): ~20% of pairs have none and the
# changed share averages about 2.5% of pixels (OSCD: ~2.3%).
CHANGE_EVENTS_PER_64PX = 1.6


def _pick(rng: np.random.Generator, eligible: np.ndarray) -> tuple[float, float] | None:
    """Centred (x, y) of a random pixel of `eligible`, or None when there is none."""
    flat = np.flatnonzero(eligible)
    if flat.size == 0:
        return None
    i = flat[rng.integers(flat.size)]
    yy, xx = grid(eligible.shape[0])
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
    mask = rect(size, centre, angle, rng.uniform(3, 7), rng.uniform(2.5, 6)) & eligible
    local, n = blocks(size, mask, angle, 3.0)
    scene.paint(mask, scene.regions(rng, np.where(rng.random(n) < 0.8, URBAN, SOIL)), local)
    return True


def _clear(rng: np.random.Generator, scene: Scene) -> bool:
    """A forest clear-cut: a rectangle of forest becomes bare soil."""
    eligible = scene.labels() == FOREST
    centre = _pick(rng, eligible)
    if centre is None:
        return False
    size, angle = eligible.shape[0], scene.theta + rng.uniform(-0.3, 0.3)
    mask = rect(size, centre, angle, rng.uniform(3, 8), rng.uniform(2, 6)) & eligible
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
    yy, xx = grid(label.shape[0])
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
