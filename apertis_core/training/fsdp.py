"""Fully sharded data parallel (FSDP2, `torch.distributed.fsdp.fully_shard`): its sharded checkpoints, and
the full weights gathered for bundles and samples.

With `train.parallel=fsdp` under torchrun, every block (and the image encoder) is its own FSDP unit and the
root holds the rest (distributed.shard_model): each rank keeps 1/N of the parameters, gradients and Adam moments, and gathers a
unit's full weights only while that unit computes. Checkpoints keep the split: each rank writes its part of
the weights and optimizer state with torch.distributed.checkpoint (DCP) into `shards/`, and resuming reads
each part back on its rank. What other programs read stays whole: the checkpoint's model.safetensors and
the final bundle hold the full weights, gathered on rank 0, so they load like any other bundle.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .checkpoint import checkpoint_dir
from .distributed import DistContext


def _fsdp_units(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """Full weights on every rank for a while, for code that calls the model's parts outside `forward`
    (generation's `step`). Collective under FSDP: every rank must enter it; a no-op otherwise."""
    units = _fsdp_units(model)
    if not units:
        yield
        return
    model.set_reshard_after_forward(False)  # a forward inside (the prompt) must not free what step needs
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            # Training's setting back: blocks free their weights after forward, the root keeps its own
            # (backward needs them at once), which is what fully_shard chose for each.
            unit.set_reshard_after_forward(unit is not model, recurse=False)


def full_model(model: nn.Module, ctx: DistContext) -> nn.Module | None:
    """The model with its full weights, for writing model.safetensors: the model itself unless sharded;
    under FSDP a plain copy gathered on rank 0 (None on the other ranks). Collective under FSDP."""
    if not ctx.sharded:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ..model import ApertisModel

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # only rank 0 keeps a copy, in RAM
    state = get_model_state_dict(model, options=options)
    if not ctx.is_main:
        return None
    with torch.random.fork_rng(devices=[]):  # its throwaway initial weights must not move rank 0's RNG
        copy = ApertisModel(model.config)
    copy.load_state_dict(state)  # copies into the existing tensors, so tied weights stay tied
    return copy


def write_shards(session: Any, run_dir: str | Path) -> Path | None:
    """Every rank writes its part of the weights and optimizer state (DCP) into a temporary folder beside
    the checkpoints; save_checkpoint moves it into the checkpoint it publishes. None unless sharded.
    Collective under FSDP. A crash leaves only the temporary folder, which the next start removes."""
    ctx: DistContext = session.ctx
    if not ctx.sharded:
        return None
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    target = checkpoint_dir(run_dir, session.step)
    folder = target.parent / f".{target.name}.tmp-shards"  # every rank knows the name without asking rank 0
    if ctx.is_main:
        shutil.rmtree(folder, ignore_errors=True)  # what an earlier, crashed write of this step left
        folder.mkdir(parents=True)
    ctx.barrier()
    model_state, optimizer_state = get_state_dict(session.model, session.optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
    return folder  # dcp.save returns on every rank only after rank 0 has written the metadata


def load_shards(session: Any, folder: Path) -> None:
    """Read each rank's part of the weights and optimizer state back from a checkpoint's shards/."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(session.model, session.optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(
        session.model,
        session.optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
    )
