"""A report as Markdown (`report.md`) and as rich tables for the terminal."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from .quality import QualityReport
from .report import BenchmarkReport, DownstreamRow, PairedGain, StoreRef, paired_gain

Row = tuple[str, float | None, float | None, str]


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "n/a"
    return f"{value:.4g}"


def quality_rows(report: BenchmarkReport) -> list[Row]:
    """(metric, synthetic, real reference or None, meaning) for the quality table."""
    q = report.quality
    rows: list[Row] = [
        ("fd_spectral", q.fd_spectral, None, "Fréchet distance, image features (lower is better)"),
        ("fd_mask", q.fd_mask, None, "Fréchet distance, mask features"),
        ("fd_joint", q.fd_joint, None, "Fréchet distance, image + mask features"),
        ("kid_spectral", q.kid_spectral, None, f"KID (± {_fmt(q.kid_spectral_std)})"),
        ("msad", q.msad, None, "mean spectral angle between class-mean spectra, rad"),
        ("js_class", q.js_class, None, "Jensen-Shannon divergence of class fractions, bits"),
        ("wasserstein_mean_std", q.wasserstein_mean_std, None, "per-band W1 / real std, mean"),
        ("pair_miou", q.pair_miou, q.pair_miou_reference, "network prediction vs own mask"),
        (
            "near_duplicate_fraction",
            q.near_duplicate_fraction_feature,
            q.near_duplicate_percentile / 100,
            # The real column is the share the threshold was set to on held-out real pairs
            # (its percentile), by construction, not a second measurement.
            "share closer to a real train sample than the threshold (real: the share it is "
            "calibrated to)",
        ),
        (
            "nn_feature_distance_median",
            q.nn_feature_distance_median,
            q.nn_feature_distance_median_reference,
            "distance to the nearest real train sample",
        ),
        ("quality_score_mean", report.scores.mean, report.scores.real_mean, "per-sample score"),
    ]
    if q.change_sample_fraction_candidate is not None:
        rows += [
            (
                "change_sample_fraction",
                q.change_sample_fraction_candidate,
                q.change_sample_fraction_reference,
                "share of samples with any change",
            ),
            (
                "change_angle_auc",
                q.change_angle_auc_candidate,
                q.change_angle_auc_reference,
                "t1->t2 spectral angle separates change (AUC)",
            ),
        ]
    return rows


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _content(store: StoreRef) -> str:
    """`, content 1a2b3c4d5e6f`: two reports read the same data where these agree."""
    return f", content {store.content_sha256[:12]}" if store.content_sha256 else ""


def _pairs_by_split(store: StoreRef) -> str:
    """`train 841, val 83, test 100`: the real store's pairs by split, as words."""
    return ", ".join(f"{split} {count}" for split, count in store.split_counts.items())


def _head(report: BenchmarkReport) -> list[str]:
    lines = [
        f"# specdm benchmark: {report.label}",
        "",
        f"- task `{report.task}`; real `{report.real.path}` ({_pairs_by_split(report.real)}"
        f"{_content(report.real)}); synthetic `{report.synthetic.path}` "
        f"({report.synthetic.count} pairs{_content(report.synthetic)})",
        f"- feature network `{report.feature_hash[:16]}` (every figure below depends on it)",
    ]
    gen = report.generator
    if gen is not None:
        seen = "unknown" if gen.real_pairs_seen is None else str(gen.real_pairs_seen)
        source = "this real store" if gen.real_store_is_source else "another store"
        lines.append(
            f"- generator `{gen.run_id}` ({gen.kind}) trained on {seen} real pairs of {source}"
        )
    # The cautions measured with the report (one read back from before them: its held-out one);
    # too few samples is told under the quality table.
    shown = report.cautions or [c for c in (heldout_caution(report),) if c]
    few = few_samples_caution(report.quality)
    lines += [f"- **Caution:** {caution}." for caution in shown if caution != few]
    return [*lines, f"- {report.created}, specdm {report.tool_version}", ""]


