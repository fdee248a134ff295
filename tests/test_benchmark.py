"""`specdm benchmark` and `specdm filter` end to end: real tiny stores, the shipped demo models,
real (tiny) training of the feature and downstream networks."""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr

from specdm_cli.config import DownstreamOptions
from specdm_cli.manifest import QualityScores, load_manifest
from specdm_cli.pipeline.benchmark.downstream import HalfTrip
from specdm_cli.pipeline.benchmark.downstream_rows import ROUND_TRIP_PARTS, configurations
from specdm_cli.pipeline.benchmark.features import manifest_sha256
from specdm_cli.pipeline.benchmark.generator import (
    heldout_in_training,
    made_by,
    other_maker,
    round_trip,
    synthesize_defaults,
    throughput,
    with_detail,
)
from specdm_cli.pipeline.benchmark.render import markdown
from specdm_cli.pipeline.benchmark.report import (
    BenchmarkReport,
    TileSizes,
    compare,
    load_report,
)
from specdm_cli.pipeline.benchmark.scores import score_definition
from specdm_cli.pipeline.runs.choose import choose_model, demo_model_path
from specdm_cli.pipeline.runs.detail_io import has_bank
from specdm_cli.pipeline.runs.run_manifest import load_run
from specdm_cli.pipeline.signals import StopFlag
from specdm_cli.pipeline.train.demo_detail import demo_with_bank
from specdm_cli.stores import content_sha256, open_store
from specdm_cli.stores.quality import read_quality, write_quality
from tests.conftest import home_sharing_the_demo_bank, manifest_of, prepare_demo, run_cli
from tests.fault_tools import assert_one_error_line
from tests.fixtures.geotiff_folder import make_geotiff_folder

# Budgets that finish in seconds: the numbers are meaningless, the plumbing is what is tested.
FAST = ("--feature-steps", "5", "--batch-size", "8", "--threads", "2", "--quiet")
# Early stopping at a tiny scale: evaluate every step, stop after 2 without a better val
# mIoU, at most 4 steps per phase; 3 seeds, as the protocol's default.
MAX_STEPS, EVAL_EVERY, PATIENCE = 4, 1, 2
DOWNSTREAM = ("--downstream", "--downstream-max-steps", str(MAX_STEPS), "--downstream-eval-every",
              str(EVAL_EVERY), "--downstream-patience", str(PATIENCE), "--downstream-seeds", "3",
              "--downstream-batch-size", "4", "--real-limit", "10", "--synthetic-ratio", "2",
              "--downstream-real-curve", "4,10")  # fmt: skip


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, shared_demo_bank: Path) -> Iterator[Path]:
    """One SPECDM_HOME for the module, so the feature network is trained once per budget."""
    folder = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPECDM_HOME", home_sharing_the_demo_bank(folder, shared_demo_bank))
        yield folder


@pytest.fixture(autouse=True)
def _shared_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECDM_HOME", str(home))


def demo_size(task: str) -> int:
    """The tile size of the shipped demo model, which the fixtures' real stores take."""
    return load_run(demo_model_path(task)).height


