"""Data-parallel training with torch.distributed: one process per device (NCCL on CUDA, gloo on CPU).

`--gpus 0,1` spawns one rank per CUDA device, `--gpus cpu:N` N CPU ranks (what CI tests);
under `torchrun` (RANK / WORLD_SIZE set) the ranks are torchrun's. Rank 0 alone writes.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.multiprocessing.spawn import spawn


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_ranks(worker: Callable[..., object], devices: list[torch.device], *args: Any) -> None:
    """Run `worker(rank, world, device, *args)` on every rank (torchrun's, else one spawned
    process per device); returns when all are done. One device in-process is `driver.launch`'s."""
    if launched_by_torchrun():
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
        _run(worker, rank, world, device, args)
        return
    port = free_port()
    spawn(_spawned, args=(worker, devices, port, args), nprocs=len(devices), join=True)  # type: ignore[no-untyped-call]


def _spawned(
    rank: int,
    worker: Callable[..., object],
    devices: list[torch.device],
    port: int,
    args: tuple[Any, ...],
) -> None:
    _init(rank, len(devices), devices[rank], "127.0.0.1", port)
    _run(worker, rank, len(devices), devices[rank], args)


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
