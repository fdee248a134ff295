"""`specdm fit-detail` and `synthesize --detail`: the bank's stage in the run, its lookups, its
use in synthesis, and the refusals."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from specdm_cli.models.detail import (
    NO_CLASS,
    Bank,
    Lookup,
    block_classes,
    build_bank,
    label_patterns,
)
from specdm_cli.pipeline.benchmark.report import load_report
from specdm_cli.pipeline.runs.choose import choose_model
from specdm_cli.pipeline.runs.detail_io import load_bank
from specdm_cli.pipeline.runs.run_manifest import load_run
from specdm_cli.pipeline.signals import StopFlag
from specdm_cli.pipeline.train.demo_detail import BANK_SCENES, BANK_STORE, bank_scenes
from specdm_cli.pipeline.train.fit_detail import round_trips
from specdm_cli.sources.demo.reader import make_sample
from specdm_cli.stores import open_store
from tests.conftest import run_cli
from tests.test_synthesize import UNET, VAE, arrays, synth, train_run

QUIET = ("--threads", "2", "--quiet")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_run(tmp_path_factory.mktemp("detail"), "ss")


def _store(run: Path) -> Path:
    return run.parent / "ss.zarr"  # train_run's store


def _copy(run: Path, target: Path) -> Path:
    return Path(shutil.copytree(run, target, ignore=shutil.ignore_patterns(".specdm*")))


@pytest.fixture(scope="module")
def banked(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = _copy(trained, tmp_path_factory.mktemp("banked") / "run")
    code, _, stderr = run_cli("fit-detail", run, _store(trained), *QUIET)
    assert code == 0, stderr
    return run


def _stage(run: Path) -> Any:
    return json.loads((run / "run.json").read_text())["stages"]["detail"]


def _random_bank(blocks: int, classes: torch.Tensor) -> Bank:
    """2 x 2 blocks of 3 bands, labels 0-2 drawn at random (the majority `classes` is not
    theirs: a lookup must not rely on the two agreeing)."""
    draw = torch.Generator().manual_seed(0)
    lookup, ones = Lookup(block=2, context=4, dims=6), torch.ones(3, 1, 1)
    keys, basis = torch.randn(blocks, 6, generator=draw), torch.randn(3 * 16, 6, generator=draw)
    residuals = torch.randn(12, blocks, generator=draw)
    keys, residuals = keys.half().float(), residuals.half().float()  # as build_bank rounds them
    labels = torch.randint(0, 3, (blocks, 4), generator=draw)
    return Bank(lookup, ones * 0, ones, torch.zeros(3 * 16), basis, keys, residuals, classes,
                labels)  # fmt: skip


def test_the_chunked_lookup_finds_what_a_full_distance_matrix_does() -> None:
    """Bank blocks scored in chunks, a running minimum across them: the nearest of all."""
    bank = _random_bank(5000, torch.zeros(5000, dtype=torch.long))  # the last chunk partial
    image = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = torch.cdist(bank.features(image), bank.keys).argmin(dim=1)
    assert torch.equal(bank.nearest(image), expected) and len(expected) == 256


def test_block_classes_are_majorities_of_the_labelled_pixels() -> None:
    mask = torch.tensor([[1, 1, 2, 2], [1, 255, 2, 3], [255, 255, 0, 3], [255, 255, 3, 0]])
    # A tie goes to the lower class; a block without a label has NO_CLASS.
    assert block_classes(mask, 2).tolist() == [1, 2, NO_CLASS, 0]
    assert block_classes(torch.full((4, 4), 255), 2).tolist() == [NO_CLASS] * 4


def _differing_pixels(mask_block: torch.Tensor, bank_labels: torch.Tensor) -> torch.Tensor:
    """(bank blocks,) pixels whose labels differ from the mask block's; a pixel the mask leaves
    unlabelled counts half (it matches no label, and no label matches it)."""
    labelled = mask_block != 255
    differ = (bank_labels != mask_block) & labelled
    return differ.sum(dim=1) + 0.5 * (~labelled).sum()


def test_lookups_take_the_mask_s_class_then_its_pattern_then_the_nearest_key(
    tmp_path: Path,
) -> None:
    """Each block takes, among the bank blocks of the class its mask draws (all of them where
    the bank has none of that class, or the block no label), those whose labels differ from the
    mask's at the fewest pixels, and of those the nearest key; across chunk boundaries and
    through a save and load."""
    draw = torch.Generator().manual_seed(2)
    bank_classes = torch.randint(0, 3, (7000,), generator=draw)  # classes 0-2, unsorted
    bank = _random_bank(7000, bank_classes)
    bank.save(tmp_path / "bank.safetensors")
    loaded = Bank.load(tmp_path / "bank.safetensors")
    image = torch.randn(3, 32, 32, generator=draw)
    mask = torch.randint(0, 5, (32, 32), generator=draw)  # 3 and 4: none in the bank
    mask[:2, :2] = 255
    wanted, patterns = block_classes(mask, 2), label_patterns(mask, 2)
    distances = torch.cdist(bank.features(image), bank.keys).pow(2)
    for chosen in (bank.nearest(image, mask), loaded.nearest(image, mask)):
        for block, value in enumerate(wanted.tolist()):
            pool = bank.classes == value if value in (0, 1, 2) else torch.ones(7000, dtype=bool)
            fewest = _differing_pixels(patterns[block], bank.labels)
            fewest = fewest == fewest.where(pool, torch.inf).min()
            row = distances[block].where(pool & fewest, torch.inf)
            assert int(chosen[block]) == int(row.argmin()), (block, value)
    assert torch.equal(bank.detail(image, mask), loaded.detail(image, mask))
    assert not torch.equal(bank.detail(image, mask), bank.detail(image))


def test_a_bank_is_stored_in_float16_and_built_at_that_precision(tmp_path: Path) -> None:
    """Half the file of float32; `build_bank` rounds to float16, so the bank fit-detail built is
    the bank read back and a lookup cannot differ between the two."""
    draw = torch.Generator().manual_seed(3)
    scenes = [(torch.randn(3, 16, 16, generator=draw) * 500 + 2000,
               torch.randn(3, 16, 16, generator=draw) * 500 + 2000,
               torch.randint(0, 3, (16, 16), generator=draw)) for _ in range(40)]  # fmt: skip
    bank = build_bank(scenes, torch.full((3, 1, 1), 2000.0), torch.full((3, 1, 1), 500.0),
                      Lookup(block=4, context=8, dims=12))  # fmt: skip
    bank.save(tmp_path / "bank.safetensors")
    stored = load_file(tmp_path / "bank.safetensors")
    assert [stored[k].dtype for k in ("keys", "residuals", "classes", "labels")] == [
        torch.float16, torch.float16, torch.int16, torch.uint8]  # fmt: skip
    size = (tmp_path / "bank.safetensors").stat().st_size
    assert bank.stored_bytes < size < bank.stored_bytes + 64 * 1024  # the rest: header, basis
    loaded = Bank.load(tmp_path / "bank.safetensors")
    assert all(torch.equal(getattr(loaded, k), getattr(bank, k))
               for k in ("keys", "residuals", "classes", "labels"))  # fmt: skip
    assert loaded.keys.dtype == torch.float32 and loaded.classes.dtype == torch.int64
    image = scenes[0][0]
    assert torch.equal(bank.detail(image, scenes[0][2]), loaded.detail(image, scenes[0][2]))


def test_a_bank_scene_gets_its_own_detail_back(banked: Path, trained: Path) -> None:
    """Each block of a decoded bank scene finds its own labels and surroundings nearest among
    the blocks of its class: decoded + detail is the real scene again, to the float16 precision the bank keeps
    its residuals at (blocks, folds and lookups line up)."""
    stage, real = _stage(banked), open_store(_store(trained))
    train = real.indices("train")
    assert stage["finished"] and stage["details"]["scenes"] == len(train)
    bank_file = banked / stage["checkpoint"] / "bank.safetensors"
    on_disk = bank_file.stat().st_size  # keys, residuals, classes; then header, basis
    assert stage["details"]["bank_bytes"] < on_disk < stage["details"]["bank_bytes"] + 256 * 1024
    assert list(stage["weights"]) == [f"{stage['checkpoint']}/bank.safetensors"]
    bank = load_bank(banked, load_run(banked))
    assert bank.keys.shape == (len(train) * 16, 48)  # 16 x 16 px scenes: 16 blocks of 4 x 4
    chosen = choose_model(str(banked), "ss", vae_only=True)
    pairs = round_trips(chosen, real, train[:3], torch.device("cpu"), StopFlag(), None)
    for decoded, truth, label in pairs:
        assert not torch.allclose(decoded, truth, atol=1.0)
        # One float16 step of the residual (2^-10 of it), plus float noise of the decoder.
        allowed = (truth - decoded).abs() * 2**-10 + 1e-2
        assert ((decoded + bank.detail(decoded, label) - truth).abs() <= allowed).all()


def test_the_same_command_finds_it_built_and_other_options_need_overwrite(
    trained: Path, tmp_path: Path
) -> None:
    run = _copy(trained, tmp_path / "run")
    store = _store(trained)
    code, stdout, stderr = run_cli("fit-detail", run, store, "--scenes", "4", "--json", *QUIET)
    assert code == 0, stderr
    assert json.loads(stdout)["state"] == "built" and json.loads(stdout)["scenes"] == 4
    first = _stage(run)["weights"]
    code, stdout, _ = run_cli("fit-detail", run, store, "--scenes", "4", "--json", *QUIET)
    assert code == 0 and json.loads(stdout)["state"] == "already complete"
    code, _, stderr = run_cli("fit-detail", run, store, "--scenes", "4", "--dims", "8", *QUIET)
    assert code == 3 and "already has a detail bank" in stderr and "--overwrite" in stderr
    assert "Traceback" not in stderr and _stage(run)["weights"] == first
    code, _, stderr = run_cli(
        "fit-detail", run, store, "--scenes", "4", "--dims", "8", "--overwrite", *QUIET
    )
    assert code == 0, stderr
    assert _stage(run)["weights"] != first and _stage(run)["config"]["dims"] == 8
    named = _stage(run)["checkpoint"]  # published under a fresh name: the old one stayed till then
    assert [f"checkpoints/{p.name}" for p in (run / "checkpoints").glob("detail-*")] == [named]


class _Killed(BaseException):
    """A SIGKILL, as far as the disk can tell: nothing after it runs (no `except Exception`)."""


def test_a_crash_while_a_new_bank_is_published_keeps_the_old_one(
    banked: Path, trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--overwrite` commits the bank under the same step as the old one: the old folder used to
    be removed before the new one was moved into place, so a kill between left run.json naming
    a missing folder, and every later synthesize of the run failed (exit 4)."""
    run, real_rename = _copy(banked, tmp_path / "run"), Path.rename

    def killed_at_publish(self: Path, target: Any) -> Path:
        if Path(target).parent.name == "checkpoints":
            raise _Killed
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_at_publish)
    with pytest.raises(_Killed):
        run_cli("fit-detail", run, _store(trained), "--dims", "8", "--overwrite", *QUIET)
    monkeypatch.undo()
    load_run(run)  # every weights file run.json lists is there and matches its sha256
    code, _, stderr = synth(run, tmp_path / "x.zarr", "--n", "2", "--no-detail")
    assert code == 0, stderr
    code, _, stderr = run_cli("fit-detail", run, _store(trained), "--dims", "8", "--overwrite",
                              *QUIET)  # fmt: skip
    assert code == 0, stderr
    named = _stage(run)["checkpoint"]
    assert [f"checkpoints/{p.name}" for p in (run / "checkpoints").glob("detail-*")] == [named]


