"""The report's PNG figures, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from specdm_cli.manifest import Manifest
from specdm_cli.pipeline.synthesize.preview import preview_row
from specdm_cli.stores import StoreReader
from specdm_cli.stores.cf import image_attributes

from .report import BenchmarkReport

# Agg before pyplot is imported: no display is needed, and none is touched.
matplotlib.use("Agg")
import matplotlib.pyplot as plt

DPI = 110


def _save(figure: Any, folder: Path, name: str) -> str:
    figure.tight_layout()
    # "tight": a legend placed under the axes (the class colours) is kept in the picture.
    figure.savefig(folder / name, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return name


def sample_grid(folder: Path, real: StoreReader, synthetic: StoreReader, rows: int = 4) -> str:
    """Real (left) and synthetic (right) pairs: RGB of each phase beside the coloured mask."""
    real_rows = [real.read(int(i)) for i in real.indices(None)[:rows]]
    syn_rows = [synthetic.read(int(i)) for i in synthetic.indices(None)[:rows]]
    count = max(len(real_rows), len(syn_rows))
    figure, axes = plt.subplots(count, 2, figsize=(8, 1.9 * count), squeeze=False)
    for column, (title, samples, manifest) in enumerate(
        (("real", real_rows, real.manifest), ("synthetic", syn_rows, synthetic.manifest))
    ):
        for row in range(count):
            axis = axes[row][column]
            axis.axis("off")
            if row < len(samples):
                axis.imshow(preview_row(samples[row], manifest), interpolation="nearest")
            if row == 0:
                axis.set_title(title)
    _class_legend(figure, real.manifest)
    return _save(figure, folder, "samples.png")


def _class_legend(figure: Any, manifest: Manifest) -> None:
    """A row of class-colour swatches under the figure (the masks' colours; cd: t2's outline)."""
    from matplotlib.patches import Patch

    from specdm_cli.pipeline.synthesize.preview import legend_entries

    entries = legend_entries(manifest, np.zeros(0, np.uint8))
    handles = [
        Patch(
            facecolor=(colour[0] / 255, colour[1] / 255, colour[2] / 255),
            edgecolor="black",
            label=name,
        )
        for colour, name in entries
    ]
    figure.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=min(len(handles), 5),
        fontsize=8,
        frameon=False,
        title="mask colours",
        title_fontsize=8,
    )


def _class_names(manifest: Manifest) -> list[str]:
    if manifest.task == "cd":
        return ["no change", "change"]
    return [c.name for c in sorted(manifest.classes, key=lambda c: c.index)]


def spectral_profiles(
    folder: Path, manifest: Manifest, real_means: np.ndarray, syn_means: np.ndarray
) -> str:
    """Mean spectrum per class (and phase for cd), real solid vs synthetic dashed."""
    names = _class_names(manifest)
    wavelengths = [b.wavelength_nm for b in manifest.bands]
    x = np.array(wavelengths if all(wavelengths) else range(len(manifest.bands)), np.float64)
    # Stores keep the source's band order (SegMunich puts B08 before B05): plot by wavelength.
    order = np.argsort(x, kind="stable")
    x, real_means, syn_means = x[order], real_means[..., order], syn_means[..., order]
    columns = min(4, len(names))
    lines = -(-len(names) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 2.6 * lines), squeeze=False)
    for k, name in enumerate(names):
        axis = axes[k // columns][k % columns]
        for phase in range(real_means.shape[0]):
            tag = f" t{phase + 1}" if real_means.shape[0] > 1 else ""
            axis.plot(x, real_means[phase, k], "-", label=f"real{tag}")
            axis.plot(x, syn_means[phase, k], "--", label=f"synthetic{tag}")
        axis.set_title(name, fontsize=9)
        axis.tick_params(labelsize=7)
    for k in range(len(names), lines * columns):
        axes[k // columns][k % columns].axis("off")
    axes[0][0].legend(fontsize=7)
    figure.supxlabel("band centre wavelength (nm)" if all(wavelengths) else "band (no wavelengths)")
    figure.supylabel(f"class mean: {image_attributes(manifest, False)['long_name']}")
    return _save(figure, folder, "spectra.png")


def _bars(axis: Any, names: list[str], series: dict[str, list[float]]) -> None:
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(names))
    for n, (label, values) in enumerate(series.items()):
        axis.bar(x + (n - (len(series) - 1) / 2) * width, values, width, label=label)
    axis.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    axis.legend(fontsize=8)


def class_distribution(folder: Path, report: BenchmarkReport, manifest: Manifest) -> str:
    """Fraction of labelled pixels per class, real vs synthetic (paper Fig. 4)."""
    real, syn = report.quality.class_fraction_reference, report.quality.class_fraction_candidate
    figure, axis = plt.subplots(figsize=(7, 3.2))
    _bars(axis, list(real), {"real": list(real.values()), "synthetic": [syn[k] for k in real]})
    axis.set_ylabel("share of labelled pixels (0-1)")
    axis.set_xlabel("class")
    _colour_ticks(axis, manifest, list(real))
    return _save(figure, folder, "classes.png")


def _colour_ticks(axis: Any, manifest: Manifest, names: list[str]) -> None:
    """A square of each class's mask colour on the x axis, under its bars."""
    colours = {c.name: c.colour for c in manifest.classes}
    for position, name in enumerate(names):
        if name in colours:
            axis.plot(position, 0, "s", color=np.asarray(colours[name]) / 255, markersize=8,
                      markeredgecolor="black", clip_on=False, transform=axis.get_xaxis_transform())  # fmt: skip


