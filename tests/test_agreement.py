"""Agreement relabelling (issue 20 section 3): the benchmark's agreement-relabelled downstream
rows end to end on tiny real and synthetic stores, and the relabelling itself."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from specdm_cli.config import DownstreamOptions
from specdm_cli.manifest import IGNORE_INDEX
from specdm_cli.pipeline.benchmark.agreement import agreement_labels, relabelled_data
from specdm_cli.pipeline.benchmark.feature_training import ArraySource, TrainData, class_weights
from specdm_cli.pipeline.benchmark.features import band_statistics, default_config
from specdm_cli.pipeline.benchmark.report import load_report
from specdm_cli.pipeline.benchmark.utility_training import (
    batches_of,
    new_model,
    predictions,
    train_to_best,
)
from specdm_cli.stores import open_store
from tests.conftest import home_sharing_the_demo_bank, prepare_demo, run_cli
from tests.test_benchmark import demo_size, synthesize_demo

TINY = DownstreamOptions(batch_size=4, eval_every=1, patience=2, max_steps=4)


@pytest.fixture(scope="module")
def stores(
    tmp_path_factory: pytest.TempPathFactory, shared_demo_bank: Path
) -> Iterator[tuple[Path, Path]]:
    """(real ss store, synthetic ss store of the shipped demo model), with their own SPECDM_HOME."""
    root = tmp_path_factory.mktemp("agree")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPECDM_HOME", home_sharing_the_demo_bank(root / "home", shared_demo_bank))
        real = prepare_demo(root / "real.zarr", n=48, size=demo_size("ss"))
        yield real, synthesize_demo(root / "syn.zarr", "ss", 12)


def test_agreement_keeps_only_the_labels_the_prediction_shares() -> None:
    generated = np.array([[0, 1, 2], [3, IGNORE_INDEX, 1]], np.int64)
    predicted = np.array([[0, 2, 2], [1, 0, 1]], np.int64)
    expected = [[0, IGNORE_INDEX, 2], [IGNORE_INDEX, IGNORE_INDEX, 1]]
    kept = agreement_labels(generated, predicted)
    assert kept.dtype == np.uint8 and kept.tolist() == expected


def test_relabelled_data_follows_the_referee(stores: tuple[Path, Path]) -> None:
    real, synthetic = (open_store(p) for p in stores)
    config = default_config(real, batch_size=4)
    stats = band_statistics(real)
    referee = new_model(config, "cpu")
    train_to_best(
        referee, batches_of(TrainData([(real, real.indices("train")[:8])], *stats), None, TINY),
        TrainData([(real, real.indices("val"))], *stats), config, TINY,
        class_weights(real, config.classes), "cpu",
    )  # fmt: skip
    indices = synthetic.indices(None)[2:9]  # not starting at 0: labels are keyed by store index
    plain = TrainData([(synthetic, indices)], *stats)
    relabelled, share = relabelled_data(referee, plain, 3, "cpu")
    guesses = np.concatenate([p for _s, p, _t in predictions(referee, plain, 5, "cpu")])
    kept = total = 0
    for position, index in enumerate(indices):
        generated = synthetic.read(int(index))["mask"]
        images, labels = relabelled.sample(position)
        agree = generated == guesses[position]
        assert np.array_equal(labels[agree], generated[agree])
        assert (labels[~agree] == IGNORE_INDEX).all()
        assert np.array_equal(images[0], plain.sample(position)[0][0])  # images untouched
        kept, total = kept + int(agree.sum()), total + generated.size
    assert share == pytest.approx(kept / total) and 0 < share < 1
    # The store itself is never rewritten: relabelling lives in memory.
    assert np.array_equal(synthetic.read(int(indices[0]))["mask"], plain.sample(0)[1])


def test_a_batch_with_no_label_takes_no_step(stores: tuple[Path, Path]) -> None:
    real = open_store(stores[0])
    config = default_config(real, batch_size=4)
    shape = real.read(0)["image"].shape
    arrays = {
        "image": np.ones(shape, np.float32),
        "mask": np.full(shape[1:], IGNORE_INDEX, np.uint8),
    }
    unlabelled = TrainData(
        [(ArraySource(real.manifest, {i: arrays for i in range(4)}), np.arange(4))],
        np.zeros(shape[0]), np.ones(shape[0]),
    )  # fmt: skip
    model = new_model(config, "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    val = TrainData([(real, real.indices("val"))], *band_statistics(real))
    train_to_best(
        model, batches_of(None, unlabelled, TINY), val, config, TINY,
        class_weights(real, config.classes), "cpu",
    )  # fmt: skip
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.slow(reason="a benchmark with downstream training, 5 rows x 2 seeds")
def test_benchmark_reports_agreement_rows_beside_plain_ones(
    stores: tuple[Path, Path], tmp_path: Path
) -> None:
    real, synthetic = stores
    out = tmp_path / "report"
    code, _, stderr = run_cli(
        "benchmark", "--real", real, "--synthetic", synthetic, "--out", out, "--downstream",
        "--downstream-protocols", "pretrain-agree,mixed,mixed-agree", "--downstream-seeds", "2",
        "--downstream-max-steps", "3", "--downstream-eval-every", "1", "--downstream-patience",
        "2", "--downstream-batch-size", "4", "--real-limit", "10", "--synthetic-ratio", "1",
        "--feature-steps", "5", "--batch-size", "8", "--threads", "2", "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    downstream = load_report(out).downstream
    assert downstream is not None
    rows = {row.name: row for row in downstream.rows}
    # Plain mixing and its relabelled twin side by side, in the protocols' fixed order.
    assert list(rows) == [
        "real", "real -> real", "synthetic", "real+synthetic x1", "real+synthetic x1, agreement-relabelled",
        "synthetic x1 -> real, agreement-relabelled",
    ]  # fmt: skip
    mixed, pretrain = (rows[n] for n in list(rows)[4:])
    assert (mixed.protocol, pretrain.protocol) == ("mixed-agree", "pretrain-agree")
    assert rows["real+synthetic x1"].kept_share is None and rows["real"].kept_share is None
    # Both relabelled rows judge with the same seed's real-only model: the same share per seed.
    shares = [run.kept_share for run in mixed.seeds]
    assert shares == [run.kept_share for run in pretrain.seeds]
    assert all(s is not None and 0 < s <= 1 for s in shares)
    assert mixed.kept_share == pytest.approx(np.mean(shares))  # type: ignore[arg-type]
    text = (out / "report.md").read_text()
    assert "agreement-relabelled" in text and "of the generated label pixels kept" in text


def test_an_unknown_protocol_is_a_usage_error(stores: tuple[Path, Path], tmp_path: Path) -> None:
    real, synthetic = stores
    code, _, stderr = run_cli(
        "benchmark", "--real", real, "--synthetic", synthetic, "--out", tmp_path / "r",
        "--downstream", "--downstream-protocols", "mixed,agree",
    )  # fmt: skip
    assert code == 2 and "mixed-agree" in stderr and stderr.count("\n") == 1
    assert not (tmp_path / "r").exists()
