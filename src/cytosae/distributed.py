"""Joining the process group that torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
from __future__ import annotations

import datetime as _dt
import os

import torch


def world_from_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as torchrun sets them; (0, 0, 1) when run as one plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device_spec: str = "auto", timeout_minutes: float = 120) -> tuple[torch.device, int, int]:
    """Resolve `--device` and, under torchrun, join the process group: NCCL on GPUs, gloo on CPUs.

    With several processes `auto`/`cuda` mean this process's own GPU, cuda:LOCAL_RANK. The timeout is
    generous because ranks meet only at the end of their share of the work, which can differ by a shard.
    Returns (device, rank, world_size).
    """
    import torch.distributed as dist

    from cytosae.devices import resolve_device

    device = resolve_device(device_spec)
    rank, local_rank, world = world_from_env()
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return device, rank, world
    if device.type == "cuda":
        if str(device_spec).strip().lower() in ("auto", "cuda"):
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=_dt.timedelta(minutes=timeout_minutes), device_id=device)
    else:
        dist.init_process_group("gloo", timeout=_dt.timedelta(minutes=timeout_minutes))
    return device, dist.get_rank(), dist.get_world_size()


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
