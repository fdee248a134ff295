"""Retrieved detail on a synthetic store's samples (docs/measurements.md: "On the U-Net's own
samples, retrieved detail..."): the pretrain row of `agreement_by_seed.py` at `--real-limit`
real pairs, its synthetic pairs' images given retrieved detail first.

`examples/retrieved_detail.py` measures the same detail on round trips of real pairs. The bank
is built as there (the real store's last `--bank` train scenes, which no row uses, through the
model's VAE). `--class-matched` looks each block up only among the bank blocks whose real label's
majority class is the class the sample's mask draws there (a road block takes road detail); the
plain lookup, as `synthesize --detail`, matches the decoded image alone.

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
import torch.nn.functional as F  # noqa: N812
from agreement_by_seed import train_row
from retrieved_detail import bank_of
from vae_utility import add_protocol_options

from specdm_cli.config import DownstreamOptions
from specdm_cli.models.detail import Bank, Lookup
from specdm_cli.pipeline.benchmark.downstream import Referees, make_setup, seed_list
from specdm_cli.pipeline.benchmark.downstream_rows import configurations
from specdm_cli.pipeline.benchmark.feature_training import ArraySource
from specdm_cli.pipeline.runs.choose import choose_model
from specdm_cli.stores import StoreReader, content_sha256, open_store


def block_classes(mask: np.ndarray, classes: int, block: int) -> torch.Tensor:
    """(blocks,) each block's majority class (unlabelled pixels count for none)."""
    labels = torch.from_numpy(mask.astype(np.int64))
    onehot = torch.stack([(labels == c).float() for c in range(classes)])[None]
    counts = F.unfold(onehot, block, stride=block)[0].view(classes, block * block, -1)
    return counts.sum(dim=1).argmax(dim=0)


def class_matched(bank: Bank, bank_classes: torch.Tensor, decoded: torch.Tensor,
                  wanted: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """(blocks,) the nearest bank block of each block's class (of any class where the bank has
    none of it)."""
    query, chosen = bank.features(decoded), torch.empty(len(wanted), dtype=torch.long)
    for value in wanted.unique().tolist():
        where = wanted == value
        pool = torch.nonzero(bank_classes == value).flatten()
        pool = pool if len(pool) else torch.arange(len(bank.keys))
        chosen[where] = pool[torch.cdist(query[where], bank.keys[pool]).argmin(dim=1)]
    return chosen


def with_detail(
    synthetic: StoreReader, indices: np.ndarray, bank: Bank, bank_classes: torch.Tensor | None
) -> ArraySource:
    """The samples `indices` with retrieved detail (class-matched when `bank_classes`)."""
    classes, block = len(synthetic.manifest.classes), bank.lookup.block
    samples = {}
    for i in indices.tolist():
        sample = synthetic.read(i)
        decoded = torch.from_numpy(sample["image"].astype(np.float32))
        chosen = None
        if bank_classes is not None:
            wanted = block_classes(sample["mask"], classes, block)
            chosen = class_matched(bank, bank_classes, decoded, wanted)
        samples[i] = {**sample, "image": (decoded + bank.detail(decoded, chosen)).numpy()}
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
    options = DownstreamOptions(
        batch_size=args.batch_size, eval_every=args.eval_every, patience=args.patience,
        max_steps=args.max_steps, real_limit=args.real_limit, ratios=(args.ratio,),
        seed=args.first_seed, seeds=args.seeds, protocols=("pretrain",), lr_drops=args.lr_drops,
    )  # fmt: skip
    real, synthetic = open_store(args.real), open_store(args.synthetic)
    (row,) = [r for r in configurations(real, synthetic, options) if r.protocol == "pretrain"]
    banked = real.indices("train")[-args.bank :]
    if np.isin(banked, row.real).any():
        parser.error("--bank overlaps the row's real pairs: the train split is too small for it")
    decoder = choose_model(args.model, "ss", vae_only=True)
    bank = bank_of(real, decoder, banked, Lookup())
    classes = len(real.manifest.classes)
    bank_classes = None
    if args.class_matched:
        masks = [real.read(i)["mask"] for i in banked.tolist()]
        bank_classes = torch.cat([block_classes(m, classes, bank.lookup.block) for m in masks])
    kind = "class-matched detail" if args.class_matched else "retrieved detail"
    detailed = with_detail(synthetic, row.synthetic, bank, bank_classes)
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
