"""The shard protocol of synthetic stores: batch grid, join-or-create, range records, finalize."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from specdm_cli.config import is_digits
from specdm_cli.errors import InputDataError, LockHeldError, UsageError
from specdm_cli.fs.atomic import atomic_write_text, remove_stray_temporaries
from specdm_cli.fs.lock import LOCK_NAME, DirLock, live_locks
from specdm_cli.manifest import Manifest, QualityScores, load_manifest
from specdm_cli.stores import create_store, open_store, open_writer, plan_differences
from specdm_cli.stores.base import MANIFEST_NAME
from specdm_cli.stores.hints import SHARD_RECORDS, SHARDED_MARK
from specdm_cli.stores.quality import write_quality


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based), as given by `--shard i/N`."""

    index: int = 0
    count: int = 1


def parse_batch_size(text: str) -> int | None:
    """`--batch-size`: a number >= 1, or None for `auto`."""
    if text.strip().lower() == "auto":
        return None
    if not is_digits(text.strip()) or int(text) < 1:
        raise UsageError(
            f"--batch-size {text!r} is not a number >= 1 or auto", hint="e.g. --batch-size 16"
        )
    return int(text)


def parse_shard(text: str | None) -> Shard:
    """`i/N` with 0 <= i < N; None means the whole job."""
    if text is None:
        return Shard()
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not int(match[1]) < int(match[2]):
        raise UsageError(f"--shard {text!r} is not i/N with 0 <= i < N", hint="e.g. --shard 0/4")
    return Shard(int(match[1]), int(match[2]))


