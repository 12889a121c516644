"""Token generation: process the prompt in parallel, then sample one token at a time from the recurrent state.

`generate` works on token ids and yields them; the caller decodes (see tokenizer.StreamDecoder).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .model import ApertisModel


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128  # hard cap on generated tokens
    temperature: float = 0.8  # 0 means greedy decoding
    top_k: int = 50  # sample among the k most likely tokens (0 = off)
    top_p: float = 0.95  # nucleus: smallest set whose probability reaches top_p (1.0 = off)
    repetition_penalty: float = 1.1  # >1 discourages tokens already in prompt or output (CTRL-style)
    stop_ids: list[int] = field(default_factory=list)  # generation ends after yielding none of these
    seed: int | None = None  # fixes sampling for reproducible output


def sample_next(
    logits: torch.Tensor, seen: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """logits: (B, V) fp32; seen: (B, V) bool of tokens already present -> next ids (B,)."""
    if config.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / config.repetition_penalty, logits * config.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if config.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / config.temperature
    if 0 < config.top_k < logits.shape[-1]:
        kth = logits.topk(config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if config.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= config.top_p  # keeps at least the most likely token
        logits = logits.masked_fill(outside.scatter(-1, order, outside), -float("inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: ApertisModel,
    prompt_ids: Sequence[int] | torch.Tensor,
    config: GenerationConfig | None = None,
    images: list[torch.Tensor] | None = None,
) -> Iterator[int]:
    """Yield new token ids for one prompt. The prompt goes through the parallel form once, then each
    token costs one `step` (constant time for SLA/STRC layers, one cache read for attention layers)."""
    config = config or GenerationConfig()
    device = model.embed.weight.device
    ids = torch.as_tensor(list(prompt_ids) if not isinstance(prompt_ids, torch.Tensor) else prompt_ids, device=device)
    if ids.numel() == 0:
        raise ValueError("the prompt is empty: give at least one token (for example the end-of-text id)")
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    was_training = model.training
    model.eval()
    try:
        out = model(ids[None], images=images, state=model.init_state(1))
        logits, state = out.logits[:, -1], out.state
        seen = torch.zeros(1, model.config.vocab_size, dtype=torch.bool, device=device)
        seen[0, ids] = True
        stops = set(config.stop_ids)
        for _ in range(config.max_new_tokens):
            token = sample_next(logits.float(), seen, config, generator)
            token_id = int(token)
            if token_id in stops:
                return
            yield token_id
            seen[0, token_id] = True
            logits, state = model.step(token, state)
    finally:
        model.train(was_training)
