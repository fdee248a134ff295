"""The VAE's ceiling on synthetic-data utility (issue 20 §2): for each run (or `demo`), the
downstream segmenter trained on the VAE round trips of the real train pairs, and the pair mIoU
of the round trips of real val.

    python examples/vae_utility.py --real demo.zarr RUN [RUN ...] [--seeds 3] [--threads 1]

`--first-seed S --seeds 1` runs one seed, so three processes can run seeds 0-2 side by side.

Downstream: the fair protocol of `specdm benchmark --downstream` (its round-trip row, the same
code), by default at the *smaller variant* of docs/measurements.md (batch 8, evaluation every
25 steps, patience 3, at most 500 steps, the first 100 real train pairs), each seed's mIoU on
the real test split.
Pair mIoU: the metrics' feature network (trained on the real train split, cached under
`--cache`) segments the round trip of each real val image; its mIoU against the decoded mask,
beside the same figure of the real val pairs. Prints one line per run; `--json` writes them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from specdm_cli.config import DownstreamOptions
from specdm_cli.pipeline.benchmark import downstream as ds
from specdm_cli.pipeline.benchmark import downstream_rows
from specdm_cli.pipeline.benchmark.features import default_config, load_or_train
from specdm_cli.pipeline.benchmark.generator import round_trip
from specdm_cli.pipeline.benchmark.quality import compare_stores
from specdm_cli.pipeline.runs.choose import ChosenModel, choose_model
from specdm_cli.stores import StoreReader, open_store


def add_protocol_options(parser: argparse.ArgumentParser) -> None:
    """The downstream protocol's options, at the *smaller variant* (docs/measurements.md) by
    default (also used by real_learning_curve.py)."""
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="so processes share cores")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lr-drops", type=int, default=0, help="benchmark --downstream-lr-drops")


def protocol_options(args: argparse.Namespace, real_limit: int, **more: Any) -> DownstreamOptions:
    """The protocol of `add_protocol_options`' arguments, at `real_limit` real pairs, with
    `more` of DownstreamOptions' fields (ratios, protocols, oracle)."""
    return DownstreamOptions(
        batch_size=args.batch_size, seed=args.first_seed, seeds=args.seeds,
        eval_every=args.eval_every, patience=args.patience, max_steps=args.max_steps,
        real_limit=real_limit, lr_drops=args.lr_drops, **more,
    )  # fmt: skip


def vae_of(model: str, task: str) -> ChosenModel:
    """`demo`, or a run folder whose VAE is trained (no diffusion stage needed here)."""
    return choose_model(model, task, vae_only=True)


def downstream_row(real: StoreReader, model: str, opts: DownstreamOptions) -> dict[str, Any]:
    """The round-trip row of `benchmark --downstream --model MODEL`, alone."""
    chosen = vae_of(model, real.manifest.task)
    setup = ds.make_setup(real, opts, "cpu")
    train = downstream_rows.real_train(real, opts)
    row = downstream_rows.Configuration(
        downstream_rows.ROUND_TRIP_NAME, "round-trip", np.zeros(0, np.int64), train
    )
    trips = round_trip(chosen, real, train, torch.device("cpu"))
    result = ds._run_row(row, setup, real, trips, ds.Referees())  # the benchmark's own row
    return {
        "miou": result.miou, "miou_std": result.miou_std, "f1": result.f1,
        "seeds": [s.miou for s in result.seeds], "steps": [s.best_steps for s in result.seeds],
    }  # fmt: skip


def append_line(out: Path, record: dict[str, Any]) -> None:
    """One JSON line appended to `out` (and printed) as soon as it is measured, so a run cut
    short on a busy machine still leaves its whole rows and seeds."""
    with out.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def train_seeds(
    name: str, data: Any, train: np.ndarray, setup: Any, opts: DownstreamOptions, out: Path,
    **extra: Any,
) -> None:  # fmt: skip
    """Every seed of one row trained on `data` alone (as the round-trip row trains), each a
    JSON line in `out` with `extra` beside its figures."""
    config = downstream_rows.Configuration(name, "round-trip", np.zeros(0, np.int64), train)
    for seed in ds.seed_list(opts):
        started = time.perf_counter()
        run, _ = ds.run_seed(config, setup, None, data, seed)
        append_line(out, {
            "row": name, "seed": seed, "miou": run.miou, "best_steps": run.best_steps,
            "iou": run.iou_per_class, **extra, "wall_s": round(time.perf_counter() - started, 1),
            "threads": torch.get_num_threads(),  # figures repeat only at the same count
        })  # fmt: skip


class RoundTrips:
    """Round trips read like the real store they came from (its manifest, root, splits)."""

    def __init__(self, trips: Any, real: StoreReader) -> None:
        self._trips, self._real = trips, real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def read(self, index: int) -> dict[str, np.ndarray]:
        sample: dict[str, np.ndarray] = self._trips.read(index)
        return sample


def pair_miou(
    real: StoreReader, model: str, cache: Path, feature_steps: int
) -> tuple[float, float]:
    """(pair mIoU of the round trips of real val, of the real val pairs), both against test."""
    network = load_or_train(real, default_config(real, steps=feature_steps), cache)
    test, val = real.indices("test"), real.indices("val")
    chosen = vae_of(model, real.manifest.task)
    trips = cast(StoreReader, RoundTrips(round_trip(chosen, real, val, torch.device("cpu")), real))
    trip = compare_stores(real, trips, network, reference_indices=test, candidate_indices=val)
    truth = compare_stores(real, real, network, reference_indices=test, candidate_indices=val)
    return trip.pair_miou, truth.pair_miou


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="run folders, or demo")
    parser.add_argument("--real", type=Path, required=True, help="real store (train/val/test)")
    add_protocol_options(parser)
    parser.add_argument("--real-limit", type=int, default=100)
    parser.add_argument("--cache", type=Path, default=Path("feature-cache"))
    parser.add_argument("--feature-steps", type=int, default=400, help="the benchmark's default")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    real = open_store(args.real)
    results = {}
    for model in args.models:
        started = time.monotonic()
        row = downstream_row(real, model, protocol_options(args, args.real_limit))
        print(f"{model}: downstream {row}", flush=True)
        trip, truth = pair_miou(real, model, args.cache, args.feature_steps)
        row |= {"pair_miou": trip, "real_pair_miou": truth}
        row["minutes"] = round((time.monotonic() - started) / 60, 1)
        results[model] = row
        seeds = ", ".join(f"{v:.3f}" for v in row["seeds"])
        print(f"{model}: round-trip mIoU {row['miou']:.3f} ± {row['miou_std']:.3f} ({seeds}), "
              f"pair mIoU {trip:.3f} (real {truth:.3f}), {row['minutes']} min", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
