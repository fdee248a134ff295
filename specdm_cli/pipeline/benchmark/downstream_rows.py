"""The downstream rows (real, its control, round trips, synthetic, real + synthetic by protocol)
and the real pairs each trains, stops and is tested on."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from specdm_cli.config import DownstreamOptions
from specdm_cli.errors import InputDataError
from specdm_cli.stores import StoreReader

# The paper limits the real training set to 2k pairs for SS and 100 for CD (Sec. 4.3).
PAPER_REAL_LIMIT = {"ss": 2000, "cd": 100}
ROUND_TRIP_NAME = "VAE round trip of real"
# The round trip with one stream put back to the real one (--round-trip-parts): what each
# decoder alone costs a model trained on its output.
ROUND_TRIP_PARTS = {
    "round-trip-images": "VAE round trip, images only (real labels)",
    "round-trip-labels": "VAE round trip, labels only (real images)",
}
# Pretrain's control: its two phases (a fresh optimiser and patience for the second) on the real
# pairs alone. On the ss demo (the protocol's defaults, 3 seeds, 2026-12-03) a second real phase
# alone took real only from 0.948 to 0.958, pretrain on synthetic pairs reached 0.955: pretrain
# rows are read against this one, not against real only.
TWICE_NAME = "real -> real"
AGREE = "-agree"
RATIO_ROW_NAMES = {
    "mixed": "real+synthetic x{ratio}",
    "pretrain": "synthetic x{ratio} -> real",
    "mixed-agree": "real+synthetic x{ratio}, agreement-relabelled",
    "pretrain-agree": "synthetic x{ratio} -> real, agreement-relabelled",
}
# The oracle (--downstream-oracle): a ratio row with real train pairs past the limit in place of
# the synthetic ones, so the best a synthetic phase could give, were its pairs real, is measured
# beside it (on the ss demo a second real phase alone gained as much as the synthetic one).
ORACLE = "-oracle"
ORACLE_ROW_NAMES = {
    "mixed": "real+real x{ratio} (oracle)",
    "pretrain": "real x{ratio} -> real (oracle)",
}
# With --model, each oracle row again on its real pairs' VAE round trips: the most any generator
# decoding through that VAE could give there, measured without a U-Net (on the ss demo at 10
# real pairs, seed 0, 2026-12-05: 0.919 against the oracle's 0.943 and real only's 0.917).
ROUND_TRIP_ORACLE_NAMES = {
    "mixed": "real+VAE round trip x{ratio} (oracle)",
    "pretrain": "VAE round trip x{ratio} -> real (oracle)",
}


@dataclass(frozen=True)
class Configuration:
    """One row: its name, how it trains (`protocol`) and which pairs of each source it uses.

    Protocols: "real", "synthetic" (one source); "real-twice" (real, then real again: pretrain's
    control); "round-trip" (the real pairs' VAE reconstructions, `synthetic` indexing the real
    store), "round-trip-images" and "round-trip-labels" (one stream decoded, the other real);
    "mixed" (every batch a fixed share real); "pretrain" (synthetic to its best val
    checkpoint, then fine-tuned on real); "mixed-agree" and "pretrain-agree" as those, with
    synthetic labels agreement-relabelled (agreement.py); "mixed-oracle" and "pretrain-oracle"
    as "mixed" and "pretrain", with `synthetic` indexing real train pairs past the limit and
    past the stopping pairs.
    """

    name: str
    protocol: str
    real: np.ndarray
    synthetic: np.ndarray
    decoded: bool = False  # an oracle row whose real pairs go through the run's VAE first

    @property
    def relabelled(self) -> bool:
        """Whether its synthetic labels are kept only where the seed's real-only model agrees."""
        return self.protocol.endswith(AGREE)

    @property
    def oracle(self) -> bool:
        """Whether its second source is real pairs past the limit instead of synthetic ones."""
        return self.protocol.endswith(ORACLE)

    @property
    def training(self) -> str:
        """How it trains, relabelled, oracle or not: real, real-twice, round-trip, synthetic,
        mixed or pretrain."""
        return self.protocol.removesuffix(AGREE).removesuffix(ORACLE)