def shard_batches(n: int, batch: int, shard: Shard) -> list[range]:
    """The sample ranges of this shard's batches: batch k is [kB, (k+1)B), shards split on them."""
    batches = -(-n // batch)
    first = shard.index * batches // shard.count
    last = (shard.index + 1) * batches // shard.count
    return [range(k * batch, min((k + 1) * batch, n)) for k in range(first, last)]


@contextmanager
def shard_lock(out: Path, n: int, batch: int, shard: Shard) -> Iterator[DirLock]:
    """Take this shard's lock, then refuse (exit 6) if a live writer holds an overlapping range.

    Every writer takes its own lock before looking at the others', so of two overlapping plans
    started together at least one sees the other.
    """
    with DirLock(out, f"{LOCK_NAME}.{shard.index}-of-{shard.count}") as lock:
        _refuse_overlaps(out, lock, n, batch, _batch_span(n, batch, shard))
        yield lock


def _refuse_overlaps(out: Path, lock: DirLock, n: int, batch: int, mine: range) -> None:
    for other in live_locks(out):
        theirs = _lock_shard(other)
        if other == lock.path or not mine:
            continue
        span = _batch_span(n, batch, theirs) if theirs else range(mine.start, mine.stop)
        if span and span.start < mine.stop and mine.start < span.stop:
            who = f"shard {theirs.index}/{theirs.count}" if theirs else "another writer"
            raise LockHeldError(
                f"{who} is writing batches {span.start}-{span.stop - 1} of this store, which "
                f"overlap this shard's {mine.start}-{mine.stop - 1}",
                out,
                "give every process of one store the same N in --shard i/N",
            )


def _batch_span(n: int, batch: int, shard: Shard) -> range:
    batches = -(-n // batch)
    return range(shard.index * batches // shard.count, (shard.index + 1) * batches // shard.count)


def _lock_shard(path: Path) -> Shard | None:
    """The shard a lock file names (`.specdm.lock.i-of-N`); None for a whole-store lock."""
    match = re.fullmatch(re.escape(LOCK_NAME) + r"\.(\d+)-of-(\d+)", path.name)
    return Shard(int(match[1]), int(match[2])) if match else None


LATER_PLAN_KEYS = ("threads", "feature_steps")


def join_or_create(out: Path, manifest: Manifest) -> Manifest:
    """Join the store at `out` if its plan matches `manifest.plan`, else create it atomically."""
    if not out.exists():
        try:
            create_store(out, manifest, manifest.count, georeferenced=False)
        except OSError:
            if not out.exists():
                raise
            # Another shard created it between our check and our rename: join theirs.
    _refuse_what_is_not_a_store(out)
    existing = load_manifest(out / MANIFEST_NAME)
    _refuse_another_command_s(out, existing.plan.get("stage"))
    plan = manifest.plan
    # Stores made before the plan recorded these: compared without them.
    plan = {k: v for k, v in plan.items() if k in existing.plan or k not in LATER_PLAN_KEYS}
    if existing.plan != plan and not _same_weights_since(existing, manifest, plan):
        differences = "; ".join(plan_differences(existing.plan, plan))
        raise InputDataError(
            f"the store was made by another synthesis plan ({differences}){_retrained(existing, manifest)}",
            out,
            "use the same options, another --out, or --overwrite",
        )
    return existing


def _refuse_what_is_not_a_store(out: Path) -> None:
    """An --out that exists as a file or a folder of something else (a store is created whole,
    manifest and all, so a shard never sees one half made)."""
    if not out.is_dir():
        raise InputDataError("--out is a file, not a store", out, "choose another --out")
    if not (out / MANIFEST_NAME).exists():
        raise InputDataError(
            "--out is a folder that holds no specdm store", out,
            "choose another --out (an empty folder: pass --overwrite to use it)",
        )  # fmt: skip


def _refuse_another_command_s(out: Path, made_by: object) -> None:
    """A store of another command (`prepare`, `filter`): its plan differs in everything, and
    the list of differences hid what it is (with an --overwrite that is then refused)."""
    if made_by == "synthesize":
        return
    if made_by is None:  # an earlier version's store: --overwrite may replace it
        what, hint = "a store whose plan names no command", "choose another --out, or --overwrite"
    else:
        what = f"a store `specdm {made_by}` made, not a synthesis"
        hint = "choose another --out (--overwrite replaces only a store synthesize made)"
    raise InputDataError(f"--out is {what}", out, hint)


def _retrained(existing: Manifest, now: Manifest) -> str:
    """Why one run's digest changed: it was trained on after the store was begun."""
    before, after = existing.model, now.model
    if before is None or after is None or before.run_id != after.run_id:
        return ""
    if existing.plan.get("model_sha256") == now.plan.get("model_sha256"):
        return ""
    return (
        f"; run {after.run_id} was trained on since the store was begun, "
        "so its samples would come from two models"
    )


def _same_weights_since(existing: Manifest, now: Manifest, plan: dict[str, Any]) -> bool:
    """The plans differ only in the run's digest, and every weights file the store's samples
    came from is still the run's, unchanged: the run gained a stage since (`distill`), which
    the store's sampler does not use (a newer student or U-Net replaces its stage's file)."""
    digest = "model_sha256"
    if {**existing.plan, digest: None} != {**plan, digest: None}:
        return False
    before, after = existing.model, now.model
    if before is None or after is None or before.run_id != after.run_id:
        return False
    used = before.checkpoint_sha256
    return bool(used) and used.items() <= after.checkpoint_sha256.items()


def mark_sharded(out: Path, shard: Shard) -> None:
    """Note in the store that a `--shard i/N` writes it, so readers of an unfinished store tell
    the user to run the missing shards rather than --resume one plain run."""
    if not (out / SHARDED_MARK).is_file():
        atomic_write_text(out / SHARDED_MARK, json.dumps({"count": shard.count}))


def write_record(out: Path, batches: list[range], stats: dict[str, Any]) -> None:
    """Record that this shard's batches are all written, with its statistics."""
    if not batches:
        return
    start, stop = batches[0].start, batches[-1].stop
    record = {"start": start, "stop": stop, **stats}
    atomic_write_text(out / SHARD_RECORDS / f"{start:09d}-{stop:09d}.json", json.dumps(record))


def _records(out: Path) -> list[dict[str, Any]]:
    folder = out / SHARD_RECORDS
    if not folder.is_dir():
        return []
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]


def _covered(records: list[dict[str, Any]], n: int) -> bool:
    flags = np.zeros(n, dtype=bool)
    for record in records:
        flags[record["start"] : record["stop"]] = True
    return bool(flags.all())


def finalize(out: Path, required: bool = False) -> bool:
    """Merge the shard records into the manifest and mark it complete when all of [0, n) is done.

    Returns whether the store is complete; with `required`, an unfinished store is an error.
    """
    if not (out / MANIFEST_NAME).is_file():
        raise InputDataError(
            "no store to finalize here", out, "pass the --out that the shards wrote to"
        )
    manifest = load_manifest(out / MANIFEST_NAME)
    if manifest.plan.get("stage") != "synthesize":
        raise UsageError(
            f"{out} is not a store that synthesize wrote (its plan: "
            f"{manifest.plan.get('stage') or 'none'}), so there are no shards to finalize",
            hint="pass the --out that the shards wrote to",
        )
    if manifest.complete:
        remove_stray_temporaries(out)
        return True
    records = _records(out)
    reader = open_store(out, allow_incomplete=True)
    if not _covered(records, manifest.count) or not reader.written().all():
        if required:
            missing = int((~reader.written()).sum())
            raise InputDataError(
                f"{missing} of {manifest.count} samples are not written yet",
                out,
                "run the missing shards (same options), then --finalize again",
            )
        return False
    manifest = _save_scores(out, manifest, records)
    fractions = reader.class_fractions().mean(axis=0)
    clipped = sum(r.get("clipped_values", 0) for r in records)
    values = sum(r.get("image_values", 0) for r in records)
    model = manifest.model
    details = {**(model.details if model else {}), "clipped_fraction": clipped / max(values, 1)}
    final = manifest.model_copy(
        update={
            "split_counts": {"synthetic": manifest.count},
            "class_pixel_fraction": {"synthetic": fractions.tolist(), "all": fractions.tolist()},
            "model": model.model_copy(update={"details": details}) if model else None,
            "complete": True,
        }
    )
    open_writer(out, manifest).save_manifest(Manifest.model_validate(final.model_dump()))
    remove_stray_temporaries(out)  # records a killed shard left half-written
    return True


def _save_scores(out: Path, manifest: Manifest, records: list[dict[str, Any]]) -> Manifest:
    """With --min-quality, the recorded score of every sample becomes the store's `quality`
    array (what `specdm filter` reads), named in the manifest."""
    details = manifest.model.details if manifest.model is not None else {}
    if "quality_scores" not in details:
        return manifest
    scores = np.full(manifest.count, np.nan)
    for record in records:
        scores[record["start"] : record["stop"]] = record["quality"]
    info = QualityScores.model_validate(details["quality_scores"])
    return write_quality(out, manifest, scores, info)
