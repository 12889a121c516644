"""Looped depth: a group of blocks applied up to `max_loops` times with shared weights, each token taking as
many passes as a learned confidence head asks for; every pass keeps its own state, so decoding is exact.

What a pass means, the same in the parallel form and in `step`: pass 1 runs on every token. After pass
k < K the head gives each token the probability that another pass helps; a token goes on only while that
probability is above `loop_halt_threshold`. A token that stopped is skipped by the later passes: it writes
nothing to their states (no SLA or STRC update, no conv input, no KV-cache entry, no position) and its hidden
goes on to the blocks after the group unchanged. The parallel form therefore runs pass k on the running
tokens gathered into a shorter sequence (order kept) and scatters the results back; `step` does not run the
pass at all for a token that stopped, which is what saves work when decoding.

Training runs every pass on every token (no data-dependent shapes, so compile and DDP see a fixed graph).
With labels it adds two terms to aux_loss: the LM loss at each earlier pass's exit (that pass's hidden
through the blocks after the group and the LM head), so a token that stops early predicts well; and the
head's binary cross-entropy against "a later exit lowered this token's loss by more than loop_halt_margin"
(targets detached; the head reads a detached hidden, so it learns to judge without reshaping the trunk).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .layers import rms_normalize

IGNORE_INDEX = -100  # the label of positions without a loss (data.IGNORE_INDEX; the model does not import data)


class LoopedDepth(nn.Module):
    """Runs the model's blocks with the group repeated; holds the confidence head (the only extra weights)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        group = cfg.loop_group()
        self.first, self.last, self.passes = group.start, group.stop, cfg.max_loops  # group = blocks[first:last]
        self.threshold, self.margin = cfg.loop_halt_threshold, cfg.loop_halt_margin
        self.confidence_coef, self.exit_coef = cfg.loop_confidence_coef, cfg.loop_exit_coef
        self.eps = cfg.norm_eps
        # One logit per decision (after pass k < K): later passes may stop more readily than earlier ones.
        self.head = nn.Linear(cfg.d_model, cfg.max_loops - 1)
        # The passes each token took in the last inference call: (B, T) after forward, (B,) after step.
        self.last_passes: torch.Tensor | None = None

    def layout(self, n_blocks: int) -> list[int]:
        """The block behind each entry of the model's state list: the group's blocks once per pass."""
        group = list(range(self.first, self.last))
        return list(range(self.first)) + group * self.passes + list(range(self.last, n_blocks))

    def confidence(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """(..., D) hidden after pass k + 1 -> (...) logit of "another pass helps"."""
        return self.head(rms_normalize(x, self.eps))[..., k]

    def _go_on(self, x: torch.Tensor, k: int, running: torch.Tensor | None) -> torch.Tensor:
        more = torch.sigmoid(self.confidence(x, k).float()) > self.threshold
        return more if running is None else running & more

    def _split(self, entries: list) -> tuple[list, list[list], list]:
        """A state list (model layout) -> the blocks before the group, one list per pass, the blocks after."""
        size = self.last - self.first
        passes = [entries[self.first + k * size : self.first + (k + 1) * size] for k in range(self.passes)]
        return entries[: self.first], passes, entries[self.first + self.passes * size :]

    def forward(
        self,
        blocks: nn.ModuleList,
        x: torch.Tensor,
        state: list[dict] | None,
        labels: torch.Tensor | None,
        readout: Callable[[torch.Tensor], torch.Tensor],
        **block_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor, list[dict] | None]:
        """x: (B, T, D) embeddings -> logits (B, T, V), aux_loss, the new state (None without a state).

        `readout` is the model's final norm and LM head; `block_kwargs` go to every block call."""
        entries = list(state) if state is not None else [None] * len(self.layout(len(blocks)))
        before, passes, after = self._split(entries)
        group, coda = blocks[self.first : self.last], blocks[self.last :]
        x, aux, new_state = _run(blocks[: self.first], x, before, block_kwargs)
        learn = self.training and labels is not None
        running, exits, confidences = None, [], []
        for k, pass_entries in enumerate(passes):
            if self.training:
                x, pass_aux, pass_state = _run(group, x, pass_entries, block_kwargs)
            else:
                x, pass_aux, pass_state = self._pass(group, x, pass_entries, running, block_kwargs)
            aux, new_state = aux + pass_aux, new_state + pass_state
            if k == self.passes - 1:
                break
            if not self.training:
                running = self._go_on(x, k, running)
                self.last_passes = self.last_passes + running if k else 1 + running.long()
            elif learn:
                exits.append(x)
                confidences.append(self.confidence(x.detach(), k))
        x, coda_aux, coda_state = _run(coda, x, after, block_kwargs)
        logits = readout(x)
        aux = aux + coda_aux
        if learn:
            exit_logits = [readout(_run(coda, h, [None] * len(coda), block_kwargs)[0]) for h in exits]
            aux = aux + self._loop_loss(exit_logits, confidences, logits, labels)
        return logits, aux, (new_state + coda_state if state is not None else None)

    def _loop_loss(self, exit_logits, confidences, logits, labels) -> torch.Tensor:
        """exit_coef * the earlier exits' mean LM loss + confidence_coef * the head's mean BCE."""
        valid = labels != IGNORE_INDEX
        count = valid.sum().clamp(min=1)

        def token_losses(scores: torch.Tensor) -> torch.Tensor:  # (B, T); 0 where no loss is taken
            flat = F.cross_entropy(scores.float().flatten(0, 1), labels.flatten(), reduction="none")
            return flat.view_as(labels)

        exit_losses = [token_losses(scores) for scores in exit_logits]
        best_later = token_losses(logits).detach()  # the lowest loss any later exit reaches, walking back
        bce = logits.new_zeros((), dtype=torch.float32)
        for k in reversed(range(len(exit_losses))):
            here = exit_losses[k].detach()
            target = (here - best_later > self.margin).float()
            per_token = F.binary_cross_entropy_with_logits(confidences[k].float(), target, reduction="none")
            bce = bce + (per_token * valid).sum()
            best_later = torch.minimum(best_later, here)
        exit_loss = sum(loss.sum() for loss in exit_losses) / (count * len(exit_losses))
        return self.exit_coef * exit_loss + self.confidence_coef * bce / (count * len(exit_losses))

    def _pass(self, group, x, entries, running, kwargs):
        """One pass over the running tokens (B, T) bool (None: all); stopped ones keep their hidden."""
        if running is None or bool(running.all()):
            return _run(group, x, entries, kwargs)
        if not bool(running.any()):
            return x, x.new_zeros((), dtype=torch.float32), list(entries)
        counts = running.sum(1)
        if entries[0] is not None and bool((counts != counts[0]).any()):
            # A row right-padded to the longest would push its padding into its state: each row runs alone.
            rows = [
                self._pass(
                    group, x[b : b + 1], [_rows(e, slice(b, b + 1)) for e in entries], running[b : b + 1], kwargs
                )
                for b in range(x.shape[0])
            ]
            states = [_combine([row[2][i] for row in rows], torch.cat) for i in range(len(entries))]
            return torch.cat([row[0] for row in rows]), sum(row[1] for row in rows) / len(rows), states
        width = int(counts.max())
        order = torch.argsort((~running).int(), dim=1, stable=True)[:, :width]  # running tokens first, in order
        index = order[..., None].expand(-1, -1, x.shape[-1])
        packed = x.gather(1, index)  # (B, width, D)
        out, aux, states = _run(group, packed, entries, kwargs)
        # Padding of shorter rows sits after all their running tokens, so causality keeps it out of them.
        real = torch.arange(width, device=x.device)[None, :] < counts[:, None]
        return x.scatter(1, index, torch.where(real[..., None], out, packed)), aux, states

    def step(self, blocks: nn.ModuleList, x: torch.Tensor, state: list[dict]) -> tuple[torch.Tensor, list[dict]]:
        """x: (B, D) embedded token -> (B, D) hidden after the last block, and the new state."""
        before, passes, after = self._split(list(state))
        x, new_state = _step(blocks[: self.first], x, before)
        group = blocks[self.first : self.last]
        running = None
        for k, pass_entries in enumerate(passes):
            x, pass_state = self._step_pass(group, x, pass_entries, running)
            new_state += pass_state
            if k < self.passes - 1:
                running = self._go_on(x, k, running)
                self.last_passes = self.last_passes + running if k else 1 + running.long()
        x, coda_state = _step(blocks[self.last :], x, after)
        return x, new_state + coda_state

    def _step_pass(self, group, x, entries, running):
        if running is None or bool(running.all()):
            return _step(group, x, entries)
        if not bool(running.any()):
            return x, list(entries)
        rows = running.nonzero().squeeze(1)
        out, states = _step(group, x[rows], [_rows(e, rows) for e in entries])

        def put(pair):
            return pair[0].index_copy(0, rows, pair[1].to(pair[0].dtype))

        return x.index_copy(0, rows, out), [_combine([e, s], put) for e, s in zip(entries, states, strict=True)]


def _run(blocks, x, entries, kwargs):
    """The blocks' parallel forms in turn -> (x, summed aux losses, their new states)."""
    aux = x.new_zeros((), dtype=torch.float32)
    states = []
    for block, entry in zip(blocks, entries, strict=True):
        x, block_aux, entry = block(x, entry, **kwargs)
        if block_aux is not None:
            aux = aux + block_aux
        states.append(entry)
    return x, aux, states


def _step(blocks, x, entries):
    states = []
    for block, entry in zip(blocks, entries, strict=True):
        x, entry = block.step(x, entry)
        states.append(entry)
    return x, states


def _rows(tree, index):
    """Batch rows `index` of a block's state (dicts of tensors, batch first, and plain numbers)."""
    if isinstance(tree, dict):
        return {key: _rows(value, index) for key, value in tree.items()}
    return tree[index] if isinstance(tree, torch.Tensor) else tree


def _combine(trees: list, tensors: Callable[[list[torch.Tensor]], torch.Tensor]):
    """Join block states leaf by leaf: tensor leaves through `tensors`; other leaves (positions) must agree."""
    first = trees[0]
    if isinstance(first, dict):
        return {key: _combine([tree[key] for tree in trees], tensors) for key in first}
    if isinstance(first, torch.Tensor):
        if all(tree.shape[1:] == first.shape[1:] for tree in trees):
            return tensors(trees)
    elif all(tree == first for tree in trees):
        return first
    raise ValueError(
        "this looped group has softmax attention, whose KV cache and position are shared by the batch, so the "
        "sequences of one batch cannot stop at different passes: decode one sequence at a time, or set "
        "model.loop_halt_threshold=0 (every token takes every pass)"
    )
