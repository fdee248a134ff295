"""`synthesize --require` (and `--min-quality`, quality.py): keep only acceptable candidates.

`--require` accepts a candidate whose decoded mask has enough of the asked classes.

Candidates are drawn in fixed blocks of B on their own per-candidate RNG (block k holds draws
kB..kB+B-1); sample i is the i-th accepted candidate, and its draw index is stored. A resumed
run restarts at the block holding the draw after the last written sample and skips the draws
before it, so it computes exactly the blocks an uninterrupted run computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from specdm_cli.errors import UsageError
from specdm_cli.manifest import ClassInfo

# Give up when this many draws per wanted sample found nothing acceptable: the model does not
# make such samples often enough for --require to be useful.
MAX_DRAWS_PER_SAMPLE = 100


@dataclass(frozen=True)
class Requirement:
    """At least `min_fraction` of a sample's pixels are class `index`."""

    index: int
    name: str
    min_fraction: float

    def text(self) -> str:
        return f"{self.name}:{self.min_fraction:g}"


def parse_require(text: str | None, classes: list[ClassInfo]) -> tuple[Requirement, ...]:
    """`CLASS:MINFRAC[,...]`, a class by name (case-insensitive) or index; fractions in (0, 1]."""
    if not text:
        return ()
    by_name = {c.name.lower(): c for c in classes} | {str(c.index): c for c in classes}
    wanted = []
    for item in text.split(","):
        name, colon, fraction = item.strip().rpartition(":")
        if not colon:
            raise UsageError(
                f"--require {item.strip()!r}: expected CLASS:FRACTION",
                hint="e.g. --require water:0.05 (at least 5% of each sample's pixels water)",
            )
        chosen = by_name.get(name.strip().lower())
        if chosen is None:
            raise UsageError(
                f"--require {item.strip()!r}: no class {name.strip()!r} (a name or an index)",
                hint=f"classes: {_listed(classes)}",
            )
        try:
            value = float(fraction)
        except ValueError:
            value = -1.0
        if not 0 < value <= 1:
            raise UsageError(
                f"--require {item.strip()!r}: the fraction must be in (0, 1]",
                hint="e.g. --require water:0.05",
            )
        wanted.append(Requirement(chosen.index, chosen.name, value))
    return tuple(wanted)


def _listed(classes: list[ClassInfo]) -> str:
    """Each class as `--require` takes it, with its raw code where that is another number (a
    user who knows the data by its codes, e.g. 7 for road, finds the index here)."""
    return ", ".join(
        f"{c.index} {c.name}"
        + (f" (code {c.code})" if str(c.code) not in ("None", str(c.index)) else "")
        for c in classes
    )


def accepted(labels: np.ndarray, requirements: tuple[Requirement, ...], classes: int) -> np.ndarray:
    """Which of a batch of decoded label maps (B, H, W) meet every requirement, as fractions of
    all their pixels (unlabelled ones, 255, included)."""
    fractions = np.stack(
        [np.bincount(label.ravel(), minlength=classes)[:classes] for label in labels]
    )
    fractions = fractions / labels[0].size
    keep = np.ones(len(labels), dtype=bool)
    for requirement in requirements:
        keep &= fractions[:, requirement.index] >= requirement.min_fraction
    return keep


def resume_draw(candidates: np.ndarray | None, first_sample: int) -> int:
    """The draw after the last one written before `first_sample` (0 when nothing is written)."""
    if first_sample == 0 or candidates is None:
        return 0
    return int(candidates[first_sample - 1]) + 1


def give_up(draws: int, kept: int, wanted: int, asked: str) -> None:
    """Stop a search that is not finding enough acceptable samples (`asked`: the options)."""
    if draws >= MAX_DRAWS_PER_SAMPLE * max(wanted, 1) and kept < wanted:
        raise UsageError(
            f"{asked}: only {kept} of {draws} draws qualified, {wanted} were wanted",
            hint="ask for less (samples written so far are kept; --resume continues)"
            if kept
            else "ask for a smaller fraction or another class (nothing was written)",
        )
