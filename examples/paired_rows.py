"""Rows of agreement_by_seed.py set against other rows seed by seed, with a 95% interval.

As `benchmark --compare` pairs a report's rows: each seed's difference, the mean, its
two-sided 95% t-interval and on how many seeds the first side is above; e.g. the declared cd
gate's bank rows against plain.

    python examples/paired_rows.py cdbank-s*.jsonl --against cdplain-s*.jsonl

Rows pair by name and seed (`--row` picks one name; default every name both sides hold); the
seeds and rows one side lacks are named. A seed found twice on one side (files of two runs
mixed), rows of one side from two synthetic stores (`synthetic_content`), or rows trained on
two real stores (`real_content`) are refused: the difference would not be the synthetic
pairs' alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from specdm_cli.metrics.stats import mean_interval

Record = dict[str, Any]


def by_row_and_seed(paths: list[Path]) -> dict[str, dict[int, Record]]:
    """Every JSON line of `paths` by row name, then seed; a seed twice is an error."""
    rows: dict[str, dict[int, Record]] = {}
    for path in paths:
        for line in filter(str.strip, path.read_text(encoding="utf-8").splitlines()):
            record = json.loads(line)
            seeds = rows.setdefault(record["row"], {})
            if record["seed"] in seeds:
                refuse(f"seed {record['seed']} of {record['row']!r} twice", path,
                       "pass the files of one run per side")  # fmt: skip
            seeds[record["seed"]] = record
    return rows


def refuse(what: str, where: Path | str, fix: str) -> None:
    sys.exit(f"error: {what} ({where}): {fix}")


def one_digest(records: list[Record], key: str, row: str, what: str) -> None:
    """The records' `key` digests (those recorded) name one store, else the comparison is off."""
    digests = {r[key] for r in records if r.get(key)}
    if len(digests) > 1:
        refuse(f"the rows of {row!r} come from {len(digests)} {what}", row,
               f"compare rows of one {what[:-1]} per side")  # fmt: skip


def change_iou(record: Record) -> float | None:
    """The last class's IoU (cd: change), where the record has per-class IoUs."""
    iou = record.get("iou")
    values = list(iou.values()) if isinstance(iou, dict) else iou
    return float(values[-1]) if values and values[-1] is not None else None


def paired(row: str, mine: dict[int, Record], theirs: dict[int, Record]) -> list[str]:
    """The lines of one row's comparison; an error where the real stores differ."""
    seeds = sorted(set(mine) & set(theirs))
    for records in (mine, theirs):
        one_digest(list(records.values()), "synthetic_content", row, "synthetic stores")
    one_digest([*mine.values(), *theirs.values()], "real_content", row, "real stores")
    lines, gains = [f"{row}:"], []
    for side, records in (("first", mine), ("--against", theirs)):
        if alone := sorted(set(records) - set(seeds)):
            lines.append(f"  seeds only on the {side} side, left out: {alone}")
    for seed in seeds:
        gain = mine[seed]["miou"] - theirs[seed]["miou"]
        gains.append(gain)
        iou_mine, iou_theirs = change_iou(mine[seed]), change_iou(theirs[seed])
        last = ""
        if iou_mine is not None and iou_theirs is not None:
            last = f", last class IoU {iou_mine - iou_theirs:+.3f}"
        lines.append(
            f"  seed {seed}: {mine[seed]['miou']:.4f} against {theirs[seed]['miou']:.4f}, "
            f"{gain:+.4f}{last}"
        )
    if len(gains) >= 2:
        mean, low, high = mean_interval(gains)
        above = sum(gain > 0 for gain in gains)
        lines.append(
            f"  mean {mean:+.4f} (95% {low:+.4f} to {high:+.4f}), above on {above}/{len(gains)}"
        )
    else:
        lines.append(f"  {len(gains)} shared seed(s): no interval")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mine", type=Path, nargs="+", help="JSON lines of the rows judged")
    parser.add_argument("--against", type=Path, nargs="+", required=True)
    parser.add_argument("--row", help="one row name (default: every name both sides hold)")
    args = parser.parse_args()
    mine, theirs = by_row_and_seed(args.mine), by_row_and_seed(args.against)
    names = [args.row] if args.row else [name for name in mine if name in theirs]
    if not names or any(name not in mine or name not in theirs for name in names):
        refuse("no row of that name on both sides", args.row or "every row",
               f"name one of {sorted(set(mine) & set(theirs))}")  # fmt: skip
    for name in sorted(set(mine) ^ set(theirs)):
        print(f"{name}: on one side only, left out")
    for name in names:
        print("\n".join(paired(name, mine[name], theirs[name])))


if __name__ == "__main__":
    main()