def synthesize_demo(out: Path, task: str, n: int) -> Path:
    code, _, stderr = run_cli(
        "synthesize", "--model", "demo", "--task", task, "--n", str(n), "--out", out,
        "--steps", "2", "--batch-size", "4", "--threads", "2", "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    return out


@pytest.fixture(scope="module")
def ss(home: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(real store, synthetic store) for ss; 10 bands and tiles as the shipped demo model's."""
    root = tmp_path_factory.mktemp("ss")
    real = prepare_demo(root / "real.zarr", n=48, size=demo_size("ss"))
    return real, synthesize_demo(root / "syn.zarr", "ss", 12)


@pytest.fixture(scope="module")
def ss_report(ss: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One full benchmark: --model, --downstream, --write-scores (on a copy of the store)."""
    real, synthetic = ss
    root = tmp_path_factory.mktemp("report")
    scored = root / "scored.zarr"
    shutil.copytree(synthetic, scored)
    out = root / "report"
    code, stdout, stderr = run_cli(
        "benchmark", "--real", real, "--synthetic", scored, "--model", "demo", "--out", out,
        "--write-scores", "--throughput-batches", "1", "--json", "--round-trip-parts",
        "--downstream-oracle", "--downstream-lr-drops", "1", *DOWNSTREAM, *FAST,
    )  # fmt: skip
    assert code == 0, stderr
    (root / "stdout.json").write_text(stdout)
    return out


@pytest.mark.slow(
    reason="its setup is the module's full benchmark run (--model, --downstream, --write-scores)"
)
def test_report_files_exist_and_validate(ss_report: Path, ss: tuple[Path, Path]) -> None:
    report = load_report(ss_report / "report.json")
    assert report.task == "ss" and report.synthetic.count == 12
    for name in ("samples", "spectra", "classes", "closest", "downstream"):
        assert (ss_report / report.figures[name]).read_bytes()[:4] == b"\x89PNG", name
    text = (ss_report / "report.md").read_text()
    for heading in (
        "## Quality",
        "## Per-sample quality",
        "## VAE reconstruction",
        "## Downstream",
    ):
        assert heading in text
    assert f"![spectra]({report.figures['spectra']})" in text
    # The stores' content digests: what tells two reports read the same data.
    real_content = content_sha256(open_store(ss[0]))
    assert real_content and report.real.content_sha256 == real_content
    assert f"content {real_content[:12]}" in text
    assert len(report.closest_pairs) == 5
    distances = [p.feature_distance for p in report.closest_pairs]
    assert distances == sorted(distances)
    assert min(report.quality.per_sample.nn_feature_distance) == distances[0]
    # The schema printed by --schema describes what report.json holds.
    code, stdout, _ = run_cli("benchmark", "--schema")
    schema = json.loads(stdout)
    written = json.loads((ss_report / "report.json").read_text())
    assert code == 0 and set(schema["required"]) <= set(written) <= set(schema["properties"])
    # With stores it ran nothing and said nothing of them: they are a usage error.
    code, stdout, stderr = run_cli("benchmark", "--schema", "--real", ss[0])
    assert_one_error_line(code, stderr, 2, "--schema prints the report.json schema")
    assert "drop --real" in stderr and stdout == ""
    # --json on stdout: the same report without the per-sample lists.
    summary = json.loads((ss_report.parent / "stdout.json").read_text())
    assert "per_sample" not in summary["quality"] and summary["feature_hash"] == report.feature_hash
    # 12 synthetic samples and a handful held out: the distribution figures are said to be noise.
    held_out = report.quality.reference.count
    assert (
        f"**Caution:** FD and KID come from {held_out} held-out real and 12 synthetic samples, "
        "fewer than 200: their noise can exceed the gap between two models (KID may be negative); "
        "rank models on larger stores." in text
    )


def test_the_few_samples_warning_names_only_the_small_side() -> None:
    from specdm_cli.pipeline.benchmark.quality import QualityReport, StoreSide
    from specdm_cli.pipeline.benchmark.render import few_samples_caution

    def quality(held_out: int, synthetic: int) -> QualityReport:
        sides = [StoreSide(path="x", manifest_sha256="0", split="s", count=count)
                 for count in (held_out, synthetic)]  # fmt: skip
        return QualityReport.model_construct(reference=sides[0], candidate=sides[1])

    assert few_samples_caution(quality(200, 5000)) is None
    notice = few_samples_caution(quality(500, 64))
    assert notice is not None and "from 64 synthetic samples" in notice and "held-out" not in notice


def test_the_leak_sentence_goes_only_where_the_generator_saw_the_real_rows_pairs(
    ss_report: Path,
) -> None:
    """The sentence crediting synthetic rows with more real scenes stood even where the
    generator trained on no pair the real rows lack; a count alone does not show that."""
    report = load_report(ss_report / "report.json")
    assert report.generator is not None and report.downstream is not None
    leak = "synthetic rows carry information from more real scenes"
    assert leak in markdown(report)  # the demo model: 1,637 pairs of another store
    few = report.generator.model_copy(update={"real_pairs_seen": report.downstream.real_limit})
    assert leak in markdown(report.model_copy(update={"generator": few}))  # another store
    mine = few.model_copy(update={"real_store_is_source": True, "train_split": "train"})
    text = markdown(report.model_copy(update={"generator": mine}))
    assert leak not in text and "all of them among the real rows'" in text
    other_split = mine.model_copy(update={"train_split": "val"})
    assert leak in markdown(report.model_copy(update={"generator": other_split}))


def test_generator_side_is_measured(ss_report: Path, ss: tuple[Path, Path]) -> None:
    report = load_report(ss_report)
    real = open_store(ss[0])
    generator, recon, speed = report.generator, report.reconstruction, report.throughput
    assert generator is not None and recon is not None and speed is not None
    # The demo run saw the train pairs of its own store, which is not this one.
    seen = load_run(demo_model_path("ss")).stages["vae"].details["train_samples"]
    assert generator.real_pairs_seen == seen > 0 and not generator.real_store_is_source
    assert generator.synthetic_made_by is None  # the demo model with its bank made the store
    assert generator.tile_sizes is None  # the real store's tiles are the model's
    assert not any("px tiles" in caution for caution in report.cautions)
    assert speed.detail  # as the store was sampled: with the bank (timed without it before)
    assert recon.split == "val" and recon.count == real.indices("val").size
    assert recon.rmse > 0 and 0 < recon.sad < 1.6 and 0 <= recon.miou <= 1
    # The synthetic store's own plan is what gets timed.
    assert (speed.steps, speed.batch_size, speed.pairs) == (2, 4, 4) and speed.pairs_per_second > 0


def test_a_store_of_another_model_is_timed_as_synthesize_samples_by_default(
    tmp_path: Path,
) -> None:
    """Without a plan of this model's to copy, throughput was timed at dpmpp 20 steps, twice
    synthesize's default of 10 (and a run's distilled student was passed over)."""
    out = tmp_path / "s.zarr"
    code, _, stderr = run_cli("synthesize", "--model", "demo", "--task", "ss", "--n", "2",
                              "--out", out, "--no-detail", "--threads", "2", "-q")  # fmt: skip
    assert code == 0, stderr
    plan = manifest_of(out)["plan"]
    defaults = synthesize_defaults(choose_model("demo", "ss"), torch.device("cpu"))
    assert {key: defaults[key] for key in ("sampler", "steps", "precision")} == {
        key: plan[key]  # type: ignore[index]
        for key in ("sampler", "steps", "precision")
    }
    assert plan["batch_size"] == min(defaults["batch_size"], 2)  # type: ignore[index]
    # The store as if another model had made it: throughput times those defaults.
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["plan"]["model_sha256"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    speed = throughput(choose_model("demo", "ss"), open_store(out), torch.device("cpu"), 1)
    assert (speed.sampler, speed.steps, speed.batch_size) == (
        defaults["sampler"],
        defaults["steps"],
        defaults["batch_size"],
    )


def test_a_store_another_model_made_is_cautioned_and_the_demos_own_is_judged_as_made(
    ss: tuple[Path, Path], tmp_path: Path
) -> None:
    """`benchmark --model demo` on a store another run made reported the demo as its generator
    without a word (review13 F7), and a store of `synthesize --model demo --no-detail` was
    judged through the detail bank it was made without."""
    real, plain = ss[0], tmp_path / "plain.zarr"
    code, _, stderr = run_cli("synthesize", "--model", "demo", "--task", "ss", "--n", "4",
                              "--out", plain, "--no-detail", "--steps", "2", "--threads", "2",
                              "-q")  # fmt: skip
    assert code == 0, stderr

    def benchmark(out: Path) -> BenchmarkReport:
        code, _, stderr = run_cli("benchmark", "--real", real, "--synthetic", plain, "--model",
                                  "demo", "--out", out, "--throughput-batches", "1", *FAST)  # fmt: skip
        assert code == 0, stderr
        return load_report(out)

    report = benchmark(tmp_path / "own")
    assert report.generator is not None and report.generator.synthetic_made_by is None
    assert report.generator.path == str(demo_model_path("ss"))  # not the copy with the bank
    assert report.throughput is not None and not report.throughput.detail
    assert not any("did not make" in caution for caution in report.cautions)
    manifest = json.loads((plain / "manifest.json").read_text())
    manifest["model"]["run_id"], manifest["plan"]["model_sha256"] = "run-x", "ab" * 32
    (plain / "manifest.json").write_text(json.dumps(manifest))
    report = benchmark(tmp_path / "other")
    assert report.generator is not None
    assert report.generator.synthetic_made_by == "run-x (demo, sha256 abababababab)"
    said = "--model run-ss (demo) did not make the synthetic store, run-x (demo, sha256 abab"
    assert any(said in caution for caution in report.cautions)  # stderr too, without --quiet
    assert said in (tmp_path / "other" / "report.md").read_text()


def test_a_store_sampled_without_detail_is_judged_without_the_runs_bank(
    ss: tuple[Path, Path], tmp_path: Path
) -> None:
    """A run's model digest covers its bank whether or not `--no-detail` left it out, so a
    run's `--no-detail` store had its round trips and speed taken with the bank (review16 M3):
    the store's plan says whether detail was added."""
    chosen = demo_with_bank(choose_model("demo", "ss"), StopFlag())
    assert has_bank(chosen.manifest) and with_detail(open_store(ss[1]), chosen)
    plain = Path(shutil.copytree(ss[1], tmp_path / "plain.zarr"))
    manifest = json.loads((plain / "manifest.json").read_text())
    del manifest["plan"]["detail"]  # as `synthesize --model RUN --no-detail` writes it
    (plain / "manifest.json").write_text(json.dumps(manifest))
    assert made_by(open_store(plain), chosen) and not with_detail(open_store(plain), chosen)
    manifest["plan"]["model_sha256"] = "0" * 64  # another model's store: synthesize's default
    (plain / "manifest.json").write_text(json.dumps(manifest))
    assert with_detail(open_store(plain), chosen)


def test_a_store_of_an_earlier_state_of_the_run_is_named_as_such(
    ss: tuple[Path, Path], tmp_path: Path
) -> None:
    """After `fit-detail` or more `fit-diffusion` on the run that made the store, the caution
    read "--model run-a did not make the synthetic store, run-a (...) did" (review16 L5)."""
    chosen = dataclasses.replace(choose_model("demo", "ss"), kind="run")
    store = Path(shutil.copytree(ss[1], tmp_path / "s.zarr"))
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["plan"]["model_sha256"], manifest["model"]["kind"] = "cd" * 32, "registry"
    (store / "manifest.json").write_text(json.dumps(manifest))
    earlier = f"an earlier state of {chosen.manifest.run_id} (sha256 cdcdcdcdcdcd; its weights"
    assert (other_maker(open_store(store), chosen) or "").startswith(earlier)
    manifest["model"]["run_id"] = "run-y"
    (store / "manifest.json").write_text(json.dumps(manifest))
    assert other_maker(open_store(store), chosen) == "run-y (registry, sha256 cdcdcdcdcdcd)"


def test_downstream_rows_train_on_the_right_data(ss_report: Path, ss: tuple[Path, Path]) -> None:
    downstream = load_report(ss_report).downstream
    assert downstream is not None and downstream.eval_split == "test"
    counts = {
        row.name: (row.protocol, row.real_count, row.synthetic_count) for row in downstream.rows
    }
    # 10 real pairs; synthetic only asks for 2 x 10 but the store has 12.
    assert counts == {
        "real": ("real", 10, 0),
        "real, first 4": ("real", 4, 0),  # the learning curve; its point at 10 is the real row
        "real -> real": ("real-twice", 10, 0),  # pretrain's control
        "VAE round trip of real": ("round-trip", 0, 10),
        "VAE round trip, images only (real labels)": ("round-trip-images", 0, 10),
        "VAE round trip, labels only (real images)": ("round-trip-labels", 0, 10),
        "synthetic": ("synthetic", 0, 12),
        "real+synthetic x2 (12 of 20 pairs)": ("mixed", 10, 12),  # the store is short: said
        "synthetic x2 -> real (12 of 20 pairs)": ("pretrain", 10, 12),
        "real+real x2 (oracle)": ("mixed-oracle", 30, 0),  # real pairs past the limit
        "real x2 -> real (oracle)": ("pretrain-oracle", 30, 0),
        # The oracle's real pairs through the run's VAE: decoded pairs, counted as such.
        "real+VAE round trip x2 (oracle)": ("mixed-oracle-round-trip", 10, 20),
        "VAE round trip x2 -> real (oracle)": ("pretrain-oracle-round-trip", 10, 20),
    }
    assert all(0 <= row.miou <= 1 for row in downstream.rows)
    real, synthetic = (open_store(p) for p in ss)
    rows = configurations(real, synthetic, DownstreamOptions(real_limit=10, ratios=(1, 2)))
    train = real.indices("train")
    assert np.array_equal(rows[0].real, train[:10]) and rows[0].synthetic.size == 0
    assert np.array_equal(rows[3].synthetic, synthetic.indices(None)[:10])
    # Several ratios: their rows each (the report above asks for one, to save time).
    assert [row.name for row in rows if row.protocol == "pretrain"] == [
        "synthetic x1 -> real",
        "synthetic x2 -> real (12 of 20 pairs)",
    ]
    curve = configurations(real, synthetic, DownstreamOptions(real_limit=10, real_curve=(4,)))
    assert curve[1].name == "real, first 4" and np.array_equal(curve[1].real, train[:4])
    # Stopping watches the val split, testing uses the test split: never the same pairs.
    assert downstream.stop_split == "val" and downstream.stop_count == real.indices("val").size
    assert (
        "'(oracle)' rows train as the mixed or pretrain row of their ratio" in downstream.protocol
    )
    assert "the first 1 such plateau(s) go back to the best-val weights" in downstream.protocol


def test_oracle_rows_train_on_real_pairs_no_other_row_uses(ss: tuple[Path, Path]) -> None:
    real, synthetic = (open_store(p) for p in ss)
    options = DownstreamOptions(real_limit=10, ratios=(2,), oracle=True)
    rows = {row.protocol: row for row in configurations(real, synthetic, options)}
    oracle, pretrain = rows["pretrain-oracle"], rows["pretrain"]
    assert oracle.training == "pretrain" and oracle.oracle and not pretrain.oracle
    train = real.indices("train")
    assert np.array_equal(oracle.real, pretrain.real)  # the same 10 real pairs, then 20 more
    assert np.array_equal(oracle.synthetic, train[10:30])
    held_out = np.concatenate([real.indices("val"), real.indices("test")])
    assert not np.isin(oracle.synthetic, np.concatenate([train[:10], held_out])).any()
    # With the run's VAE (--model): each oracle row again, on the same pairs decoded.
    with_vae = configurations(real, synthetic, options, round_trip=True)
    decoded = [row for row in with_vae if row.decoded]
    assert [row.name for row in decoded] == [
        "real+VAE round trip x2 (oracle)",
        "VAE round trip x2 -> real (oracle)",
    ]
    assert all(np.array_equal(row.synthetic, oracle.synthetic) and row.oracle for row in decoded)
    assert not any(row.decoded for row in configurations(real, synthetic, options))
    # Stopping on train pairs past the limit (as when val is the test set): those are skipped.
    stopping_on_train = DownstreamOptions(real_limit=10, ratios=(1,), oracle=True, val_limit=4)
    without_test = _store_without(real, "test")
    spare = configurations(without_test, synthetic, stopping_on_train)[-1].synthetic
    assert np.array_equal(spare, train[14:24])


def _store_without(real: Any, split: str) -> Any:
    """`real` as a reader whose `split` is empty (the evaluation falls back to val)."""

    class Without:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def indices(self, asked: str | None) -> np.ndarray:
            return np.zeros(0, np.int64) if asked == split else real.indices(asked)

    return Without()


def test_round_trip_parts_put_one_stream_back(ss: tuple[Path, Path]) -> None:
    real = open_store(ss[0])
    pairs = real.indices("train")[:3]
    trips = round_trip(choose_model("demo", "ss"), real, pairs, torch.device("cpu"))
    images, labels = (HalfTrip(trips, real, part) for part in ROUND_TRIP_PARTS)
    for i in pairs:
        truth, decoded = real.read(int(i)), trips.read(int(i))
        assert not np.array_equal(decoded["image"], truth["image"])  # a lossy VAE
        assert np.array_equal(images.read(int(i))["image"], decoded["image"])
        assert np.array_equal(images.read(int(i))["mask"], truth["mask"])
        assert np.array_equal(labels.read(int(i))["image"], truth["image"])
        assert np.array_equal(labels.read(int(i))["mask"], decoded["mask"])
    # Without a VAE there is no round trip to split: one line, usage exit.
    code, _, stderr = run_cli(
        "benchmark", "--real", ss[0], "--synthetic", ss[1], "--downstream", "--round-trip-parts"
    )
    assert code == 2 and "--round-trip-parts" in stderr and "Traceback" not in stderr


def test_downstream_seeds_give_mean_and_spread(ss_report: Path) -> None:
    downstream = load_report(ss_report).downstream
    assert downstream is not None and downstream.seeds == [0, 1, 2]
    for row in downstream.rows:
        scores = np.array([run.miou for run in row.seeds])
        assert [run.seed for run in row.seeds] == [0, 1, 2]
        assert row.miou == pytest.approx(scores.mean())
        assert row.miou_std == pytest.approx(scores.std(ddof=1))
        assert (row.miou_min, row.miou_max) == (scores.min(), scores.max())
    # Seeds change initialisation, batches and augmentation: some row's scores must differ.
    assert any(row.miou_std and row.miou_std > 0 for row in downstream.rows)
    text = (ss_report / "report.md").read_text()
    assert "±" in text and "standard deviation over the seeds" in text
    assert "the paper has the same leak" in text and "round-trip" in text
    assert "'real -> real' (their control)" in text  # the run has pretrain rows
    # The thread count changes float sums, hence the figures: the report says what it used.
    assert (downstream.device, downstream.threads) == ("cpu", 2)
    assert "on cpu with 2 torch thread(s)" in text


def test_rows_are_paired_by_seed_with_real_only_and_their_control(ss_report: Path) -> None:
    """report.md gives each row's gains over real only (pretrain rows: over their control too)
    seed by seed, from the scores in report.json, with the mean's 95% t-interval."""
    downstream = load_report(ss_report).downstream
    assert downstream is not None
    rows = {row.name: row for row in downstream.rows}
    text = (ss_report / "report.md").read_text()
    table = text.split("### Paired by seed")[1].split("\n\n")[2].splitlines()[2:]
    cells = {(c[0], c[1]): c[2:] for c in (line.strip("| ").split(" | ") for line in table)}
    pretrain = next(n for n, r in rows.items() if r.protocol == "pretrain")
    control = next(n for n, r in rows.items() if r.protocol == "real-twice")
    assert ("real", "real") not in cells and (control, "real") not in cells
    for base in ("real", control):
        gains = np.array([a.miou - b.miou for a, b in zip(rows[pretrain].seeds, rows[base].seeds,
                                                              strict=True)])  # fmt: skip
        by_seed, mean, interval, above = cells[(pretrain, base)]
        assert by_seed == ", ".join(f"{g:+.3f}" for g in gains)
        half = 4.303 * gains.std(ddof=1) / np.sqrt(3)  # Student's t, 2 degrees of freedom
        assert mean == f"{gains.mean():+.3f}"
        assert interval == f"{gains.mean() - half:+.3f} to {gains.mean() + half:+.3f}"
        assert above == f"{int((gains > 0).sum())} of 3"
    mixed = next(n for n, r in rows.items() if r.protocol == "mixed")
    assert (mixed, "real") in cells and (mixed, control) not in cells


def test_compare_pairs_downstream_rows_by_seed_only_on_the_same_protocol(
    ss_report: Path,
) -> None:
    """Two reports of one real store and protocol: each row against the other's same row, seed
    by seed (here the other's pretrain scores lowered by known amounts); another real store or
    another protocol: no pairing, as a seed no longer means the same training."""
    this = load_report(ss_report)
    assert this.downstream is not None
    other = this.model_copy(deep=True)
    assert other.downstream is not None
    other.label = "other"
    pretrain = next(row for row in other.downstream.rows if row.protocol == "pretrain")
    lowered = [0.010, 0.030, -0.005]
    for run, by in zip(pretrain.seeds, lowered, strict=True):
        run.miou -= by
    comparison = compare(this, other, Path("other/report.json"))
    pairs = {pair.row: pair for pair in comparison.paired}
    assert set(pairs) == {row.name for row in this.downstream.rows}
    assert pairs[pretrain.name].gains == pytest.approx(lowered)
    assert pairs[pretrain.name].seeds == [0, 1, 2]
    assert pairs[pretrain.name].against == f"{pretrain.name} (other)"
    assert all(pair.gains == [0.0] * 3 for name, pair in pairs.items() if name != pretrain.name)
    this.comparison = comparison
    assert "paired by seed with other's" in markdown(this)
    elsewhere = other.model_copy(deep=True)
    elsewhere.real.content_sha256 = "0" * 64
    assert compare(this, elsewhere, Path("x")).paired == []
    longer = other.model_copy(deep=True)
    assert longer.downstream is not None
    longer.downstream.config = {**longer.downstream.config, "max_steps": 99}
    assert compare(this, longer, Path("x")).paired == []
    # Another patience, or another real limit: another training. The rule is read from its
    # fields, not from the protocol's words (reworded, the same rule still pairs); a report
    # from before the fields were recorded is read from its words.
    assert this.downstream.stopping == {"eval_every": EVAL_EVERY, "patience": PATIENCE,
                                        "lr_drops": 1}  # fmt: skip
    patient = other.model_copy(deep=True)
    assert patient.downstream is not None and patient.downstream.stopping is not None
    patient.downstream.stopping["patience"] += 1
    assert compare(this, patient, Path("x")).paired == []
    reworded = other.model_copy(deep=True)
    assert reworded.downstream is not None
    reworded.downstream.protocol = reworded.downstream.protocol.replace("every row", "each row")
    assert len(compare(this, reworded, Path("x")).paired) == len(this.downstream.rows)
    old = patient.model_copy(deep=True)
    assert old.downstream is not None
    old.downstream.stopping = None
    old.downstream.protocol = old.downstream.protocol.replace(
        f"stops after {PATIENCE} evaluations", f"stops after {PATIENCE + 1} evaluations"
    )
    assert compare(this, old, Path("x")).paired == []
    old.downstream.protocol = this.downstream.protocol
    assert len(compare(this, old, Path("x")).paired) == len(this.downstream.rows)
    more_real = other.model_copy(deep=True)
    assert more_real.downstream is not None
    more_real.downstream.rows[0].real_count += 5
    paired = {pair.row for pair in compare(this, more_real, Path("x")).paired}
    assert paired == {row.name for row in this.downstream.rows[1:]}


def test_early_stopping_tests_the_best_val_checkpoint(ss_report: Path) -> None:
    downstream = load_report(ss_report).downstream
    assert downstream is not None
    for row in downstream.rows:
        for run in row.seeds:
            two_phases = row.protocol.startswith("pretrain") or row.protocol == "real-twice"
            assert len(run.best_steps) == (2 if two_phases else 1), row.protocol
            curve = np.array(run.val_curve)
            # The tested weights are the last phase's (pretrain: the fine-tuning on real).
            last = curve[curve[:, 0] > sum(run.phase_steps[:-1])]
            assert run.best_val_miou == last[:, 1].max()
            # A phase stops `PATIENCE` evaluations after its (first) best, or at the cap.
            after_best = len(last) - 1 - int(np.argmax(last[:, 1]))
            assert after_best == PATIENCE or run.phase_steps[-1] == MAX_STEPS
            assert run.steps == sum(run.phase_steps) <= MAX_STEPS * len(run.phase_steps)


def test_pretrains_control_repeats_the_real_row_then_trains_on(ss_report: Path) -> None:
    downstream = load_report(ss_report).downstream
    assert downstream is not None
    rows = {row.name: row for row in downstream.rows}
    for real, twice in zip(rows["real"].seeds, rows["real -> real"].seeds, strict=True):
        # Its first phase is the real row's run, step for step; the second starts from there.
        first = real.phase_steps[0]
        assert twice.phase_steps[0] == first and len(twice.phase_steps) == 2
        assert twice.val_curve[: len(real.val_curve)] == real.val_curve
        assert all(step > first for step, _ in twice.val_curve[len(real.val_curve) :])


def test_pretrains_control_goes_on_from_the_real_row_as_if_trained_again(
    ss: tuple[Path, Path],
) -> None:
    from specdm_cli.pipeline.benchmark import downstream as ds
    from specdm_cli.pipeline.benchmark.feature_training import TrainData

    real, synthetic = (open_store(p) for p in ss)
    options = DownstreamOptions(
        batch_size=4, eval_every=1, patience=2, max_steps=4, real_limit=10, protocols=("pretrain",)
    )
    stages: list[str] = []
    setup = ds.make_setup(real, options, "cpu", lambda stage, _done, _total: stages.append(stage))
    rows = {row.protocol: row for row in configurations(real, synthetic, options)}
    data = TrainData([(real, rows["real"].real)], *setup.stats)
    _, real_run = ds.run_seed(rows["real"], setup, data, None, seed=1)
    weights = {k: v.clone() for k, v in real_run.model.state_dict().items()}
    anew, _ = ds.run_seed(rows["real-twice"], setup, data, None, seed=1)
    stages.clear()
    reused, _ = ds.run_seed(rows["real-twice"], setup, data, None, seed=1, before=real_run)
    # The same curve and score as training phase 1 again, which this time did not run.
    assert reused.model_dump(exclude={"seconds"}) == anew.model_dump(exclude={"seconds"})
    assert set(stages) == {"downstream real -> real seed 1 phase 2"}
    # The real row's model judges agreement rows after this: the control trained a copy.
    after = real_run.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())


def test_early_stopping_restores_the_best_weights(ss: tuple[Path, Path]) -> None:
    from specdm_cli.pipeline.benchmark.collect import mean_iou
    from specdm_cli.pipeline.benchmark.feature_training import TrainData, class_weights
    from specdm_cli.pipeline.benchmark.features import band_statistics, default_config
    from specdm_cli.pipeline.benchmark.utility_training import (
        batches_of,
        confusion,
        new_model,
        train_to_best,
    )  # fmt: skip

    real = open_store(ss[0])
    options = DownstreamOptions(batch_size=4, eval_every=1, patience=2, max_steps=6)
    config = default_config(real, batch_size=4)
    stats = band_statistics(real)
    train = TrainData([(real, real.indices("train")[:8])], *stats)
    val = TrainData([(real, real.indices("val"))], *stats)
    model = new_model(config, "cpu")
    weights = class_weights(real, config.classes)
    phase = train_to_best(
        model, batches_of(train, None, options), val, config, options, weights, "cpu"
    )
    assert phase.best_val == max(score for _step, score in phase.curve)
    again = float(mean_iou(confusion(model, val, config.classes, 4, "cpu")))
    assert again == pytest.approx(phase.best_val, abs=1e-5)


@pytest.mark.parametrize("drops", [0, 1, 2])
def test_a_plateau_drops_the_rate_from_the_best_weights_before_stopping(
    ss: tuple[Path, Path], drops: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from specdm_cli.pipeline.benchmark import utility_training as ut
    from specdm_cli.pipeline.benchmark.feature_training import TrainData, class_weights
    from specdm_cli.pipeline.benchmark.features import band_statistics, default_config

    real = open_store(ss[0])
    options = DownstreamOptions(
        batch_size=4, eval_every=1, patience=2, max_steps=20, lr_drops=drops
    )
    config = default_config(real, batch_size=4)
    stats = band_statistics(real)
    train = TrainData([(real, real.indices("train")[:8])], *stats)
    model = ut.new_model(config, "cpu")
    scores = iter([0.5, 0.6] + [0.1] * 20)  # the best at step 2, then a plateau
    monkeypatch.setattr(ut, "mean_iou", lambda _confusion: next(scores))
    rates: list[float] = []
    seen: list[dict[str, torch.Tensor]] = []  # the weights each step starts from
    stepped = ut._step

    def step(model: torch.nn.Module, optimiser: torch.optim.Optimizer, *rest: Any) -> None:
        rates.append(optimiser.param_groups[0]["lr"])
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        stepped(model, optimiser, *rest)

    monkeypatch.setattr(ut, "_step", step)
    phase = ut.train_to_best(
        model, ut.batches_of(train, None, options), train, config, options,
        class_weights(real, config.classes), "cpu",
    )  # fmt: skip
    # Patience runs out after steps 3-4; each drop gives it two more steps at a tenth the rate.
    assert phase.steps == 4 + 2 * drops and phase.best_step == 2
    expected = [config.lr] * 4 + [config.lr / 10 ** (k + 1) for k in range(drops) for _ in "ab"]
    assert rates == pytest.approx(expected)
    best = seen[2]  # what step 3 started from: the weights of step 2, the best
    for first_after_drop in seen[4::2]:  # each drop goes back to them
        assert all(torch.equal(best[k], v) for k, v in first_after_drop.items())
    assert not all(torch.equal(best[k], v) for k, v in seen[3].items())  # it had moved on


def test_mixed_batches_keep_the_real_share(ss: tuple[Path, Path]) -> None:
    from specdm_cli.pipeline.benchmark.feature_training import ArraySource, TrainData
    from specdm_cli.pipeline.benchmark.utility_training import batches_of

    real = open_store(ss[0])
    manifest, shape = real.manifest, real.read(0)["image"].shape

    # Real pairs are all 0, synthetic ones all 1 (after normalisation with mean 0, std 1), so
    # a flip or turn cannot blur which is which.
    def constant(value: float, count: int) -> TrainData:
        arrays = {"image": np.full(shape, value, np.float32), "mask": np.zeros(shape[1:], np.uint8)}
        source = ArraySource(manifest, {i: arrays for i in range(count)})
        return TrainData([(source, np.arange(count))], np.zeros(shape[0]), np.ones(shape[0]))

    rng = np.random.default_rng(0)
    for share, synthetic in ((0.5, 6), (0.25, 18), (0.75, 2)):
        options = DownstreamOptions(batch_size=6, real_share=share)
        batches = batches_of(constant(0.0, 10), constant(1.0, 30), options)
        for _ in range(3):
            images, labels = batches.draw(rng)
            per_sample = images[0].mean(dim=(1, 2, 3)).numpy()
            assert (
                per_sample.tolist() == [0.0] * 6 + [1.0] * synthetic
                and len(labels) == 6 + synthetic
            )


def test_round_trip_row_decodes_through_the_models_vae(ss: tuple[Path, Path]) -> None:
    import torch

    from specdm_cli.pipeline.benchmark.generator import round_trip
    from specdm_cli.pipeline.runs.choose import choose_model
    from specdm_cli.pipeline.runs.vae_io import load_vae

    real = open_store(ss[0])
    chosen = choose_model("demo", "ss")
    indices = real.indices("train")[:3]
    source = round_trip(chosen, real, indices, torch.device("cpu"))
    norm = chosen.manifest.normalization
    mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in (norm.mean, norm.std))
    vae = load_vae(chosen.path, chosen.manifest, torch.device("cpu"))
    for index in indices:
        arrays = real.read(int(index))
        image = (torch.from_numpy(arrays["image"].astype(np.float32)) - mean) / std
        batch = {
            "image": image[None],
            "mask": torch.from_numpy(arrays["mask"].astype(np.int64))[None],
        }
        with torch.no_grad():
            decoded = vae.decode_joint(vae.encode_latent(batch))
        expected = (decoded["image"][0] * std + mean).numpy()
        got = source.read(int(index))
        np.testing.assert_allclose(got["image"], expected, rtol=1e-4, atol=1e-2)
        label = decoded["mask"][0].argmax(dim=0).numpy()
        ignored = arrays["mask"] == 255
        assert (got["mask"][ignored] == 255).all()
        assert np.array_equal(got["mask"][~ignored], label[~ignored])
        assert not np.allclose(got["image"], arrays["image"])  # a round trip, not a copy


def test_write_scores_then_filter_keeps_the_samples_above(ss_report: Path, tmp_path: Path) -> None:
    scored = ss_report.parent / "scored.zarr"
    reader = open_store(scored)
    scores = read_quality(reader)
    assert reader.manifest.quality_scores is not None
    assert scores.shape == (12,) and ((scores >= 0) & (scores <= 1)).all()
    assert load_report(ss_report).scores.written
    threshold = float(np.median(scores))
    code, stdout, stderr = run_cli(
        "filter", scored, "--min-quality", str(threshold), "--out", tmp_path / "sub.zarr", "--json"
    )
    assert code == 0, stderr
    assert json.loads(stdout)["kept"] == int((scores >= threshold).sum())


def test_filter_keeps_exactly_the_samples_at_or_above(
    ss: tuple[Path, Path], tmp_path: Path
) -> None:
    store = tmp_path / "syn.zarr"
    shutil.copytree(ss[1], store)
    scores = np.array([0.9, 0.1, 0.5, 0.49, 0.7, 0.0, 1.0, 0.3, 0.5, 0.2, 0.8, 0.6])
    info = QualityScores(
        definition="test", feature_hash="f" * 64, reference="r", reference_manifest_sha256="0",
        count=12,
    )  # fmt: skip
    write_quality(store, open_store(store).manifest, scores, info)
    out = tmp_path / "sub.zarr"
    code, _, stderr = run_cli("filter", store, "--min-quality", "0.5", "--out", out, "--quiet")
    assert code == 0, stderr
    expected = [0, 2, 4, 6, 8, 10, 11]
    manifest = load_manifest(out / "manifest.json")
    assert manifest.complete and manifest.count == 7 and manifest.split_counts == {"synthetic": 7}
    assert manifest.parent is not None and manifest.parent.min_quality == 0.5
    assert manifest.parent.parent_index == expected and manifest.parent.path == str(store)
    parent, subset = zarr.open_group(store, mode="r"), zarr.open_group(out, mode="r")
    for name in ("image", "mask", "class_fraction", "candidate"):
        np.testing.assert_array_equal(subset[name][:], parent[name][:][expected], err_msg=name)
    np.testing.assert_allclose(read_quality(open_store(out)), scores[expected])
    assert run_cli("inspect", out)[0] == 0
    # A second filter of the subset works on the copied scores.
    code, stdout, _ = run_cli(
        "filter", out, "--min-quality", "0.8", "--out", tmp_path / "b", "--json"
    )
    assert code == 0 and json.loads(stdout)["kept"] == 3
    # Refusals: one line, the contract's exit code, nothing written.
    for args, exit_code, words in (
        (("--min-quality", "0.5", "--out", out), 3, "already exists"),
        (("--min-quality", "1.5", "--out", tmp_path / "c"), 2, "[0, 1]"),
        (("--min-quality", "1.0", "--out", tmp_path / "d"), 0, ""),
    ):
        code, _, stderr = run_cli("filter", store, *args, "--quiet")
        assert code == exit_code and words in stderr and "Traceback" not in stderr
        assert "--resume" not in stderr  # filter takes no --resume: its hints never offer it
    code, _, stderr = run_cli("filter", ss[1], "--min-quality", "0.5", "--out", tmp_path / "e")
    assert code == 3 and "no quality scores" in stderr and not (tmp_path / "e").exists()


def test_a_filter_cut_short_leaves_no_store(ss: tuple[Path, Path], tmp_path: Path) -> None:
    """filter does not resume: a copy stopped by a damaged parent sample (or Ctrl-C) is removed,
    where it stood in the way of the same command again until --overwrite."""
    store = tmp_path / "syn.zarr"
    shutil.copytree(ss[1], store)
    info = QualityScores(definition="test", feature_hash="f" * 64, reference="r",
                         reference_manifest_sha256="0", count=12)  # fmt: skip
    write_quality(store, open_store(store).manifest, np.linspace(0, 1, 12), info)
    chunk = next(p for p in (store / "image" / "c" / "9").rglob("*") if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:10])
    out = tmp_path / "sub.zarr"
    code, _, stderr = run_cli("filter", store, "--min-quality", "0.5", "--out", out, "--quiet")
    assert code == 3 and "sample 9 is damaged" in stderr and "Traceback" not in stderr, stderr
    assert not out.exists()


