"""The judge of `synthesize --min-quality Q --real STORE`: draws scored as the benchmark scores.

The score is the benchmark's (scores.py, README "Benchmark"): the weaker of
label consistency and spectral plausibility, each relative to the typical real held-out pair of
STORE, judged by the feature network of STORE (the one `specdm benchmark` trains and caches).
So a store written with `--min-quality 0.6` holds the samples that `benchmark --write-scores`
and `filter --min-quality 0.6` would keep from a larger one, without the second pass; their
scores are written into the store, so `filter` can raise the bar later.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from specdm_cli.config import Progress
from specdm_cli.errors import InputDataError
from specdm_cli.manifest import QualityScores
from specdm_cli.pipeline.benchmark.features import (
    FeatureNetwork,
    default_config,
    load_or_train,
    manifest_sha256,
)
from specdm_cli.pipeline.benchmark.quality import split_indices
from specdm_cli.pipeline.benchmark.scores import (
    Calibration,
    batch_traits,
    sample_traits,
    score_definition,
)
from specdm_cli.pipeline.runs.run_manifest import RunManifest, check_store_fits
from specdm_cli.pipeline.synthesize.quality import QualityBar
from specdm_cli.stores import open_store

# Notes for the user: the CLI prints them on stderr.
log = logging.getLogger(__name__)


class QualityJudge:
    """Scores batches of decoded samples against the real store's held-out pairs (a
    synthesize.quality.Judge; the CLI hands this class to synthesize, which may not import
    the benchmark stage)."""

    def __init__(
        self, bar: QualityBar, run: RunManifest, device: str, progress: Progress | None = None
    ):
        self.bar = bar
        self.real = open_store(bar.real)
        check_store_fits(self.real, run, "--real")
        if len(self.real.manifest.bands) != len(run.bands):
            raise InputDataError(
                f"the --real store has {len(self.real.manifest.bands)} bands, the model "
                f"{len(run.bands)}",
                bar.real,
                "pass the real store the model was trained on (or one like it)",
            )
        overrides = {"steps": bar.feature_steps} if bar.feature_steps else {}
        self.network: FeatureNetwork = load_or_train(
            self.real, default_config(self.real, **overrides), device=device, progress=progress
        )
        heldout, split = split_indices(self.real, "heldout")
        if split == "train":
            log.warning(
                "warning: the --real store has no val or test split, so the scores are "
                "relative to its train pairs, which the feature network was fitted on, not to "
                "unseen real pairs; prepare it with a val or test split for that bar (%s)",
                bar.real,
            )
        traits = sample_traits(
            self.real, heldout, self.network, progress=progress, stage="scores (real)"
        )
        self.calibration = Calibration.of(traits)
        self.real_split = split
        self.task = run.task
        self.real_sha256 = manifest_sha256(self.real)

    def scores(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """(B,) quality of a batch of samples in the store's units."""
        quality, _angle = self.calibration.score(batch_traits(arrays, self.task, self.network))
        return quality

    def plan(self) -> dict[str, Any]:
        """What a resume must match: the bar, the real store's manifest and the judge's weights."""
        return {
            "min_quality": self.bar.min_quality,
            "quality_reference_sha256": self.real_sha256,
            "feature_hash": self.network.feature_hash,
            # What trains that judge: a resume takes it from here (`synthesize._feature_steps`).
            "feature_steps": self.bar.feature_steps,
        }

    def info(self, count: int) -> QualityScores:
        """How the written scores were made (the manifest's `quality_scores`)."""
        return QualityScores(
            definition=score_definition(self.real_split), feature_hash=self.network.feature_hash,
            reference=str(self.bar.real), reference_manifest_sha256=self.real_sha256, count=count,
        )  # fmt: skip
