"""Data-parallel training through PyTorch's own engine: torchrun sets the environment, DDP syncs gradients.

The same `train()` runs alone or under `torchrun --nproc_per_node N`; this module hides the difference
(gloo on CPU, NCCL on CUDA, one GPU per process).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class DistContext:
    rank: int  # this process among all of them; rank 0 writes files and reports
    world_size: int  # number of processes; 1 = plain single-process training
    local_rank: int  # process index on this machine: picks the GPU
    device: torch.device  # where this process trains
    owns_group: bool = False  # we created the process group, so we tear it down (not a caller's group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of small float lists over all processes (identity when alone)."""
        if not self.enabled:
            return list(values)
        # float64: token counts and loss sums stay exact enough to make every rank agree bit for bit
        tensor = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def broadcast(self, value: float) -> float:
        """Rank 0's value, on every process (decisions taken from wall-clock timing must agree)."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.broadcast(tensor, src=0)
        return float(tensor.item())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group torchrun describes in RANK/WORLD_SIZE/LOCAL_RANK, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(0, 1, 0, device)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
    return DistContext(rank, world_size, local_rank, device, owns_group)


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: DistContext, has_experts: bool) -> nn.Module:
    """DDP wrapper when running with several processes; the model itself otherwise."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # A routed expert that receives no token on one rank has no gradient there; DDP must then look for
    # unused parameters instead of waiting for them (a small cost paid only by mixture-of-experts models).
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=has_experts)
