"""A conversation (and the images it shows) -> the prompt ids a model answers, trimmed to fit its context.

The studio's Chat tab and `apertis chat` both build their prompts here, so one conversation gives one prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .tokenizer import IMAGE_LINE

if TYPE_CHECKING:
    import torch

    from .model import ApertisModel
    from .tokenizer import Tokenizer


def with_images(text: str, count: int) -> str:
    """`text` after `count` image markers, each on its own line, as the data formats place them."""
    return IMAGE_LINE * count + text


def prompt_budget(max_seq_len: int, max_new_tokens: int) -> int:
    """How many tokens a prompt may take: room for the reply, but never less than half the context (a huge
    max_new_tokens would otherwise trim every earlier turn away)."""
    return max_seq_len - min(max_new_tokens, max_seq_len // 2)


def chat_prompt(
    model: ApertisModel,
    tokenizer: Tokenizer,
    messages: Sequence[dict[str, Any]],
    images: Sequence[Sequence[torch.Tensor]] | None = None,
    system: str = "",
    max_new_tokens: int = 0,
) -> tuple[list[int], list[torch.Tensor]]:
    """Token ids ending with the assistant prompt, and the images of the turns kept, in <image> order.

    `messages` are {"role", "content"} dicts whose content holds one IMAGE_LINE per image; `images` lists
    each message's preprocessed images (None: no images). The oldest turns are dropped until the prompt fits
    `prompt_budget`; the system prompt and the latest message always stay (a prompt that is too long even
    then is returned as it is, and generation says so).
    """
    per_message = [list(group) for group in images] if images is not None else [[] for _ in messages]
    if len(per_message) != len(messages):
        raise ValueError(f"{len(messages)} messages but images for {len(per_message)}")
    head = [{"role": "system", "content": system}] if system.strip() else []
    budget = prompt_budget(model.config.max_seq_len, max_new_tokens)
    start = 0
    while True:
        kept = [image for group in per_message[start:] for image in group]
        ids, _ = tokenizer.encode_chat([*head, *messages[start:]], add_generation_prompt=True)
        # Always expanded: a typed <image> without a picture is refused here rather than read as an empty slot.
        ids = model.expand_image_tokens(ids, kept)
        if len(ids) <= budget or start >= len(messages) - 1:
            return ids, kept
        start = _next_turn(messages, start)


def _next_turn(messages: Sequence[dict[str, Any]], start: int) -> int:
    """Where the conversation starts once its oldest turn is dropped: at the next user message (a reply
    without its question would only confuse the model), or at the latest message."""
    start += 1
    while start < len(messages) - 1 and messages[start]["role"] != "user":
        start += 1
    return start
