"""``torch.distributed`` helpers: who this process is, starting the process group under
``torchrun``, averaging tensors across processes, and a barrier. Every helper is a no-op (or
answers for one process) when no process group is active, so callers need no branches."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside ``torch.distributed``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed_from_env() -> bool:
    """Initialise the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1) and not yet
    initialised: NCCL on CUDA, gloo otherwise. Returns whether a process group is active."""
    if not torch.distributed.is_available():
        return False
    if torch.distributed.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Replace each tensor by its mean over the processes, in place, with one ``all_reduce`` of
    their concatenation (same dtype and device for all)."""
    rank, world = dist_info()
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def barrier() -> None:
    """Wait for every process (no-op for one)."""
    if dist_info()[1] > 1:
        torch.distributed.barrier()
