"""Detail retrieved from other real scenes onto decoded images (docs/measurements.md: "Detail
retrieved from other scenes"): the round-trip oracle rows of `agreement_by_seed.py` again, each
decoded image given back fine detail by example, as example-based super-resolution does.

The VAE's decoder loses the fine detail a segmenter needs ("What the image stream loses is fine
detail": the real image's own detail put back on decoded images recovered most of the loss). A
decoded image has no real image to take it from; this takes it from others. A bank of real
scenes that no row trains or tests on is encoded and decoded by the same VAE; each block of
`--block` pixels of a decoded image looks up the bank block whose decoded surroundings
(`--context` pixels square, band-normalised, projected on their first `--dims` principal
components) are nearest, and adds that block's residual (real - decoded).

    OMP_NUM_THREADS=1 python examples/retrieved_detail.py real-ss.zarr demo out.jsonl \
        --real-limit 10 --ratio 50 --lr-drops 1 --batch-size 16 --eval-every 50 --patience 6 \
        --max-steps 3000 --first-seed 0 --seeds 1

`--unmatched` is the control: each block takes a random bank block's residual, detail as real
as the retrieved one but placed without regard to the image.

Per seed: each protocol's round-trip oracle row with retrieved detail (protocol
`...-oracle-round-trip-detail`; the plain round trip is `agreement_by_seed.py
--round-trip-oracle MODEL --round-trip-only`, the same rows, seeds and store). Before training it
prints how much of the oracle pairs' true residual the retrieved one explains.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from agreement_by_seed import train_row
from vae_utility import add_protocol_options, protocol_options

from specdm_cli.config import downstream_protocol_list
from specdm_cli.models.detail import Bank, Lookup, build_bank
from specdm_cli.pipeline.benchmark.downstream import Referees, make_setup, seed_list
from specdm_cli.pipeline.benchmark.downstream_rows import configurations
from specdm_cli.pipeline.benchmark.feature_training import ArraySource
from specdm_cli.pipeline.benchmark.generator import round_trip
from specdm_cli.pipeline.runs.choose import ChosenModel, choose_model
from specdm_cli.stores import StoreReader, content_sha256, open_store

_CPU = torch.device("cpu")


def bank_of(real: StoreReader, decoder: ChosenModel, indices: np.ndarray, lookup: Lookup) -> Bank:
    """The bank of the real scenes `indices` through the decoder's VAE."""
    norm = real.manifest.normalization
    assert norm is not None
    mean = torch.tensor(norm.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(norm.std, dtype=torch.float32).view(-1, 1, 1)
    trips = round_trip(decoder, real, indices, _CPU)
    truths = (real.read(i) for i in indices.tolist())
    scenes = (
        (_image(trips.read(i)), _image(truth), torch.from_numpy(truth["mask"]))
        for i, truth in zip(indices.tolist(), truths, strict=True)
    )
    return build_bank(scenes, mean, std, lookup)


def _image(sample: dict[str, np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(sample["image"].astype(np.float32))


def unmatched_detail(bank: Bank, decoded: torch.Tensor, seed: int) -> torch.Tensor:
    """The control: each block takes a random bank block's residual, drawn from `seed`."""
    blocks = (decoded.shape[1] // bank.lookup.block) * (decoded.shape[2] // bank.lookup.block)
    draw = torch.Generator().manual_seed(seed)
    return bank.detail(decoded, chosen=torch.randint(len(bank.keys), (blocks,), generator=draw))


def with_detail(
    trips: ArraySource, real: StoreReader, bank: Bank, matched: bool = True
) -> ArraySource:
    """The round trips with retrieved detail; prints how much of the true residual it explains."""
    samples, explained, energy = {}, 0.0, 0.0
    for i, sample in trips.samples.items():
        decoded = torch.from_numpy(sample["image"].astype(np.float32))
        detail = bank.detail(decoded) if matched else unmatched_detail(bank, decoded, int(i))
        truth = torch.from_numpy(real.read(i)["image"].astype(np.float32)) - decoded
        scale = bank.std
        explained += float((((truth - detail) / scale) ** 2).sum())
        energy += float(((truth / scale) ** 2).sum())
        samples[i] = {**sample, "image": (decoded + detail).numpy()}
    print(f"retrieved detail: 1 - |true - retrieved|^2 / |true|^2 = {1 - explained / energy:.3f}")
    return ArraySource(trips.manifest, samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("real", type=Path, help="real ss store")
    parser.add_argument("model", help="the VAE's run folder, or demo")
    parser.add_argument("out", type=Path, help="JSON lines, appended to")
    parser.add_argument("--protocols", default="pretrain")
    parser.add_argument("--real-limit", type=int, default=10)
    parser.add_argument("--ratio", type=int, default=50, help="oracle pairs per real one")
    parser.add_argument("--bank", type=int, default=300, help="real scenes the detail comes from")
    parser.add_argument("--block", type=int, default=4)
    parser.add_argument("--context", type=int, default=8)
    parser.add_argument("--dims", type=int, default=48)
    parser.add_argument(
        "--unmatched",
        action="store_true",
        help="the control: each block takes a random bank block's residual, not the nearest's",
    )
    add_protocol_options(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = protocol_options(
        args, args.real_limit, ratios=(args.ratio,),
        protocols=downstream_protocol_list(args.protocols), oracle=True,
    )  # fmt: skip
    real = open_store(args.real)
    decoder = choose_model(args.model, real.manifest.task, vae_only=True)
    rows = [row for row in configurations(real, real, options, round_trip=True) if row.decoded]
    used = np.concatenate([np.concatenate([row.real, row.synthetic]) for row in rows])
    # The bank: the train split's last scenes, which no row trains on; val and test stay out.
    banked = real.indices("train")[-args.bank :]
    if np.isin(banked, used).any():
        parser.error("--bank overlaps the rows' pairs: the train split is too small for it")
    bank = bank_of(real, decoder, banked, Lookup(args.block, args.context, args.dims))
    kind = "unmatched detail" if args.unmatched else "retrieved detail"
    inputs = {
        "real_content": content_sha256(real), "synthetic": None, "synthetic_content": None,
        "decoder": f"{decoder.manifest.run_id} {decoder.sha256[:12]} + {kind} "
        f"(bank {args.bank}, block {args.block}, context {args.context}, dims {args.dims})",
    }  # fmt: skip
    trips = {
        row.name: with_detail(
            round_trip(decoder, real, row.synthetic, _CPU), real, bank, not args.unmatched
        )
        for row in rows
    }
    for seed in seed_list(options):
        setup, referees = make_setup(real, options, "cpu"), Referees()
        for row in rows:
            detailed = replace(row, name=f"{row.name} + {kind}")
            train_row(detailed, setup, (real, trips[row.name]), seed, referees, args.out, inputs)


if __name__ == "__main__":
    main()
