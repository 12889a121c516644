"""AdamW with weight decay only on matrices: norms, biases and embeddings are left undecayed."""

from __future__ import annotations

import torch
import torch.nn as nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay 2-D+ weights of linear maps; not gains, biases or embedding tables.

    Decaying norm gains and biases pulls them towards 0 rather than towards their neutral values, and
    embedding rows of rare tokens would shrink between their infrequent updates. A tied output head
    shares the embedding tensor, so it is not decayed either.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():  # unique tensors: tied weights appear once
        if not param.requires_grad:
            continue
        if param.ndim >= 2 and id(param) not in embeddings:
            decay.append(param)
        else:
            no_decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], device: torch.device
) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) on devices that have the fused implementation."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=tuple(betas), fused=fused)
