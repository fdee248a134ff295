"""Paths: digests of files, safe names from untrusted text, outputs that must not hit inputs."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from specdm_cli.errors import UsageError


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in blocks by hashlib)."""
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def safe_component(name: str) -> str:
    """`name` as one harmless path component: letters, digits, `.`, `_`, `-` only, no leading
    dot, at most 64 characters (a manifest may say `../../x` or `/etc`)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip(".")[:64]
    return cleaned or "dataset"


def refuse_overlap(output: Path, inputs: dict[str, Path | None]) -> None:
    """An output that is, holds or lies inside an input of the same command is a usage error
    (exit 2): `--overwrite` would destroy what the command reads (DESIGN.md)."""
    out = output.resolve()
    for option, given in inputs.items():
        if given is None:
            continue
        source = given.resolve()
        if out == source or out.is_relative_to(source) or source.is_relative_to(out):
            raise UsageError(
                f"the output {output} overlaps the input {given} ({option})",
                hint="write to a folder outside every input",
            )