# FD and KID compare distributions of 64 feature dimensions (the feature network's default);
# from fewer than a few times that many samples their sampling noise can exceed the gaps
# between models, and KID's unbiased estimate can come out negative.
FEW_SAMPLES = 200


def few_samples_caution(quality: QualityReport) -> str | None:
    """The sentence saying the distribution figures rest on too few samples to rank models
    by (the report's and the command's), or None."""
    counts = {real_side(quality): quality.reference.count, "synthetic": quality.candidate.count}
    few = [f"{count} {side}" for side, count in counts.items() if count < FEW_SAMPLES]
    if not few:
        return None
    return (
        f"FD and KID come from {' and '.join(few)} samples, fewer than {FEW_SAMPLES}: "
        "their noise can exceed the gap between two models (KID may be negative); "
        "rank models on larger stores"
    )


def real_side(quality: QualityReport) -> str:
    """The real pairs the figures compare with, in words: held-out (val + test), or the train
    split where the store has neither."""
    return "real train" if quality.reference.split == "train" else "held-out real"


def train_reference_caution(report: BenchmarkReport, how: str) -> str | None:
    """The sentence saying the real reference is the train split (the store has no val or test
    split), which figures that flatters, and `how` to prepare a held-out split; None otherwise."""
    if report.quality.reference.split != "train":
        return None
    return (
        f"the real store has no val or test split, so the real reference is its "
        f"{report.quality.reference.count} train pairs, which the feature network was fitted on "
        "(and a generator trained on this store saw): the real column (pair mIoU ceiling, "
        "quality score mean) is measured on learned pairs and reads high, the near-duplicate "
        "threshold is calibrated train against train, and FD, KID and the scores favour a "
        f"generator that copies its training pairs; {how}"
    )


def cautions(report: BenchmarkReport, how: str) -> list[str]:
    """Every caution on the report's figures (`how`: the fix for a store without held-out)."""
    found = (
        train_reference_caution(report, how),
        heldout_caution(report),
        few_samples_caution(report.quality),
        real_limit_caution(report),
        other_maker_caution(report),
        tile_size_caution(report),
    )
    return [caution for caution in found if caution]


def other_maker_caution(report: BenchmarkReport) -> str | None:
    """The sentence saying --model did not make the synthetic store, or None."""
    gen = report.generator
    if gen is None or gen.synthetic_made_by is None:
        return None
    return (
        f"--model {gen.run_id} ({gen.kind}) did not make the synthetic store, "
        f"{gen.synthetic_made_by} did: the reconstruction, throughput and round-trip figures "
        "measure --model, the quality and synthetic rows the store; pass the --model that made "
        "it, or leave --model out"
    )


def tile_size_caution(report: BenchmarkReport) -> str | None:
    """The sentence saying --model learned tiles of another size than the real store's, or None."""
    gen = report.generator
    if gen is None or gen.tile_sizes is None:
        return None
    model, real = ("x".join(map(str, size)) for size in (gen.tile_sizes.model, gen.tile_sizes.real))
    return (
        f"--model {gen.run_id} ({gen.kind}) learned {model} px tiles, the real store's are "
        f"{real} px: its reconstruction and round trips are measured on tiles of a size it never "
        f"trained on; benchmark against a real store of {model} px tiles"
    )


def real_limit_caution(report: BenchmarkReport) -> str | None:
    """The sentence saying the real rows trained on fewer pairs than --real-limit, or None."""
    d = report.downstream
    if d is None or d.real_limit_asked is None:
        return None
    return (
        f"the real rows trained on all {d.real_limit} train pairs of the real store, fewer than "
        f"the {d.real_limit_asked} of --real-limit (the paper's limited-data count where not "
        f"given): pass --real-limit {d.real_limit} or less to say what was measured"
    )


def heldout_caution(report: BenchmarkReport) -> str | None:
    """The sentence saying the held-out pairs include some the generator trained on, or None."""
    gen = report.generator
    if gen is None or not gen.heldout_in_training:
        return None
    heldout = report.quality.reference.count
    return (
        f"{gen.heldout_in_training} of the {heldout} held-out real pairs are among the pairs the "
        "generator trained on (the same source ids in its training store): the figures against "
        "them flatter it; benchmark against a store whose held-out pairs it never saw"
    )