def configurations(
    real: StoreReader, synthetic: StoreReader, options: DownstreamOptions, round_trip: bool = False
) -> list[Configuration]:
    """Real only (the first `real_limit` train pairs, as `fit-vae --limit`), their VAE round
    trips, synthetic only (as many as the largest ratio asks for) and, per ratio and protocol,
    real + ratio x synthetic, each followed by its oracle when asked for."""
    train = real_train(real, options)
    pool = synthetic.indices(None)
    none = np.zeros(0, np.int64)
    rows = [Configuration("real", "real", train, none)]
    rows += [
        Configuration(f"real, first {limit}", "real", pairs, none)
        for limit, pairs in curve_pairs(real, options, train.size)
    ]
    if pretrains(options):
        rows.append(Configuration(TWICE_NAME, "real-twice", train, none))
    if round_trip:
        rows.append(Configuration(ROUND_TRIP_NAME, "round-trip", none, train))
        if options.round_trip_parts:
            rows += [
                Configuration(name, part, none, train) for part, name in ROUND_TRIP_PARTS.items()
            ]
    rows.append(
        Configuration("synthetic", "synthetic", none, pool[: max(options.ratios) * train.size])
    )
    spare = oracle_pairs(real, options, train) if options.oracle else none
    for ratio in options.ratios:
        chosen = pool[: ratio * train.size]
        short = (
            f" ({chosen.size} of {ratio * train.size} pairs)"
            if chosen.size < ratio * train.size
            else ""
        )
        for protocol in options.protocols:
            name = RATIO_ROW_NAMES[protocol].format(ratio=ratio) + short
            rows.append(Configuration(name, protocol, train, chosen))
        if options.oracle:  # one per way of training, relabelled or not: real labels agree
            for training in dict.fromkeys(p.removesuffix(AGREE) for p in options.protocols):
                oracle = Configuration(
                    ORACLE_ROW_NAMES[training].format(ratio=ratio), training + ORACLE, train,
                    spare[: ratio * train.size],
                )  # fmt: skip
                rows.append(oracle)
                if round_trip:
                    name = ROUND_TRIP_ORACLE_NAMES[training].format(ratio=ratio)
                    rows.append(replace(oracle, name=name, decoded=True))
    return rows


def oracle_pairs(real: StoreReader, options: DownstreamOptions, train: np.ndarray) -> np.ndarray:
    """The real train pairs past the limit that no row stops on, as many as the largest ratio's
    oracle takes; too few is an input error, raised before any training."""
    _, eval_split = evaluation_split(real)
    stopping, _ = stopping_split(real, eval_split, options)
    rest = real.indices("train")[train.size :]
    spare = rest[~np.isin(rest, stopping)]
    wanted = max(options.ratios) * train.size
    if spare.size < wanted:
        raise InputDataError(
            f"--downstream-oracle needs {wanted} real train pairs past the {train.size} of "
            f"{_limit_named(real, options)}"
            f" (--synthetic-ratio {max(options.ratios)} per real pair), the store has {spare.size}",
            real.root,
            "lower --synthetic-ratio or --real-limit, or leave out --downstream-oracle",
        )
    return spare[:wanted]


def pretrains(options: DownstreamOptions) -> bool:
    """Whether a pretrain row runs, and with it pretrain's control."""
    return any(protocol.removesuffix(AGREE) == "pretrain" for protocol in options.protocols)


def asked_real_limit(real: StoreReader, options: DownstreamOptions) -> int:
    """--real-limit, else the paper's for the task (more than a small store holds, maybe)."""
    return options.real_limit or PAPER_REAL_LIMIT[real.manifest.task]


def real_train(real: StoreReader, options: DownstreamOptions) -> np.ndarray:
    """The first `real_limit` real train pairs (the paper's limited-data protocol)."""
    train = real.indices("train")[: asked_real_limit(real, options)]
    if train.size == 0:
        raise InputDataError("the real store has no train split", real.root, "re-prepare it")
    return train


def curve_pairs(
    real: StoreReader, options: DownstreamOptions, limit: int
) -> list[tuple[int, np.ndarray]]:
    """(L, the first L real train pairs) of each learning-curve point other than `limit`."""
    available = real.indices("train")
    wanted = sorted({size for size in options.real_curve if size != limit})
    if wanted and wanted[-1] > available.size:
        raise InputDataError(
            f"--downstream-real-curve asks for {wanted[-1]} real train pairs, the store has "
            f"{available.size}",
            real.root,
            f"keep the curve's limits at or below {available.size}",
        )
    return [(size, available[:size]) for size in wanted]


def evaluation_split(real: StoreReader) -> tuple[np.ndarray, str]:
    """The real test split, else val (SegMunich and OSCD ship none: val is their test)."""
    for split in ("test", "val"):
        indices = real.indices(split)
        if indices.size:
            return indices, split
    raise InputDataError(
        "the real store has no test or val split to evaluate on",
        real.root,
        "prepare it with --test-fraction or --val-fraction",
    )


def stopping_split(
    real: StoreReader, eval_split: str, options: DownstreamOptions
) -> tuple[np.ndarray, str]:
    """Real pairs early stopping watches, never the tested ones: val when testing on test, else
    the train pairs past `real_limit` (which no row trains on)."""
    if eval_split == "test" and real.indices("val").size:
        return real.indices("val")[: options.val_limit], "val"
    limit = asked_real_limit(real, options)
    spare = real.indices("train")[limit : limit + options.val_limit]
    if spare.size == 0:
        raise InputDataError(
            f"no real pairs left for early stopping: the {eval_split} split is the test set and "
            f"every train pair is in {_limit_named(real, options)}",
            real.root,
            "lower --real-limit or prepare the store with --test-fraction",
        )
    return spare, "train pairs past --real-limit"


def _limit_named(real: StoreReader, options: DownstreamOptions) -> str:
    """--real-limit as given, or the default that stood in for it (users who never gave one
    read "--real-limit" as an option of theirs)."""
    if options.real_limit is not None:
        return "--real-limit"
    return f"the paper's {PAPER_REAL_LIMIT[real.manifest.task]} (--real-limit's default)"
