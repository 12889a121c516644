"""DataConfig: where the training data lives and how it becomes token windows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..configio import ConfigError


@dataclass
class DataConfig:
    path: str = ""  # a file, a folder or a .zip (see docs: txt/md, jsonl, csv, image folders)
    seq_len: int = 256  # tokens the model sees per sample; packing makes windows of seq_len + 1
    val_fraction: float = 0.1  # share held out for validation loss (0 = no validation set)
    split: Literal["random", "tail"] = "random"  # tail: last fraction of the text by characters (nanoGPT's split)
    seed: int = 0  # fixes the split so train/val never change between runs or on resume
    vocab_size: int = 4096  # size of the tokenizer trained on the data (<= 262 gives a byte-level one)
    tokenizer: str = ""  # an existing tokenizer.json (or bundle folder) to reuse; "" trains one on the data
    image_augment: bool = True  # small random brightness/contrast/saturation changes; never hue or flips
    # Easy samples first: for this many epochs the loader draws from a share of the training samples that grows
    # from their first tenth, in file order, to all of them; 0 = shuffled from the start. For data that lists
    # easy samples first (generate_shapes(curriculum=True): non-relational questions before relational ones).
    curriculum_epochs: float = 0.0
    # Samples of similar length share a batch (every batch is already cut to its longest sample, rounded up
    # to 64): short samples beside long ones then cost what they hold, not seq_len. Off by default: on the
    # shapes set it made 1.4x the steps, but batches of captions only and of chats only made the lookup form
    # later (benchmarks/README.md). For data whose kinds need not share a batch.
    group_by_length: bool = False

    def __post_init__(self):
        # Checked here so a bad YAML value fails at load time, naming the key, not deep inside training.
        if self.seq_len < 1:
            raise ConfigError(f"data.seq_len: must be at least 1, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(
                f"data.val_fraction: must be in [0, 1), got {self.val_fraction} (0.1 keeps 10% for validation)"
            )
        if self.curriculum_epochs < 0:
            raise ConfigError(f"data.curriculum_epochs: must be >= 0 (0 = no curriculum), got {self.curriculum_epochs}")
        if self.split not in ("random", "tail"):
            raise ConfigError(f"data.split: {self.split!r} is not one of 'random', 'tail'")
