"""`specdm benchmark` (a report on a synthetic store) and `specdm filter` (its best pairs)."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from specdm_cli.cli.options import (
    JsonOption,
    OneDeviceOption,
    OverwriteOption,
    QuietOption,
    ThreadsOption,
    parse_counts,
    require_inputs,
)
from specdm_cli.cli.output import (
    StdoutConsole,
    Warnings,
    domain_errors,
    emit_json,
    progress_reporter,
    stderr,
)
from specdm_cli.config import (
    METRICS_BATCH_SIZE,
    THROUGHPUT_BATCHES,
    Devices,
    DownstreamOptions,
)
from specdm_cli.pipeline.signals import stop_at_once


def benchmark(
    real: Annotated[
        Path | None, typer.Option(help="The real store (held-out splits compared; required).")
    ] = None,
    synthetic: Annotated[
        Path | None, typer.Option(help="The synthetic store to judge (required).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Run (or 'demo'): adds VAE reconstruction and pairs/s (a run with only its VAE: "
            "reconstruction and round trips)."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Report folder [<synthetic>-benchmark].")
    ] = None,
    downstream: Annotated[
        bool,
        typer.Option("--downstream", help="Train on real / synthetic / both, test on real (slow)."),
    ] = False,
    real_limit: Annotated[
        int | None,
        typer.Option(min=1, help="Real train pairs downstream [paper: ss 2000, cd 100]."),
    ] = None,
    synthetic_ratio: Annotated[
        str, typer.Option(help="Synthetic pairs per real pair, e.g. 1,3,5 (Table 6).")
    ] = ",".join(map(str, DownstreamOptions.ratios)),
    downstream_seeds: Annotated[
        int, typer.Option(min=1, help="Seeds per downstream row (mean ± std).")
    ] = DownstreamOptions.seeds,
    downstream_max_steps: Annotated[
        int, typer.Option(min=1, help="Step cap per downstream training phase.")
    ] = DownstreamOptions.max_steps,
    downstream_patience: Annotated[
        int, typer.Option(min=1, help="Val evaluations without a better mIoU before stopping.")
    ] = DownstreamOptions.patience,
    downstream_eval_every: Annotated[
        int, typer.Option(min=1, help="Steps between downstream val evaluations.")
    ] = DownstreamOptions.eval_every,
    downstream_protocols: Annotated[
        str,
        typer.Option(
            help="How synthetic pairs join real ones: mixed, pretrain (and mixed-agree, pretrain-agree: relabelled)."
        ),
    ] = ",".join(DownstreamOptions.protocols),
    real_share: Annotated[
        float, typer.Option(min=0.01, max=1.0, help="Real share of a mixed downstream batch.")
    ] = DownstreamOptions.real_share,
    downstream_batch_size: Annotated[
        int, typer.Option(min=1, help="Downstream batch size.")
    ] = DownstreamOptions.batch_size,
    downstream_lr_drops: Annotated[
        int,
        typer.Option(
            min=0,
            help="Times a plateau drops the rate tenfold from the best-val weights before "
            "stopping; 0 = stop at the first.",
        ),
    ] = DownstreamOptions.lr_drops,
    downstream_real_curve: Annotated[
        str | None,
        typer.Option(
            help="Also train real only on the first L real pairs for each L (e.g. 25,50,200): "
            "the learning curve that shows whether --real-limit leaves room for synthetic data."
        ),
    ] = None,
    round_trip_parts: Annotated[
        bool,
        typer.Option(
            "--round-trip-parts",
            help="With --model: also train on the round trip's images with the real labels, and "
            "on the real images with its labels (which VAE stream bounds the ceiling).",
        ),
    ] = False,
    downstream_oracle: Annotated[
        bool,
        typer.Option(
            "--downstream-oracle",
            help="Also train each real + synthetic row with real train pairs past --real-limit "
            "in place of the synthetic ones: the most synthetic pairs could give.",
        ),
    ] = False,
    write_scores: Annotated[
        bool,
        typer.Option(
            "--write-scores", help="Add a per-sample `quality` array to the synthetic store."
        ),
    ] = False,
    compare: Annotated[
        Path | None, typer.Option(help="Another report.json to put side by side.")
    ] = None,
    label: Annotated[str | None, typer.Option(help="Name of this side [store name].")] = None,
    feature_steps: Annotated[
        int | None, typer.Option(min=1, help="Feature network training steps [400].")
    ] = None,
    throughput_batches: Annotated[int, typer.Option(min=1, help="Batches timed for pairs/s.")] = (
        THROUGHPUT_BATCHES
    ),
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per metrics batch.")] = (
        METRICS_BATCH_SIZE
    ),
    gpus: OneDeviceOption = Devices(),  # noqa: B008 (an immutable value)
    threads: ThreadsOption = None,
    overwrite: OverwriteOption = False,
    schema: Annotated[
        bool, typer.Option("--schema", help="Print the report.json JSON Schema.")
    ] = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Report how good, how useful and how fast a synthetic dataset is."""
    with domain_errors(resumable=False), stop_at_once():
        if not schema:
            require_inputs(stores={"--real": real, "--synthetic": synthetic}, models=(model,))
        from specdm_cli.config import count_list, downstream_protocol_list
        from specdm_cli.errors import UsageError
        from specdm_cli.pipeline.benchmark.benchmark import BenchmarkRequest, rgb_notice
        from specdm_cli.pipeline.benchmark.benchmark import benchmark as run_benchmark
        from specdm_cli.pipeline.benchmark.render import print_tables
        from specdm_cli.pipeline.benchmark.report import report_json, report_schema
        from specdm_cli.pipeline.devices import torch_threads

        if schema:
            given = [name for name, path in (("--real", real), ("--synthetic", synthetic)) if path]
            if given:
                raise UsageError(
                    "--schema prints the report.json schema; it runs no benchmark",
                    hint=f"drop --schema to benchmark, or drop {' and '.join(given)}",
                )
            emit_json(report_schema())
            return
        if real is None or synthetic is None:
            raise UsageError(
                "benchmark needs --real and --synthetic",
                hint="e.g. --real real.zarr --synthetic syn.zarr",
            )
        ratios = count_list(synthetic_ratio, "--synthetic-ratio", "1,3,5")
        curve = parse_counts(downstream_real_curve, "--downstream-real-curve", "25,50,200") or ()
        if round_trip_parts and (model is None or not downstream):
            raise UsageError(
                "--round-trip-parts splits the VAE round-trip row, which needs --downstream and "
                "--model",
                hint="e.g. --downstream --model demo --round-trip-parts",
            )
        if downstream_oracle and not downstream:
            raise UsageError(
                "--downstream-oracle adds downstream rows, which needs --downstream",
                hint="e.g. --downstream --downstream-oracle",
            )
        options = DownstreamOptions(
            batch_size=downstream_batch_size, seeds=downstream_seeds,
            eval_every=downstream_eval_every, patience=downstream_patience,
            max_steps=downstream_max_steps, real_share=real_share,
            protocols=downstream_protocol_list(downstream_protocols),
            real_limit=real_limit, ratios=ratios, real_curve=curve,
            round_trip_parts=round_trip_parts, oracle=downstream_oracle,
            lr_drops=downstream_lr_drops,
        )  # fmt: skip
        request = BenchmarkRequest(
            real=real, synthetic=synthetic, out=out, model=model,
            downstream=options if downstream else None, write_scores=write_scores,
            compare=compare, overwrite=overwrite, feature_steps=feature_steps, label=label,
            devices=gpus, throughput_batches=throughput_batches, batch_size=batch_size,
        )  # fmt: skip
        with torch_threads(threads), progress_reporter("benchmark", quiet) as progress:
            report, folder = run_benchmark(request, progress)
        warnings = Warnings(quiet)
        unet = (
            f"note: --model {model} has no U-Net that samples yet: its VAE's reconstruction and "
            "round trips only, no sampling throughput"
            if model is not None and report.throughput is None
            else None
        )
        for note in (rgb_notice(real), unet, *(f"warning: {c}" for c in report.cautions)):
            if note:
                warnings(note)
        if json_output:
            sys.stdout.write(report_json(report, per_sample=False) + "\n")
        else:
            print_tables(report, StdoutConsole())
        if not quiet:
            stderr.print(f"report: {folder / 'report.md'}", markup=False)


def filter_command(
    store: Annotated[
        Path, typer.Argument(help="A store with quality scores (benchmark --write-scores).")
    ],
    min_quality: Annotated[
        float, typer.Option(help="Keep the samples scoring at least this (0..1).")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="The subset store (required).")
    ] = None,
    overwrite: OverwriteOption = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Write the subset of a store whose per-sample quality reaches --min-quality."""
    with domain_errors(resumable=False), stop_at_once():
        from specdm_cli.errors import UsageError
        from specdm_cli.pipeline.filter import FilterRequest, filter_store

        if out is None:
            raise UsageError("filter needs --out", hint="e.g. --out syn-good.zarr")
        with progress_reporter("filter", quiet) as bar:
            summary = filter_store(FilterRequest(store, min_quality, out, overwrite), bar)
        if not quiet:
            stderr.print(
                f"complete: {summary.out}: kept {summary.kept} of {summary.parent_count} "
                f"(quality >= {summary.min_quality:g})",
                markup=False,
            )
        if json_output:
            emit_json(asdict(summary))
