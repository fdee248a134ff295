"""`synthesize --min-quality Q --real STORE`: keep only draws whose quality score reaches Q.

The judge that scores draws is the benchmark's (pipeline/benchmark/judge.py); synthesis comes
before the benchmark stage, so it names only what it needs of a judge (`Judge`) and is handed
the benchmark's by the CLI.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from specdm_cli.config import Progress
from specdm_cli.errors import UsageError
from specdm_cli.manifest import QualityScores
from specdm_cli.pipeline.runs.run_manifest import RunManifest


@dataclass(frozen=True)
class QualityBar:
    """`--min-quality` and the real store (`--real`) its scores are calibrated on."""

    min_quality: float
    real: Path
    feature_steps: int | None = None  # None: the feature network's default training steps

    def __post_init__(self) -> None:
        # The one check of the bar, whoever builds it.
        if not math.isfinite(self.min_quality) or not 0.0 < self.min_quality <= 1.0:
            raise UsageError(
                f"--min-quality {self.min_quality:g} is outside (0, 1]",
                hint="1 = at least as good as the typical real pair, e.g. --min-quality 0.6",
            )


class Judge(Protocol):
    """Scores draws; what synthesis needs of the benchmark's QualityJudge."""

    bar: QualityBar

    def scores(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """(B,) quality of a batch of samples in the store's units."""
        ...

    def plan(self) -> dict[str, Any]:
        """What a resume must match."""
        ...

    def info(self, count: int) -> QualityScores:
        """How the written scores were made (the manifest's `quality_scores`)."""
        ...


# (bar, the model's run manifest, device, progress) -> a loaded judge
JudgeMaker = Callable[[QualityBar, RunManifest, str, Progress | None], Judge]