@pytest.mark.slow(reason="two more benchmark runs, one training another feature network")
def test_compare_lines_up_reports_of_one_feature_network(
    ss_report: Path, ss: tuple[Path, Path], tmp_path: Path
) -> None:
    real, synthetic = ss
    out = tmp_path / "other"
    code, stdout, stderr = run_cli(
        "benchmark", "--real", real, "--synthetic", synthetic, "--out", out, "--label", "plain",
        "--compare", ss_report / "report.json", *FAST,
    )  # fmt: skip
    assert code == 0, stderr
    comparison = load_report(out).comparison
    assert comparison is not None and comparison.other_label == "scored"
    figures = {f.name: (f.this, f.other) for f in comparison.figures}
    # The other side ran downstream; this one did not: its rows show as missing here.
    assert figures["downstream[real].miou"][0] is None and figures["fd_spectral"][1] is not None
    assert "## Comparison" in (out / "report.md").read_text() and "scored" in stdout
    # Another feature network (other training budget): refused, nothing written.
    refused = tmp_path / "refused"
    code, _, stderr = run_cli(
        "benchmark", "--real", real, "--synthetic", synthetic, "--out", refused,
        "--compare", out / "report.json", *FAST, "--feature-steps", "6",
    )  # fmt: skip
    assert code == 3 and "feature networks differ" in stderr and stderr.count("\n") == 1
    assert not refused.exists()


