"""Where real data stops helping (issue 20 §1): the real-only downstream row at several real
limits, per store, so `--real-limit` can sit on the steep part of the curve.

    python examples/real_learning_curve.py STORE [STORE ...] [--limits 25,50,100,200,400]

Each point is the real-only row of `specdm benchmark --downstream` (the same code: the first
L real train pairs, trained to the best real-val mIoU, tested on the real test split), by
default at the *smaller variant* of docs/measurements.md (batch 8, evaluation every 25 steps,
patience 3, at most 500 steps), over `--seeds` seeds. Prints one line per (store, limit); `--json` writes them.
A store with the same scenes drawn harder (`prepare demo --demo-variant hard`) beside the
standard one shows whether the task leaves synthetic data anything to add.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from vae_utility import add_protocol_options, protocol_options

from specdm_cli.pipeline.benchmark import downstream as ds
from specdm_cli.pipeline.benchmark import downstream_rows
from specdm_cli.stores import StoreReader, open_store


def real_only(real: StoreReader, limit: int, args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark's real-only row with the first `limit` real train pairs."""
    opts = protocol_options(args, limit)
    setup = ds.make_setup(real, opts, "cpu")
    train = downstream_rows.real_train(real, opts)
    row = downstream_rows.Configuration("real", "real", train, np.zeros(0, np.int64))
    result = ds._run_row(row, setup, real, real, ds.Referees())  # the benchmark's own row
    return {
        "store": str(real.root), "limit": int(train.size), "miou": result.miou,
        "miou_std": result.miou_std, "seeds": [s.miou for s in result.seeds],
        "steps": [s.best_steps for s in result.seeds],
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stores", nargs="+", type=Path, help="real stores (train/val/test)")
    parser.add_argument("--limits", default="25,50,100,200,400", help="real train pairs")
    add_protocol_options(parser)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    limits = [int(part) for part in args.limits.split(",")]
    results = []
    for path in args.stores:
        real = open_store(path)
        for limit in limits:
            started = time.monotonic()
            point = real_only(real, limit, args)
            results.append(point)
            seeds = ", ".join(f"{m:.3f}" for m in point["seeds"])
            print(f"{path.name} real {point['limit']:4d}: mIoU {point['miou']:.3f} ± "
                  f"{point['miou_std']:.3f} ({seeds}), {time.monotonic() - started:.0f} s",
                  flush=True)  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
