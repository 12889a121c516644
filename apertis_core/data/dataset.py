"""Records -> token windows: a deterministic train/val split, plain text packed into fixed-length windows,
chat and image samples in windows of their own that take loss only on what the model should learn to say."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from itertools import chain
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from ..configio import ConfigError
from ..image_tokens import image_token_repeats
from .config import DataConfig
from .records import Record

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: no loss at this position


class Encoded(NamedTuple):
    ids: list[int]  # each <image> already expanded to its patch count
    trainable: list[bool] | None  # per token: may it be a target? None = all (plain text, packed)
    images: list[Path]
    image_spans: list[tuple[int, int]]  # [start, end) of each image's positions in ids


class _Window(NamedTuple):
    ids: torch.Tensor  # (n,) int64 with 2 <= n <= seq_len + 1; plain-text windows are views of one stream
    trainable: torch.Tensor | None  # (n,) bool, None = every target trains
    images: tuple[Path, ...]


ImageTokens = Callable[[Path], int]  # an image file -> the positions it fills (its patch count)


def encode_records(records: Sequence[Record], tokenizer, image_tokens: ImageTokens | None = None) -> list[Encoded]:
    """Token ids as the model will see them: text + <|eot|>, chats through the chat template, and each
    <image> widened to `image_tokens(file)` positions. Plain text trains on every token; image positions
    never train, and in chats only the assistant's words do."""
    texts = iter(tokenizer.encode_batch([r.text for r in records if r.kind == "text"]))
    out = []
    for record in records:
        if record.kind == "chat":
            ids, mask = tokenizer.encode_chat(record.messages)
        else:
            ids, mask = next(texts) + [tokenizer.eot_id], None
        if not record.images:
            out.append(Encoded(ids, mask, [], []))
            continue
        if image_tokens is None:
            raise ConfigError("the data has images but the model has no image encoder; set model.image_encoder=vit")
        out.append(_with_image_positions(ids, mask, record.images, tokenizer.image_id, image_tokens))
    return out


def _with_image_positions(ids, mask, images, image_id: int, image_tokens: ImageTokens) -> Encoded:
    repeats = image_token_repeats(ids, image_id, [image_tokens(path) for path in images])
    mask = mask or [True] * len(ids)
    wide_ids, wide_mask, spans = [], [], []
    for token, trainable, repeat in zip(ids, mask, repeats, strict=True):
        if token == image_id:
            spans.append((len(wide_ids), len(wide_ids) + repeat))
        wide_ids += [token] * repeat
        wide_mask += [trainable and token != image_id] * repeat
    return Encoded(wide_ids, wide_mask, list(images), spans)


class TokenDataset(Dataset):
    """Fixed-length samples: dict(input_ids (T,), labels (T,), images list[Path]); labels are already shifted."""

    def __init__(
        self,
        windows: list[_Window],
        seq_len: int,
        pad_id: int,
        curriculum_samples: int = 0,
        group_by_length: bool = False,
    ):
        self._windows = windows
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.curriculum_samples = curriculum_samples  # easy-first start of the BatchLoader's stream (samples)
        self.group_by_length = group_by_length  # the BatchLoader puts samples of similar length in one batch
        self.lengths = [len(w.ids) - 1 for w in windows]  # real positions of each sample; the rest is padding
        self.tokens = sum(len(w.ids) - 1 if w.trainable is None else int(w.trainable[1:].sum()) for w in windows)

    def __len__(self) -> int:
        return len(self._windows)

    def __getitem__(self, index: int) -> dict:
        window = self._windows[index]
        n = len(window.ids) - 1  # targets in this window; the rest is padding
        input_ids = torch.full((self.seq_len,), self.pad_id, dtype=torch.long)
        labels = torch.full((self.seq_len,), IGNORE_INDEX, dtype=torch.long)
        input_ids[:n] = window.ids[:-1]
        targets = window.ids[1:]
        if window.trainable is not None:
            targets = targets.masked_fill(~window.trainable[1:], IGNORE_INDEX)
        labels[:n] = targets
        return {"input_ids": input_ids, "labels": labels, "images": list(window.images)}


