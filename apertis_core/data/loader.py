"""BatchLoader: an endless, seeded stream of batches that DDP ranks share and that resumes exactly.

The position is one number: how many samples of the global stream (all ranks together) were taken. The
stream is epoch after epoch, each a permutation fixed by (seed, epoch), so a restored position continues
with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..configio import ConfigError

# A curriculum's first draws come from the first tenth of the samples, not from a handful that would be
# memorised; the share then grows linearly to all of them (competence-based curriculum, Platanios et al. 2019).
CURRICULUM_START = 0.1
_DRAW_BLOCK = 4096  # curriculum draws are made this many at a time, each block from its own seed
# Length grouping sorts this many global batches of the stream at a time by length, then shuffles the
# batches it cut: wide enough that most batches hold one kind of sample, narrow enough that every stretch of
# training still sees all kinds (HF's group_by_length does the same with its "megabatches"). A run of at most
# a quarter of the data, so that a sample rarely meets its own copy from the next epoch in one run.
GROUP_BATCHES = 32
WIDTH_STEP = 64  # a batch is cut to a multiple of this: few distinct shapes for compiled models


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64, already shifted; -100 = no loss
    images: list[list[Path]] | None  # per sample, in <image> order; None when no sample has images

    def to(self, device, non_blocking: bool = False) -> Batch:
        return Batch(
            self.input_ids.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            self.images,
        )


class BatchLoader:
    """Iterate forever: `next(loader)` is this rank's `batch_size` samples of the next global batch.

    batch_size is per rank: a global batch is batch_size * world_size samples and rank r takes the r-th
    contiguous slice, so the ranks' batches are disjoint and, concatenated in rank order, equal what a
    single process with batch_size * world_size gets.

    A dataset that tells its samples' `lengths` (TokenDataset) gets batches without the padding columns all
    their samples share. One with `group_by_length` set (from data.group_by_length) is read in length-grouped
    order: each run of GROUP_BATCHES global batches of the shuffled stream is sorted by sample length, cut into
    global batches again, and those are shuffled. The order is still a function of (seed, position), so a
    resume continues exactly.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if len(dataset) == 0:
            raise ConfigError("the dataset has no samples to batch: add data or lower data.seq_len")
        if batch_size < 1:
            raise ConfigError(f"batch_size: must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in 0..{world_size - 1} (world_size {world_size})")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self._consumed = 0  # samples of the global stream taken so far, by all ranks
        # The stream starts with this many easy-first draws (TokenDataset.curriculum_samples, from DataConfig).
        self.curriculum = getattr(dataset, "curriculum_samples", 0)
        self._draw_block, self._draws = -1, []
        self._order_epoch, self._order = -1, []
        self.lengths = getattr(dataset, "lengths", None)  # real positions per sample: batches drop the rest
        self.grouped = bool(getattr(dataset, "group_by_length", False))
        global_batch = batch_size * world_size
        runs = min(GROUP_BATCHES, len(dataset) // (4 * global_batch)) if self.grouped else 0  # 0: no regrouping
        self._group_span = runs * global_batch
        self._group_chunk, self._group_order = -1, []

    @property
    def epoch(self) -> float:
        """Progress in epochs (2.5 = halfway through the third pass)."""
        return self._consumed / len(self.dataset)

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> Batch:
        start = self._consumed + self.rank * self.batch_size
        pick = self._grouped_index if self._group_span else self._index
        indices = [pick(k) for k in range(start, start + self.batch_size)]
        samples = [self.dataset[i] for i in indices]
        self._consumed += self.batch_size * self.world_size
        images = [s["images"] for s in samples]
        input_ids, labels = torch.stack([s["input_ids"] for s in samples]), torch.stack([s["labels"] for s in samples])
        if self.lengths is not None:
            longest = max(self.lengths[i] for i in indices)
            width = min(-(-longest // WIDTH_STEP) * WIDTH_STEP, input_ids.shape[1])
            input_ids, labels = input_ids[:, :width], labels[:, :width]  # only padding is cut
        return Batch(input_ids=input_ids, labels=labels, images=images if any(images) else None)

    def state_dict(self) -> dict:
        return {
            "consumed": self._consumed,
            "seed": self.seed,
            "dataset_size": len(self.dataset),
            "curriculum_samples": self.curriculum,
            "group_by_length": self.grouped,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (from `state_dict`); seed, dataset size and curriculum must match for an exact resume."""
        # Checkpoints from before the curriculum had none; from before length grouping, none either (taken as
        # this loader's, so they resume, in an order that can differ from the one they were written in).
        state = {"curriculum_samples": 0, "group_by_length": self.grouped, **state}
        expected = {
            "seed": self.seed,
            "dataset_size": len(self.dataset),
            "curriculum_samples": self.curriculum,
            "group_by_length": self.grouped,
        }
        changed = [f"{k} {state.get(k)} -> {v}" for k, v in expected.items() if state.get(k) != v]
        if changed:
            raise ConfigError(
                f"cannot resume the data position: {', '.join(changed)} since the checkpoint. "
                "Resume with the same data, data.seed, data.curriculum_epochs and data.group_by_length, or start a "
                "new run."
            )
        self._consumed = int(state["consumed"])

    def _index(self, k: int) -> int:
        """Dataset index of the k-th sample of the global stream: the curriculum's draws, then epoch after epoch."""
        if k < self.curriculum:
            return self._curriculum_index(k)
        epoch, position = divmod(k - self.curriculum, len(self.dataset))
        if epoch != self._order_epoch:
            self._order_epoch, self._order = epoch, _epoch_order(len(self.dataset), self.seed, epoch).tolist()
        return self._order[position]

    def _grouped_index(self, k: int) -> int:
        """Dataset index of the k-th sample of the length-grouped stream (see the class docstring)."""
        span = self._group_span
        chunk, offset = divmod(k, span)
        if chunk != self._group_chunk:
            stream = [self._index(j) for j in range(chunk * span, (chunk + 1) * span)]
            stream.sort(key=lambda i: -self.lengths[i])  # stable: equal lengths keep their shuffled order
            width = self.batch_size * self.world_size
            batches = [stream[b : b + width] for b in range(0, span, width)]
            order = torch.randperm(len(batches), generator=_generator(f"{self.seed}:group:{chunk}")).tolist()
            self._group_chunk, self._group_order = chunk, [i for b in order for i in batches[b]]
        return self._group_order[offset]

    def _curriculum_index(self, k: int) -> int:
        """A uniform draw among the first samples in data order; their share grows with k from CURRICULUM_START."""
        n = len(self.dataset)
        share = CURRICULUM_START + (1 - CURRICULUM_START) * k / self.curriculum
        block, offset = divmod(k, _DRAW_BLOCK)
        if block != self._draw_block:
            draws = torch.rand(_DRAW_BLOCK, generator=_generator(f"{self.seed}:curriculum:{block}"))
            self._draw_block, self._draws = block, draws.tolist()
        return min(int(self._draws[offset] * math.ceil(share * n)), n - 1)


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=_generator(f"{seed}:{epoch}"))


def _generator(key: str) -> torch.Generator:
    # Hashing the key (seed, epoch or block) gives each its own unrelated generator seed.
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
