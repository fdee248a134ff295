"""One acquisition of a demo scene: mixtures x spectra, texture, a soft PSF, gain, haze and
sensor noise, as reflectance x 10000 (uint16)."""

from __future__ import annotations

import numpy as np

from specdm_cli.sources.demo.scenes import Scene
from specdm_cli.sources.demo.spectra import GREEN, ROUGHNESS, VIGOUR, BandTable


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