def test_detail_is_the_default_of_a_banked_run_changes_images_only_and_is_recorded(
    banked: Path, tmp_path: Path
) -> None:
    plain, detailed, again = tmp_path / "p.zarr", tmp_path / "d.zarr", tmp_path / "d1.zarr"
    assert synth(banked, plain, "--n", "4", "--no-detail")[0] == 0
    code, _, stderr = synth(banked, detailed, "--n", "4", "--detail")
    assert code == 0, stderr
    # The default: detail, as the run has a bank, the same arrays as --detail's (at the same
    # thread count: the last bit of a decoded value depends on it, README, synthesize).
    code, _, stderr = run_cli("synthesize", "--model", banked, "--out", again, "--n", "4",
                              "--steps", "4", "--batch-size", "4", "--threads", "2")  # fmt: skip
    assert code == 0 and "detail: the run's retrieved detail" in stderr, stderr
    with_detail, without = arrays(detailed), arrays(plain)
    assert np.array_equal(with_detail["mask"], without["mask"])
    assert not np.array_equal(with_detail["image"], without["image"])
    assert all(np.array_equal(with_detail[k], arrays(again)[k]) for k in with_detail)
    manifest = json.loads((detailed / "manifest.json").read_text())
    assert manifest["plan"]["detail"] == _stage(banked)["weights"]
    recorded = manifest["model"]["details"]["detail"]
    assert (recorded["block"], recorded["context"], recorded["dims"]) == (4, 8, 48)
    assert "detail" not in json.loads((plain / "manifest.json").read_text())["plan"]


