"""Runs on several GPUs: how many worker processes a run asks for, why this computer cannot give them, and
the torchrun command that starts one worker per GPU (every one trains; rank 0 records the run).

A run asks with `train.gpus: all` (the Train tab's "GPUs to use"); the trainer then works as under any
torchrun (apertis_core/training/distributed.py), with DDP or, for `train.parallel: fsdp`, FSDP2.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml


def local_gpu_count() -> int:
    """CUDA GPUs on this computer (0 without CUDA); imports torch, so only a run that asks for GPUs pays."""
    import torch

    return torch.cuda.device_count()


def gpu_refusal(train: dict[str, Any]) -> str | None:
    """Why a run's train settings (a config mapping's `train:`) cannot start here, or None when they can:
    gpus "all" needs two GPUs or more, and torchrun, which only a Python install has."""
    if train.get("gpus", "one") != "all":
        return None
    if getattr(sys, "frozen", False):
        return (
            "training on several GPUs starts one process per GPU through torchrun, which the packaged app "
            "does not have; set 'GPUs to use' to one, or run the studio from its Python install"
        )
    count = local_gpu_count()
    if count < 2:
        return (
            f"'GPUs to use: all' needs two or more CUDA GPUs and this computer has {count}; set it to one "
            "(one GPU, or the CPU, trains the same run in one process)"
        )
    return None


def gpu_processes(config_yaml: str | None) -> tuple[int, str | None]:
    """(worker processes, refusal) for a run's stored config: 1, or one per GPU here for train.gpus=all;
    the refusal (gpu_refusal) says why the run cannot start here, else None."""
    try:
        mapping = yaml.safe_load(config_yaml or "") or {}
    except yaml.YAMLError:  # the trainer reports a broken config with its own, better message
        return 1, None
    train = mapping.get("train") if isinstance(mapping, dict) else None
    if not isinstance(train, dict) or train.get("gpus") != "all":
        return 1, None
    refusal = gpu_refusal(train)
    return (1, refusal) if refusal else (local_gpu_count(), None)


def torchrun_command(command: list[str], processes: int) -> list[str]:
    """A worker command (`python -m studio.worker ARGS`, jobs.worker_command) started `processes` times on
    this computer by torchrun."""
    python, _, module, *args = command
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m", module, *args]
