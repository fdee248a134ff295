"""`prepare demo`: plan n demo samples, sample i a function of (seed, i) and the options only."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from specdm_cli.config import Progress
from specdm_cli.errors import UsageError
from specdm_cli.manifest import Band
from specdm_cli.sources.base import Candidate, PrepareOptions, RawSample, SourcePlan, SourceSpec
from specdm_cli.sources.demo.change import evolve
from specdm_cli.sources.demo.render import render
from specdm_cli.sources.demo.scenes import make_scene
from specdm_cli.sources.demo.spectra import (
    BAND_SETS,
    CD_CLASSES,
    SPECTRA_SOURCE,
    SS_CLASSES,
    VARIANTS,
    band_table,
)
from specdm_cli.sources.sentinel2 import S2_RGB_BANDS, s2_bands


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


def read_demo(
    raw: Path | None, options: PrepareOptions, progress: Progress | None = None
) -> SourcePlan:
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
