"""A site's several GPUs: one process per device, joined in a torch.distributed process group.

`launch` starts the processes itself (torch's `start_processes`, spawned: no torchrun, no environment to
set up), so a site runs the same command with one GPU or eight. The group talks over loopback (NCCL on
CUDA, gloo on the CPU, where it serves the tests) on a free port. What the processes compute, and how
it comes back, is the caller's (`client.train`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing

from common.loopback import free_port


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes) in the current group; (0, 1) outside one."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def launch(fn: Callable[..., None], processes: int, cuda: bool, *args: Any) -> None:
    """Run `fn(rank, device, *args)` in `processes` new processes joined in one group (each on its own GPU
    with `cuda`, else on the CPU with an equal share of its cores); raises when any of them fails."""
    port = free_port()
    torch.multiprocessing.start_processes(_process, args=(fn, processes, port, cuda, args), nprocs=processes,
                                          start_method="spawn")


def _process(rank: int, fn: Callable[..., None], world: int, port: int, cuda: bool, args: tuple[Any, ...]
             ) -> None:
    if cuda:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, device_id=device if cuda else None)
    try:
        fn(rank, device, *args)
    finally:
        dist.destroy_process_group()
