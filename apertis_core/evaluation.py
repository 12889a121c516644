"""Exact-match scoring of answers (visual Q&A, short replies) by one batched forward pass per batch.

Greedy decoding reproduces a reply exactly when, at every position of the reply and its end-of-turn
token, the most likely next token is the reply's own. Checking that teacher-forced is the same test as
generating, at the cost of a single forward pass for a whole batch of questions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .data import Record
from .data.dataset import IGNORE_INDEX, TokenDataset, encode_records, make_windows
from .model import ApertisModel
from .tokenizer import Tokenizer


@torch.no_grad()
def exact_match(
    model: ApertisModel, tokenizer: Tokenizer, records: Sequence[Record], batch_size: int = 64
) -> list[bool]:
    """One bool per record: would greedy decoding give its assistant reply exactly (and then stop)?

    Records must be chats (or captions) short enough for the model's max_seq_len; the prompt is
    everything before the reply, images included.
    """
    if any(r.kind != "chat" for r in records):
        raise ValueError("exact_match scores chat records (a question and its answer); got plain text")
    images = None
    if model.vision is not None:
        from .vision import ImageCache

        images = ImageCache(model.config.image_patch_size, model.config.image_max_patches)
    encoded = encode_records(records, tokenizer, images.file_tokens if images else None)
    longest = max(len(e.ids) for e in encoded)
    if longest > model.config.max_seq_len + 1:
        raise ValueError(
            f"a record has {longest} tokens, more than the model's max_seq_len ({model.config.max_seq_len}); "
            "score shorter questions, or a model built with a larger max_seq_len"
        )
    windows = make_windows(encoded, longest - 1)
    if len(windows) != len(records):
        raise ValueError("every record needs an assistant reply to score")
    dataset = TokenDataset(windows, longest - 1, tokenizer.pad_id)
    device = model.embed.weight.device
    was_training = model.training
    model.eval()
    correct: list[bool] = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[k] for k in range(start, min(start + batch_size, len(dataset)))]
        input_ids = torch.stack([item["input_ids"] for item in items]).to(device)
        labels = torch.stack([item["labels"] for item in items]).to(device)
        batch_images = images.batch([item["images"] for item in items], train=False, device=device) if images else None
        predicted = model(input_ids, images=batch_images).logits.argmax(-1)
        wrong = (predicted != labels) & (labels != IGNORE_INDEX)
        correct += (~wrong.any(dim=1)).tolist()
    model.train(was_training)
    return correct
