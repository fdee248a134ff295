"""Data-parallel training with torch.distributed: one process per device (NCCL on CUDA, gloo on CPU).

`--gpus 0,1` spawns one rank per CUDA device, `--gpus cpu:N` N CPU ranks (what CI tests);
under `torchrun` (RANK / WORLD_SIZE set) the ranks are torchrun's. Rank 0 alone writes.
`run_spawned` is the one way a stage runs a process per device (training here, synthesize's
ranks too): each rank stops gracefully, the parent forwards its stop signal, and a rank's
error, or its stop, reaches the parent as one line and an exit code.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.queues import SimpleQueue
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException, spawn

from specdm_cli.errors import EXIT_RESOURCE, Interrupted, SpecdmError, resource_error_from
from specdm_cli.faults import fault_point
from specdm_cli.pipeline.signals import StopFlag, graceful_stop

# What a spawned rank reports before it exits: (exit code, its one line); 0 is done, 128 + n
# stopped by signal n, anything else the rank's error.
Outcome = tuple[int, str]
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
TEARDOWN_GRACE_S = 5.0  # from the last rank's outcome to its process's exit


class RankFailed(SpecdmError):
    """A device's process stopped with an error; its own line is the message."""

    def __init__(self, line: str, exit_code: int):
        super().__init__(line.removeprefix("error: "))
        self.exit_code = exit_code


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_ranks(
    worker: Callable[..., object], devices: list[torch.device], stop: StopFlag, *args: Any
) -> None:
    """Run `worker(rank, world, device, *args, stop)` on every rank (torchrun's, else one spawned
    process per device); returns when all finished, raises Interrupted when they stopped early.
    One device in-process is `driver.launch`'s."""
    if launched_by_torchrun():  # this process is a rank: the CLI's own stop flag is its own
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = devices[local % len(devices)]
        _init(
            rank,
            world,
            device,
            os.environ.get("MASTER_ADDR", "127.0.0.1"),
            int(os.environ.get("MASTER_PORT", "29500")),
        )
        _run(worker, rank, world, device, (*args, stop))
        return
    port = free_port()
    run_spawned(_spawned, len(devices), (worker, devices, port, args), stop)


def _spawned(
    rank: int,
    stop: StopFlag,
    worker: Callable[..., object],
    devices: list[torch.device],
    port: int,
    args: tuple[Any, ...],
) -> None:
    _init(rank, len(devices), devices[rank], "127.0.0.1", port)
    # The process group is left after the rank has told its outcome (`_spawned_rank`).
    worker(rank, len(devices), devices[rank], *args, stop)


def _init(rank: int, world: int, device: torch.device, address: str, port: int) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world
    )


def _run(
    worker: Callable[..., object],
    rank: int,
    world: int,
    device: torch.device,
    args: tuple[Any, ...],
) -> None:
    try:
        worker(rank, world, device, *args)
    finally:
        dist.destroy_process_group()


def stop_of_any_rank(signum: int | None) -> int | None:
    """The stop signal any rank was sent (None: none was), the same on every rank. The ranks
    must stop at the same step: one that stepped on alone would wait in DDP's all-reduce for
    ranks that had left."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return signum
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    flag = torch.tensor([signum or 0], dtype=torch.int64, device=on)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


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


def data_parallel(module: nn.Module, device: torch.device, world: int) -> nn.Module:
    """Wrap in DistributedDataParallel when there are several ranks."""
    if world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    # A hint about speed, not numbers: a 1x1 convolution's grad may come out with other strides
    # than its bucket's (the same values); printed on a rank's stderr, it read as a failure.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None
    )
