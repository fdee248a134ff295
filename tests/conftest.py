"""Shared fixtures: tiny stores made by the real CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from specdm_cli.cli import app
from tests.processes import kill_started

# fit-vae options for tests of other behaviour: the paper's loss and label latent (3 channels),
# not the cpu preset's semantic term (a segmenter trained first on every call); the channels
# are pinned too, so a preset change (the cd demo recipe gives 8) leaves these tests alone.
PAPER_LOSS = ("--semantic-weight", "0", "--mask-latent-channels", "3")


@pytest.fixture(scope="session")
def shared_demo_bank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache of the ss demo model's detail bank for the session (built on first use, a few
    seconds): every test's home links to it. A test of the cache itself removes the link."""
    return tmp_path_factory.mktemp("demo-detail")


def home_sharing_the_demo_bank(home: Path, shared: Path) -> str:
    """`home` (made) with its demo-bank cache linked to the session's `shared` one."""
    (home / "cache").mkdir(parents=True, exist_ok=True)
    (home / "cache" / "demo-detail").symlink_to(shared, target_is_directory=True)
    return str(home)


@pytest.fixture(scope="session", autouse=True)
def _isolated_session_user_dirs(
    tmp_path_factory: pytest.TempPathFactory, shared_demo_bank: Path
) -> Iterator[None]:
    """Session and module fixtures (tiny runs made once) register their runs too: keep those
    out of the real home directory as well, or a developer's `synthesize` would pick them."""
    home = tmp_path_factory.mktemp("specdm-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPECDM_HOME", home_sharing_the_demo_bank(home, shared_demo_bank))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(autouse=True)
def _isolated_user_dirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_demo_bank: Path
) -> None:
    """Each test gets a registry and caches of its own (the demo bank's shared), in
    tmp_path / "specdm-home", made now: a test wanting an empty folder makes one in tmp_path."""
    home = tmp_path / "specdm-home"
    monkeypatch.setenv("SPECDM_HOME", home_sharing_the_demo_bank(home, shared_demo_bank))


def run_cli(*args: str | Path) -> tuple[int, str, str]:
    """Run the real CLI in-process; returns (exit code, stdout, stderr)."""
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def prepare_demo(out: Path, *extra: str, task: str = "ss", n: int = 24, size: int = 32) -> Path:
    code, _stdout, stderr = run_cli(
        "prepare", "demo", "--out", out, "--task", task, "--n", str(n), "--size", str(size),
        "--quiet", *extra,
    )  # fmt: skip
    assert code == 0, stderr
    return out


@pytest.fixture(scope="session")
def demo_ss_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_demo(tmp_path_factory.mktemp("demo") / "ss.zarr")


@pytest.fixture(scope="session")
def demo_cd_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_demo(tmp_path_factory.mktemp("demo") / "cd.zarr", task="cd")


def manifest_of(store: Path) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((store / "manifest.json").read_text())
    return loaded


@pytest.fixture(autouse=True)
def _kill_spawned_process_groups() -> Iterator[None]:
    """Whatever a test started through tests.processes dies with the test, ranks included."""
    yield
    kill_started()