def _quality(report: BenchmarkReport) -> list[str]:
    rows = [[n, _fmt(s), _fmt(r), m] for n, s, r, m in quality_rows(report)]
    lines = [f"## Quality ({real_side(report.quality)} vs synthetic)", ""]
    lines += _table(["metric", "synthetic", "real", "meaning"], rows)
    caution = few_samples_caution(report.quality)
    if caution is not None:
        lines += ["", f"**Caution:** {caution}."]
    per_class = [[k, _fmt(v)] for k, v in report.quality.sad_per_class.items()]
    lines += ["", "Spectral angle of class-mean spectra (rad):", ""]
    lines += _table(["class", "SAD"], per_class)
    fractions = report.quality.class_fraction_reference
    lines += ["", "Class pixel fractions:", ""]
    lines += _table(
        ["class", "real", "synthetic"],
        [
            [k, _fmt(v), _fmt(report.quality.class_fraction_candidate.get(k))]
            for k, v in fractions.items()
        ],
    )
    pairs = [
        [str(p.synthetic_index), str(p.real_index), _fmt(p.feature_distance),
         _fmt(p.pixel_distance), "yes" if p.near_duplicate else "no"]
        for p in report.closest_pairs
    ]  # fmt: skip
    lines += ["", "Memorisation: the synthetic samples closest to a real train sample:", ""]
    lines += _table(["synthetic", "real train", "feature d", "pixel d", "near duplicate"], pairs)
    return [*lines, ""]


def _scores(report: BenchmarkReport) -> list[str]:
    s = report.scores
    quantiles = ", ".join(f"{k} {_fmt(v)}" for k, v in s.quantiles.items())
    shares = ", ".join(f">= {k}: {_fmt(v)}" for k, v in s.share_at_least.items())
    written = "written to the store" if s.written else "not written (--write-scores)"
    return [
        "## Per-sample quality scores",
        "",
        f"Score = {s.definition}. Mean {_fmt(s.mean)} ({real_side(report.quality)}: "
        f"{_fmt(s.real_mean)}); "
        f"{quantiles}; shares {shares}; {written}.",
        "",
    ]


def _generator(report: BenchmarkReport) -> list[str]:
    lines: list[str] = []
    if report.reconstruction is not None:
        r = report.reconstruction
        lines += [f"## VAE reconstruction (Table 4), real {r.split} ({r.count})", ""]
        lines += _table(
            ["RMSE", "RMSE (physical)", "SAD", "CE", "mIoU"],
            [[_fmt(r.rmse), _fmt(r.rmse_physical), _fmt(r.sad), _fmt(r.ce), _fmt(r.miou)]],
        )
        lines.append("")
    if report.throughput is not None:
        t = report.throughput
        lines += [
            "## Sampling throughput",
            "",
            f"{_fmt(t.pairs_per_second)} pairs/s ({t.sampler}, {t.steps} steps, B {t.batch_size}, "
            f"{t.precision}, {t.device}; sampling and decoding, no I/O)",
            "",
        ]
    return lines


def _spread(mean: float, std: float | None) -> str:
    return _fmt(mean) if std is None else f"{mean:.3f} ± {std:.3f}"


def downstream_cells(row: DownstreamRow) -> list[str]:
    """training data, protocol, real, synthetic, mIoU, F1, steps: one row of Tables 5-6's shape."""

    def spread(std: float | None) -> float | None:  # one seed has none, not a spread of 0
        return std if len(row.seeds) > 1 else None

    best = [sum(run.best_steps) for run in row.seeds]
    steps = (
        f"{np.mean(best):.0f} of {np.mean([run.steps for run in row.seeds]):.0f}" if best else "-"
    )
    return [
        row.name, row.protocol, str(row.real_count), str(row.synthetic_count),
        _spread(row.miou, spread(row.miou_std)), _spread(row.f1, spread(row.f1_std)), steps,
    ]  # fmt: skip


