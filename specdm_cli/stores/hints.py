"""What to tell a user whose store is incomplete or damaged: the fix depends on who wrote it."""

from __future__ import annotations

from pathlib import Path

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
