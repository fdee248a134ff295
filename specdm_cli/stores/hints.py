"""What to tell a user whose store is incomplete or damaged: the fix depends on who wrote it."""

from __future__ import annotations

import shlex
from pathlib import Path

from specdm_cli.config import (
    PATCH_FILTER_DEFAULTS,
    PREPARE_FLAGS,
    SPLIT_BY_FRACTIONS,
    prepare_default,
)
from specdm_cli.manifest import Manifest

# Every synthesize writer, sharded or not, leaves a record here per batch written
# (pipeline/synthesize/shards.py writes them; stores may not import the pipeline).
SHARD_RECORDS = ".specdm/shards"
# Only a store that a `synthesize --shard i/N` joined holds this: what tells a sharded store
# from a plain one (whose per-batch records look the same).
SHARDED_MARK = ".specdm/sharded.json"
# For a store whose plan names no stage (written before plans recorded one).
GENERIC_HINT = "rerun the command that wrote it with --resume (it rewrites damaged samples)"
FILTER_HINT = "rerun `specdm filter` with the same options and --overwrite (filter does not resume)"


def _stage(manifest: Manifest) -> object:
    return (manifest.plan or {}).get("stage")


def repair_hint(manifest: Manifest) -> str:
    """How to rewrite a store's damaged samples or tables: `filter` has no --resume (its
    output is made again with --overwrite); `prepare` and `synthesize` rewrite them on --resume."""
    stage = _stage(manifest)
    if stage == "filter":
        return FILTER_HINT
    if stage in ("prepare", "synthesize"):
        return f"rerun `specdm {stage}` with the same options and --resume (it rewrites them)"
    return GENERIC_HINT


def incomplete_hint(root: Path, manifest: Manifest) -> str:
    """How to finish an incomplete store: a store written with --shard i/N needs the missing
    shards (or only --finalize); a filter output is made again; else --resume."""
    stage = _stage(manifest)
    if stage == "filter":
        return FILTER_HINT
    if stage == "synthesize" and (root / SHARDED_MARK).is_file():
        return (
            "run the shards still missing (the same options and --shard i/N), then "
            f"`specdm synthesize --finalize {root}`"
        )
    if stage in ("prepare", "synthesize"):
        return f"rerun `specdm {stage}` with the same options and --resume"
    return "rerun its command with --resume"


# What gives a store of `prepare SOURCE` a val or test split, which benchmark and validation read.
HELD_OUT_OPTIONS = {
    "demo": "more scenes (--n) or a larger --val-fraction/--test-fraction, or another --seed "
    "(each scene's split is drawn from the seed and its index)",
    "geotiff": "more source files, a larger --val-fraction/--test-fraction (splits take whole "
    "files), or --splits FILE.csv",
    "oscd": "--val-cities, or --val-fraction (of the train cities)",
    "segmunich": "the dataset's val or test list (dataset/val.txt, dataset/test.txt)",
}


def held_out_hint(manifest: Manifest) -> str:
    """How to prepare the store again with a val or test split, for the source it came from."""
    how = HELD_OUT_OPTIONS.get(str((manifest.plan or {}).get("source")))
    if how is None:
        return "prepare it again with a val or test split"
    return f"prepare it again with --overwrite and {how}"


# The `prepare` option that sets a source's sample side (SegMunich's patches are 128 px, fixed).
SIDE_OPTION = {"demo": "--size", "geotiff": "--patch-size", "oscd": "--patch-size"}


def prepare_again(root: Path, manifest: Manifest, side: int, out: Path | None = None) -> str:
    """The `specdm prepare` command that makes the store again with samples `side` px square:
    its source's own size option, its raw folder and recorded options (so its splits stay),
    then `--overwrite` of the store or a new `out`; a sentence where the source has no size
    option (SegMunich) or the store records no prepare plan."""
    plan = manifest.plan or {}
    source = str(plan.get("source", ""))
    option = SIDE_OPTION.get(source)
    if plan.get("stage") != "prepare" or option is None:
        return f"prepare a store of {side}x{side} px samples"
    words = ["specdm", "prepare", source, *([str(plan["raw"])] if plan.get("raw") else [])]
    words += ["--out", str(out or root), option, str(side)]
    if plan.get("format") == "geotiff":
        words += ["--format", "geotiff"]
    words += _carried_options(source, plan)
    return f"`{shlex.join(words if out else [*words, '--overwrite'])}`"


def _carried_options(source: str, plan: dict[str, object]) -> list[str]:
    """The options `plan` records that `source` reads, each left out at its default (and the
    seeded-split ones beside a --splits file); the size option is the caller's."""
    recorded = plan.get("options")
    options = dict(recorded) if isinstance(recorded, dict) else {}
    by_file = options.get("splits_file") is not None
    words: list[str] = []
    for field, (flag, readers) in PREPARE_FLAGS.items():
        value = options.get(field)
        unread = field in SPLIT_BY_FRACTIONS and by_file
        if flag == SIDE_OPTION.get(source) or source not in readers or unread:
            continue
        if value is not None and value != _as_recorded(prepare_default(field, source)):
            words += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    for key, default in PATCH_FILTER_DEFAULTS.items():
        if plan.get(key) is not None and plan.get(key) != default:
            words += [f"--{key.replace('_', '-')}", str(plan[key])]
    return words


def _as_recorded(value: object) -> object:
    """A default as a plan's JSON holds it (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value


# What gives a store of `prepare SOURCE` a train split, where fit-vae's normalisation comes from.
TRAIN_OPTIONS = {
    "demo": "smaller --val-fraction/--test-fraction (they took every scene) or more scenes (--n)",
    "geotiff": "a smaller --val-fraction/--test-fraction (they took every file), or a --splits "
    "file that names some files train",
    "oscd": "fewer --val-cities or a smaller --val-fraction (they took every train city)",
    "segmunich": "the dataset's train list (dataset/train.txt)",
}


# What moves a class into the train split of a store of `prepare SOURCE` (SegMunich's split
# lists are the dataset's own: nothing to move).
TRAIN_CLASS_OPTIONS = {
    "demo": "more scenes (--n) or another --seed",
    "geotiff": "move tiles that hold them to train (--splits FILE.csv)",
    "oscd": "keep cities that hold them out of val (--val-cities, or another --seed for "
    "--val-fraction)",
}


def train_split_hint(manifest: Manifest) -> str:
    """How to prepare the store again with a train split (the normalisation statistics are the
    train split's, so no other split can stand in for it), for the source it came from."""
    plan = manifest.plan or {}
    source = str(plan.get("source"))
    options = plan.get("options") if isinstance(plan.get("options"), dict) else {}
    splits_file = (options or {}).get("splits_file")
    if source == "geotiff" and splits_file:
        how = f"a --splits file that names some files train ({splits_file} names none)"
    else:
        how = TRAIN_OPTIONS.get(source, "a train split")
    return f"prepare it again with --overwrite and {how}"
