"""The notes and warnings `prepare` gives about the store it wrote, before a later stage meets them.

No train split, no held-out split, classes that only val or test hold, sparse train labels, and
samples fit-vae cannot train on.
"""

from __future__ import annotations

from specdm_cli.config import trainable_side
from specdm_cli.pipeline.prepare.request import PrepareRequest
from specdm_cli.pipeline.prepare.tally import PrepareTally
from specdm_cli.sources.base import SourceSpec
from specdm_cli.stores.hints import HELD_OUT_OPTIONS, TRAIN_CLASS_OPTIONS, TRAIN_OPTIONS


def untrainable_note(request: PrepareRequest, spec: SourceSpec) -> list[str]:
    """Samples `fit-vae` cannot train on, told now rather than at its first step."""
    height, width = spec.height, spec.width
    side = trainable_side(height, width)
    if height == width == side:
        return []
    fix = (
        f"--patch-size {side} gives samples it can"
        if request.source in ("geotiff", "oscd")
        else f"cut them to {side}x{side} first"
    )
    return [
        f"warning: samples are {height}x{width}: fit-vae trains on square samples whose side is "
        f"a multiple of 8 ({fix})"
    ]


def no_train_note(request: PrepareRequest, tally: PrepareTally) -> str | None:
    """Told here, not first by fit-vae: the normalisation statistics are the train split's."""
    if tally.split_counts.get("train"):
        return None
    how = TRAIN_OPTIONS.get(request.source, "a train split")
    return (
        "note: the store has no train split, so no normalisation statistics: fit-vae will refuse "
        f"it; to train on it, prepare it again with --overwrite and {how}"
    )


def no_held_out_warning(request: PrepareRequest, tally: PrepareTally) -> str | None:
    """A store asked for a val or test split that got none (24 demo scenes can draw none):
    benchmark refuses it later, and training validates on nothing."""
    counts = tally.split_counts
    asked = request.options.val_fraction > 0 or request.options.test_fraction > 0
    if not asked or counts.get("val") or counts.get("test") or not counts.get("train"):
        return None
    how = HELD_OUT_OPTIONS.get(request.source, "")
    return "warning: the store has no val or test split, which benchmark and validation need" + (
        f"; to get one, prepare it again with {how}" if how else ""
    )


def untrained_classes_warning(tally: PrepareTally, spec: SourceSpec) -> str | None:
    """Classes that val or test hold and train does not: no model trained on the store can
    segment or synthesize them, and their IoU of 0 pulls every held-out mIoU down."""
    train = tally.class_pixels.get("train")
    if not train:
        return None  # no train split: told by no_train_note
    held_out = [
        (split, pixels) for split, pixels in sorted(tally.class_pixels.items()) if split != "train"
    ]
    missing = [
        f"{spec.classes[index].name} ({', '.join(s for s, p in held_out if p[index])})"
        for index, count in enumerate(train)
        if count == 0 and any(pixels[index] for _, pixels in held_out)
    ]
    if not missing:
        return None
    how = TRAIN_CLASS_OPTIONS.get(spec.dataset)
    return (
        f"warning: {len(missing)} class(es) have no train pixels, only held-out ones: "
        f"{', '.join(missing)}; no model trained on this store learns them"
        + (f": {how}" if how else "")
    )


# From this share of unlabelled train pixels on, `prepare` points at `fit-vae --unlabelled-class`.
SPARSE_LABEL_SHARE = 0.2


def sparse_label_note(tally: PrepareTally, spec: SourceSpec) -> str | None:
    """A note when most train labels are absent where the image is real (nodata and padding
    are not missing labels): the paper's mask branch decodes a class in every pixel, so
    synthesized masks would guess where the real ones say nothing."""
    pixels = tally.split_counts.get("train", 0) * spec.height * spec.width
    if not pixels:
        return None
    unlabelled = tally.unlabelled_train_pixels / pixels
    if unlabelled < SPARSE_LABEL_SHARE:
        return None
    return (
        f"note: {unlabelled:.0%} of the train label pixels are unlabelled (255); "
        "`fit-vae --unlabelled-class` keeps synthesized masks from guessing classes there"
    )