def test_refusals_are_one_line(trained: Path, banked: Path, tmp_path: Path) -> None:
    code, _, stderr = synth(trained, tmp_path / "x.zarr", "--n", "2", "--detail")
    assert code == 2 and "no detail bank" in stderr and "fit-detail" in stderr
    assert not (tmp_path / "x.zarr").exists()
    stale = _copy(banked, tmp_path / "stale")
    manifest = json.loads((stale / "run.json").read_text())
    manifest["stages"]["detail"]["config"]["vae_weights"] = {"image": "0" * 64}
    (stale / "run.json").write_text(json.dumps(manifest))
    code, _, stderr = synth(stale, tmp_path / "y.zarr", "--n", "2", "--detail")
    assert code == 4 and "earlier VAE" in stderr and "--overwrite" in stderr
    code, _, stderr = run_cli("fit-detail", banked, _store(trained), "--context", "5", *QUIET)
    assert code == 2 and "--context" in stderr
    code, _, stderr = run_cli("fit-detail", banked, _store(trained), "--gpus", "cpu:2", *QUIET)
    assert code == 2 and "--gpus cpu:2: fit-detail runs on one device" in stderr
    unfinished = _copy(trained, tmp_path / "unfinished")
    manifest = json.loads((unfinished / "run.json").read_text())
    manifest["stages"]["vae"]["finished"] = False
    (unfinished / "run.json").write_text(json.dumps(manifest))
    code, _, stderr = run_cli("fit-detail", unfinished, _store(trained), *QUIET)
    assert code == 4 and "VAE is not trained yet" in stderr and "fit-vae" in stderr
    cd = _copy(trained, tmp_path / "cd")
    manifest = json.loads((cd / "run.json").read_text())
    (cd / "run.json").write_text(json.dumps({**manifest, "task": "cd"}))
    code, _, stderr = run_cli("fit-detail", cd, _store(trained), *QUIET)
    assert code == 3 and "task ss, the model cd" in stderr and "Traceback" not in stderr


