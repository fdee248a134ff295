"""`prepare geotiff` on the files real folders hold: JPEG images, companions of ENVI data,
names in two Unicode forms, custom CRSs spelled two ways, and thousands of tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from specdm_cli.stores import open_store
from tests.conftest import run_cli
from tests.fault_tools import assert_one_error_line


def _rgb(seed: int, size: int = 16) -> np.ndarray:
    # Values 1..254: no pixel is blank or 255.
    return np.random.default_rng(seed).integers(1, 255, (size, size, 3), dtype=np.uint8)


def _codes(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).choice(np.array([1, 2], np.uint8), (size, size))


def _prepare(raw: Path, out: Path, *extra: str) -> tuple[int, str]:
    code, _, stderr = run_cli("prepare", "geotiff", raw, "--out", out, "-q", *extra)
    return code, stderr


def _folders(root: Path) -> tuple[Path, Path]:
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    return images, masks


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".JPG"])
def test_jpeg_images_pair_with_png_masks(tmp_path: Path, suffix: str) -> None:
    """DeepGlobe's layout: JPEG satellite images, PNG masks; one image saved as .jpeg among
    PNG ones pairs as well."""
    images, masks = _folders(tmp_path / "raw")
    for i, stem in enumerate(["a", "b"]):
        image = images / f"{stem}{suffix if stem == 'a' else '.png'}"
        Image.fromarray(_rgb(i)).save(image, **({"quality": 95} if image.suffix != ".png" else {}))
        Image.fromarray(_codes(i)).save(masks / f"{stem}.png")
    code, stderr = _prepare(tmp_path / "raw", tmp_path / "s.zarr", "--patch-size", "16")
    assert code == 0, stderr
    store = open_store(tmp_path / "s.zarr")
    assert sorted(store.source_ids() or []) == ["a", "b"]
    assert store.manifest.dtype == "uint8" and len(store.manifest.bands) == 3


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg"])
def test_a_jpeg_mask_is_refused_as_lossy(tmp_path: Path, suffix: str) -> None:
    images, masks = _folders(tmp_path / "raw")
    Image.fromarray(_rgb(0)).save(images / "a.png")
    Image.fromarray(_codes(0)).save(masks / f"a{suffix}")
    code, stderr = _prepare(tmp_path / "raw", tmp_path / "s.zarr")
    assert_one_error_line(code, stderr, 3, f"({masks / f'a{suffix}'})")
    assert "lossy" in stderr and "PNG or GeoTIFF" in stderr
    assert not (tmp_path / "s.zarr").exists()
