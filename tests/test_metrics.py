"""Quality metrics: golden values for the pure maths, invariants and corruptions on demo stores."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from specdm_cli.config import MetricsOptions
from specdm_cli.errors import InputDataError, UsageError
from specdm_cli.fs.paths import file_sha256
from specdm_cli.manifest import IMAGE_ARRAYS, LABEL_ARRAY
from specdm_cli.metrics.masks import mask_feature_dims, mask_features
from specdm_cli.metrics.memorisation import nearest
from specdm_cli.metrics.stats import (
    MomentAccumulator,
    frechet_distance,
    jensen_shannon,
    kid,
    mean_interval,
    mean_iou,
    roc_auc,
    roc_auc_from_histograms,
    spectral_angle,
    t_quantile_975,
    wasserstein1,
)
from specdm_cli.pipeline.benchmark import quality
from specdm_cli.pipeline.benchmark.collect import collect
from specdm_cli.pipeline.benchmark.features import (
    FeatureNetwork,
    default_cache_dir,
    default_config,
    load_or_train,
)
from specdm_cli.pipeline.benchmark.quality import (
    QualityReport,
    compare_stores,
    split_indices,
)
from specdm_cli.stores import StoreReader, open_store
from specdm_cli.stores.zarr_store import crc32
from tests.conftest import prepare_demo

# ---------------------------------------------------------------- pure maths: golden values


def test_frechet_1d_gaussians_closed_form() -> None:
    # d^2 = (mu1 - mu2)^2 + (sigma1 - sigma2)^2 for 1-D Gaussians.
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_frechet_2d_non_commuting_closed_form() -> None:
    # For 2x2 PSD A: tr sqrt(A) = sqrt(tr A + 2 sqrt(det A)); with A = C1 C2, tr = 10 and
    # det = 3 * 4, so d^2 = |(1, 2)|^2 + tr C1 + tr C2 - 2 sqrt(10 + 2 sqrt(12)).
    c1, c2 = [[2.0, 1.0], [1.0, 2.0]], [[1.0, 0.0], [0.0, 4.0]]
    expected = 5.0 + 4.0 + 5.0 - 2.0 * math.sqrt(10.0 + 2.0 * math.sqrt(12.0))
    assert frechet_distance([0.0, 0.0], c1, [1.0, 2.0], c2) == pytest.approx(expected, rel=1e-12)
    # Diagonal covariances: per dimension (sqrt(a) - sqrt(b))^2.
    diagonal = frechet_distance([0, 0], np.diag([1.0, 4.0]), [0, 0], np.diag([9.0, 16.0]))
    assert diagonal == pytest.approx(4.0 + 4.0)


def test_frechet_identical_moments_is_zero() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 20))
    mu, cov = x.mean(axis=0), np.cov(x, rowvar=False)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)


def test_frechet_safe_with_fewer_samples_than_dims() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 64)), rng.normal(1.0, 2.0, size=(5, 64))
    moments = []
    for x in (a, b):
        acc = MomentAccumulator(64)
        acc.add(x)
        moments.append(acc)
    value = moments[0].frechet_to(moments[1])
    assert math.isfinite(value) and value > 0
    assert moments[0].frechet_to(moments[0]) == pytest.approx(0.0, abs=1e-8)
    one = MomentAccumulator(64)
    one.add(a[:1])
    assert math.isfinite(one.frechet_to(moments[1]))


def test_moment_accumulator_matches_numpy() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(1e4, 3.0, size=(103, 6))  # large offset: the naive formula would cancel
    acc = MomentAccumulator(6)
    for start, stop in ((0, 1), (1, 40), (40, 40), (40, 103)):
        acc.add(x[start:stop])
    assert acc.count == 103
    np.testing.assert_allclose(acc.mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(acc.covariance(), np.cov(x, rowvar=False), rtol=1e-9)


@pytest.mark.parametrize(
    ("a", "b", "angle"),
    [
        ([1.0, 0.0], [0.0, 1.0], math.pi / 2),
        ([1.0, 1.0], [1.0, 0.0], math.pi / 4),
        ([1.0, 2.0, 3.0], [2.0, 4.0, 6.0], 0.0),
        ([1.0, 2.0, 3.0], [3.0, 2.0, 1.0], math.acos(10.0 / 14.0)),
        ([1.0, 0.0], [-1.0, 0.0], math.pi),
        ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0], 0.0),
        ([0.0, 0.0, 0.0], [1.0, 2.0, 3.0], math.pi / 2),
    ],
)
def test_spectral_angle_golden(a: list[float], b: list[float], angle: float) -> None:
    value = float(spectral_angle(a, b))
    assert value == pytest.approx(angle, abs=1e-12)


def test_spectral_angle_is_exact_for_parallel_spectra() -> None:
    spectra = np.random.default_rng(3).uniform(100, 5000, size=(50, 10))
    assert np.all(spectral_angle(spectra, 1.7 * spectra) < 1e-7)


def test_jensen_shannon() -> None:
    assert jensen_shannon([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0, abs=1e-12)
    assert jensen_shannon([1, 1, 0, 0], [0, 0, 5, 1]) == pytest.approx(1.0)
    # p = (1, 0), q = (1/2, 1/2), m = (3/4, 1/4): 0.5 log2(4/3) + 0.25 log2(2/3) + 0.25 log2(2).
    expected = 0.5 * math.log2(4 / 3) + 0.25 * math.log2(2 / 3) + 0.25
    assert jensen_shannon([1, 0], [1, 1]) == pytest.approx(expected)
    with pytest.raises(ValueError):
        jensen_shannon([0, 0], [1, 1])


def test_roc_auc() -> None:
    labels = [0, 0, 1, 1]
    assert roc_auc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], labels) == 0.0
    assert roc_auc([0.1, 0.4, 0.35, 0.8], labels) == pytest.approx(0.75)
    assert roc_auc([1, 1, 2], [0, 1, 1]) == pytest.approx(0.75)  # one tie counts one half
    assert roc_auc([5, 5, 5, 5], labels) == pytest.approx(0.5)
    assert math.isnan(roc_auc([1, 2], [1, 1]))
    rng = np.random.default_rng(4)
    scores, random_labels = rng.random(20000), rng.random(20000) < 0.3
    assert roc_auc(scores, random_labels) == pytest.approx(0.5, abs=0.02)


def test_roc_auc_from_histograms_equals_ranks_of_binned_scores() -> None:
    rng = np.random.default_rng(5)
    labels = rng.random(3000) < 0.4
    scores = np.floor((rng.normal(size=3000) + labels) * 4) / 4  # many ties
    bins = np.unique(scores)
    position = np.searchsorted(bins, scores)
    pos = np.bincount(position[labels], minlength=bins.size)
    neg = np.bincount(position[~labels], minlength=bins.size)
    assert roc_auc_from_histograms(pos, neg) == pytest.approx(roc_auc(scores, labels), abs=1e-12)


def test_kid_identical_sets_near_zero_and_shift_positive() -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=(400, 16))
    mean, error = kid(x, x, subsets=50, subset_size=100)
    assert abs(mean) < 3 * error + 1e-3
    shifted, shifted_error = kid(x, x + 1.0, subsets=50, subset_size=100)
    assert shifted > 10 * shifted_error > 0
    assert all(math.isnan(v) for v in kid(x[:3], x[:3]))


def test_wasserstein1_from_histograms() -> None:
    edges = np.arange(11.0) * 2.0  # bins of width 2
    a = np.zeros((2, 10))
    b = np.zeros((2, 10))
    a[0, 0], b[0, 3] = 5, 7  # two point masses 3 bins apart
    a[1, :4], b[1, 2:6] = 1, 1  # a uniform block moved by 2 bins
    np.testing.assert_allclose(wasserstein1(a, b, edges), [6.0, 4.0])
    np.testing.assert_allclose(wasserstein1(a, a, edges), [0.0, 0.0])


# ---------------------------------------------------------------- feature pieces


def test_mask_features_by_hand() -> None:
    mask = np.array([[[0, 1], [1, 1]]], np.uint8)
    values = mask_features(mask, classes=2)
    assert values.shape == (1, mask_feature_dims(2))
    pyramid_1, pyramid_2 = [0.25, 0.75], [1, 0, 0, 1, 0, 1, 0, 1]
    adjacency = [0.0, 0.5, 0.5]  # pairs (0,0), (0,1), (1,1) of the 4 neighbour pairs
    np.testing.assert_allclose(values[0], pyramid_1 + pyramid_2 + adjacency)
    ignored = mask_features(np.full((1, 2, 2), 255, np.uint8), classes=2)
    assert not ignored.any()


def test_mean_iou_and_nearest() -> None:
    confusion = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])  # class 2 absent: not counted
    assert float(mean_iou(confusion)) == pytest.approx((3 / 4 + 2 / 3) / 2)
    bank = np.array([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]])
    distances, rows = nearest(bank, bank, exclude=np.array([0, 1, -1]), chunk=2)
    np.testing.assert_allclose(distances, [5.0, 5.0, 0.0])
    np.testing.assert_array_equal(rows, [1, 0, 2])


# ---------------------------------------------------------------- corrupted copies of a store

Corruption = Callable[[zarr.Group, str, np.ndarray], None]


def _shuffle_masks(group: zarr.Group, task: str, rows: np.ndarray) -> None:
    label = group[LABEL_ARRAY[task]]
    masks = [label[int(i)] for i in rows]
    for i, mask in zip(rows, masks[1:] + masks[:1], strict=True):
        label[int(i)] = mask


def _spectral_shift(group: zarr.Group, task: str, rows: np.ndarray) -> None:
    for name in IMAGE_ARRAYS[task]:
        for i in rows:
            image = group[name][int(i)].astype(np.float64)
            image[3:8] *= 0.85  # red edge / NIR gain
            image[0:3] += 300  # visible offset (haze)
            group[name][int(i)] = np.clip(image, 0, 65535).astype(np.uint16)


def _blur(group: zarr.Group, task: str, rows: np.ndarray) -> None:
    for name in IMAGE_ARRAYS[task]:
        for i in rows:
            image = np.pad(group[name][int(i)].astype(np.float64), ((0, 0), (2, 2), (2, 2)), "edge")
            size = image.shape[1] - 4
            box = sum(image[:, y : y + size, x : x + size] for y in range(5) for x in range(5))
            group[name][int(i)] = np.rint(box / 25).astype(np.uint16)


def _drop_rare_class(group: zarr.Group, task: str, rows: np.ndarray) -> None:
    fractions = np.asarray(group["class_fraction"][:])[rows]
    rare = int(np.argmin(fractions.mean(axis=0)))
    richest = rows[np.argsort(-fractions[:, rare], kind="stable")[: rows.size // 2]]
    for i in richest:
        group["written"][int(i)] = False


def _train_copies(group: zarr.Group, task: str, rows: np.ndarray) -> None:
    train = np.flatnonzero(np.asarray(group["split"][:]) == 0)  # split code 0 = train
    for i, source in zip(rows, train, strict=False):
        for name in (*IMAGE_ARRAYS[task], LABEL_ARRAY[task]):
            group[name][int(i)] = group[name][int(source)]


def corrupted_copy(store: Path, out: Path, corruption: Corruption, rows: np.ndarray) -> StoreReader:
    """A copy of `store` whose samples `rows` went through `corruption` (via the Zarr API)."""
    shutil.copytree(store, out)
    group = zarr.open_group(out, mode="r+", zarr_format=3, use_consolidated=False)
    corruption(group, open_store(out).manifest.task, rows)
    _refresh_checksums(group)  # a deliberate edit, not damage: the store's crc32s follow it
    return open_store(out)


def _refresh_checksums(group: zarr.Group) -> None:
    table = group["checksum"]
    assert isinstance(table, zarr.Array)
    names = list(table.attrs["arrays"])  # type: ignore[arg-type]
    arrays = [group[name] for name in names]
    for i in range(table.shape[0]):
        table[i] = [crc32(np.asarray(a[i]), a.dtype) for a in arrays]  # type: ignore[index,union-attr]


# ---------------------------------------------------------------- store-level: ss


@pytest.fixture(scope="module")
def ss_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[StoreReader, FeatureNetwork]:
    root = tmp_path_factory.mktemp("metrics-ss")
    # Half the scenes held out, so each val half has ~40 samples.
    store = prepare_demo(root / "ss.zarr", "--val-fraction", "0.5", n=160, size=32)
    reader = open_store(store)
    # A tiny budget (a few seconds): enough for every corruption to show, per our runs.
    config = default_config(reader, width=8, steps=80)
    return reader, load_or_train(reader, config, root / "cache")


@pytest.fixture(scope="module")
def ss_reports(
    ss_setup: tuple[StoreReader, FeatureNetwork], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, QualityReport]:
    reader, network = ss_setup
    root = tmp_path_factory.mktemp("metrics-ss-copies")
    val = reader.indices("val")
    half_a, half_b = val[0::2], val[1::2]
    reports = {
        "halves": compare_stores(
            reader, reader, network, reference_indices=half_a, candidate_indices=half_b
        )
    }
    corruptions: dict[str, Corruption] = {
        "shuffled": _shuffle_masks,
        "shift": _spectral_shift,
        "blur": _blur,
        "rebalanced": _drop_rare_class,
        "copies": _train_copies,
    }
    for name, corruption in corruptions.items():
        copy = corrupted_copy(reader.root, root / f"{name}.zarr", corruption, half_b)
        rows = np.intersect1d(half_b, copy.indices(None))
        reports[name] = compare_stores(
            reader, copy, network, reference_indices=half_a, candidate_indices=rows
        )
    return reports


def test_fd_of_real_halves_is_much_smaller_than_of_corrupted_copies(
    ss_reports: dict[str, QualityReport],
) -> None:
    halves = ss_reports["halves"]
    assert ss_reports["shift"].fd_spectral > 3 * halves.fd_spectral
    assert ss_reports["blur"].fd_spectral > 1.3 * halves.fd_spectral
    # Marginal FDs cannot see shuffled pairs (same images, same masks); the joint one does.
    assert ss_reports["shuffled"].fd_spectral == pytest.approx(halves.fd_spectral)
    assert ss_reports["shuffled"].fd_joint > 1.3 * halves.fd_joint


def test_each_corruption_moves_its_metric(ss_reports: dict[str, QualityReport]) -> None:
    halves = ss_reports["halves"]
    assert ss_reports["shuffled"].pair_miou < 0.5 * halves.pair_miou
    assert halves.pair_miou > 0.7 * halves.pair_miou_reference
    assert halves.msad < 0.05
    assert ss_reports["shift"].msad > 5 * halves.msad
    assert ss_reports["shift"].wasserstein_mean_std > 3 * halves.wasserstein_mean_std
    assert ss_reports["rebalanced"].js_class > 3 * halves.js_class
    assert ss_reports["rebalanced"].fd_mask > halves.fd_mask
    assert ss_reports["copies"].near_duplicate_fraction_pixel == 1.0
    assert ss_reports["copies"].nn_pixel_distance_median == pytest.approx(0.0, abs=1e-9)
    assert halves.near_duplicate_fraction_pixel < 0.2


def test_store_compared_with_itself(ss_setup: tuple[StoreReader, FeatureNetwork]) -> None:
    reader, network = ss_setup
    val = reader.indices("val")
    report = compare_stores(reader, reader, network, reference_indices=val, candidate_indices=val)
    assert report.msad == 0.0
    assert all(v == 0.0 for v in report.sad_per_class.values())
    assert report.fd_spectral == pytest.approx(0.0, abs=1e-6)
    assert report.fd_mask == pytest.approx(0.0, abs=1e-6)
    assert report.js_class == 0.0
    assert all(v == 0.0 for v in report.wasserstein_per_band.values())
    assert report.pair_miou == report.pair_miou_reference


def test_train_bank_is_read_once_per_reference_and_network(
    ss_setup: tuple[StoreReader, FeatureNetwork], monkeypatch: pytest.MonkeyPatch
) -> None:
    reader, network = ss_setup
    val = reader.indices("val")
    stages: list[str] = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        stages.append(args[5])
        return collect(*args, **kwargs)

    monkeypatch.setattr(quality, "_last_train_bank", None)
    monkeypatch.setattr(quality, "collect", counting)
    pairs = {"reference_indices": val[0::2], "candidate_indices": val[1::2]}
    first = compare_stores(reader, reader, network, **pairs)
    second = compare_stores(reader, reader, network, **pairs)
    assert stages == ["reference", "candidate", "train", "reference", "candidate"]
    assert first.model_dump_json() == second.model_dump_json()
    compare_stores(reader, reader, network, reference_indices=val[1::2], candidate_indices=val)
    assert stages.count("train") == 1  # other samples judged, the same train bank


def test_report_streams_and_carries_the_feature_hash(
    ss_setup: tuple[StoreReader, FeatureNetwork],
) -> None:
    reader, network = ss_setup
    assert network.path is not None
    assert network.feature_hash == file_sha256(network.path / "model.safetensors")
    record = json.loads((network.path / "config.json").read_text())
    assert record["weights_sha256"] == network.feature_hash
    val = reader.indices("val")
    reports = [
        compare_stores(
            reader,
            reader,
            network,
            reference_indices=val[:20],
            candidate_indices=val[20:36],
            options=MetricsOptions(batch_size=b),
        )
        for b in (7, 64)
    ]
    for (name, a, hash_a), (_, b, hash_b) in zip(
        reports[0].figures(), reports[1].figures(), strict=True
    ):
        assert hash_a == hash_b == network.feature_hash
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9, nan_ok=True), name
    again = QualityReport.model_validate_json(reports[0].model_dump_json())
    assert again.per_sample.index == reports[0].per_sample.index
    assert len(again.per_sample.pair_miou) == reports[0].candidate.count


def test_cache_is_reused_and_training_deterministic(
    ss_setup: tuple[StoreReader, FeatureNetwork], tmp_path: Path
) -> None:
    reader, network = ss_setup
    calls: list[int] = []
    cached = load_or_train(
        reader, network.config, network.path.parent if network.path else None,
        progress=lambda _stage, step, _total: calls.append(step),
    )  # fmt: skip
    assert cached.feature_hash == network.feature_hash and not calls
    tiny = default_config(reader, width=4, feature_dim=32, spectral_dim=4, steps=3, batch_size=4)
    first = load_or_train(reader, tiny, tmp_path / "a")
    second = load_or_train(reader, tiny, tmp_path / "b")
    assert first.feature_hash == second.feature_hash
    assert default_cache_dir() == tmp_path / "specdm-home" / "cache" / "features"


def test_misuse_is_refused(ss_setup: tuple[StoreReader, FeatureNetwork], tmp_path: Path) -> None:
    reader, network = ss_setup
    cd = open_store(prepare_demo(tmp_path / "cd.zarr", task="cd", n=8, size=16))
    with pytest.raises(InputDataError):
        compare_stores(reader, cd, network)
    stranger = dataclasses.replace(network, reference_manifest_sha256="0" * 64)
    with pytest.raises(UsageError):
        compare_stores(reader, reader, stranger)
    with pytest.raises(UsageError):
        split_indices(reader, "everything")
    heldout, used = split_indices(reader, "heldout")
    expected = np.union1d(reader.indices("val"), reader.indices("test"))
    assert used == "heldout" and np.array_equal(heldout, expected)


def test_geotiff_store_against_zarr_twin(tmp_path: Path) -> None:
    zarr_store = open_store(prepare_demo(tmp_path / "z.zarr", n=24, size=16))
    tiff_store = open_store(prepare_demo(tmp_path / "tif", "--format", "geotiff", n=24, size=16))
    tiny = default_config(zarr_store, width=4, feature_dim=32, spectral_dim=4, steps=3)
    network = load_or_train(zarr_store, tiny, tmp_path / "cache")
    report = compare_stores(zarr_store, tiff_store, network, candidate_split="heldout")
    assert report.candidate.count == report.reference.count  # the same samples, other format
    assert report.msad == 0.0 and report.js_class == 0.0
    assert report.fd_spectral == pytest.approx(0.0, abs=1e-6)
    # The same held-out samples on both sides: the same distances to train.
    assert report.nn_pixel_distance_median == pytest.approx(
        report.nn_pixel_distance_median_reference
    )


# ---------------------------------------------------------------- store-level: cd


def test_change_detection_metrics(tmp_path: Path) -> None:
    store = prepare_demo(tmp_path / "cd.zarr", "--val-fraction", "0.5", task="cd", n=96, size=32)
    reader = open_store(store)
    network = load_or_train(reader, default_config(reader, width=8, steps=60), tmp_path / "cache")
    val = reader.indices("val")
    half_a, half_b = val[0::2], val[1::2]
    real = compare_stores(
        reader, reader, network, reference_indices=half_a, candidate_indices=half_b
    )
    shuffled_store = corrupted_copy(store, tmp_path / "shuffled.zarr", _shuffle_masks, half_b)
    shuffled = compare_stores(
        reader, shuffled_store, network, reference_indices=half_a, candidate_indices=half_b
    )
    assert real.fd_spectral_t1 is not None and real.fd_spectral_t2 is not None
    assert real.fd_spectral == pytest.approx((real.fd_spectral_t1 + real.fd_spectral_t2) / 2)
    assert set(real.sad_per_class) <= {"t1:no change", "t1:change", "t2:no change", "t2:change"}
    assert real.change_ratio_hist_candidate is not None
    assert sum(real.change_ratio_hist_candidate) == half_b.size
    assert 0.0 <= (real.change_sample_fraction_candidate or 0.0) <= 1.0
    # Demo changes are spectral: the t1->t2 angle predicts the real change mask well, and the
    # shuffled masks (unrelated to their images) about as well as chance.
    assert (real.change_angle_auc_candidate or 0.0) > 0.8
    assert (shuffled.change_angle_auc_candidate or 1.0) < 0.65
    assert shuffled.pair_miou < real.pair_miou


@pytest.mark.parametrize("degrees", [1, 2, 4, 8, 30, 31, 60])
def test_t_quantiles_leave_2_5_percent_in_each_tail(degrees: int) -> None:
    """The density of Student's t integrated between -q and q is 0.95 (table and expansion)."""
    q = t_quantile_975(degrees)
    x = np.linspace(-q, q, 400_001)
    norm = math.gamma((degrees + 1) / 2) / (math.sqrt(degrees * math.pi) * math.gamma(degrees / 2))
    density = norm * (1 + x**2 / degrees) ** (-(degrees + 1) / 2)
    area = float(np.sum((density[1:] + density[:-1]) / 2 * np.diff(x)))
    assert area == pytest.approx(0.95, abs=2e-4)


def test_a_mean_interval_is_t_times_the_standard_error() -> None:
    gains = [0.009, 0.011, -0.007, 0.008]
    mean, low, high = mean_interval(gains)
    assert mean == pytest.approx(np.mean(gains))
    half = t_quantile_975(3) * np.std(gains, ddof=1) / 2
    assert (low, high) == pytest.approx((mean - half, mean + half))
    with pytest.raises(ValueError):
        mean_interval([0.01])
