"""Process-group setup from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), and the few collectives used.

One process per device; NCCL on GPUs, gloo on CPUs. Without those variables everything is a
single process and every helper here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from ..config import ConfigError


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank, the process count, its device, and whether it made the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of a tensor over all processes (a copy; the input is left alone)."""
        out = tensor.detach().clone()
        if self.distributed:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def all_true(self, flag: bool) -> bool:
        """Whether flag holds in every process."""
        if not self.distributed:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every process's obj, in rank order (a one-item list when not distributed)."""
        if not self.distributed:
            return [obj]
        objects: list[Any] = [None] * self.world_size
        dist.all_gather_object(objects, obj)
        return objects

    def barrier(self) -> None:
        """Wait for every process."""
        if self.distributed:
            dist.barrier()

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm statistics) to every process, so all evaluate the same model."""
        if self.distributed:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto -> this process's GPU if there is one, else CPU; cuda -> cuda:LOCAL_RANK; cuda:N and cpu as given."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name}: CUDA is not available on this machine (use cpu or auto)")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def setup(device_name: str) -> Context:
    """Join the process group torchrun describes in the environment (if any) and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size <= 1:
        return Context(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Context(rank, world_size, local_rank, device, owns)


def teardown(ctx: Context) -> None:
    """Leave the process group if setup made it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


class ShardSampler(Sampler[int]):
    """Every `world_size`-th index from `rank`, in order, without padding: shards sum to the dataset exactly."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))
