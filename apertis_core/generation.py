"""Token generation: prompts go through the parallel form once, then advance one token per step, together.

`generate` continues one prompt, `generate_many` several at once; both work on token ids and yield them
(the caller decodes, see tokenizer.StreamDecoder). `DecodeBatch` is the loop under both: prompts join it,
one `model.step` advances all of them, and each leaves when it ends. A prompt in a batch gets what it
would get alone: it is prefilled by itself, the states are then stacked (attention caches left-padded and
masked, positions per row), and it samples with its own settings and its own random generator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from . import decode_graph
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


# ---- batch states -------------------------------------------------------------------------------------
# A model's state is a list (one dict per state_blocks() entry) of {sub-module name: its state}. A layer
# whose state grows (a KV cache) stacks and selects it itself (stack_states / select_state); fixed-size
# states (SLA, STRC) are plain batch-first tensors, joined and indexed along the batch axis.
def _layers(model: ApertisModel, state: list[dict]) -> Iterator[tuple[int, str, torch.nn.Module]]:
    for index, (block, entry) in enumerate(zip(model.state_blocks(), state, strict=True)):
        for name in entry:
            yield index, name, getattr(block, name)


def can_batch(model: ApertisModel) -> bool:
    """Whether prompts can share decode steps: every layer state stacks itself or has a fixed size (a state
    that grows starts with a 0-length axis, or holds a plain position number). Not a looped model: its rows
    may take different numbers of passes (model/looped.py), which it runs one sequence at a time."""
    if getattr(model, "loop", None) is not None:
        return False
    state = model.init_state(1)
    return all(
        hasattr(module, "stack_states") or all(torch.is_tensor(t) and t.numel() for t in state[i][name].values())
        for i, name, module in _layers(model, state)
    )


def stack_states(model: ApertisModel, states: list[list[dict]]) -> list[dict]:
    """One state holding the rows of `states` (each from init_state or a prefill, any batch size) in order."""
    stacked = [{} for _ in states[0]]
    for i, name, module in _layers(model, states[0]):
        parts = [state[i][name] for state in states]
        stacked[i][name] = (
            module.stack_states(parts)
            if hasattr(module, "stack_states")
            else {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
        )
    return stacked


def select_rows(model: ApertisModel, state: list[dict], rows: torch.Tensor) -> list[dict]:
    """The state of batch rows `rows` (a 1-D index tensor)."""
    selected = [{} for _ in state]
    for i, name, module in _layers(model, state):
        part = state[i][name]
        selected[i][name] = (
            module.select_state(part, rows)
            if hasattr(module, "select_state")
            else {key: tensor[rows] for key, tensor in part.items()}
        )
    return selected


# ---- the decode loop ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for one call, the model's own mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


@dataclass
class _Prompt:
    config: GenerationConfig
    generator: torch.Generator | None
    left: int  # tokens it may still produce


class DecodeBatch:
    """Prompts continued together: `add` prefills one and joins it, `step` gives each its next token.

    `step` returns {key: token} for every prompt in the batch, None for one that has ended (a stop id, or
    max_new_tokens reached on the step before); an ended prompt has left the batch. Not thread-safe: one
    thread drives a batch (the studio's scheduler does).
    """

    def __init__(self, model: ApertisModel):
        self.model = model
        self.batchable = can_batch(model)
        self.keys: list[int] = []  # the prompt in each row of state and logits
        self.prompts: dict[int, _Prompt] = {}
        self.ended: list[int] = []  # reached max_new_tokens: reported None on the next step
        self.state: list[dict] | None = None
        self.logits: torch.Tensor | None = None  # (B, V): each row's next-token logits
        self.seen: torch.Tensor | None = None  # (B, V) bool: each row's prompt and output, for repetition_penalty
        self._count = 0
        self._graph: decode_graph.GraphedStep | None = None  # with APERTIS_CUDA_GRAPH=1 (decode_graph.py)

    def __len__(self) -> int:
        return len(self.prompts)

    def add(
        self,
        prompt_ids: Sequence[int] | torch.Tensor,
        config: GenerationConfig | None = None,
        images: list[torch.Tensor] | None = None,
    ) -> int:
        """Prefill a prompt alone and join it to the batch; returns its key."""
        config = config or GenerationConfig()
        device = self.model.norm.weight.device
        ids = torch.as_tensor(list(prompt_ids) if not isinstance(prompt_ids, torch.Tensor) else prompt_ids)
        if ids.numel() == 0:
            raise ValueError("the prompt is empty: give at least one token (for example the end-of-text id)")
        if self.keys and not self.batchable:
            raise ValueError("this model's layers cannot share decode steps (see generation.can_batch)")
        ids = ids.to(device)
        key, self._count = self._count, self._count + 1
        generator = torch.Generator(device=device).manual_seed(config.seed) if config.seed is not None else None
        self.prompts[key] = _Prompt(config, generator, config.max_new_tokens)
        if config.max_new_tokens <= 0:
            self.ended.append(key)
            return key
        with _evaluating(self.model):
            seen = torch.zeros(1, self.model.config.vocab_size, dtype=torch.bool, device=device)
            seen[0, ids] = True
            out = self.model(ids[None], images=images, state=self.model.init_state(1))
            logits = out.logits[:, -1].float()
            if self.state is None:
                self.state, self.logits, self.seen = out.state, logits, seen
            else:
                self.state = stack_states(self.model, [self.state, out.state])
                self.logits, self.seen = torch.cat([self.logits, logits]), torch.cat([self.seen, seen])
        self.keys.append(key)
        return key

    def remove(self, key: int) -> None:
        """Drop a prompt (a cancelled request) before it ends."""
        if key in self.keys:
            self._keep([k for k in self.keys if k != key])
        if key in self.ended:
            self.ended.remove(key)
        self.prompts.pop(key, None)

    def _keep(self, keys: list[int]) -> None:
        """Shrink state and logits to the rows of `keys` (a subsequence of self.keys)."""
        if not keys:
            self.keys, self.state, self.logits, self.seen = [], None, None, None
            return
        if keys != self.keys:
            rows = torch.tensor([self.keys.index(k) for k in keys], device=self.logits.device)
            self.state = select_rows(self.model, self.state, rows)
            self.logits, self.seen, self.keys = self.logits[rows], self.seen[rows], keys

    def _model_step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
        """model.step, replayed as a CUDA graph when asked for and possible; a graph serves one batch, so
        it is captured again after a prompt joins or leaves (they replace the state)."""
        self._graph = decode_graph.graphed(self.model, self.state, self._graph)
        return (self._graph or self.model.step)(tokens, self.state)

    def _sample(self) -> torch.Tensor:
        """Each row's next token (B,): rows with the same settings and no seed of their own in one call."""
        groups: dict[object, list[int]] = {}
        for row, key in enumerate(self.keys):
            prompt, c = self.prompts[key], self.prompts[key].config
            same = (c.temperature, c.top_k, c.top_p, c.repetition_penalty) if prompt.generator is None else key
            groups.setdefault(same, []).append(row)
        if len(groups) == 1:
            prompt = self.prompts[self.keys[0]]
            return sample_next(self.logits, self.seen, prompt.config, prompt.generator)
        tokens = torch.empty(len(self.keys), dtype=torch.long, device=self.logits.device)
        for rows in groups.values():
            prompt, index = self.prompts[self.keys[rows[0]]], torch.tensor(rows, device=tokens.device)
            tokens[index] = sample_next(self.logits[index], self.seen[index], prompt.config, prompt.generator)
        return tokens

    def step(self) -> dict[int, int | None]:
        """Each prompt's next token (None: it ended and left), then one model step for those that go on."""
        produced: dict[int, int | None] = {key: None for key in self.ended}
        for key in self.ended:
            del self.prompts[key]
        self.ended = []
        if not self.keys:
            return produced
        going: list[int] = []
        with _evaluating(self.model):
            tokens = self._sample()
            self.seen[torch.arange(len(tokens), device=tokens.device), tokens] = True
            for key, token in zip(self.keys, tokens.tolist(), strict=True):
                prompt = self.prompts[key]
                if token in prompt.config.stop_ids:
                    produced[key] = None
                    del self.prompts[key]
                    continue
                produced[key], prompt.left = token, prompt.left - 1
                (going if prompt.left > 0 else self.ended).append(key)
            self._keep(going)
            if going:
                tokens = torch.tensor([produced[key] for key in going], device=self.logits.device)
                logits, self.state = self._model_step(tokens)
                self.logits = logits.float()
        return produced


def generate(
    model: ApertisModel,
    prompt_ids: Sequence[int] | torch.Tensor,
    config: GenerationConfig | None = None,
    images: list[torch.Tensor] | None = None,
) -> Iterator[int]:
    """Yield new token ids for one prompt. The prompt goes through the parallel form once, then each
    token costs one `step` (constant time for SLA/STRC layers, one cache read for attention layers)."""
    batch = DecodeBatch(model)
    key = batch.add(prompt_ids, config, images)
    while (token := batch.step()[key]) is not None:
        yield token


def generate_many(
    model: ApertisModel,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig | None = None,
    images: Sequence[list[torch.Tensor] | None] | None = None,
    max_batch: int = 16,
) -> Iterator[tuple[int, int]]:
    """Yield (prompt index, token) as several prompts are continued, up to `max_batch` sharing each step
    (one at a time for a model that cannot batch); a prompt gets what `generate` gives it alone."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    batch = DecodeBatch(model)
    limit = max_batch if batch.batchable else 1
    waiting = list(range(len(prompts)))[::-1]
    index_of: dict[int, int] = {}
    while waiting or len(batch):
        while waiting and len(batch) < limit:
            index = waiting.pop()
            index_of[batch.add(prompts[index], config, images[index] if images else None)] = index
        for key, token in batch.step().items():
            if token is not None:
                yield index_of[key], token
