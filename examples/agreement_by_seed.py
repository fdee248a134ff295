"""The downstream rows seed by seed: agreement relabelling vs plain mixing (issue 20, section 3),
pretrain vs its control.

`specdm benchmark --downstream --downstream-protocols mixed,pretrain,mixed-agree,pretrain-agree`
is the product path; it writes its table only at the end. This script trains the same rows by
the same rule (`pipeline/benchmark/downstream.py`), seed-major (per seed: real, then each ratio
row), and appends one JSON line per (row, seed) as soon as it is done, so a run cut short on a
busy machine still leaves whole seeds. It skips the synthetic-only row. Then it prints mean ±
std (ddof 1) per row over the seeds finished.

    OMP_NUM_THREADS=1 python examples/agreement_by_seed.py demo-ss.zarr syn-ss.zarr out.jsonl

Defaults are the smaller variant of docs/measurements.md (batch 8, evaluation every 25 steps,
patience 3, at most 500 steps per phase, 100 real pairs, ratio 1, seeds 0-2); `--batch-size 16
--eval-every 50 --patience 6 --max-steps 3000` is the benchmark's defaults. `--first-seed` lets processes share
the seeds (each appending to its own file). `--skip-real` trains only the rows that use the
synthetic store (pretrain, mixed, and their oracles with `--oracle`: `benchmark
--downstream-oracle`'s rows, real train pairs past the limit in place of the synthetic ones;
`--round-trip-oracle MODEL` trains each oracle row again on those pairs' round trip through
MODEL's VAE: the most any generator decoding through that VAE could give, with no U-Net),
for another model's pairs beside real and control rows
already measured on the same real store, seeds and thread count (they do not depend on the
model; rows repeat bit for bit at the same thread count, docs/measurements.md: issue 20's gates).
`--real-rows-only` trains the real row and its control alone: more seeds of them beside synthetic
rows already measured.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from vae_utility import add_protocol_options, append_line, protocol_options

from specdm_cli.config import DOWNSTREAM_PROTOCOLS, DownstreamOptions, downstream_protocol_list
from specdm_cli.pipeline.benchmark.downstream import (
    Referees,
    Setup,
    make_setup,
    row_data,
    seed_list,
    train_seed,
)
from specdm_cli.pipeline.benchmark.downstream_rows import Configuration, configurations
from specdm_cli.pipeline.benchmark.feature_training import SampleSource
from specdm_cli.pipeline.benchmark.generator import round_trip
from specdm_cli.pipeline.runs.choose import ChosenModel, choose_model
from specdm_cli.stores import StoreReader, content_sha256, open_store

# The rows no synthetic store enters: the real row and its control, which goes on from it
# (the agree rows need the real row's model too; --skip-real refuses them).
REAL_ROWS = frozenset({"real", "real-twice"})


def measure_seed(
    real: StoreReader,
    synthetic: StoreReader,
    options: DownstreamOptions,
    seed: int,
    out: Path,
    skip: frozenset[str] = frozenset(),
    decoder: ChosenModel | None = None,
    round_trip_only: bool = False,
) -> None:
    """Every row but synthetic-only, the round trips of the limited pairs and the protocols in
    `skip` for one seed; the real row's model judges the agree rows and pretrain's control goes
    on from it. With `decoder`, each oracle row again on its pairs' round trip through that
    run's VAE (the benchmark's rows with --model); `round_trip_only` trains only those."""
    setup = make_setup(real, options, "cpu")
    referees = Referees()
    # Which data and VAE each line measured: stores made again by the same command share
    # their content digests (not their manifests'); a decoder is named by its weights' digest.
    inputs = {
        "real_content": content_sha256(real), "synthetic": str(synthetic.root),
        "synthetic_content": content_sha256(synthetic),
        "decoder": None if decoder is None else f"{decoder.manifest.run_id} {decoder.sha256[:12]}",
    }  # fmt: skip
    for row in configurations(real, synthetic, options, round_trip=decoder is not None):
        if row.protocol in skip or row.protocol.startswith(("synthetic", "round-trip")):
            continue
        if round_trip_only and not row.decoded:
            continue
        second: SampleSource = real if row.oracle else synthetic  # the oracle's pairs are real
        if row.decoded and decoder is not None:
            second = round_trip(decoder, real, row.synthetic, torch.device("cpu"))
        train_row(row, setup, (real, second), seed, referees, out, inputs)


def train_row(
    row: Configuration,
    setup: Setup,
    sources: tuple[StoreReader, SampleSource],
    seed: int,
    referees: Referees,
    out: Path,
    inputs: dict[str, str | None],
) -> None:
    """Train one row of one seed and append its line to `out` (`inputs`: the stores and
    decoder, each recorded for the rows it enters)."""
    start = time.perf_counter()
    run = train_seed(row, setup, *row_data(row, setup, *sources), seed, referees)
    trains_on_synthetic = bool(row.synthetic.size) and not row.oracle
    record = {
            "row": row.name, "protocol": row.protocol + ("-round-trip" if row.decoded else ""),
            "seed": seed, "miou": run.miou,
            "real_content": inputs["real_content"],
            "synthetic": inputs["synthetic"] if trains_on_synthetic else None,
            "synthetic_content": inputs["synthetic_content"] if trains_on_synthetic else None,
            "decoder": inputs["decoder"] if row.decoded else None,
            "f1": run.f1, "steps": run.steps, "best_steps": run.best_steps,
            "phase_steps": run.phase_steps,
            "best_val": run.best_val_miou, "kept_share": run.kept_share, "iou": run.iou_per_class,
            "wall_s": round(time.perf_counter() - start, 1),
            "threads": torch.get_num_threads(),  # figures repeat only at the same count
    }  # fmt: skip
    append_line(out, record)


def summary(out: Path) -> None:
    """Mean ± std (ddof 1) of mIoU and F1 per row over the seeds in `out`."""
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    for name in dict.fromkeys(r["row"] for r in records):
        mine = [r for r in records if r["row"] == name]
        miou, f1 = np.array([r["miou"] for r in mine]), np.array([r["f1"] for r in mine])
        spread = miou.std(ddof=1) if miou.size > 1 else 0.0
        kept = [r["kept_share"] for r in mine if r["kept_share"] is not None]
        print(
            f"{name}: mIoU {miou.mean():.3f} ± {spread:.3f} ({miou.min():.3f}-{miou.max():.3f}), "
            f"F1 {f1.mean():.3f}, seeds {[r['seed'] for r in mine]}"
            + (f", kept {np.mean(kept):.1%}" if kept else "")
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("real", type=Path)
    parser.add_argument("synthetic", type=Path)
    parser.add_argument("out", type=Path, help="JSON lines, appended to")
    parser.add_argument("--protocols", default="mixed,mixed-agree,pretrain,pretrain-agree")
    parser.add_argument("--real-limit", type=int, default=100)
    parser.add_argument("--ratio", type=int, default=1, help="synthetic pairs per real one")
    parser.add_argument(
        "--skip-real", action="store_true", help="skip the real row and the rows that need it"
    )
    parser.add_argument(
        "--real-rows-only",
        action="store_true",
        help="only the real row and its control (no synthetic store enters them; SYNTHETIC is "
        "still opened, for the lines' record)",
    )
    parser.add_argument(
        "--oracle",
        action="store_true",
        help="also each protocol's oracle row: real train pairs past the limit as the synthetic",
    )
    parser.add_argument(
        "--round-trip-oracle",
        metavar="MODEL",
        help="with --oracle: each oracle row again on its pairs' round trip through MODEL's VAE "
        "(a run folder, or demo): the most any generator decoding through that VAE could give",
    )
    parser.add_argument(
        "--round-trip-only",
        action="store_true",
        help="with --round-trip-oracle: only those rows (a VAE's screen; the others do not "
        "depend on the VAE)",
    )
    add_protocol_options(parser)
    args = parser.parse_args()
    if args.skip_real and "agree" in args.protocols:
        parser.error("--skip-real: the agree rows need the real row's model")
    if args.round_trip_oracle and not args.oracle:
        parser.error("--round-trip-oracle: round trips of the oracle's pairs need --oracle")
    if args.round_trip_only and not args.round_trip_oracle:
        parser.error("--round-trip-only: which VAE? name it with --round-trip-oracle")
    torch.set_num_threads(args.threads)
    options = protocol_options(
        args, args.real_limit, ratios=(args.ratio,),
        protocols=downstream_protocol_list(args.protocols), oracle=args.oracle,
    )  # fmt: skip
    real, synthetic = open_store(args.real), open_store(args.synthetic)
    if args.real_rows_only and (args.skip_real or args.oracle):
        parser.error("--real-rows-only: --skip-real and --oracle add rows it leaves out")
    skip = REAL_ROWS if args.skip_real else frozenset()
    if args.real_rows_only:
        skip = frozenset(DOWNSTREAM_PROTOCOLS)
    decoder = None
    if args.round_trip_oracle:
        decoder = choose_model(args.round_trip_oracle, real.manifest.task, vae_only=True)
    for seed in seed_list(options):
        measure_seed(real, synthetic, options, seed, args.out, skip, decoder, args.round_trip_only)
    summary(args.out)


if __name__ == "__main__":
    main()