DOWNSTREAM_HEADER = ["training data", "protocol", "real", "synthetic", "mIoU", "F1", "steps"]


def _downstream_notes(report: BenchmarkReport) -> list[str]:
    """The protocol, the stopping and test pairs, and what the generator saw (the leak)."""
    d = report.downstream
    assert d is not None
    lines = [
        f"{d.network}. Protocol: {d.protocol or 'fixed steps, one seed (an older report)'}.",
        "",
        f"Stopping watched real {d.stop_split or '-'} ({d.stop_count} pairs); every row is tested "
        f"on real {d.eval_split} ({d.eval_count} pairs); F1 = {d.f1_definition}; "
        f"± = {d.spread or 'none'}; seeds {d.seeds or [d.config.get('seed')]}; steps = optimiser "
        "step of the tested (best-val) weights, of the steps run (mean over seeds, all phases).",
        "",
    ]
    if d.threads is not None:
        lines += [
            f"Trained on {d.device} with {d.threads} torch thread(s): the figures repeat bit for "
            "bit with the same device type and thread count, not across them.",
            "",
        ]
    gen = report.generator
    seen = gen.real_pairs_seen if gen is not None else None
    trained = f"The generator trained on {seen if seen is not None else 'an unknown number of'}"
    trained += f" real pairs, the real rows here on {d.real_limit}"
    # The real rows take the first pairs of the train split: a generator that trained on no
    # more of this very store's train split saw only pairs they have.
    nested = gen is not None and gen.real_store_is_source and gen.train_split in (None, "train")
    if seen is not None and seen <= d.real_limit and nested:
        lines.append(
            f"{trained}: all of them among the real rows' (the first of this store's train split)."
        )
    else:
        lines.append(
            f"{trained}: synthetic rows carry information from more real scenes than the "
            "real-only baseline has (the paper has the same leak: its generators train on the "
            "whole training set, its downstream real set is limited to 2k ss / 100 cd pairs)."
        )
    if d.round_trip is not None:
        lines.append(
            f"The round-trip row trains on the real train pairs encoded and decoded by the VAE of "
            f"{d.round_trip}: the most any generator decoding through this VAE can give."
        )
    return [*lines, ""]


def _downstream(report: BenchmarkReport) -> list[str]:
    d = report.downstream
    if d is None:
        return []
    lines = ["## Downstream utility (Tables 3, 5, 6)", "", *_downstream_notes(report)]
    rows = [downstream_cells(r) for r in d.rows]
    lines += [*_table(DOWNSTREAM_HEADER, rows), "", *_kept_notes(d.rows)]
    paired = paired_cells(d.rows)
    if not paired:
        return lines
    return [*lines, "### Paired by seed", "",
            "Each row's test mIoU less its baseline's on the same seed (the same initialisation, "
            "batches and real pairs), the mean of those gains and its two-sided 95% t-interval: "
            "above zero, the gain is beyond the seeds' scatter.", "",
            *_table(PAIRED_HEADER, paired), ""]  # fmt: skip


PAIRED_HEADER = ["training data", "against", "gain by seed", "mean gain", "95% interval", "above"]


def paired_cells(rows: list[DownstreamRow]) -> list[list[str]]:
    """Every row against real only, and rows that pretrain against their control (real, then
    real again), seed by seed, where the two share two or more seeds."""
    real = next((r for r in rows if r.name == "real"), None)
    control = next((r for r in rows if r.protocol == "real-twice"), None)
    pairs = []
    for row in rows:
        if row.protocol in ("real", "real-twice"):
            continue
        bases = [real] + ([control] if row.protocol.startswith("pretrain") else [])
        pairs += [paired_gain(row, base, base.name) for base in bases if base is not None]
    return [_paired_row(pair) for pair in pairs if pair is not None]


