"""What every command prints: progress on stderr, one-line errors and exit codes, --json."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console

from specdm_cli.config import Progress
from specdm_cli.errors import (
    EXIT_RESOURCE,
    EXIT_SIGINT,
    Interrupted,
    ResourceError,
    SpecdmError,
    resource_error_from,
)

# soft_wrap: a log line (paths!) is never split at the terminal width, in a file or not.
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


class StdoutConsole(Console):
    """Rich's console for tables on stdout. Its reader may leave (`| head -1`), where rich
    exits 1 with nothing said: the application's own handling (quiet, exit 141) takes it."""

    def __init__(self) -> None:
        super().__init__(highlight=False)

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


_NOT_RESUMABLE = (
    "interrupted: this command does not resume; run it again (--overwrite for an --out it began)"
)


@contextmanager
def domain_errors(resumable: bool = True) -> Iterator[None]:
    """Domain errors become one stderr line and their exit code; never a traceback. A command
    without --resume (`resumable` False) is not told to rerun with it when interrupted."""
    interrupted = "interrupted: rerun with --resume" if resumable else _NOT_RESUMABLE
    try:
        yield
    except Interrupted as error:
        stderr.print(error.line() if resumable else _NOT_RESUMABLE, markup=False)
        raise typer.Exit(error.exit_code) from None
    except SpecdmError as error:
        stderr.print(error.line(), markup=False, soft_wrap=True)
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt:
        stderr.print(interrupted, markup=False)
        raise typer.Exit(EXIT_SIGINT) from None
    except BrokenPipeError:
        raise  # the reader of stdout left: the application's (quiet, exit 141)
    except OSError as error:
        # Readers turn their own I/O errors into input errors; what is left is the output side.
        resource = resource_error_from(error) or ResourceError(
            f"cannot write ({error.strerror or error})", error.filename, "check --out"
        )
        stderr.print(resource.line(), markup=False, soft_wrap=True)
        raise typer.Exit(EXIT_RESOURCE) from None
    except MemoryError:
        stderr.print("error: out of memory: use a smaller --batch-size or --workers", markup=False)
        raise typer.Exit(EXIT_RESOURCE) from None
    except Exception as error:
        if os.environ.get("SPECDM_DEBUG"):
            raise
        stderr.print(
            f"error: unexpected {type(error).__name__}: {error} "
            "(a bug: rerun with SPECDM_DEBUG=1 for a traceback and report it)",
            markup=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


def emit_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


@contextmanager
def progress_reporter(name: str, quiet: bool) -> Iterator[Progress]:
    """Progress on stderr fed by progress(stage, done, total): a rich bar on a terminal, plain
    unwrapped lines at a bounded rate in a log file; a new stage is named on its own line."""
    if quiet:
        yield lambda stage, done, total: None
    elif stderr.is_terminal:
        with _progress_bar(name) as update:
            yield update
    else:
        yield _progress_lines(name)


@contextmanager
def _progress_bar(name: str) -> Iterator[Progress]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TaskProgressColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as Bar

    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Bar(*columns, console=stderr, transient=False) as bar:
        task = bar.add_task(name, total=None)
        stages: list[str] = []

        def update(stage: str, done: int, total: int) -> None:
            if stages[-1:] != [stage]:
                stages.append(stage)
                if stage != name:
                    stderr.print(_label(name, stage), markup=False)
            bar.update(task, completed=done, total=total)

        yield update


# In a log file: a line at most every 10 s or every 5% of a stage, and at its end.
LOG_SECONDS = 10.0


LOG_FRACTION = 0.05


def _progress_lines(name: str) -> Progress:
    """Plain progress lines (step/total, rate, ETA) for stderr that is not a terminal."""
    state: dict[str, Any] = {"stage": None}

    def update(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if stage != state["stage"]:
            state.update(
                stage=stage, start=now, start_done=done, last=now, last_done=done, ended=False
            )
        due = now - state["last"] >= LOG_SECONDS or (
            total > 0 and done - state["last_done"] >= LOG_FRACTION * total
        )
        if done == total and state["ended"]:
            return  # told once: a poller (the parent of --gpus ranks) repeats it till they exit
        if not (due or done == total):
            return
        state["ended"] = done == total
        rate = (done - state["start_done"]) / max(now - state["start"], 1e-9)
        eta = f", ETA {_duration((total - done) / rate)}" if rate > 0 and total > done else ""
        share = f" ({done / total:.0%})" if total > 0 else ""
        label = _label(name, stage)
        speed = f", {rate:.3g}/s" if rate > 0 else ""
        sys.stderr.write(f"{label} {done}/{total}{share}{speed}{eta}\n")
        sys.stderr.flush()
        state.update(last=now, last_done=done)

    return update


def _label(name: str, stage: str) -> str:
    """A stage of command `name` as progress names it: `prepare: scanning masks`, but a stage
    named after its command once (`fit-vae segmenter`, not `fit-vae: fit-vae segmenter`)."""
    if stage == name or stage.startswith(f"{name} "):
        return stage
    return f"{name}: {stage}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Warnings(list[str]):
    """A stage's warnings and notices: on stderr as they come (not with --quiet), and kept for
    `--json`'s `warnings`, so a pipeline reading stdout sees them too."""

    def __init__(self, quiet: bool):
        super().__init__()
        self.quiet = quiet

    def __call__(self, line: str) -> None:
        self.append(line)
        if not self.quiet:
            stderr.print(line, markup=False)

    def always(self, line: str) -> None:
        """A warning --quiet does not silence: part of the data is missing (not progress)."""
        self.append(line)
        stderr.print(line, markup=False)
