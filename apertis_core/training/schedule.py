"""Learning-rate schedules as pure functions of the step: linear warmup, then cosine or warmup-stable-decay.

The schedule is plain data (`LRSchedule`), so a checkpoint stores it as a dict and a resumed run computes
exactly the same learning rate for every step; the trainer sets the rate on the optimizer itself.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LRSchedule:
    kind: str  # "cosine" or "wsd"
    peak_lr: float  # rate reached at the end of warmup
    min_lr: float  # rate at the last step
    warmup_steps: int  # linear ramp from start_lr to peak_lr
    total_steps: int  # the step at which the schedule ends (absolute, counted from the run's first step)
    decay_fraction: float = 0.2  # wsd only: share of the segment spent decaying to min_lr
    start_step: int = 0  # first step of this segment; > 0 for a "train N more steps" extension
    start_lr: float = 0.0  # rate the warmup starts from (0 for a fresh run, the old rate for an extension)

    def lr_at(self, step: int) -> float:
        """Learning rate for the optimizer update that follows `step` completed steps."""
        local = step - self.start_step
        length = max(1, self.total_steps - self.start_step)
        # At most half the segment warms up: a short run (20 steps, 30 warm-up steps) still decays to min_lr.
        warmup = min(self.warmup_steps, max(1, length // 2))
        if local < warmup:
            return self.start_lr + (self.peak_lr - self.start_lr) * (local + 1) / warmup
        if self.kind == "wsd":
            return self._wsd(local, length, warmup)
        # The peak is used by the last warmup step and min_lr by the last step of the segment.
        progress = min(1.0, (local - warmup + 1) / max(1, length - warmup))
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _wsd(self, local: int, length: int, warmup: int) -> float:
        # Warmup-stable-decay holds the peak rate, then decays linearly over the last decay_fraction.
        decay = max(1, round(length * self.decay_fraction))
        decay_start = max(warmup, length - decay)
        if local < decay_start:
            return self.peak_lr
        progress = min(1.0, (local - decay_start + 1) / max(1, length - decay_start))
        return self.peak_lr + (self.min_lr - self.peak_lr) * progress

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LRSchedule:
        return cls(**data)

    def with_total(self, total_steps: int) -> LRSchedule:
        return dataclasses.replace(self, total_steps=total_steps)


def build_schedule(
    kind: str, lr: float, min_lr_ratio: float, warmup_steps: int, total_steps: int, decay_fraction: float
) -> LRSchedule:
    """The schedule of a fresh run."""
    if kind not in ("cosine", "wsd"):
        raise ValueError(f"unknown schedule {kind!r}; use 'cosine' or 'wsd'")
    return LRSchedule(kind, lr, lr * min_lr_ratio, warmup_steps, total_steps, decay_fraction)


def extend_schedule(old: LRSchedule, from_step: int, extra_steps: int, peak_lr: float) -> LRSchedule:
    """Schedule for `extra_steps` more steps after `from_step` ("train N more").

    A finished run has annealed to min_lr. Jumping back to the full peak would spike the loss and undo the
    annealing; staying at min_lr learns too slowly. So, as in continual pre-training (re-warm, then
    re-decay), the rate ramps from where it is to `peak_lr` (a fraction of the original peak) over a short
    warmup, then decays with the same shape down to the same min_lr at the new end.
    """
    warmup = min(old.warmup_steps, max(1, extra_steps // 10))
    return dataclasses.replace(
        old,
        peak_lr=peak_lr,
        warmup_steps=warmup,
        total_steps=from_step + extra_steps,
        start_step=from_step,
        start_lr=old.lr_at(max(0, from_step - 1)),
    )