@pytest.mark.slow(
    reason="cd synthesis with the demo model, then a benchmark with downstream training"
)
def test_change_detection_report(home: Path, tmp_path: Path) -> None:
    real = prepare_demo(tmp_path / "real-cd.zarr", task="cd", n=24, size=demo_size("cd"))
    synthetic = synthesize_demo(tmp_path / "syn-cd.zarr", "cd", 8)
    out = tmp_path / "cd"
    code, _, stderr = run_cli(
        "benchmark", "--real", real, "--synthetic", synthetic, "--out", out,
        *DOWNSTREAM, "--downstream-seeds", "1", *FAST,  # the rows, not their seeds (ss's tests)
    )  # fmt: skip
    assert code == 0, stderr
    report = BenchmarkReport.model_validate_json((out / "report.json").read_text())
    assert report.downstream is not None and report.downstream.seeds == [0]
    assert report.quality.change_ratio_hist_candidate is not None and "change" in report.figures
    assert report.downstream is not None
    assert report.downstream.f1_definition == "F1 of the change class"
    # Without --model there is no VAE to round-trip through: no such row.
    assert [r.protocol for r in report.downstream.rows] == [
        "real",
        "real",  # --downstream-real-curve 4,10: its point at 4 pairs
        "real-twice",  # pretrain's control: the real pairs in its two phases
        "synthetic",
        "mixed",
        "pretrain",
    ]
    assert report.downstream.round_trip is None