def test_synthesize_detail_looks_up_within_the_mask_it_writes(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The label each image's detail is matched on is the one stored beside it: the decoded
    mask, or with --masks the mask given."""
    looked_up: list[np.ndarray] = []
    detail = Bank.detail

    def spy(bank: Bank, decoded: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        assert mask is not None
        looked_up.append(mask.numpy().copy())
        return detail(bank, decoded, mask)

    store, conditioned = _store(trained), tmp_path / "conditioned"
    for command in (
        ("fit-vae", store, "--run", conditioned, *VAE),
        ("fit-diffusion", conditioned, *UNET, "--mask-condition-rate", "0.5"),
        ("fit-detail", conditioned, store, *QUIET),
    ):
        code, _, stderr = run_cli(*command)
        assert code == 0, stderr
    monkeypatch.setattr(Bank, "detail", spy)
    for out, extra in (("decoded.zarr", ()), ("given.zarr", ("--masks", str(store)))):
        looked_up.clear()
        code, _, stderr = synth(conditioned, tmp_path / out, "--n", "4", "--detail", *extra)
        assert code == 0, stderr
        assert np.array_equal(np.stack(looked_up), arrays(tmp_path / out)["mask"])


@pytest.mark.parametrize(
    ("left_out", "lookup", "message"),
    [
        ("classes", None, "no block classes"),
        ("labels", "within the mask's class", "no block labels"),
    ],
)
def test_a_bank_of_an_earlier_kind_is_rebuilt_not_used(
    banked: Path, trained: Path, tmp_path: Path, left_out: str, lookup: str | None, message: str
) -> None:
    """A bank of an earlier kind (matched on the image alone, or on the mask's class alone) is
    refused with the fix, and the same fit-detail command rebuilds it only with --overwrite."""
    old = _copy(banked, tmp_path / "old")
    path = old / _stage(old)["checkpoint"] / "bank.safetensors"
    tensors = load_file(path)
    kept = {k: v for k, v in tensors.items() if k not in {left_out, "labels"}}
    save_file(kept, path, metadata=safe_open(str(path), "pt").metadata())
    manifest = json.loads((old / "run.json").read_text())
    del manifest["stages"]["detail"]["config"]["lookup"]
    if lookup is not None:
        manifest["stages"]["detail"]["config"]["lookup"] = lookup
    name = f"{_stage(old)['checkpoint']}/bank.safetensors"
    manifest["stages"]["detail"]["weights"][name] = hashlib.sha256(path.read_bytes()).hexdigest()
    (old / "run.json").write_text(json.dumps(manifest))
    code, _, stderr = synth(old, tmp_path / "x.zarr", "--n", "2", "--detail")
    assert code == 4 and message in stderr and "--overwrite" in stderr
    assert "Traceback" not in stderr and not (tmp_path / "x.zarr").exists()
    code, _, stderr = run_cli("fit-detail", old, _store(trained), *QUIET)
    assert code == 3 and "already has a detail bank" in stderr and "--overwrite" in stderr
    code, _, stderr = run_cli("fit-detail", old, _store(trained), "--overwrite", *QUIET)
    assert code == 0, stderr
    assert synth(old, tmp_path / "y.zarr", "--n", "2", "--detail")[0] == 0


def test_a_store_begun_before_the_bank_goes_on_without_it(trained: Path, tmp_path: Path) -> None:
    """The default follows a store begun before: a resume after fit-detail goes on as begun."""
    run, out = _copy(trained, tmp_path / "run"), tmp_path / "syn.zarr"
    assert synth(run, out, "--n", "4")[0] == 0
    assert run_cli("fit-detail", run, _store(trained), *QUIET)[0] == 0
    code, _, stderr = synth(run, out, "--n", "4", "--resume", "--json")
    assert code == 0, stderr
    assert "detail" not in json.loads((out / "manifest.json").read_text())["plan"]
    code, _, stderr = synth(run, out, "--n", "4", "--resume", "--detail")
    assert code != 0 and "Traceback" not in stderr


def test_the_benchmark_s_round_trip_row_adds_the_run_s_bank(
    banked: Path, trained: Path, tmp_path: Path
) -> None:
    """The oracle decodes as the run's generator does: VAE, then the bank's detail."""
    synthetic, out = tmp_path / "syn.zarr", tmp_path / "report"
    assert synth(banked, synthetic, "--n", "4")[0] == 0
    code, _, stderr = run_cli(
        "benchmark", "--real", _store(trained), "--synthetic", synthetic, "--model", banked,
        "--out", out, "--downstream", "--downstream-protocols", "pretrain", "--downstream-oracle",
        "--downstream-seeds", "1", "--downstream-max-steps", "1", "--downstream-eval-every", "1",
        "--downstream-patience", "1", "--downstream-batch-size", "4", "--real-limit", "4",
        "--synthetic-ratio", "1", "--feature-steps", "5", "--batch-size", "8", "--threads", "2",
        "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    downstream = load_report(out / "report.json").downstream
    assert downstream is not None and downstream.round_trip is not None
    assert downstream.round_trip.endswith("+ retrieved detail (its fit-detail bank)")
    assert "pretrain-oracle-round-trip" in {row.protocol for row in downstream.rows}


DEMO = ("synthesize", "--model", "demo", "--task", "ss", "--n", "2", "--steps", "2")


def _own_demo_cache() -> Path:
    """This test's own demo-bank cache, in place of the session's shared one."""
    link = Path(os.environ["SPECDM_HOME"]) / "cache" / "demo-detail"
    link.unlink()
    return link


def test_the_demo_model_builds_its_bank_once_and_adds_its_detail(
    tmp_path: Path, shared_demo_bank: Path
) -> None:
    """The ss demo model's bank (too large to ship) is built on first use on one thread, so
    --threads does not change its bytes, then found; a damaged copy is built again (one build
    here: a CI minute is a bank build); --no-detail leaves it out and builds none."""
    shared = tmp_path / "shared.zarr"  # the session's bank, built at --threads 2 if not yet
    assert run_cli(*DEMO, "--out", shared, "--threads", "2", "--quiet")[0] == 0
    (reference,) = shared_demo_bank.glob("*/checkpoints/detail-*/bank.safetensors")
    cache = _own_demo_cache()
    plain = tmp_path / "plain.zarr"
    assert run_cli(*DEMO, "--no-detail", "--out", plain, "--quiet")[0] == 0
    assert not cache.exists()
    shutil.copytree(shared_demo_bank, cache)
    (bank,) = cache.glob("*/checkpoints/detail-*/bank.safetensors")
    bank.write_bytes(reference.read_bytes()[: reference.stat().st_size // 2])
    first, again = tmp_path / "d.zarr", tmp_path / "d1.zarr"
    code, _, stderr = run_cli(*DEMO, "--out", first, "--threads", "1")
    assert code == 0 and "building the demo model's detail bank once" in stderr, stderr
    assert bank.read_bytes() == reference.read_bytes()
    assert not list(cache.glob(".*partial"))
    code, _, stderr = run_cli(*DEMO, "--out", again, "--threads", "1")
    assert code == 0 and "building" not in stderr and "detail: the run's" in stderr, stderr
    assert all(np.array_equal(arrays(first)[k], arrays(again)[k]) for k in arrays(first))
    assert np.array_equal(arrays(first)["mask"], arrays(plain)["mask"])
    assert not np.array_equal(arrays(first)["image"], arrays(plain)["image"])


def test_the_demo_bank_s_scenes_are_train_scenes_of_the_store_it_was_measured_on(
    tmp_path: Path,
) -> None:
    """The recipe: `prepare demo --task ss --n 5120 --size 64 --seed 11`'s train split, spread
    evenly; checked on the first 160 scenes of that store (sample i depends on (seed, i) only)."""
    store = tmp_path / "s.zarr"
    command = ("prepare", "demo", "--task", "ss", "--n", "160", "--size", "64", "--seed", "11")
    assert run_cli(*command, "--out", store, "--quiet")[0] == 0
    real = open_store(store)
    scenes = [int(i) for i in bank_scenes() if i < 160]
    assert len(bank_scenes()) == BANK_SCENES and len(scenes) >= 2
    assert set(scenes) <= set(real.indices("train").tolist())
    for index in scenes:
        made = make_sample(BANK_STORE.seed, index, "ss", BANK_STORE.size, "s2")
        assert np.array_equal(made["image"], real.read(index)["image"])
