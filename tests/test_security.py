"""Nothing in the package unpickles or evaluates, and the pipeline needs no network."""

from __future__ import annotations

import ast
import socket
from pathlib import Path

import pytest

import specdm_cli
from tests.conftest import run_cli

PACKAGE = Path(specdm_cli.__file__).parent


def _calls_and_imports(tree: ast.AST) -> list[str]:
    """Dotted names of every call and import in a module."""
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call):
            found.append(ast.unparse(node.func))
            for keyword in node.keywords:
                if keyword.arg == "allow_pickle" and ast.unparse(keyword.value) != "False":
                    found.append("allow_pickle=True")
                if keyword.arg == "weights_only" and ast.unparse(keyword.value) != "True":
                    found.append("weights_only=False")
    return found


FORBIDDEN = {"pickle", "cPickle", "dill", "marshal", "shelve", "torch.load", "eval", "exec",
             "allow_pickle=True", "weights_only=False", "joblib"}  # fmt: skip


def test_the_package_never_unpickles_or_evaluates() -> None:
    offenders = []
    for module in sorted(PACKAGE.rglob("*.py")):
        names = _calls_and_imports(ast.parse(module.read_text(encoding="utf-8")))
        offenders += [
            f"{module.relative_to(PACKAGE)}: {n}"
            for n in names
            if n in FORBIDDEN or n.split(".")[0] in {"pickle", "dill", "marshal"}
        ]
    assert offenders == []


def test_the_scan_would_catch_a_pickle() -> None:
    bad = "import pickle\nimport torch\nx = torch.load('w.pt')\nnp.load('a', allow_pickle=True)\n"
    names = _calls_and_imports(ast.parse(bad))
    assert {"pickle", "torch.load", "allow_pickle=True"} <= set(names)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("specdm tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.usefixtures("no_network")
def test_prepare_and_inspect_run_with_sockets_blocked(tmp_path: Path) -> None:
    code, _, stderr = run_cli(
        "prepare", "demo", "--n", "8", "--size", "32", "--out", tmp_path / "s.zarr", "--quiet"
    )
    assert code == 0, stderr
    assert run_cli("inspect", tmp_path / "s.zarr", "--json")[0] == 0


@pytest.mark.usefixtures("no_network")
def test_the_whole_pipeline_runs_with_sockets_blocked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # HF_HUB_OFFLINE unset, as a user runs it: models come from local folders, never the Hub.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    store, run = tmp_path / "s.zarr", tmp_path / "run"
    tiny = ("--norm-groups", "4", "--batch-size", "4", "--threads", "2", "--quiet", "--steps", "2")
    for command in (
        ("prepare", "demo", "--n", "12", "--size", "16", "--out", store, "--quiet"),
        ("fit-vae", store, "--run", run, "--image-blocks", "8,16,16", "--mask-blocks", "8,8,16",
         "--semantic-steps", "2", *tiny),  # the semantic term's segmenter too, for 2 steps
        ("fit-diffusion", run, "--unet-blocks", "16,32", "--head-dim", "8",
         "--layers-per-block", "1", *tiny),
        ("synthesize", "--model", run, "--n", "2", "--batch-size", "2", "--steps", "2",
         "--out", tmp_path / "syn.zarr", "--quiet"),
        ("synthesize", "--model", "demo", "--task", "cd", "--n", "1", "--batch-size", "1",
         "--steps", "1", "--out", tmp_path / "demo.zarr", "--quiet"),
        ("inspect", tmp_path / "syn.zarr", "--json"),
    ):  # fmt: skip
        code, _, stderr = run_cli(*command)
        assert code == 0, f"{command[0]}: {stderr}"
