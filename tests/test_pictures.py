"""Pictures a person can read: the --preview grid's title and class legend, the cd change
outline on t2, and the benchmark figures' class-colour legend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from specdm_cli.manifest import IGNORE_INDEX
from specdm_cli.pipeline.benchmark.figures import sample_grid
from specdm_cli.pipeline.synthesize.preview import (
    LINE,
    OUTLINE,
    colour_mask,
    title_lines,
    write_preview,
)
from specdm_cli.stores import open_store
from tests.conftest import prepare_demo, run_cli


def has_colour(pixels: np.ndarray, colour: tuple[int, ...], tolerance: int = 0) -> bool:
    close = np.abs(pixels[..., :3].astype(int) - np.asarray(colour[:3])) <= tolerance
    return bool(close.all(axis=-1).any())


def grid_height(samples: int, size: int) -> int:
    """The scaled grid of write_preview: pairs of samples per row, 2 px between rows."""
    rows = -(-samples // 2)
    return (rows * size + 2 * (rows - 1)) * max(1, 256 // size)


def test_preview_has_a_title_and_a_legend_of_every_class(tmp_path: Path) -> None:
    out, png = tmp_path / "syn.zarr", tmp_path / "p.png"
    code, _, stderr = run_cli("synthesize", "--model", "demo", "--task", "ss", "--n", "4",
                              "--steps", "2", "--out", out, "--preview", png, "-q")  # fmt: skip
    assert code == 0, stderr
    manifest = open_store(out).manifest
    titles = title_lines(manifest)
    assert "seed 0" in titles[0] and "2 steps" in titles[0] and manifest.model is not None
    assert titles[0].startswith(manifest.model.run_id)
    assert titles[1].endswith("red, green, blue = B04, B03, B02")  # the demo's Sentinel-2 bands
    pixels = np.asarray(Image.open(png).convert("RGB"))
    top = len(titles) * LINE + 6
    assert (pixels[:top] < 128).any()  # the title is drawn
    legend = pixels[top + grid_height(4, manifest.height) :]
    assert legend.shape[0] >= LINE
    for info in manifest.classes:
        assert has_colour(legend, info.colour), info.name


def test_a_preview_path_that_would_destroy_a_file_is_refused_before_sampling(
    tmp_path: Path,
) -> None:
    """It replaced a run's run.json, the new store's manifest, any file, with exit 0; and
    wrote a PNG under any name (`p.jpg`)."""
    out, notes, folder = tmp_path / "syn.zarr", tmp_path / "notes.png", tmp_path / "dir.png"
    notes.write_text("mine")
    folder.mkdir()
    # The last: a folder on its path is a file, which failed the write after sampling.
    cases = {out / "manifest.json": "overlaps", tmp_path / "p.jpg": "the picture is a PNG",
             notes: "a file other than a PNG", folder: "is a folder",
             notes / "p.png": "is a file, not a folder"}  # fmt: skip
    for preview, words in cases.items():
        code, _, stderr = run_cli("synthesize", "--model", "demo", "--task", "ss", "--n", "2",
                                  "--steps", "2", "--out", out, "--preview", preview, "-q")  # fmt: skip
        assert code == 2 and stderr.startswith("error:") and words in stderr, (preview, stderr)
        assert not out.exists()
    assert notes.read_text() == "mine" and not (tmp_path / "p.jpg").exists()
    # A picture there before (the same command again) is replaced.
    png = tmp_path / "p.png"
    Image.new("RGB", (2, 2)).save(png)
    code, _, stderr = run_cli("synthesize", "--model", "demo", "--task", "ss", "--n", "2",
                              "--steps", "2", "--out", out, "--preview", png, "-q")  # fmt: skip
    assert code == 0, stderr
    assert Image.open(png).size != (2, 2)


def test_cd_preview_outlines_the_change_on_t2(tmp_path: Path) -> None:
    store = prepare_demo(tmp_path / "cd.zarr", task="cd", n=16, size=32)
    reader = open_store(store)
    changed = [i for i in reader.indices() if reader.read(int(i))["change"].any()][:2]
    assert changed, "the demo scenes have changes"
    samples = [reader.read(int(i)) for i in changed]
    png = tmp_path / "cd.png"
    write_preview(png, samples, reader.manifest)
    pixels = np.asarray(Image.open(png).convert("RGB"))
    top = len(title_lines(reader.manifest)) * LINE + 6
    grid = pixels[top : top + grid_height(len(samples), 32)]
    scale = 256 // 32
    t1 = grid[:, : 32 * scale]
    t2 = grid[:, (32 + 2) * scale : (64 + 2) * scale]
    assert has_colour(t2, OUTLINE) and not has_colour(t1, OUTLINE)
    assert has_colour(pixels[top + grid.shape[0] :], OUTLINE)  # and the legend names it


@pytest.mark.parametrize("task", ["ss", "cd"])
def test_benchmark_sample_figure_has_a_class_colour_legend(tmp_path: Path, task: str) -> None:
    real = open_store(prepare_demo(tmp_path / "real.zarr", task=task, n=8, size=16))
    other = open_store(
        prepare_demo(tmp_path / "other.zarr", "--seed", "3", task=task, n=8, size=16)
    )
    name = sample_grid(tmp_path, real, other, rows=2)
    pixels = np.asarray(Image.open(tmp_path / name).convert("RGB"))
    # Under the last axes: the legend of the mask colours only.
    below = pixels[int(pixels.shape[0] * 0.8) :]
    for info in real.manifest.classes:
        if tuple(info.colour) != (255, 255, 255):  # white on the white page: the edge shows it
            assert has_colour(below, info.colour, tolerance=2), info.name


@pytest.mark.parametrize("task", ["ss", "cd"])
def test_ignored_pixels_do_not_look_like_any_class(tmp_path: Path, task: str) -> None:
    reader = open_store(prepare_demo(tmp_path / "real.zarr", task=task, n=4, size=16))
    sample = reader.read(0)
    label = "mask" if task == "ss" else "change"
    sample[label][:4] = IGNORE_INDEX
    png = tmp_path / "p.png"
    write_preview(png, [sample], reader.manifest)
    ignored = np.asarray(colour_mask(sample[label], reader.manifest)[0, 0], dtype=float)
    # The demo's road grey was 8 levels from the old fixed grey of ignored pixels.
    used = [info.colour for info in reader.manifest.classes] + [OUTLINE]
    assert min(np.linalg.norm(ignored - np.asarray(c)) for c in used) > 100
    legend = np.asarray(Image.open(png).convert("RGB"))[-3 * LINE :]
    assert has_colour(legend, tuple(int(v) for v in ignored))
