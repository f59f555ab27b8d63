"""``torch.distributed`` helpers: who this process is, starting the process group under
``torchrun``, summing or averaging tensors across processes, a barrier, and FSDP sharding of the
frozen base weights. Every helper is a no-op (or answers for one process) when no process group
is active, so callers need no branches."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

# Tensors up to this many elements are concatenated into one all_reduce (one message instead of
# hundreds for the adapter gradients); larger ones (second moments: in² floats per module) are
# reduced in place, so the reduction never holds a second copy of them.
_COALESCE_NUMEL = 1 << 24


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


def all_reduce_sum_(tensors: Sequence[torch.Tensor], group=None) -> None:
    """Replace each tensor by its sum over the processes, in place. Small tensors of one dtype and
    device go in one ``all_reduce`` of their concatenation; large ones are reduced where they are."""
    if dist_info()[1] == 1 or not tensors:
        return
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel() > _COALESCE_NUMEL and t.is_contiguous():
            torch.distributed.all_reduce(t, group=group)
        else:
            buckets.setdefault((t.dtype, t.device), []).append(t)
    for bucket in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in bucket])
        torch.distributed.all_reduce(flat, group=group)
        offset = 0
        for t in bucket:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


def all_reduce_mean_(tensors: Sequence[torch.Tensor], group=None) -> None:
    """Replace each tensor by its mean over the processes, in place (see :func:`all_reduce_sum_`)."""
    world = dist_info()[1]
    if world == 1 or not tensors:
        return
    all_reduce_sum_(tensors, group=group)
    for t in tensors:
        t.div_(world)


def barrier() -> None:
    """Wait for every process (no-op for one)."""
    if dist_info()[1] > 1:
        torch.distributed.barrier()


def any_process(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Whether ``flag`` is true on any process (every process gets the same answer)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    all_reduce_sum_([t])
    return bool(t.item() > 0)


def run_on_rank0(fn: Callable[[], object], error_type: type[Exception] = RuntimeError):
    """Call ``fn()`` on rank 0 only (a check or a write that touches the file system) and return
    its result on every process (it must pickle). When it raises, every process raises too —
    ``error_type`` with the same message when rank 0's error is one, else a ``RuntimeError``
    naming it — so none is left waiting in a collective."""
    rank, world = dist_info()
    if world == 1:
        return fn()
    failure = result = None
    if rank == 0:
        try:
            result = fn()
        except Exception as err:
            failure = (isinstance(err, error_type), f"{type(err).__name__}: {err}", str(err))
            box = [(failure, None)]
            torch.distributed.broadcast_object_list(box, src=0)
            raise
    box = [(failure, result)]
    torch.distributed.broadcast_object_list(box, src=0)
    failure, result = box[0]
    if failure is not None:
        same, described, message = failure
        raise error_type(message) if same else RuntimeError(f"rank 0 failed: {described}")
    return result


def gather_strings(text: str) -> list[str]:
    """``text`` of every process, by rank (``[text]`` for one process)."""
    if dist_info()[1] == 1:
        return [text]
    out: list = [None] * dist_info()[1]
    torch.distributed.all_gather_object(out, text)
    return [str(t) for t in out]


# --------------------------------------------------------------------------------------------
# FSDP: shard the frozen base weights, keep the adapters whole


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer (the longest ``nn.ModuleList``): FSDP's units."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    return list(max(lists, key=len)) if lists else []


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, keep_whole: Iterable[nn.Parameter] | None = None,
                device: torch.device | str | None = None) -> nn.Module:
    """Shard ``model``'s parameters across the processes with FSDP2 (``fully_shard``), one unit per
    transformer block plus the root, except ``keep_whole`` (default: every parameter that requires
    grad, i.e. the adapter factors after :func:`nsru.apply_nsru`), which stay plain tensors on every
    process.

    Each process then holds 1/world of the base weights at rest; a block's weights are gathered for
    its forward and again for its backward and freed after. The adapters are a few MB, so keeping
    them whole costs little and leaves everything that touches them unchanged: their gradients are
    all-reduced by the trainer, ``lora_A`` is projected in place, and adapter files are written
    from them as they are. ``device``: where the shards go (default: this process's GPU, else the
    CPU); the kept parameters move there too. Returns ``model`` (sharded in place); a no-op for one
    process or a model that is already sharded.

    :func:`nsru.unlearn` with ``fsdp=True`` shards before training. To run the statistics sharded
    too, add the adapters and shard first: ``nsru.apply_nsru(model, ...)``, ``shard_model(model)``,
    then ``nsru.unlearn(model, ..., fsdp=True)`` (it keeps the adapters it finds).
    """
    rank, world = dist_info()
    if world == 1 or is_sharded(model):
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    keep = list(keep_whole) if keep_whole is not None else [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in keep:
            p.data = p.data.to(device)
    mesh = init_device_mesh(device.type, (world,))
    ignored = set(keep)
    for block in blocks_of(model):
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    return model
