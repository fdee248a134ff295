"""The samples a synthesize batch writes: draw i for sample i, or the accepted draws in order
when --require / --min-quality filter them."""

from __future__ import annotations

import numpy as np

from specdm_cli.faults import fault_point
from specdm_cli.manifest import LABEL_ARRAY
from specdm_cli.pipeline.signals import StopFlag
from specdm_cli.pipeline.synthesize.quality import Judge
from specdm_cli.pipeline.synthesize.require import Requirement, accepted, give_up
from specdm_cli.pipeline.synthesize.sampler import Sampler
from specdm_cli.stores.quality import at_least

# arrays, values clipped, draw indices, quality scores (NaN without --min-quality), per sample
Drawn = tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]


class Draws:
    """The samples of grid batches: draw i for sample i, or with --require / --min-quality the
    accepted draws in order, drawn in fixed blocks of B (see require.py)."""

    def __init__(self, sampler: Sampler, steps: int, stop: StopFlag):
        self.sampler, self.steps, self.stop = sampler, steps, stop
        self.block = sampler.plan.batch_size
        self.requirements: tuple[Requirement, ...] = ()
        self.judge: Judge | None = None
        self.asked = ""
        self.count = 0
        self.pending: list[Drawn] = []

    def filter(
        self,
        requirements: tuple[Requirement, ...],
        judge: Judge | None,
        asked: str,
        next_draw: int,
    ) -> None:
        self.requirements, self.judge, self.asked = requirements, judge, asked
        self.next_draw = next_draw

    def take(self, batch: range) -> Drawn:
        if not self.asked:
            arrays, clipped = self.sampler.batch(batch.start, len(batch), self.steps)
            self.count += len(batch)
            unscored = np.full(len(batch), np.nan)
            return arrays, clipped, np.arange(batch.start, batch.stop), unscored
        spent = 0
        while self._waiting() < len(batch):
            # Between blocks: a rare --require may draw for minutes before a batch is whole.
            self.stop.check()
            spent += self._draw_block()
            give_up(spent, self._waiting(), len(batch), self.asked)
        return self._pop(len(batch))

    def _waiting(self) -> int:
        return sum(len(drawn[2]) for drawn in self.pending)

    def _draw_block(self) -> int:
        """Draws the block holding `next_draw`; returns how many new draws it made."""
        first = self.next_draw - self.next_draw % self.block
        arrays, clipped = self.sampler.batch(first, self.block, self.steps)
        fault_point("synthesize.draw_block")
        keep, scores = self._acceptable(arrays)
        keep[: self.next_draw - first] = False  # drawn before: written already
        rows = np.flatnonzero(keep)
        arrays = {k: v[rows] for k, v in arrays.items()}
        self.pending.append((arrays, clipped[rows], first + rows, scores[rows]))
        made = self.block - (self.next_draw - first)
        self.count += made
        self.next_draw = first + self.block
        return made

    def _acceptable(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Which draws of a block pass every filter, and their quality scores (NaN unscored)."""
        label = arrays[LABEL_ARRAY[self.sampler.task]]
        keep = accepted(label, self.requirements, self.sampler.classes)
        if self.judge is None:
            return keep, np.full(len(label), np.nan)
        scores = self.judge.scores(arrays)
        return keep & at_least(scores, self.judge.bar.min_quality), scores

    def _pop(self, size: int) -> Drawn:
        """The first `size` accepted draws; the rest stay pending."""
        joined = _joined(self.pending)
        self.pending = [_rows(joined, slice(size, None))] if len(joined[2]) > size else []
        return _rows(joined, slice(None, size))


def _joined(parts: list[Drawn]) -> Drawn:
    arrays = {k: np.concatenate([part[0][k] for part in parts]) for k in parts[0][0]}
    clipped, drawn, scores = (np.concatenate([part[i] for part in parts]) for i in (1, 2, 3))
    return arrays, clipped, drawn, scores


def _rows(drawn: Drawn, rows: slice) -> Drawn:
    arrays, clipped, draws, scores = drawn
    return {k: v[rows] for k, v in arrays.items()}, clipped[rows], draws[rows], scores[rows]