def change_statistics(folder: Path, report: BenchmarkReport) -> str | None:
    """cd: histogram of the per-sample changed-pixel ratio, real vs synthetic."""
    q = report.quality
    if q.change_ratio_hist_reference is None or q.change_ratio_hist_candidate is None:
        return None
    assert q.change_ratio_bin_edges is not None
    edges = q.change_ratio_bin_edges
    names = [f"{a:.1f}-{b:.1f}" for a, b in itertools.pairwise(edges)]
    share = {
        label: (np.asarray(h, np.float64) / max(sum(h), 1)).tolist()
        for label, h in (
            ("real", q.change_ratio_hist_reference),
            ("synthetic", q.change_ratio_hist_candidate),
        )
    }
    figure, axis = plt.subplots(figsize=(7, 3.2))
    _bars(axis, names, share)
    axis.set_xlabel("changed-pixel ratio of a sample")
    axis.set_ylabel("share of samples")
    return _save(figure, folder, "change.png")


def closest_pairs(
    folder: Path, report: BenchmarkReport, real: StoreReader, syn: StoreReader
) -> str | None:
    """The synthetic samples nearest to a real train sample (memorisation check), side by side."""
    pairs = report.closest_pairs
    if not pairs:
        return None
    figure, axes = plt.subplots(len(pairs), 2, figsize=(8, 1.9 * len(pairs)), squeeze=False)
    for row, pair in enumerate(pairs):
        for column, (reader, index, label) in enumerate(
            ((syn, pair.synthetic_index, "synthetic"), (real, pair.real_index, "nearest real"))
        ):
            axis = axes[row][column]
            axis.axis("off")
            axis.imshow(preview_row(reader.read(index), reader.manifest), interpolation="nearest")
            axis.set_title(f"{label} #{index} (d={pair.feature_distance:.2f})", fontsize=8)
    _class_legend(figure, real.manifest)
    return _save(figure, folder, "closest.png")


def downstream_bars(folder: Path, report: BenchmarkReport) -> str | None:
    """mIoU and F1 of each downstream configuration on the real test data (Tables 3, 6)."""
    if report.downstream is None or not report.downstream.rows:
        return None
    rows = report.downstream.rows
    figure, axis = plt.subplots(figsize=(7, 3.2))
    _bars(
        axis, [r.name for r in rows], {"mIoU": [r.miou for r in rows], "F1": [r.f1 for r in rows]}
    )
    axis.set_ylim(0, 1)
    axis.set_ylabel("score on real test pairs (0-1)")
    axis.set_title(
        f"tested on real {report.downstream.eval_split} ({report.downstream.eval_count})"
    )
    return _save(figure, folder, "downstream.png")


def draw_all(
    folder: Path,
    report: BenchmarkReport,
    real: StoreReader,
    synthetic: StoreReader,
    class_means: tuple[np.ndarray, np.ndarray],
) -> dict[str, str]:
    """Every figure that applies; returns name -> file name (relative to `folder`)."""
    figures = {
        "samples": sample_grid(folder, real, synthetic),
        "spectra": spectral_profiles(folder, real.manifest, *class_means),
        "classes": class_distribution(folder, report, real.manifest),
    }
    optional = {
        "closest": closest_pairs(folder, report, real, synthetic),
        "change": change_statistics(folder, report),
        "downstream": downstream_bars(folder, report),
    }
    return figures | {name: made for name, made in optional.items() if made is not None}
