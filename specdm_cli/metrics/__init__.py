"""Offline quality metrics of labelled multispectral datasets: a candidate store vs a reference."""

from specdm_cli.metrics.features import FeatureNetwork, default_cache_dir, load_or_train
from specdm_cli.metrics.network import FeatureNetConfig
from specdm_cli.metrics.quality import MetricsOptions, QualityReport, compare_stores

__all__ = [
    "FeatureNetConfig",
    "FeatureNetwork",
    "MetricsOptions",
    "QualityReport",
    "compare_stores",
    "default_cache_dir",
    "load_or_train",
]
