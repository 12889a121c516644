"""Context-length curriculum: train on short windows first, then double their length up to data.seq_len.

Short windows make early steps cheaper (softmax attention is quadratic in the length, and every model
spends the first steps on local statistics that a short context already shows). The batches keep their
tokens: a (B, T) batch becomes (B * T / L, L), each row a contiguous piece of a sample, so the learning
rate schedule, tokens per step and data order are those of the plain run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.dataset import IGNORE_INDEX


def stage_lengths(full_len: int, start_len: int) -> list[int]:
    """Ascending window lengths full_len / 2^k down to the first that is >= start_len; [full_len] when off.

    Halving keeps every stage a divisor of the full length, so a sample cuts into whole pieces.
    """
    lengths = [full_len]
    while start_len > 0 and lengths[0] % 2 == 0 and lengths[0] // 2 >= start_len:
        lengths.insert(0, lengths[0] // 2)
    return lengths


def length_at(step: int, total_steps: int, full_len: int, start_len: int, warmup_fraction: float) -> int:
    """The window length for optimizer step `step` (0-based): the shorter stages share the first
    `warmup_fraction` of the steps equally; the rest of the run trains at full length."""
    lengths = stage_lengths(full_len, start_len)
    short_stages = len(lengths) - 1
    curriculum_steps = int(total_steps * warmup_fraction)
    if short_stages == 0 or step >= curriculum_steps:
        return full_len
    return lengths[step * short_stages // curriculum_steps]


def cut_batch(input_ids: torch.Tensor, labels: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) -> (B * T / length, length), keeping only rows that still have a target (padding is dropped)."""
    batch, full = input_ids.shape
    if length >= full:
        return input_ids, labels
    if full % length:  # the loader cut the batch to its longest sample: pad it back to whole pieces
        extra = length - full % length
        input_ids = F.pad(input_ids, (0, extra), value=0)  # never a target: the labels there are ignored
        labels = F.pad(labels, (0, extra), value=IGNORE_INDEX)
    input_ids, labels = input_ids.reshape(-1, length), labels.reshape(-1, length)  # (B * T / L, L)
    keep = (labels != IGNORE_INDEX).any(dim=1)
    if not bool(keep.any()):  # nothing to learn from: one row keeps the step's shapes valid, its loss is 0
        keep[0] = True
    return input_ids[keep], labels[keep]
