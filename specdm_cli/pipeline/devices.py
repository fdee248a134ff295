"""Where a stage computes: torch devices, threads and mixed precision, and a process per device.

Training, synthesize, benchmark and the CLI use these. `run_spawned` is the one way a stage runs
a process per device (training's ranks, synthesize's too): each rank stops gracefully, the parent
forwards its stop signal, and a rank's error, or its stop, reaches the parent as one line and an
exit code.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.queues import SimpleQueue
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException, spawn

from specdm_cli.config import Devices, Precision
from specdm_cli.errors import (
    EXIT_RESOURCE,
    Interrupted,
    ResourceError,
    SpecdmError,
    resource_error_from,
)
from specdm_cli.faults import fault_point
from specdm_cli.pipeline.signals import StopFlag, graceful_stop

# What a spawned rank reports before it exits: (exit code, its one line); 0 is done, 128 + n
# stopped by signal n, anything else the rank's error.
Outcome = tuple[int, str]
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
TEARDOWN_GRACE_S = 5.0  # from the last rank's outcome to its process's exit


def torch_devices(devices: Devices) -> list[torch.device]:
    """One torch device per rank; CUDA asked for but absent is a resource error (exit 5)."""
    if devices.kind == "cpu":
        return [torch.device("cpu")] * devices.ranks
    if not torch.cuda.is_available():
        raise ResourceError(
            "CUDA was asked for but no GPU is available", hint="drop --gpus to run on the CPU"
        )
    missing = [index for index in devices.cuda_indices if index >= torch.cuda.device_count()]
    if missing:
        raise ResourceError(
            f"no CUDA device {missing[0]}", hint=f"there are {torch.cuda.device_count()}"
        )
    return [torch.device(f"cuda:{index}") for index in devices.cuda_indices]


def cpu_threads_per_process(devices: Devices) -> int:
    """torch's intra-op threads of each sampling process: the CPU kernels' float sums, so the
    last bit of a decoded value, depend on it (CPU ranks share the threads of the command)."""
    return max(1, torch.get_num_threads() // devices.ranks)


def autocast(
    device: torch.device, precision: Precision
) -> contextlib.AbstractContextManager[object]:
    """Mixed precision on CUDA; the CPU always runs fp32 (bf16 there is slower and noisier)."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def available_cpus(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a
    container limited to 2 CPUs on a 64-core host must not start 64 threads)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text(encoding="ascii").split()
        return max(1, min(cpus, int(quota) // int(period)))
    except (OSError, ValueError):  # no cgroup v2, or "max": no quota
        return cpus


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Set torch's intra-op threads for a stage, by default the CPUs it may use (restored after)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count or available_cpus())
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class RankFailed(SpecdmError):
    """A device's process stopped with an error; its own line is the message."""

    def __init__(self, line: str, exit_code: int):
        super().__init__(line.removeprefix("error: "))
        self.exit_code = exit_code


def run_spawned(
    worker: Callable[..., object],
    nprocs: int,
    args: tuple[Any, ...],
    stop: StopFlag,
    waiting: Callable[[], None] | None = None,
) -> None:
    """Run `worker(rank, stop, *args)` in one spawned process per rank, each under its own
    graceful stop, calling `waiting` about twice a second meanwhile. A stop asked of this
    process goes on to the ranks (SIGTERM: each finishes its step or batch in hand). Raises a
    rank's error as its own line, else Interrupted when this process or any rank was stopped."""
    outcomes: SimpleQueue[Outcome] = multiprocessing.get_context("spawn").SimpleQueue()
    # torch warns on stderr as it stops the other ranks after one failed; the failed rank's own
    # line is what the user needs.
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    with _stop_signals_held():
        context: Any = spawn(  # type: ignore[no-untyped-call]
            _spawned_rank, args=(worker, args, outcomes), nprocs=nprocs, join=False
        )
    forwarded, died, told = False, None, []
    all_told: float | None = None
    try:
        while not context.join(timeout=0.5):
            told += _drained(outcomes)
            if stop.signum is not None and not forwarded:
                for process in context.processes:
                    process.terminate()
                forwarded = True
            if len(told) == nprocs:
                all_told = all_told or time.monotonic()
                if time.monotonic() - all_told > TEARDOWN_GRACE_S:
                    _end_lingering(context.processes)
            if waiting is not None:
                waiting()
    except ProcessRaisedException as error:  # not a domain error: a bug, reported as such
        last = str(error).strip().splitlines()[-1]
        raise RankFailed(f"a device process failed: {last}", 1) from None
    except ProcessExitedException as error:  # torch stopped the other ranks before it raised
        died = error
    told += _drained(outcomes)
    _raise_unless_done(told, nprocs, stop, died if len(told) < nprocs else None)


def _end_lingering(processes: list[Any]) -> None:
    """Every rank has told how it ended, and one still has not exited: torch's teardown was
    seen to wait on a rank that had left (gloo, after a stop, in some runs on a loaded
    machine). Nothing is left for it to do."""
    for process in processes:
        if process.is_alive():
            process.kill()


def _drained(outcomes: SimpleQueue[Outcome]) -> list[Outcome]:
    found = []
    while not outcomes.empty():
        found.append(outcomes.get())
    return found


def _raise_unless_done(
    outcomes: list[Outcome], nprocs: int, stop: StopFlag, died: ProcessExitedException | None
) -> None:
    """A rank's error first, then a stop (this process's signal, else a rank's); a rank that
    ended without a word was stopped too (torch's wrapper swallows a KeyboardInterrupt that
    lands before the rank's handlers are installed)."""
    for code, line in outcomes:
        if 0 < code < 128:
            raise RankFailed(line, code)
    stop.check()
    for code, _ in outcomes:
        if code >= 128:
            raise Interrupted(code - 128)
    if died is not None:
        raise RankFailed(f"a device process died (exit {died.exit_code})", 1)
    if len(outcomes) < nprocs:
        raise Interrupted(signal.SIGINT)


@contextmanager
def _stop_signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while the ranks start: they inherit the signal mask, so a stop
    landing while a rank still imports waits for its handlers, where it used to kill the rank
    mid-import or print a KeyboardInterrupt traceback. Held here, it then reaches our own."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _spawned_rank(
    rank: int, worker: Callable[..., object], args: tuple[Any, ...], outcomes: SimpleQueue[Outcome]
) -> None:
    """One rank: run, report how it ended; an error exits non-zero, so that torch stops the
    other ranks rather than leave them waiting in a collective for this one."""
    with graceful_stop() as stop:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held since the start
        outcome = _outcome(worker, rank, stop, args)
        # Done: a stop arriving now (the parent forwards one) has nothing left to stop, and
        # the default action it would meet after the handlers go would kill the rank.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    outcomes.put(outcome)
    fault_point("rank.after_outcome")  # a teardown that never ends (the parent ends the rank)
    if dist.is_initialized():  # told first: the parent ends a rank whose teardown waits on
        dist.destroy_process_group()
    if 0 < outcome[0] < 128:
        sys.exit(outcome[0])


def _outcome(
    worker: Callable[..., object], rank: int, stop: StopFlag, args: tuple[Any, ...]
) -> Outcome:
    try:
        worker(rank, stop, *args)
    except SpecdmError as error:  # Interrupted too: its code is 128 + the signal
        return error.exit_code, error.line()
    except OSError as error:
        resource = resource_error_from(error)
        return EXIT_RESOURCE, resource.line() if resource else f"error: {error}"
    return 0, ""
