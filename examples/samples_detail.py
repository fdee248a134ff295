"""Retrieved detail on a synthetic store's samples (docs/measurements.md: "On the U-Net's own
samples, retrieved detail..."): the pretrain row of `agreement_by_seed.py` at `--real-limit`
real pairs, its synthetic pairs' images given retrieved detail first.

`examples/retrieved_detail.py` measures the same detail on round trips of real pairs. The bank
is built as there (the real store's last `--bank` train scenes, which no row uses, through the
model's VAE). `--class-matched` looks each block up only among the bank blocks whose real label's
majority class is the class the sample's mask draws there (a road block takes road detail), as
`synthesize --detail` does; without it the lookup matches the decoded image alone.

    OMP_NUM_THREADS=1 python examples/samples_detail.py real-ss.zarr syn500.zarr demo out.jsonl \
        --class-matched --real-limit 10 --ratio 50 --lr-drops 1 --batch-size 16 --eval-every 50 \
        --patience 6 --max-steps 3000 --first-seed 0 --seeds 1
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from agreement_by_seed import train_row
from retrieved_detail import bank_of
from vae_utility import add_protocol_options, protocol_options

from specdm_cli.models.detail import Bank, Lookup
from specdm_cli.pipeline.benchmark.downstream import Referees, make_setup, seed_list
from specdm_cli.pipeline.benchmark.downstream_rows import configurations
from specdm_cli.pipeline.benchmark.feature_training import ArraySource
from specdm_cli.pipeline.runs.choose import choose_model
from specdm_cli.stores import StoreReader, content_sha256, open_store


def with_detail(
    synthetic: StoreReader, indices: np.ndarray, bank: Bank, class_matched: bool
) -> ArraySource:
    """The samples `indices` with retrieved detail (looked up within the mask's class when
    `class_matched`, as `synthesize --detail` does)."""
    samples = {}
    for i in indices.tolist():
        sample = synthetic.read(i)
        decoded = torch.from_numpy(sample["image"].astype(np.float32))
        mask = torch.from_numpy(sample["mask"]) if class_matched else None
        samples[i] = {**sample, "image": (decoded + bank.detail(decoded, mask)).numpy()}
    return ArraySource(synthetic.manifest, samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("real", type=Path, help="real ss store")
    parser.add_argument("synthetic", type=Path, help="synthetic ss store (plain samples)")
    parser.add_argument("model", help="the samples' run folder, or demo")
    parser.add_argument("out", type=Path, help="JSON lines, appended to")
    parser.add_argument("--real-limit", type=int, default=10)
    parser.add_argument("--ratio", type=int, default=50, help="synthetic pairs per real one")
    parser.add_argument("--bank", type=int, default=300, help="real scenes the detail comes from")
    parser.add_argument("--class-matched", action="store_true", help="look up within the class")
    add_protocol_options(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = protocol_options(args, args.real_limit, ratios=(args.ratio,), protocols=("pretrain",))
    real, synthetic = open_store(args.real), open_store(args.synthetic)
    (row,) = [r for r in configurations(real, synthetic, options) if r.protocol == "pretrain"]
    banked = real.indices("train")[-args.bank :]
    if np.isin(banked, row.real).any():
        parser.error("--bank overlaps the row's real pairs: the train split is too small for it")
    decoder = choose_model(args.model, "ss", vae_only=True)
    bank = bank_of(real, decoder, banked, Lookup())
    kind = "class-matched detail" if args.class_matched else "retrieved detail"
    detailed = with_detail(synthetic, row.synthetic, bank, args.class_matched)
    inputs = {
        "real_content": content_sha256(real), "synthetic": str(args.synthetic),
        "synthetic_content": content_sha256(synthetic),
        "decoder": f"samples + {kind} (bank {args.bank}, block 4, context 8, dims 48)",
    }  # fmt: skip
    for seed in seed_list(options):
        setup = make_setup(real, options, "cpu")
        named = replace(row, name=f"{row.name} + {kind}")
        train_row(named, setup, (real, detailed), seed, Referees(), args.out, inputs)


if __name__ == "__main__":
    main()