@pytest.mark.parametrize(
    ("case", "code", "words"),
    [
        ("missing", 3, "does not exist"),
        ("task", 3, "task mismatch"),
        ("incomplete", 3, "incomplete"),
        ("compare", 3, "not a specdm benchmark report"),
        ("no-real", 2, "needs --real"),
        ("ratio", 2, "--synthetic-ratio"),
        ("ratio-word", 2, "--synthetic-ratio 'x'"),
        ("size", 3, "differ in size"),
        ("swapped", 2, "is a synthetic store (made by "),
    ],
)
def test_bad_input_is_one_line(
    case: str, code: int, words: str, ss: tuple[Path, Path], demo_cd_store: Path, tmp_path: Path
) -> None:
    real, synthetic = ss
    args: list[str | Path] = ["--real", real, "--synthetic", synthetic]
    if case == "missing":
        args[3] = tmp_path / "nope.zarr"
    elif case == "task":
        args[1] = demo_cd_store
    elif case == "incomplete":
        broken = tmp_path / "broken.zarr"
        shutil.copytree(synthetic, broken)
        manifest = json.loads((broken / "manifest.json").read_text())
        (broken / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
        args[3] = broken
    elif case == "compare":
        (tmp_path / "bad.json").write_text('{"task": "ss"}')
        args += ["--compare", tmp_path / "bad.json"]
    elif case == "size":
        args[1] = prepare_demo(tmp_path / "big.zarr", n=12, size=16)
    elif case == "no-real":
        args = args[2:]
    elif case == "swapped":  # once "too few samples to compare" with a prepare hint
        args = ["--real", synthetic, "--synthetic", real]
    elif case == "ratio-word":  # once told "not a comma-separated list of widths"
        args += ["--synthetic-ratio", "x"]
    else:
        args += ["--synthetic-ratio", "0"]
    out = tmp_path / "out"
    exit_code, _, stderr = run_cli("benchmark", *args, "--out", out, *FAST)
    assert exit_code == code and words in stderr, stderr
    assert stderr.startswith("error:") and stderr.count("\n") == 1 and not out.exists()
    assert case != "swapped" or stderr.rstrip().endswith("swap --real and --synthetic")


def test_a_real_store_without_val_or_test_is_told_at_prepare_and_benchmark_says_how(
    tmp_path: Path,
) -> None:
    """24 demo scenes of seed 11 drew no val or test scene: prepare said nothing, and benchmark
    only "re-prepare it", not how."""
    real = tmp_path / "d64.zarr"
    code, stdout, stderr = run_cli("prepare", "demo", "--n", "24", "--seed", "11", "--out", real,
                                   "--json", "--quiet")  # fmt: skip
    assert code == 0 and json.loads(stdout)["split_counts"] == {"train": 24}, stderr
    how = "more scenes (--n) or a larger --val-fraction/--test-fraction, or another --seed"
    (warning,) = json.loads(stdout)["warnings"]
    assert warning.startswith("warning: the store has no val or test split") and how in warning
    synthetic = tmp_path / "s.zarr"
    code, _, stderr = run_cli("synthesize", "--model", "demo", "--task", "ss", "--n", "2",
                              "--steps", "2", "--no-detail", "--quiet", "--out", synthetic)  # fmt: skip
    assert code == 0, stderr
    code, _, stderr = run_cli("benchmark", "--real", real, "--synthetic", synthetic, "--model",
                              "demo", "--out", tmp_path / "out", *FAST)  # fmt: skip
    assert_one_error_line(code, stderr, 3, f"prepare it again with --overwrite and {how}")


def test_a_real_store_of_train_only_is_said_to_be_the_train_reference(
    ss: tuple[Path, Path], tmp_path: Path
) -> None:
    """Without val or test the train pairs stood in silently, called "held-out real" ("FD and
    KID come from 4 held-out real", "real held-out: 0.96"), though the feature network was
    fitted on them. The report, --json and a warning say it is the train split and what that
    flatters; the exit stays 0."""
    real = prepare_demo(tmp_path / "train.zarr", "--val-fraction", "0", "--test-fraction", "0",
                        n=12, size=demo_size("ss"))  # fmt: skip
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("benchmark", "--real", real, "--synthetic", ss[1],
                                   "--out", out, "--json", *FAST[:-1])  # fmt: skip
    assert code == 0, stderr
    said = "the real store has no val or test split, so the real reference is its 12 train pairs"
    assert f"warning: {said}" in stderr and "FD, KID and the scores favour" in stderr
    assert "prepare it again with --overwrite and more scenes (--n)" in stderr
    summary = json.loads(stdout)
    assert summary["quality"]["reference"]["split"] == "train"
    assert [c for c in summary["cautions"] if c.startswith(said)], summary["cautions"]
    assert summary["scores"]["definition"] == score_definition("train")
    assert "real = the real store's train samples" in summary["scores"]["definition"]
    text = (out / "report.md").read_text()
    assert "## Quality (real train vs synthetic)" in text and f"**Caution:** {said}" in text
    assert "(real train: " in text and "held-out real" not in text and "real held-out" not in text


def test_stores_of_another_size_name_every_difference_and_a_prepare_that_works(
    tmp_path: Path,
) -> None:
    """A 60-band 16 px real store against a 3-band 32 px synthetic one was "differ in size
    (16x16 vs 32x32) ...: `specdm prepare ... --size 32` for the demo source": the bands went
    unnamed and --size is exit 2 for a GeoTIFF source. Every difference is named now, bands
    first; a size alone gets the real store's own prepare command (--patch-size), which works."""
    raw = make_geotiff_folder(tmp_path / "raw", n=2, size=(32, 32), bands=3, codes=[1, 2])
    other = make_geotiff_folder(tmp_path / "other", n=2, size=(16, 16), bands=4, codes=[1, 2])
    small, large, wide = tmp_path / "small.zarr", tmp_path / "large.zarr", tmp_path / "wide.zarr"
    for folder, out, side in ((raw, small, "16"), (raw, large, "32"), (other, wide, "16")):
        code, _, stderr = run_cli("prepare", "geotiff", folder, "--out", out,
                                  "--patch-size", side, "--val-fraction", "0.5", "-q")  # fmt: skip
        assert code == 0, stderr
    out = tmp_path / "out"
    code, _, stderr = run_cli("benchmark", "--real", wide, "--synthetic", large, "--out", out)
    assert_one_error_line(code, stderr, 3, "differ in bands (4 vs 3), size (16x16 vs 32x32)")
    assert "benchmark against the real store the generator" in stderr and "--size" not in stderr
    code, _, stderr = run_cli("benchmark", "--real", small, "--synthetic", large, "--out", out)
    assert_one_error_line(code, stderr, 3, "the stores differ in size (16x16 vs 32x32)")
    command = shlex.split(stderr.split("`")[1])
    assert command[:4] == ["specdm", "prepare", "geotiff", str(raw.resolve())], stderr
    assert "--patch-size 32" in stderr and "--val-fraction 0.5" in stderr and not out.exists()
    code, _, stderr = run_cli(*command[1:], "-q")
    assert code == 0, stderr
    assert manifest_of(tmp_path / "small-32px.zarr")["height"] == 32


@pytest.mark.parametrize("field", ["bands", "classes"])
def test_stores_whose_band_or_class_names_differ_are_refused(
    field: str, ss: tuple[Path, Path], tmp_path: Path
) -> None:
    """Only their counts were compared: a report set band B03 against B02, one class against
    another, and looked valid."""
    real, synthetic = ss
    other = tmp_path / "other.zarr"
    shutil.copytree(real, other)
    manifest = json.loads((other / "manifest.json").read_text())
    entries = manifest[field]
    entries[0]["name"], entries[1]["name"] = entries[1]["name"], entries[0]["name"]
    (other / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "out"
    code, _, stderr = run_cli("benchmark", "--real", other, "--synthetic", synthetic,
                              "--out", out, *FAST)  # fmt: skip
    assert_one_error_line(code, stderr, 3, f"the stores' {field} differ: 2 of")
    assert not out.exists()


def test_a_model_of_another_task_is_a_model_error(ss: tuple[Path, Path], tmp_path: Path) -> None:
    """Exit 2 (usage) before; a model that does not fit the data is exit 4, as synthesize's."""
    real, synthetic = ss
    code, _, stderr = run_cli("benchmark", "--real", real, "--synthetic", synthetic, "--model",
                              demo_model_path("cd"), "--out", tmp_path / "out", *FAST)  # fmt: skip
    assert_one_error_line(code, stderr, 4, "the model is for task cd with 10 bands")


def test_a_model_of_other_classes_is_a_model_error(ss: tuple[Path, Path], tmp_path: Path) -> None:
    """Only task and band count were checked: a model whose class 1 is another store's class 2
    had its reconstruction mIoU scored class against the wrong class."""
    copies = [Path(shutil.copytree(store, tmp_path / store.name)) for store in ss]
    for store in copies:
        manifest = json.loads((store / "manifest.json").read_text())
        classes = manifest["classes"]
        classes[0]["name"], classes[1]["name"] = classes[1]["name"], classes[0]["name"]
        (store / "manifest.json").write_text(json.dumps(manifest))
    code, _, stderr = run_cli("benchmark", "--real", copies[0], "--synthetic", copies[1],
                              "--model", "demo", "--out", tmp_path / "out", *FAST)  # fmt: skip
    first, second = (c.name for c in load_run(demo_model_path("ss")).classes[:2])
    said = f"class 0 is {second!r} in the real store, {first!r} in the model"
    assert_one_error_line(code, stderr, 4, said)
    assert not (tmp_path / "out").exists()


def test_real_tiles_the_vae_cannot_take_are_refused_before_any_training(tmp_path: Path) -> None:
    """30 px tiles (`prepare geotiff` keeps 30 px files whole under --patch-size 32) ended in
    "unexpected RuntimeError ... (a bug)", exit 1, after the feature network had trained."""
    classes = load_run(demo_model_path("ss")).classes
    legend = tmp_path / "classes.csv"
    legend.write_text("code,name\n" + "".join(f"{c.index},{c.name}\n" for c in classes))
    raw = make_geotiff_folder(tmp_path / "raw", n=8, size=(30, 30), bands=10,
                              codes=[c.index for c in classes])  # fmt: skip
    real = tmp_path / "real.zarr"
    code, _, stderr = run_cli("prepare", "geotiff", raw, "--out", real, "--patch-size", "32",
                              "--val-fraction", "0.25", "--classes", legend, "--quiet")  # fmt: skip
    assert code == 0, stderr
    synthetic = Path(shutil.copytree(real, tmp_path / "syn.zarr"))
    out = tmp_path / "report"
    code, _, stderr = run_cli("benchmark", "--real", real, "--synthetic", synthetic, "--model",
                              "demo", "--out", out, *FAST)  # fmt: skip
    step = load_run(demo_model_path("ss")).vae_details().model["downsample"]
    said = f"the real store's tiles are 30x30 px, not a multiple of the {step} px the model's VAE"
    assert_one_error_line(code, stderr, 3, said)
    assert not out.exists()


def test_a_model_of_another_tile_size_is_cautioned(tmp_path: Path) -> None:
    """The demo model (64 px) reconstructed 32 px real tiles without a word (review13 F7)."""
    real = prepare_demo(tmp_path / "real.zarr", n=16, size=demo_size("ss") // 2)
    synthetic = Path(shutil.copytree(real, tmp_path / "syn.zarr"))
    out = tmp_path / "report"
    code, _, stderr = run_cli("benchmark", "--real", real, "--synthetic", synthetic, "--model",
                              "demo", "--out", out, "--throughput-batches", "1", *FAST)  # fmt: skip
    assert code == 0, stderr
    report = load_report(out)
    size, half = demo_size("ss"), demo_size("ss") // 2
    assert report.generator is not None
    assert report.generator.tile_sizes == TileSizes(model=(size, size), real=(half, half))
    said = f"learned {size}x{size} px tiles, the real store's are {half}x{half} px"
    assert any(said in caution for caution in report.cautions)
    assert said in (out / "report.md").read_text()


def test_a_report_inside_the_model_is_refused(ss: tuple[Path, Path]) -> None:
    """It was written into the run folder, or with --model demo into the installed package."""
    real, synthetic = ss
    out = demo_model_path("ss") / "report"
    code, _, stderr = run_cli("benchmark", "--real", real, "--synthetic", synthetic,
                              "--model", "demo", "--out", out, *FAST)  # fmt: skip
    assert_one_error_line(code, stderr, 2, "(--model)")
    assert not out.exists()


def test_synthetic_dot_reports_beside_the_store(
    ss: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--synthetic .` from inside the store was "unexpected ValueError: ... empty name"."""
    real, synthetic = ss
    copy = Path(shutil.copytree(synthetic, tmp_path / "syn.zarr"))
    monkeypatch.chdir(copy)
    code, _, stderr = run_cli("benchmark", "--real", real, "--synthetic", ".", *FAST)
    assert code == 0, stderr
    assert load_report(tmp_path / "syn-benchmark" / "report.json").synthetic.count == 12


def test_score_terms_are_ratios_to_the_typical_real_sample() -> None:
    from specdm_cli.pipeline.benchmark.scores import relative_to_typical

    consistency = relative_to_typical(np.array([0.2, 0.5, 1.0, 0.0]), 0.5, higher_is_better=True)
    np.testing.assert_allclose(consistency, [0.4, 1.0, 1.0, 0.0])
    angles = np.array([0.1, 0.4, 0.0, np.inf])
    np.testing.assert_allclose(
        relative_to_typical(angles, 0.2, higher_is_better=False), [1.0, 0.5, 1.0, 0.0]
    )


def test_a_learning_curve_beyond_the_real_pairs_is_refused_at_once(
    ss: tuple[Path, Path], tmp_path: Path
) -> None:
    real, synthetic = ss
    code, _, stderr = run_cli(
        "benchmark", "--real", real, "--synthetic", synthetic, "--out", tmp_path / "r",
        "--downstream", "--downstream-real-curve", "5,100000", *FAST,
    )  # fmt: skip
    assert code == 3 and "asks for 100000 real train pairs" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "r").exists()
    code, _, stderr = run_cli(
        "benchmark", "--real", real, "--synthetic", synthetic, "--downstream",
        "--downstream-real-curve", "5,x",
    )  # fmt: skip
    assert code == 2 and "--downstream-real-curve '5,x' is not a comma-separated list" in stderr


def test_a_real_limit_above_the_store_is_recorded_as_trained_and_cautioned(
    ss: tuple[Path, Path], tmp_path: Path
) -> None:
    """The report said the real rows trained on --real-limit's 2000 (the default) where the
    store had 38 train pairs, and credited the synthetic rows with more real scenes."""
    real, synthetic = ss
    train = open_store(real).indices("train").size
    out = tmp_path / "report"
    limited = [arg for arg in DOWNSTREAM if arg not in ("--real-limit", "10")]
    code, _, stderr = run_cli(
        "benchmark", "--real", real, "--synthetic", synthetic, "--out", out, *limited,
        "--downstream-seeds", "1", *[arg for arg in FAST if arg != "--quiet"],
    )  # fmt: skip
    assert code == 0, stderr
    report = BenchmarkReport.model_validate_json((out / "report.json").read_text())
    assert report.downstream is not None and 10 < train < 2000
    assert (report.downstream.real_limit, report.downstream.real_limit_asked) == (train, 2000)
    assert report.downstream.rows[0].real_count == train
    caution = f"the real rows trained on all {train} train pairs of the real store"
    assert any(caution in line for line in report.cautions)
    assert f"warning: {caution}" in stderr
    assert f"pass --real-limit {train} or less" in (out / "report.md").read_text()


def test_no_pairs_left_for_early_stopping_is_refused_before_any_work(
    ss: tuple[Path, Path], tmp_path: Path
) -> None:
    """Without a test split the stopping pairs are the train pairs past the real limit; with
    none left the refusal came after the feature network and every quality metric (minutes),
    and named --real-limit to a user who never gave it."""
    real = prepare_demo(tmp_path / "no-test.zarr", "--test-fraction", "0", "--val-fraction",
                        "0.3", n=24, size=demo_size("ss"))  # fmt: skip
    out = tmp_path / "report"
    code, _, stderr = run_cli(  # not --quiet: any work would print its progress
        "benchmark", "--real", real, "--synthetic", ss[1], "--out", out, "--downstream",
        "--feature-steps", "5", "--threads", "2",
    )  # fmt: skip
    words = "every train pair is in the paper's 2000 (--real-limit's default)"
    assert_one_error_line(code, stderr, 3, words)
    assert "no real pairs left for early stopping" in stderr and not out.exists()


def test_an_oracle_beyond_the_real_pairs_is_refused_at_once(
    ss: tuple[Path, Path], tmp_path: Path
) -> None:
    real, synthetic = ss
    code, _, stderr = run_cli(
        "benchmark", "--real", real, "--synthetic", synthetic, "--out", tmp_path / "r",
        "--downstream", "--downstream-oracle", "--real-limit", "10", "--synthetic-ratio", "5",
        *FAST,
    )  # fmt: skip
    assert (
        code == 3
        and "--downstream-oracle needs 50 real train pairs past the 10 of --real-limit" in stderr
    )
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
    code, _, stderr = run_cli(
        "benchmark", "--real", real, "--synthetic", synthetic, "--downstream-oracle"
    )
    assert code == 2 and "needs --downstream" in stderr and "Traceback" not in stderr


def test_too_few_held_out_samples_are_told_before_any_training(tmp_path: Path) -> None:
    """It trained the feature network first, then said "choose another split", an option
    benchmark does not have."""
    real = prepare_demo(
        tmp_path / "real.zarr", "--val-fraction", "0.1", "--test-fraction", "0", n=12
    )
    synthetic = prepare_demo(tmp_path / "syn.zarr", "--seed", "3", n=4)
    out = tmp_path / "report"
    code, _, stderr = run_cli("benchmark", "--real", real, "--synthetic", synthetic, "--out", out)
    assert_one_error_line(code, stderr, 3, "too few samples to compare (1 in split 'heldout')")
    assert "--val-fraction" in stderr and not out.exists()
    assert not (tmp_path / "specdm-home" / "cache" / "features").exists()  # none trained


def test_held_out_pairs_the_generator_trained_on_are_counted_and_cautioned(
    ss: tuple[Path, Path], tmp_path: Path
) -> None:
    """A run trained on a store of the same demo scenes under other split fractions: the real
    store's held-out scenes that were its training scenes are counted, and the report says so."""
    real, synthetic = ss
    trained_on = prepare_demo(
        tmp_path / "a.zarr", "--val-fraction", "0.01", n=48, size=demo_size("ss")
    )
    run = tmp_path / "run"
    shutil.copytree(demo_model_path("ss"), run)
    record = json.loads((run / "run.json").read_text())
    record["source_store"] = str(trained_on)
    record["source_manifest_sha256"] = manifest_sha256(open_store(trained_on))
    record["source_content_sha256"] = content_sha256(open_store(trained_on))
    (run / "run.json").write_text(json.dumps(record))
    # By source id, independently of the code under test.
    a, b = open_store(trained_on), open_store(real)
    a_ids, b_ids = a.source_ids() or [], b.source_ids() or []
    trained = {a_ids[int(i)] for i in a.indices("train")}
    heldout = np.union1d(b.indices("val"), b.indices("test"))
    expected = sum(b_ids[int(i)] in trained for i in heldout)
    assert expected > 0
    out = tmp_path / "report"
    code, _, stderr = run_cli("benchmark", "--real", real, "--synthetic", synthetic,
                              "--model", run, "--out", out, "--throughput-batches", "1",
                              "--feature-steps", "5", "--batch-size", "8", "--threads", "2")  # fmt: skip
    assert code == 0, stderr
    report = load_report(out / "report.json")
    assert report.generator is not None and report.generator.heldout_in_training == expected
    assert f"{expected} of the {heldout.size} held-out real pairs" in stderr
    assert f"**Caution:** {expected} of the {heldout.size}" in (out / "report.md").read_text()
    # Benchmarked against its own training store, none of the held-out pairs was trained on;
    # a training store that is gone is not checked.
    assert heldout_in_training(load_run(run), a) == 0
    # Prepared again by the same command (another manifest digest), it is the same data.
    shutil.rmtree(trained_on)
    prepare_demo(trained_on, "--val-fraction", "0.01", n=48, size=demo_size("ss"))
    assert manifest_sha256(open_store(trained_on)) != record["source_manifest_sha256"]
    assert heldout_in_training(load_run(run), b) == expected
    shutil.rmtree(trained_on)
    assert heldout_in_training(load_run(run), b) is None


def test_a_run_with_only_its_vae_gets_round_trips_and_no_throughput(
    ss: tuple[Path, Path], tmp_path: Path
) -> None:
    """A VAE is judged before a U-Net is trained on it: its reconstruction and round-trip
    oracle rows, and a note that pairs/s needs a U-Net."""
    real, synthetic = ss
    run = tmp_path / "vae-only"
    shutil.copytree(demo_model_path("ss"), run)
    record = json.loads((run / "run.json").read_text())
    del record["stages"]["diffusion"]
    (run / "run.json").write_text(json.dumps(record))
    code, _, stderr = run_cli("synthesize", "--model", run, "--n", "2", "--out", tmp_path / "s")
    assert code == 4 and "the run cannot sample yet" in stderr
    out = tmp_path / "report"
    code, _, stderr = run_cli(
        "benchmark", "--real", real, "--synthetic", synthetic, "--model", run, "--out", out,
        "--downstream", "--downstream-protocols", "pretrain", "--downstream-oracle",
        "--downstream-seeds", "1", "--downstream-max-steps", "1", "--downstream-eval-every", "1",
        "--downstream-patience", "1", "--downstream-batch-size", "4", "--real-limit", "4",
        "--synthetic-ratio", "2", "--feature-steps", "5", "--batch-size", "8", "--threads", "2",
    )  # fmt: skip
    assert code == 0, stderr
    report = load_report(out / "report.json")
    assert report.reconstruction is not None and report.throughput is None
    assert f"note: --model {run} has no U-Net that samples yet" in stderr
    protocols = {row.protocol for row in report.downstream.rows} if report.downstream else set()
    assert "pretrain-oracle-round-trip" in protocols


def test_benchmark_takes_one_device_refused_before_any_work(
    ss: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An empty home: the refusal must come before the demo model's bank is built there.
    monkeypatch.setenv("SPECDM_HOME", str(tmp_path / "home"))
    code, stdout, _ = run_cli("benchmark", "--help")
    words = " ".join(stdout.split())  # the help wraps at the terminal's width
    assert code == 0 and "--gpus 0|cpu" in words and "this command runs on one device" in words
    real, synthetic = ss
    out = tmp_path / "report"
    code, _, stderr = run_cli("benchmark", "--real", real, "--synthetic", synthetic, "--model",
                              "demo", "--gpus", "cpu:2", "--out", out)  # fmt: skip
    assert code == 2 and "--gpus cpu:2: benchmark runs on one device" in stderr
    assert len(stderr.strip().splitlines()) == 1 and not out.exists()
    assert not (tmp_path / "home").exists()
