"""Domain errors: one line for the user (what, which file, how to fix) and an exit code."""

from __future__ import annotations

import errno
import re
from pathlib import Path

# Exit codes of DESIGN.md: a pipeline branches on them.
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_MODEL = 4
EXIT_RESOURCE = 5
EXIT_LOCKED = 6
EXIT_SIGINT = 130
EXIT_SIGPIPE = 141  # the reader of stdout left, as a tool killed by SIGPIPE exits in a shell


class SpecdmError(Exception):
    """An error the user can act on; the CLI prints `line()` and exits with `exit_code`."""

    exit_code = EXIT_INPUT

    def __init__(self, message: str, path: Path | str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.path = Path(path) if path is not None else None
        self.hint = hint

    def line(self) -> str:
        """The single stderr line: message, the file it concerns, the fix."""
        text = f"error: {self.message}"
        if self.path is not None:
            text += f" ({self.path})"
        if self.hint:
            text += f": {self.hint}"
        return " ".join(text.split())


class UsageError(SpecdmError):
    """Options that cannot work together or are out of range."""

    exit_code = EXIT_USAGE


def refuse_resume_with_overwrite(resume: bool, overwrite: bool) -> None:
    """--resume continues an output, --overwrite replaces it: every command that has both."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other", hint="pick one")


class InputDataError(SpecdmError):
    """Raw data or a store that is missing, malformed or inconsistent."""

    exit_code = EXIT_INPUT


class ModelError(SpecdmError):
    """A run directory or checkpoint that is missing, corrupt, tampered or incompatible."""

    exit_code = EXIT_MODEL


class ResourceError(SpecdmError):
    """Disk full, out of memory, no GPU."""

    exit_code = EXIT_RESOURCE


class LockHeldError(SpecdmError):
    """Another live process holds the lock of a store or run directory."""

    exit_code = EXIT_LOCKED


class Interrupted(SpecdmError):
    """SIGINT or SIGTERM arrived; the work in hand was finished and the rest can be resumed."""

    def __init__(self, signum: int, hint: str = "rerun with --resume"):
        super().__init__("interrupted", hint=hint)
        self.signum = signum
        self.exit_code = 128 + signum

    def line(self) -> str:
        return f"interrupted: {self.hint}"


def reason_of(exc: BaseException, path: Path | str | None = None) -> str:
    """An exception's first line, short enough for one stderr line (its type when it says
    nothing): what a library reported, quoted inside our own message, which names `path`."""
    if "See previous exception" in str(exc) and exc.__cause__ is not None:
        # rasterio keeps GDAL's reason (a missing file) there
        return reason_of(exc.__cause__, path)
    first = str(exc).splitlines()[0] if str(exc) else ""
    # Shortened after the path is gone: a long path would leave no room for the reason.
    reason = _without_leading_path(first, Path(path).name) if path is not None else first
    return reason[:120] if reason else type(exc).__name__


# rasterio's MemoryFile (a zip member read in memory): a uuid name under /vsimem/.
_MEMORY_FILE = re.compile(r"(?:/vsimem/)?[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}(?:\.\w+)?")


def _without_leading_path(text: str, name: str) -> str:
    """`text` less the file GDAL puts first ("'/a/b.tif' not recognized as ...", "b.tif:
    TIFFReadDirectory..."), when it is the file named `name` or GDAL's in-memory copy of it (a
    zip member); a path to another file (a VRT's missing band) is the reason itself and stays."""
    if text.startswith("'") and "'" in text[1:]:
        lead, rest = text[1:].split("'", 1)
    elif ": " in text:
        lead, rest = text.split(": ", 1)
    else:
        return text
    ours = (bool(name) and lead.endswith(name)) or _MEMORY_FILE.fullmatch(lead) is not None
    return rest.lstrip(" :") if ours and rest.strip(" :") else text


def resource_error_from(exc: OSError, path: Path | str | None = None) -> ResourceError | None:
    """Disk full and unwritable paths as one-line resource errors (exit 5); None for the rest."""
    where = path if path is not None else exc.filename
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return ResourceError(
            "no space left on device", where, "free space, then rerun with --resume"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ResourceError("cannot write here", where, "make it writable, or write elsewhere")
    return None


def missing_store(path: Path, option: str = "") -> InputDataError:
    """A store path with nothing there (told by the CLI before torch loads, and by readers)."""
    what = f"{option}: store does not exist" if option else "store does not exist"
    return InputDataError(what, path, "check the path or run `specdm prepare`")


def task_needed(model: str | None) -> UsageError:
    """`--model demo` or no --model without --task: which of the ss and cd models is meant."""
    what = "--model demo holds an ss and a cd model" if model == "demo" else "without --model"
    return UsageError(f"{what}, --task is needed to pick one", hint="pass --task ss or --task cd")


def missing_run(path: Path) -> ModelError:
    """A run path with nothing there; the name `demo` is the shipped model, which is read-only."""
    if str(path) == "demo":  # e.g. `specdm distill demo`
        return ModelError(
            "no run folder 'demo' here: the shipped demo models are read-only",
            path,
            "copy the package's specdm_cli/assets/demo-ss (or demo-cd) folder and name the copy",
        )
    return ModelError(
        "no such run folder", path, "check the path, or train one: `specdm fit-vae STORE --run RUN`"
    )