def build_datasets(
    records: Sequence[Record], tokenizer, cfg: DataConfig, image_tokens: ImageTokens | None = None
) -> tuple[TokenDataset, TokenDataset]:
    """(train, val) for `cfg`; the same records, tokenizer and config always give the same split.
    `image_tokens` gives an image file's patch count (the model's encoder decides it); text-only data needs none."""
    if not records:
        raise ConfigError(
            f"data.path {cfg.path!r}: no usable records. Run `apertis data validate {cfg.path or 'PATH'}` to see why."
        )
    if cfg.split == "tail":
        train_records, val_records = tail_split(records, cfg.val_fraction)
        train = make_windows(encode_records(train_records, tokenizer, image_tokens), cfg.seq_len)
        val = make_windows(encode_records(val_records, tokenizer, image_tokens), cfg.seq_len)
    else:
        train, val = _random_split(
            make_windows(encode_records(records, tokenizer, image_tokens), cfg.seq_len), cfg.val_fraction, cfg.seed
        )
    if not train or (cfg.val_fraction > 0 and not val):
        raise ConfigError(
            f"data: too little data for seq_len={cfg.seq_len} and val_fraction={cfg.val_fraction}: "
            f"{len(train)} training and {len(val)} validation sequences. "
            "Add data, lower data.seq_len, or set data.val_fraction=0."
        )
    curriculum = round(cfg.curriculum_epochs * len(train))  # windows keep the records' order: easy ones first
    val_data = TokenDataset(val, cfg.seq_len, tokenizer.pad_id, group_by_length=cfg.group_by_length)
    return TokenDataset(train, cfg.seq_len, tokenizer.pad_id, curriculum, cfg.group_by_length), val_data


def make_windows(encoded: Sequence[Encoded], seq_len: int) -> list[_Window]:
    """Plain text: one stream, windows of seq_len + 1 tokens every seq_len (each token is a target once; the
    last window may be short). Samples: one window each, truncated before any image that would not fit
    whole; those left with no target are dropped."""
    stream = torch.tensor(list(chain.from_iterable(e.ids for e in encoded if e.trainable is None)), dtype=torch.long)
    windows = [_Window(stream[s : s + seq_len + 1], None, ()) for s in range(0, len(stream) - 1, seq_len)]
    for e in encoded:
        if e.trainable is None:
            continue
        end, kept = seq_len + 1, len(e.images)
        for index, (start, stop) in enumerate(e.image_spans):
            if stop > end:  # half an image would leave its patches without a place: cut before it
                end, kept = start, index
                break
        if any(e.trainable[1:end]):
            ids = torch.tensor(e.ids[:end], dtype=torch.long)
            windows.append(_Window(ids, torch.tensor(e.trainable[:end]), tuple(e.images[:kept])))
    return windows


def tail_split(records: Sequence[Record], val_fraction: float) -> tuple[list[Record], list[Record]]:
    """The last `val_fraction` of all characters is validation (nanoGPT: data[:int(n * 0.9)] trains).

    A plain-text record that straddles the cut is cut in two; a chat or image sample cannot be, so it goes
    to the side holding most of its characters.
    """
    sizes = [len(r.text) if r.kind == "text" else r.characters for r in records]
    cut = int(sum(sizes) * (1 - val_fraction))
    train, val, pos = [], [], 0
    for record, size in zip(records, sizes, strict=True):
        if pos + size <= cut:
            train.append(record)
        elif pos >= cut:
            val.append(record)
        elif record.kind == "text" and not record.images:
            k = cut - pos
            train.append(dataclasses.replace(record, text=record.text[:k]))
            val.append(dataclasses.replace(record, text=record.text[k:]))
        else:
            (train if 2 * (cut - pos) >= size else val).append(record)
        pos += size
    return train, val


def _random_split(windows: list[_Window], val_fraction: float, seed: int) -> tuple[list[_Window], list[_Window]]:
    """Whole windows go to validation at random (seeded), so even a single long file splits."""
    n = len(windows)
    n_val = min(max(1, round(n * val_fraction)), n - 1) if val_fraction > 0 and n >= 2 else 0
    chosen = set(random.Random(seed).sample(range(n), n_val))
    train = [w for i, w in enumerate(windows) if i not in chosen]
    val = [w for i, w in enumerate(windows) if i in chosen]
    return train, val
