"""Training over several processes: a device per rank, the process group, DDP or FSDP2.

Under ``torchrun`` every rank trains on its rows of the same global batch. With ``ddp``
each rank holds the whole model; with ``fsdp`` (``torch.distributed.fsdp.fully_shard``,
per block and then the root) each parameter, codebooks included, is a DTensor sharded
along dim 0. The helpers here hide that difference from the trainer: the full value of a
(possibly sharded) tensor, writing a full value into one, and the few collectives the
trainer needs (rank 0's word broadcast, a global all-finite check, sums over ranks).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

PARALLEL_MODES = ("ddp", "fsdp")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world > 1


def launch_world() -> tuple[int, int]:
    """``(WORLD_SIZE, LOCAL_RANK)`` as torchrun sets them; ``(1, 0)`` for a plain process."""
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(
    spec: str, *, world: int, local_rank: int, cuda_available: bool | None = None
) -> torch.device:
    """The device this rank trains on.

    ``auto`` and ``cuda`` mean the GPU of this process's ``LOCAL_RANK``, so the ranks of a
    node never share one. ``cuda:N`` names one GPU, which several processes cannot share.
    """
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if spec == "auto":
        spec = "cuda" if cuda_available else "cpu"
    device = torch.device(spec)
    if device.type != "cuda":
        return device
    if device.index is not None and world > 1:
        raise ValueError(
            f"device {spec!r} puts all {world} processes on one GPU; use device: cuda "
            "(each process takes the GPU of its LOCAL_RANK) and choose the GPUs with "
            "CUDA_VISIBLE_DEVICES"
        )
    return device if device.index is not None else torch.device("cuda", local_rank)


def start(device: torch.device, batch_size: int, world: int) -> Ranks:
    """Join (or create) the process group of a ``torchrun`` launch; a no-op for one process."""
    if world <= 1:
        return Ranks()
    if batch_size % world:
        raise ValueError(
            f"batch_size {batch_size} does not split evenly over {world} processes "
            f"(WORLD_SIZE={world}): ranks with fewer rows would weigh as much as the others, "
            f"so the run would not match one process; use a multiple of {world}"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return Ranks(dist.get_rank(), dist.get_world_size(), owns_group=True)
    return Ranks(dist.get_rank(), dist.get_world_size())


def stop(ranks: Ranks) -> None:
    """End the process group this run started, and with it gloo's worker threads.

    Whatever still holds the group (a sharded model's state) is collected first, so that
    the group is freed here: its worker threads can otherwise still be releasing tensors
    when the interpreter exits, which aborts the process after a finished run.
    """
    if ranks.owns_group and dist.is_initialized():
        _drop_dtensor_caches()
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def _drop_dtensor_caches() -> None:
    """Empty torch's DTensor caches, which keep sharded runs' device meshes (and through
    them the process group) alive. Private torch functions: one that a torch release
    renames is skipped, and `tests/test_distributed.py` then finds gloo's threads alive."""
    from torch.distributed import tensor

    for path in (
        "debug._clear_sharding_prop_cache",
        "_redistribute._gen_transform_infos.cache_clear",
        "_redistribute.clear_redistribute_planner_cache",
        "_collective_utils.MeshTopoInfo.build_from_mesh.cache_clear",
    ):
        module, *attrs = path.split(".")
        try:
            target = importlib.import_module(f"{tensor.__name__}.{module}")
            for attr in attrs:
                target = getattr(target, attr)
        except (ImportError, AttributeError):
            continue
        target()


def rank0_says(value: Any, ranks: Ranks) -> Any:
    """Rank 0's ``value`` on every rank (a small picklable object, e.g. a path or None)."""
    if not ranks.several:
        return value
    box = [value if ranks.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, ranks: Ranks, device: torch.device) -> bool:
    """Whether ``flag`` holds on at least one rank (every rank gets the same answer)."""
    if not ranks.several:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(values: Tensor, ranks: Ranks) -> Tensor:
    """The mean of ``values`` over ranks; a NaN or inf on any rank reaches every rank."""
    if not ranks.several:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / ranks.world


def sum_over_ranks(values: Tensor, ranks: Ranks) -> Tensor:
    """The sum of ``values`` over ranks, on every rank (``values`` itself for one process)."""
    if not ranks.several:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values


# ------------------------------------------------------------------------ wrapping


def wrap(model: nn.Module, mode: str, ranks: Ranks) -> nn.Module:
    """The module the training step calls: the model itself, DDP around it, or it sharded.

    ``fsdp`` first gives every rank rank 0's weights (``fully_shard`` keeps each rank's own
    copy of its shard), then shards each block and the root in place.
    """
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {mode!r}")
    if not ranks.several:
        return model
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def gradient_sync(trainable: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient reduction of a micro-batch that is not the step's last one."""
    if enabled:
        yield
    elif isinstance(trainable, nn.parallel.DistributedDataParallel):
        with trainable.no_sync():
            yield
    elif hasattr(trainable, "set_requires_gradient_sync"):  # fully_shard'ed
        trainable.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            trainable.set_requires_gradient_sync(True)
    else:
        yield


@contextlib.contextmanager
def root_gathered(model: nn.Module) -> Iterator[None]:
    """Keep a sharded root's own weights whole inside (a collective on every rank).

    FSDP gathers a module's weights when the module is called; TransformerLens's
    ``run_with_cache`` calls ``forward`` itself, which would meet the root's shards.
    """
    if not hasattr(model, "unshard"):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


# ------------------------------------------------------------------------ sharded tensors


def full(tensor: Tensor) -> Tensor:
    """The whole value of ``tensor`` (a collective on every rank when it is a DTensor)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this rank holds (all of it unless it is a DTensor)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_part(value: Tensor, like: Tensor) -> Tensor:
    """This rank's part of the full ``value``, cut as ``like`` is sharded (no communication:
    every rank holds ``value``)."""
    if not isinstance(like, DTensor):
        return value
    value = value.to(like.device)
    return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)


@torch.no_grad()
def assign(tensor: Tensor, value: Tensor) -> None:
    """Write the full ``value`` into ``tensor`` (each rank writes its shard)."""
    local(tensor).copy_(local(local_part(value, tensor)))
