"""`synthesize --gpus 0,1` (or `cpu:N`): one process per device, no communication needed.

Rank r of k writes sub-shard (i*k + r) / (N*k) of shard i/N: the same grid lines the shard
protocol uses, and together exactly shard i's batches, so the bytes equal a single-device run's
on one device type. The parent shows progress from the store's written flags, forwards a stop
signal to the ranks (each finishes its batch in hand) and finalizes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Protocol, TypeVar

import torch

from specdm_cli.config import Devices, Progress
from specdm_cli.pipeline.devices import cpu_threads_per_process, run_spawned
from specdm_cli.pipeline.signals import StopFlag
from specdm_cli.pipeline.synthesize.shards import Shard, shard_batches
from specdm_cli.stores import open_store


class RankedRequest(Protocol):
    """What the ranks need of a synthesize request (a dataclass: each rank gets a `replace`d copy)."""

    @property
    def out(self) -> Path: ...
    @property
    def n(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def shard(self) -> Shard: ...
    @property
    def devices(self) -> Devices: ...


Request = TypeVar("Request", bound=RankedRequest)


def sub_shard(shard: Shard, rank: int, world: int) -> Shard:
    return Shard(shard.index * world + rank, shard.count * world)


def run_on_devices(
    request: Request,
    worker: Callable[[Request, StopFlag], object],
    stop: StopFlag,
    progress: Progress | None,
) -> int:
    """Synthesize this shard with one process per device; returns the samples this call wrote."""
    batches = shard_batches(request.n, request.batch_size, request.shard)
    before = _written(request, batches)

    def waiting() -> None:
        if progress:
            progress("synthesize", _written(request, batches), sum(map(len, batches)))

    run_spawned(_rank, request.devices.ranks, (request, worker), stop, waiting)
    return _written(request, batches) - before


def _written(request: RankedRequest, batches: list[range]) -> int:
    if not batches:
        return 0
    flags = open_store(request.out, allow_incomplete=True).written()
    return int(flags[batches[0].start : batches[-1].stop].sum())


def _rank(
    rank: int, stop: StopFlag, request: Request, worker: Callable[[Request, StopFlag], object]
) -> None:
    part = replace(  # type: ignore[type-var]
        request,
        shard=sub_shard(request.shard, rank, request.devices.ranks),
        devices=request.devices.rank(rank),
    )
    if request.devices.kind == "cpu":  # share the cores instead of oversubscribing them
        # The count the plan records: the bytes depend on it.
        torch.set_num_threads(cpu_threads_per_process(request.devices))
    worker(part, stop)
