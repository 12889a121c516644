"""AdamW with weight decay only on matrices (norms, biases and embeddings undecayed), and optionally a
learning rate of its own for the image encoder and projector, and groups the schedule can hold at lr 0."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..model.cross_attention import GatedCrossAttention
from ..vision.positions import DistanceBias


def parameter_groups(
    model: nn.Module,
    weight_decay: float,
    encoder_lr_scale: float = 1.0,
    separate_encoder: bool = False,
    separate_places: bool = False,
) -> list[dict]:
    """Decay 2-D+ weights of linear maps; not gains, biases or embedding tables.

    Decaying norm gains and biases pulls them towards 0 rather than towards their neutral values, and
    embedding rows of rare tokens would shrink between their infrequent updates. A tied output head
    shares the embedding tensor, so it is not decayed either. With `encoder_lr_scale` != 1 (or
    `separate_encoder`) the image encoder's parameters (`model.vision`, projector included) form groups of
    their own, marked "encoder", whose `lr_scale` multiplies the scheduled learning rate (ScaledAdamW);
    otherwise the two groups are as they always were, so older checkpoints' optimizer states still load.
    With `separate_places` the cross-attention place maps (`model.cross_attn_pos`) form groups marked
    "places", with the ViT's distance curves (`model.image_distance_bias`) and the relative heads' place weights
    (`model.cross_attn_relative_heads`), so `set_learning_rate` can hold them as they are; they learn at the
    full rate, not the encoder's, since they start from nothing.
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
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    vision = getattr(model, "vision", None)
    if (encoder_lr_scale != 1.0 or separate_encoder) and vision is not None:
        groups = _split(groups, {id(p) for p in vision.parameters()}, "encoder", encoder_lr_scale)
    if separate_places:
        holders = (GatedCrossAttention, DistanceBias)
        places = {id(p) for m in model.modules() if isinstance(m, holders) for p in m.place_parameters()}
        groups = _split(groups, places, "places", 1.0)
    return groups


def _split(groups: list[dict], members: set[int], mark: str, lr_scale: float) -> list[dict]:
    """Each group in two: the parameters not in `members`, then those that are, marked `mark`."""
    return [
        {
            **group,
            "params": [p for p in group["params"] if (id(p) in members) == inside],
            "lr_scale": lr_scale if inside else group.get("lr_scale", 1.0),
            mark: inside,
        }
        for inside in (False, True)
        for group in groups
    ]


def set_learning_rate(
    optimizer: torch.optim.Optimizer, lr: float, encoder_frozen: bool = False, places_frozen: bool = False
) -> None:
    """The scheduled lr for every group; 0 for the image encoder's groups while it is held frozen, and for
    the place maps' while they are (with lr 0, AdamW's update and its decoupled weight decay leave the
    weights exactly as they are)."""
    for group in optimizer.param_groups:
        held = (encoder_frozen and group.get("encoder")) or (places_frozen and group.get("places"))
        group["lr"] = 0.0 if held else lr


class ScaledAdamW(torch.optim.AdamW):
    """AdamW that multiplies each group's lr (the schedule sets one for all) by its `lr_scale` while stepping."""

    def step(self, closure=None):
        scheduled = [group["lr"] for group in self.param_groups]
        for group in self.param_groups:
            group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
        try:
            return super().step(closure)
        finally:  # the schedule, checkpoints and logs keep seeing the lr they set
            for group, lr in zip(self.param_groups, scheduled, strict=True):
                group["lr"] = lr


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    device: torch.device,
    encoder_lr_scale: float = 1.0,
    separate_encoder: bool = False,
    separate_places: bool = False,
) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) on devices that have the fused implementation."""
    fused = device.type in ("cuda", "cpu")
    groups = parameter_groups(model, weight_decay, encoder_lr_scale, separate_encoder, separate_places)
    return ScaledAdamW(groups, lr=lr, betas=tuple(betas), fused=fused)