def _paired_row(pair: PairedGain) -> list[str]:
    above = f"{sum(g > 0 for g in pair.gains)} of {len(pair.gains)}"
    return [pair.row, pair.against, ", ".join(f"{g:+.3f}" for g in pair.gains),
            f"{pair.mean:+.3f}", f"{pair.low:+.3f} to {pair.high:+.3f}", above]  # fmt: skip


def _kept_notes(rows: list[DownstreamRow]) -> list[str]:
    """How much of the generated labels each agreement-relabelled row kept."""
    kept = [
        f"- {r.name}: {r.kept_share:.1%} of the generated label pixels kept (mean over seeds; "
        + ", ".join(
            f"seed {run.seed} {run.kept_share:.1%}" for run in r.seeds if run.kept_share is not None
        )
        + ")"
        for r in rows
        if r.kept_share is not None
    ]
    return [*kept, ""] if kept else []


def _comparison(report: BenchmarkReport) -> list[str]:
    c = report.comparison
    if c is None:
        return []
    rows = []
    for f in c.figures:
        delta = None if f.this is None or f.other is None else f.this - f.other
        rows.append([f.name, _fmt(f.this), _fmt(f.other), _fmt(delta)])
    lines = [f"## Comparison with `{c.other}`", ""]
    lines += [*_table(["figure", c.this_label, c.other_label, "difference"], rows), ""]
    if not c.paired:
        return lines
    return [*lines, f"### Downstream rows paired by seed with {c.other_label}'s", "",
            "Both reports trained on the same real store with the same protocol, so a seed is "
            "the same training but for the synthetic pairs: each row's mIoU less the other "
            "report's same row, seed by seed, with the mean gain's two-sided 95% t-interval.", "",
            *_table(PAIRED_HEADER, [_paired_row(pair) for pair in c.paired]), ""]  # fmt: skip


def markdown(report: BenchmarkReport) -> str:
    """The whole `report.md`, with the figures embedded by relative path."""
    lines = _head(report) + _quality(report) + _scores(report)
    lines += _generator(report) + _downstream(report) + _comparison(report)
    if report.figures:
        lines += ["## Figures", ""]
        lines += [f"![{name}]({file})" for name, file in report.figures.items()]
    return "\n".join(lines) + "\n"


def print_tables(report: BenchmarkReport, console: Console) -> None:
    """The quality figures (beside the compared report's), then the downstream rows."""
    comparison = report.comparison
    table = Table(title=f"benchmark: {report.label} (feature network {report.feature_hash[:12]})")
    for column in ("metric", "synthetic", "real"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    if comparison is not None:
        table.add_column(comparison.other_label, justify="right")
    other: dict[str, Any] = {f.name: f.other for f in comparison.figures} if comparison else {}
    names = {"near_duplicate_fraction": "near_duplicate_fraction_feature"}
    for name, synthetic, real, _meaning in quality_rows(report):
        cells = [name, _fmt(synthetic), _fmt(real)]
        if comparison is not None:
            cells.append(_fmt(other.get(names.get(name, name))))
        table.add_row(*cells)
    console.print(table)
    gains = "(mIoU gain, two-sided 95% t-interval)"
    if report.downstream is not None:
        d = report.downstream
        _print_rows(console, f"downstream, tested on real {d.eval_split}", DOWNSTREAM_HEADER,
                    [downstream_cells(r) for r in d.rows])  # fmt: skip
        _print_rows(console, f"downstream, paired by seed {gains}", PAIRED_HEADER,
                    paired_cells(d.rows))  # fmt: skip
    if comparison is not None:
        _print_rows(console, f"downstream, paired by seed with {comparison.other_label} {gains}",
                    PAIRED_HEADER, [_paired_row(pair) for pair in comparison.paired])  # fmt: skip


def _print_rows(console: Console, title: str, header: list[str], cells: list[list[str]]) -> None:
    """A terminal table of downstream rows (nothing where there are none)."""
    if not cells:
        return
    table = Table(title=title)
    for column in header:
        table.add_column(column, justify="left" if column == "training data" else "right")
    for row in cells:
        table.add_row(*row)
    console.print(table)
