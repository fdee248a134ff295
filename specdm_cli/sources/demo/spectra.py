"""Land-cover classes of the `demo` source and their spectra: endmember table, class recipes
and the endmember spectra integrated over the `s2` and `hsi` band sets."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from specdm_cli.manifest import ClassInfo
from specdm_cli.sources.sentinel2 import S2_BAND_SOURCE, S2_FWHM_NM, S2_TEN_BANDS, S2_WAVELENGTH_NM

WATER, FOREST, CROP, GRASS, SOIL, ROAD, URBAN = range(7)
SS_CLASSES = [
    ClassInfo(index=i, name=name, colour=colour, code=i)
    for i, (name, colour) in enumerate(
        [
            ("water", (30, 100, 200)),
            ("forest", (20, 100, 40)),
            ("cropland", (235, 200, 60)),
            ("grassland", (140, 215, 90)),
            ("bare soil", (165, 115, 65)),
            ("road", (120, 120, 120)),
            ("urban", (220, 40, 40)),
        ]
    )
]
CD_CLASSES = [
    ClassInfo(index=0, name="no change", colour=(0, 0, 0), code=0),
    ClassInfo(index=1, name="change", colour=(255, 255, 255), code=1),
]
BAND_SETS = ("s2", "hsi")

# Typical surface reflectance (0..1) at the anchor wavelengths, read off the well-known shapes of
# the USGS Spectral Library v7 (splib07) and ECOSTRESS (ex-ASTER) library spectra of each
# material: water, green and senescent vegetation, loam soils, asphalt, concrete, clay tiles.
# The numbers are representative, not measured and not copied from any one spectrum; they keep
# the features a model should learn: the green peak, red edge, NIR plateau, leaf-water dips at
# 1450/1950 nm, cellulose and clay features near 2100/2200 nm, water dark past 900 nm.
# fmt: off
ANCHOR_NM = np.array([400, 450, 500, 550, 600, 650, 680, 700, 720, 750, 800, 900, 1000,
                      1100, 1200, 1300, 1400, 1450, 1500, 1650, 1800, 1950, 2100, 2200, 2300, 2500],
                     dtype=np.float64)
ENDMEMBERS: dict[str, tuple[float, ...]] = {
    "water": (.050, .055, .060, .055, .040, .028, .024, .020, .015, .012, .010, .006, .004,
              .003, .002, .002, .001, .001, .001, .001, .001, .001, .001, .001, .001, .001),
    "turbid": (.040, .050, .065, .085, .080, .070, .065, .060, .045, .035, .025, .012, .006,
               .004, .003, .002, .001, .001, .001, .002, .002, .001, .002, .002, .002, .001),
    "forest": (.020, .025, .032, .060, .042, .030, .026, .050, .140, .280, .330, .340, .330,
               .320, .270, .280, .160, .090, .120, .180, .150, .040, .080, .090, .070, .030),
    "green": (.030, .035, .045, .095, .065, .045, .038, .080, .210, .400, .460, .470, .460,
              .450, .380, .400, .240, .140, .190, .300, .250, .060, .140, .170, .130, .060),
    "dry": (.050, .065, .085, .115, .145, .170, .180, .195, .215, .245, .280, .310, .330,
            .350, .355, .370, .300, .240, .290, .390, .370, .180, .270, .310, .260, .180),
    "soil": (.060, .080, .100, .130, .170, .200, .210, .220, .230, .240, .260, .280, .300,
             .320, .330, .350, .320, .300, .340, .380, .390, .300, .370, .360, .350, .320),
    "dark_soil": (.030, .040, .050, .065, .085, .100, .105, .110, .115, .120, .130, .140, .150,
                  .160, .165, .170, .140, .120, .150, .180, .180, .120, .160, .150, .145, .120),
    "asphalt": (.050, .055, .062, .070, .076, .082, .085, .087, .089, .092, .097, .105, .110,
                .115, .118, .122, .118, .115, .122, .130, .132, .120, .130, .130, .126, .120),
    "concrete": (.150, .200, .240, .270, .285, .295, .300, .305, .308, .312, .320, .330, .340,
                 .345, .350, .352, .330, .320, .340, .360, .350, .300, .330, .320, .310, .280),
    "tile": (.060, .060, .070, .090, .160, .250, .280, .300, .310, .330, .350, .380, .400,
             .420, .430, .440, .420, .410, .430, .450, .460, .420, .440, .430, .420, .400),
    # Photometric shade (spectral mixture analysis): the shadows between buildings and crowns.
    "shade": (0.0,) * 26,
}
# fmt: on
_EM = {name: i for i, name in enumerate(ENDMEMBERS)}
SPECTRA_SOURCE = (
    "demo endmember table: representative shapes after the USGS splib07 and ECOSTRESS "
    "spectral libraries (not measured values)"
)

# Per class: (probability, {endmember: (low, high) fraction before normalising}) options.
Recipe = list[tuple[float, dict[str, tuple[float, float]]]]
# fmt: off
RECIPES: dict[int, Recipe] = {
    WATER: [(1.0, {"water": (0.3, 1.0), "turbid": (0.0, 0.7)})],
    FOREST: [(1.0, {"forest": (0.85, 1.0), "green": (0.0, 0.15), "shade": (0.0, 0.15)})],
    CROP: [  # growing, emerging, ripening or stubble: parcels differ by phenology
        (0.5, {"green": (0.6, 0.95), "dark_soil": (0.0, 0.3), "soil": (0.0, 0.15)}),
        (0.25, {"green": (0.1, 0.4), "dark_soil": (0.3, 0.6), "soil": (0.1, 0.4)}),
        (0.25, {"dry": (0.4, 0.85), "green": (0.05, 0.3), "soil": (0.0, 0.3)}),
    ],
    GRASS: [(1.0, {"green": (0.55, 0.85), "dry": (0.1, 0.4), "soil": (0.0, 0.05)})],
    SOIL: [(1.0, {"soil": (0.0, 1.0), "dark_soil": (0.0, 1.0), "dry": (0.0, 0.1)})],
    ROAD: [(1.0, {"asphalt": (0.65, 0.95), "concrete": (0.0, 0.2), "green": (0.0, 0.15)})],
    URBAN: [  # 10 m pixels mix roofs, paving, gardens and shadow: dense, residential, industrial
        (0.4, {"concrete": (.3, .6), "asphalt": (.2, .4), "tile": (0, .3), "green": (0, .15),
               "shade": (.1, .35)}),
        (0.4, {"tile": (.25, .5), "concrete": (.1, .3), "asphalt": (.1, .3), "green": (.1, .35),
               "shade": (.1, .35)}),
        (0.2, {"asphalt": (.3, .6), "concrete": (.2, .5), "green": (0, .1), "shade": (.1, .35)}),
    ],
}
# The `hard` variant (issue 20: a demo with headroom): cropland, grassland and bare soil mix the
# same endmembers over overlapping ranges, so a pixel's spectrum alone no longer tells them
# apart (emerging crop looks like soil, growing and ripening crop like meadow); grassland is
# laid out as ragged meadows instead of parcels, so the shape of a region is the cue.
HARD_RECIPES: dict[int, Recipe] = {
    CROP: [
        (0.4, {"green": (0.45, 0.85), "dry": (0.05, 0.35), "dark_soil": (0.0, 0.2)}),
        (0.3, {"green": (0.1, 0.4), "dark_soil": (0.2, 0.6), "soil": (0.1, 0.5)}),
        (0.3, {"dry": (0.35, 0.8), "green": (0.1, 0.45), "soil": (0.0, 0.2)}),
    ],
    GRASS: [(1.0, {"green": (0.4, 0.85), "dry": (0.1, 0.55), "soil": (0.0, 0.15)})],
    SOIL: [(1.0, {"soil": (0.0, 1.0), "dark_soil": (0.0, 1.0), "dry": (0.0, 0.3), "green": (0.0, 0.25)})],
}
# fmt: on


@dataclass(frozen=True)
class Variant:
    """How a demo scene's regions vary: class recipes and the spread of brightness and slope
    between regions of one class."""

    name: str
    recipes: dict[int, Recipe]
    gain_sd: float
    tilt_sd: float
    meadows: bool  # grassland as ragged meadows over the fields, not as parcels


STANDARD = Variant("standard", RECIPES, gain_sd=0.05, tilt_sd=0.04, meadows=False)
# Twice the standard spread between parcels of one class: acquisition and management differ.
HARD = Variant("hard", {**RECIPES, **HARD_RECIPES}, gain_sd=0.10, tilt_sd=0.08, meadows=True)
VARIANTS = {variant.name: variant for variant in (STANDARD, HARD)}

# Per class: amplitude of in-region brightness texture and of vigour (greenness) variation.
ROUGHNESS = np.array([0.02, 0.12, 0.03, 0.04, 0.05, 0.04, 0.12], dtype=np.float32)
VIGOUR = np.array([0.0, 0.04, 0.15, 0.10, 0.0, 0.0, 0.10], dtype=np.float32)
GREEN = np.eye(len(ENDMEMBERS), dtype=np.float32)[_EM["green"]]


@dataclass(frozen=True)
class BandTable:
    """A band set: names, wavelengths and endmember spectra integrated over each band."""

    names: tuple[str, ...]
    wavelength_nm: np.ndarray
    fwhm_nm: np.ndarray
    endmembers: np.ndarray  # (M, C) reflectance
    noise: np.ndarray  # (C,) noise multiplier: low-SNR atmospheric windows are noisier
    band_source: str


@lru_cache(maxsize=4)
def band_table(band_set: str) -> BandTable:
    """The `s2` (10 SpecDM bands) or `hsi` (400-2500 nm every 10 nm) band table."""
    if band_set not in BAND_SETS:
        raise ValueError(f"unknown band set {band_set!r}; expected one of {BAND_SETS}")
    if band_set == "s2":
        names = S2_TEN_BANDS
        centre = np.array([S2_WAVELENGTH_NM[n] for n in names])
        fwhm = np.array([S2_FWHM_NM[n] for n in names], dtype=np.float64)
        source = S2_BAND_SOURCE
    else:
        centre = np.arange(400.0, 2501.0, 10.0)
        names = tuple(f"b{int(w):04d}" for w in centre)
        fwhm = np.full(centre.shape, 10.0)
        source = "demo hyperspectral grid: 400-2500 nm every 10 nm, Gaussian response, FWHM 10 nm"
    grid = np.arange(400.0, 2501.0, 1.0)
    fine = np.stack([np.interp(grid, ANCHOR_NM, row) for row in ENDMEMBERS.values()])
    fine = _gauss_smooth(fine, sigma_nm=8.0)  # round the corners of the piecewise-linear table
    sigma = fwhm / 2.3548
    response = np.exp(-0.5 * ((grid[None, :] - centre[:, None]) / sigma[:, None]) ** 2)
    response /= response.sum(axis=1, keepdims=True)
    # Residual water-vapour absorption after atmospheric correction makes these bands noisy.
    window = np.exp(-(((centre - 1400) / 45) ** 2)) + np.exp(-(((centre - 1900) / 60) ** 2))
    noise = 1.0 + 4.0 * window + 2.0 * (centre > 2400)
    arrays: list[np.ndarray] = [
        # einsum, not `@`: BLAS results depend on its thread count (see demo.render).
        a.astype(np.float32)
        for a in (centre, fwhm, np.einsum("eg,bg->eb", fine, response), noise)
    ]
    for array in arrays:
        array.flags.writeable = False  # shared by every thread and sample
    centre, fwhm, endmembers, noise = arrays
    return BandTable(names, centre, fwhm, endmembers, noise, source)


def _gauss_smooth(rows: np.ndarray, sigma_nm: float) -> np.ndarray:
    taps = np.arange(-3 * int(sigma_nm), 3 * int(sigma_nm) + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (taps / sigma_nm) ** 2)
    kernel /= kernel.sum()
    pad = len(taps) // 2
    padded = np.pad(rows, ((0, 0), (pad, pad)), mode="edge")
    return np.stack([np.convolve(row, kernel, mode="valid") for row in padded])


@dataclass
class Regions:
    """Per-region parameters; every pixel of a scene points at one row."""

    cls: np.ndarray  # (n,) class index
    abund: np.ndarray  # (n, M) endmember fractions
    gain: np.ndarray  # (n,) brightness
    tilt: np.ndarray  # (n,) spectral slope: parcels of one class are not spectrally identical

    def __add__(self, other: Regions) -> Regions:
        return Regions(
            *(np.concatenate([a, b]) for a, b in zip(self.astuple(), other.astuple(), strict=True))
        )

    def astuple(self) -> tuple[np.ndarray, ...]:
        """The arrays in field order."""
        return self.cls, self.abund, self.gain, self.tilt


def mixtures(rng: np.random.Generator, cls: int, k: int, variant: Variant = STANDARD) -> np.ndarray:
    """`k` random endmember mixtures (rows summing to 1) following the class's recipe."""
    options = variant.recipes[cls]
    pick = rng.choice(len(options), size=k, p=[p for p, _ in options])
    out = np.zeros((k, len(ENDMEMBERS)), dtype=np.float32)
    for j, (_, parts) in enumerate(options):
        rows = np.flatnonzero(pick == j)
        for name, (low, high) in parts.items():
            out[rows, _EM[name]] = rng.uniform(low, high, rows.size)
    return np.asarray(out / out.sum(axis=1, keepdims=True), dtype=np.float32)


def regions(
    rng: np.random.Generator, classes: np.ndarray | list[int], variant: Variant = STANDARD
) -> Regions:
    """One region per entry of `classes`, each with its own mixture, brightness and slope."""
    cls = np.asarray(classes, dtype=np.int64)
    abund = np.zeros((cls.size, len(ENDMEMBERS)), dtype=np.float32)
    for c in np.unique(cls):
        idx = np.flatnonzero(cls == c)
        abund[idx] = mixtures(rng, int(c), idx.size, variant)
    gain = rng.normal(1.0, variant.gain_sd, cls.size).astype(np.float32)
    tilt = rng.normal(0.0, variant.tilt_sd, cls.size).astype(np.float32)
    return Regions(cls, abund, gain, tilt)


def turbid_water(rng: np.random.Generator) -> Regions:
    """One water region carrying sediment, as flood water does."""
    flood = regions(rng, [WATER])
    flood.abund[:, _EM["turbid"]] += 1.0
    flood.abund /= flood.abund.sum(axis=1, keepdims=True)
    return flood
