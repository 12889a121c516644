"""Data-parallel training through PyTorch's own engine: torchrun sets the environment; DDP keeps a copy of
the model on every process and syncs gradients, or FSDP2 (`train.parallel=fsdp`) shards the model over them
(its checkpoints and gathered weights: fsdp.py).

The same `train()` runs alone or under `torchrun --nproc_per_node N`; this module hides the difference
(gloo on CPU, NCCL on CUDA, one GPU per process).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from .precision import Precision


@dataclass
class DistContext:
    rank: int  # this process among all of them; rank 0 writes files and reports
    world_size: int  # number of processes; 1 = plain single-process training
    local_rank: int  # process index on this machine: picks the GPU
    device: torch.device  # where this process trains
    owns_group: bool = False  # we created the process group, so we tear it down (not a caller's group)
    parallel: str = "ddp"  # train.parallel: how several processes split the work

    @property
    def sharded(self) -> bool:
        """FSDP with several processes: parameters, gradients and optimizer state are split over the ranks."""
        return self.enabled and self.parallel == "fsdp"

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


def init_distributed(device: torch.device, parallel: str = "ddp") -> DistContext:
    """Join the process group torchrun describes in RANK/WORLD_SIZE/LOCAL_RANK, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(0, 1, 0, device, parallel=parallel)
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
    return DistContext(rank, world_size, local_rank, device, owns_group, parallel)


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: DistContext, compile: bool, precision: Precision) -> nn.Module:
    """What training steps call: the model compiled if asked, then wrapped in DDP when several processes
    train; under FSDP the model is sharded in place first (compiling a sharded model keeps FSDP's hooks)."""
    if ctx.sharded:
        shard_model(model, ctx, precision)
        return torch.compile(model) if compile else model
    train_model = torch.compile(model) if compile else model
    if not ctx.enabled:
        return train_model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # A routed expert that receives no token on one rank has no gradient there; DDP must then look for
    # unused parameters instead of waiting for them (a small cost paid only by mixture-of-experts models).
    has_experts = model.config.n_experts > 0
    return DistributedDataParallel(train_model, device_ids=device_ids, find_unused_parameters=has_experts)


def gradient_sync(train_model: nn.Module, ctx: DistContext, last: bool) -> contextlib.AbstractContextManager:
    """The context of one micro-batch's backward. DDP all-reduces only after the last micro-batch of a step;
    FSDP reduce-scatters after each, which keeps the gradients sharded (the memory FSDP is there to save)."""
    if ctx.enabled and not ctx.sharded and not last:
        return train_model.no_sync()
    return contextlib.nullcontext()


def shard_model(model: nn.Module, ctx: DistContext, precision: Precision) -> nn.Module:
    """Shard `model` in place over all ranks (it may still be on the CPU: each rank moves only its shard to
    ctx.device, so the full model never has to fit one GPU)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ..model.apertis import Block

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    policy = MixedPrecisionPolicy()
    if ctx.device.type == "cuda" and precision.name != "fp32":
        # Gather and compute in the 16-bit format (half the traffic), sum gradients in fp32 (no lost bits).
        policy = MixedPrecisionPolicy(param_dtype=precision.dtype, reduce_dtype=torch.float32)
    units = [m for m in model.modules() if isinstance(m, Block)]  # by type: a wrapper (LoRA) may hold the model
    vision = getattr(model, "vision", None)
    for unit in [*units, *([vision] if vision is not None else [])]:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # the root: embeddings, final norm, output head
    return model
