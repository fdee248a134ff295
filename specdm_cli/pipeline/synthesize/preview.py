"""`--preview PNG`: a grid of the first samples (RGB with a robust stretch beside coloured masks),
under a title (model, seed, sampler, the bands shown as RGB) and over a class legend."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from specdm_cli.errors import UsageError
from specdm_cli.fs.atomic import atomic_write_bytes
from specdm_cli.fs.paths import refuse_overlap
from specdm_cli.manifest import IGNORE_INDEX, IMAGE_ARRAYS, LABEL_ARRAY, Manifest


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


# Drawn around the changed pixels of t2: a colour that no class and no RGB stretch uses much.
OUTLINE = (255, 0, 255)
# Ignored pixels take whichever of these lies farthest from every class colour: a fixed grey
# was the demo's road grey within 8 levels, so ignored pixels looked like roads.
IGNORE_CANDIDATES = ((128, 128, 128), (255, 255, 255), (0, 0, 0), (0, 255, 255), (255, 255, 0))


def ignore_colour(manifest: Manifest) -> tuple[int, int, int]:
    """The colour of ignored pixels: the candidate farthest from the classes' and the outline's."""
    used = np.array([info.colour for info in manifest.classes] + [OUTLINE], dtype=np.float64)
    distances = [np.linalg.norm(used - candidate, axis=1).min() for candidate in IGNORE_CANDIDATES]
    return IGNORE_CANDIDATES[int(np.argmax(distances))]


def colour_mask(label: np.ndarray, manifest: Manifest) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 in the manifest's class colours, ignored pixels
    in `ignore_colour`."""
    palette = np.tile(np.array(ignore_colour(manifest), dtype=np.uint8), (256, 1))
    for info in manifest.classes:
        palette[info.index] = info.colour
    coloured: np.ndarray = palette[label]
    return coloured


def outline(label: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels of class >= 1 (changed) with a 4-neighbour that is not."""
    changed = (label >= 1) & (label != IGNORE_INDEX)
    padded = np.pad(changed, 1, mode="edge")
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & changed
    edge: np.ndarray = changed & ~inner
    return edge


def preview_row(sample: dict[str, np.ndarray], manifest: Manifest) -> np.ndarray:
    """One row of the grid: ss image | mask; cd t1 | t2 (change outlined) | change."""
    bands = rgb_indices(manifest)
    tiles = [stretch(sample[name], bands) for name in IMAGE_ARRAYS[manifest.task]]
    label = sample[LABEL_ARRAY[manifest.task]]
    if manifest.task == "cd":
        tiles[-1][outline(label)] = OUTLINE
    tiles.append(colour_mask(label, manifest))
    gap = np.full((manifest.height, 2, 3), 255, dtype=np.uint8)
    return np.concatenate([part for tile in tiles for part in (tile, gap)][:-1], axis=1)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_preview_path(path: Path, inputs: dict[str, Path | None]) -> None:
    """Before any sampling: the picture goes neither into an input nor the store (it replaced
    a run's run.json, or the new store's manifest), nor over a file that is not a picture."""
    refuse_overlap(path, inputs)
    if path.suffix.lower() != ".png":  # a PNG it is: `p.jpg` held one that viewers misread
        raise UsageError(
            f"--preview {path}: the picture is a PNG", hint="choose a file name ending in .png"
        )
    if path.is_dir() or (path.exists() and not _holds_png(path)):
        raise UsageError(
            f"--preview {path} is {'a folder' if path.is_dir() else 'a file other than a PNG'}, "
            "which the picture would replace",
            hint="choose a new file name ending in .png",
        )
    # The nearest existing folder above it: a file there (`--preview notes.txt/p.png`) would
    # fail the write only after every sample was drawn.
    above = next((folder for folder in path.absolute().parents if folder.exists()), None)
    if above is not None and not above.is_dir():
        raise UsageError(
            f"--preview {path}: {above} is a file, not a folder the picture can go in",
            hint="choose a path whose folders are folders",
        )


def _holds_png(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(len(_PNG_SIGNATURE)) == _PNG_SIGNATURE
    except OSError:
        return False


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
    labels = np.stack([sample[LABEL_ARRAY[manifest.task]] for sample in samples])
    framed = _framed(picture, title_lines(manifest), legend_entries(manifest, labels))
    buffer = BytesIO()
    framed.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


FONT_SIZE = 14
LINE = FONT_SIZE + 6  # pixels per text line
SWATCH = 14


def title_lines(manifest: Manifest) -> list[str]:
    """What the grid shows: the model and how it sampled, the columns, the bands shown as RGB."""
    model = manifest.model
    made = (
        f"{model.run_id} ({model.kind}), seed {model.seed}, {model.sampler} {model.steps} steps"
        if model is not None
        else f"{manifest.source.dataset if manifest.source else 'store'} ({manifest.count} pairs)"
    )
    columns = "image | mask" if manifest.task == "ss" else "t1 | t2 (change outlined) | change"
    rgb = ", ".join(manifest.bands[i].name for i in rgb_indices(manifest))
    return [made, f"each pair: {columns}; red, green, blue = {rgb}"]


def legend_entries(manifest: Manifest, labels: np.ndarray) -> list[tuple[tuple[int, ...], str]]:
    """(colour, name) of every class, the cd outline, and "ignore" where pixels have it."""
    entries = [(tuple(c.colour), c.name) for c in sorted(manifest.classes, key=lambda c: c.index)]
    if manifest.task == "cd":
        entries.append((OUTLINE, "change outline on t2"))
    if (labels == IGNORE_INDEX).any():
        entries.append((ignore_colour(manifest), "ignore"))
    return entries


def _framed(
    picture: Image.Image, titles: list[str], legend: list[tuple[tuple[int, ...], str]]
) -> Image.Image:
    """`picture` with the title lines above and the legend (wrapped to its width) below."""
    font = ImageFont.load_default(size=FONT_SIZE)
    width = max(picture.width, 320)
    placed, x, y = [], 8, 0  # legend entries: (x, y) of each swatch, wrapped into lines
    for _colour, name in legend:
        step = SWATCH + 6 + int(font.getlength(name)) + 16
        if x + step > width and x > 8:
            x, y = 8, y + LINE
        placed.append((x, y))
        x += step
    top, bottom = len(titles) * LINE + 6, y + LINE + 8
    framed = Image.new("RGB", (width, top + picture.height + bottom), "white")
    framed.paste(picture, (0, top))
    draw = ImageDraw.Draw(framed)
    for n, text in enumerate(titles):
        draw.text((8, 4 + n * LINE), text, fill="black", font=font)
    base = top + picture.height + 6
    for (colour, name), (x, y) in zip(legend, placed, strict=True):
        box = (x, base + y + 2, x + SWATCH - 1, base + y + 1 + SWATCH)
        draw.rectangle(box, fill=tuple(colour), outline="black")
        draw.text((x + SWATCH + 6, base + y), name, fill="black", font=font)
    return framed
