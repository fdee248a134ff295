"""Per-sample tables (split, class fractions, draws, scores): a lost or garbled chunk is damage.

zarr reads a missing chunk as the fill value (split 255, fraction 0, draw -1, score NaN) with
no error, so readers and `inspect --verify` look for the chunks of written samples themselves;
a garbled one fails its crc32c. Either is exit 3 naming the table, never data.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from specdm_cli.errors import InputDataError
from specdm_cli.manifest import QualityScores
from specdm_cli.stores import open_store
from specdm_cli.stores.dataset import StoreDataset
from specdm_cli.stores.quality import read_quality, write_quality
from tests.conftest import prepare_demo, run_cli
from tests.fault_tools import assert_one_error_line
from tests.test_faults_concurrency import SYNTH

PREPARE = ("prepare", "demo", "--task", "ss", "--n", "24", "--size", "16", "--quiet")
SCORES = QualityScores(definition="test", feature_hash="f" * 64, reference="r",
                       reference_manifest_sha256="0", count=8)  # fmt: skip


def _content(store: Path) -> str:
    code, stdout, stderr = run_cli("inspect", store, "--json")
    assert code == 0, stderr
    digest: str = json.loads(stdout)["content_sha256"]
    return digest


def _chunk(store: Path, table: str, first: int = 0) -> Path:
    """The file of the table's chunk `first`: c/first, or c/first/0 for a 2-d table."""
    path = store / table / "c" / str(first)
    return path / "0" if path.is_dir() else path


def _garble(chunk: Path) -> None:
    data = bytearray(chunk.read_bytes())
    data[20] ^= 0xFF
    chunk.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_demo(tmp_path_factory.mktemp("tables") / "p.zarr", n=24, size=16)


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic store (B = 2: four chunks per table) with scores 0, 1/7, ..., 1."""
    store = tmp_path_factory.mktemp("tables") / "syn.zarr"
    code, _, stderr = run_cli(*SYNTH, "--out", store)
    assert code == 0, stderr
    write_quality(store, open_store(store).manifest, np.linspace(0, 1, 8), SCORES)
    return store


@pytest.mark.parametrize(
    ("table", "damage"), [("split", Path.unlink), ("class_fraction", _garble)],
    ids=["lost-split", "garbled-class-fraction"],
)  # fmt: skip
def test_verify_and_readers_refuse_a_damaged_table_and_resume_repairs_it(
    prepared: Path, tmp_path: Path, table: str, damage: object
) -> None:
    """A lost `split` chunk passed --verify ("all samples match"), and readers saw split ''."""
    store = tmp_path / "p.zarr"
    shutil.copytree(prepared, store)
    assert callable(damage)
    damage(_chunk(store, table))
    code, _, stderr = run_cli("inspect", store, "--verify", "-q")
    assert_one_error_line(code, stderr, 3, f"table {table!r} is damaged")
    assert "`specdm prepare`" in stderr and "--resume" in stderr
    read = {"split": "splits", "class_fraction": "class_fractions"}[table]
    with pytest.raises(InputDataError, match=f"{table!r} is damaged"):
        getattr(open_store(store), read)()
    if table == "split":
        with pytest.raises(InputDataError, match="'split' is damaged"):
            StoreDataset(store, split="train")
    # The hint holds: --resume rewrites the samples the table lost, to the same data.
    code, _, stderr = run_cli(*PREPARE, "--out", store, "--resume")
    assert code == 0, stderr
    assert run_cli("inspect", store, "--verify")[0] == 0
    assert _content(store) == _content(prepared)


def test_a_lost_draw_table_chunk_is_named_and_synthesize_resume_rewrites_it(
    scored: Path, tmp_path: Path
) -> None:
    store = tmp_path / "syn.zarr"
    shutil.copytree(scored, store)
    _chunk(store, "candidate", 1).unlink()  # samples 2 and 3
    code, _, stderr = run_cli("inspect", store, "--verify", "-q")
    assert_one_error_line(code, stderr, 3, "table 'candidate' is damaged")
    assert "2 written samples: 2, 3" in stderr and "`specdm synthesize`" in stderr
    code, _, stderr = run_cli(*SYNTH, "--out", store, "--resume")
    assert code == 0, stderr
    expected = zarr.open_group(scored, mode="r")["candidate"][:]
    np.testing.assert_array_equal(zarr.open_group(store, mode="r")["candidate"][:], expected)
    assert run_cli("inspect", store, "--verify")[0] == 0


def test_a_lost_quality_chunk_is_damage_not_unscored(scored: Path, tmp_path: Path) -> None:
    """A lost `quality` chunk read as NaN: --verify passed and `filter --min-quality 0` kept
    6 of 8 without a word."""
    store = tmp_path / "syn.zarr"
    shutil.copytree(scored, store)
    _chunk(store, "quality", 1).unlink()
    code, _, stderr = run_cli("inspect", store, "--verify", "-q")
    assert_one_error_line(code, stderr, 3, "table 'quality' is damaged")
    assert "benchmark --write-scores" in stderr
    out = tmp_path / "all.zarr"
    code, _, stderr = run_cli("filter", store, "--min-quality", "0", "--out", out, "--quiet")
    assert_one_error_line(code, stderr, 3, "table 'quality' is damaged")
    assert not out.exists()


def test_scores_of_nan_are_unscored_not_damage(scored: Path, tmp_path: Path) -> None:
    """NaN is a score's "not scored": a chunk of NaN scores is stored like any other, so it is
    not mistaken for a lost one."""
    store = tmp_path / "syn.zarr"
    shutil.copytree(scored, store)
    scores = np.linspace(0, 1, 8)
    scores[:2] = np.nan  # the whole first chunk
    write_quality(store, open_store(store).manifest, scores, SCORES)
    np.testing.assert_allclose(read_quality(open_store(store)), scores, rtol=1e-6)  # float32
    assert run_cli("inspect", store, "--verify")[0] == 0
    code, stdout, stderr = run_cli(
        "filter", store, "--min-quality", "0", "--out", tmp_path / "f.zarr", "--json"
    )
    assert code == 0 and json.loads(stdout)["kept"] == 6, stderr


def test_filter_of_a_store_with_a_lost_split_chunk_is_exit_3(scored: Path, tmp_path: Path) -> None:
    """It crashed: "unexpected ValueError: tuple.index(x): x not in tuple (a bug)", exit 1."""
    store = tmp_path / "syn.zarr"
    shutil.copytree(scored, store)
    _chunk(store, "split", 2).unlink()
    out = tmp_path / "good.zarr"
    code, _, stderr = run_cli("filter", store, "--min-quality", "0", "--out", out)
    assert_one_error_line(code, stderr, 3, "table 'split' is damaged")
    assert f"({store})" in stderr and not out.exists()


def test_a_store_written_before_every_chunk_was_stored_reads_as_before(
    prepared: Path, tmp_path: Path
) -> None:
    """zarr skipped the all-fill chunks of earlier stores' tables (a batch of wholly unlabelled
    patches: class fractions 0): a chunk missing there may be data, so it is not judged."""
    store = Path(shutil.copytree(prepared, tmp_path / "old.zarr"))
    metadata = store / "class_fraction" / "zarr.json"
    record = json.loads(metadata.read_text())
    del record["attributes"]["every_chunk_stored"]
    metadata.write_text(json.dumps(record))
    _chunk(store, "class_fraction").unlink()
    fractions, original = (
        open_store(store).class_fractions(),
        open_store(prepared).class_fractions(),
    )
    assert fractions.shape == original.shape and original[0].any() and not fractions[0].any()


def test_a_lost_written_chunk_of_a_complete_store_is_damage(scored: Path, tmp_path: Path) -> None:
    """It read as unwritten: `filter` and the training dataset skipped those samples silently."""
    store = tmp_path / "syn.zarr"
    shutil.copytree(scored, store)
    _chunk(store, "written", 1).unlink()  # samples 2 and 3
    code, _, stderr = run_cli("inspect", store, "--verify", "-q")
    assert_one_error_line(code, stderr, 3, "table 'written' is damaged")
    out = tmp_path / "good.zarr"
    code, _, stderr = run_cli("filter", store, "--min-quality", "0", "--out", out)
    assert_one_error_line(code, stderr, 3, "table 'written' is damaged")
    assert "samples: 2, 3" in stderr and not out.exists()
    with pytest.raises(InputDataError, match="'written' is damaged"):
        StoreDataset(store)
    # The hint holds: --resume writes those samples again, to the same data.
    code, _, stderr = run_cli(*SYNTH, "--out", store, "--resume")
    assert code == 0, stderr
    assert run_cli("inspect", store, "--verify")[0] == 0
    assert _content(store) == _content(scored)


def test_verify_names_every_damaged_table(scored: Path, tmp_path: Path) -> None:
    """It named the first table only: once that was mended, the next --verify found another.
    The scores come last, so the hint is the one that mends the samples' tables."""
    store = tmp_path / "syn.zarr"
    shutil.copytree(scored, store)
    for table, chunk in (("quality", 0), ("split", 1), ("candidate", 3)):
        _chunk(store, table, chunk).unlink()
    code, _, stderr = run_cli("inspect", store, "--verify", "-q")
    assert_one_error_line(code, stderr, 3, "table 'candidate' is damaged")
    assert "written samples: 6, 7; also the tables 'split' (2, 3), 'quality' (0, 1)" in stderr
    assert "`specdm synthesize`" in stderr
