"""Gated cross-attention from the text to the image patches before it: the answer re-reads the picture.

A linear-attention layer reads an image's patches before the question and keeps only what fits its fixed
state. Here every position may attend again to the patch embeddings of the images of its own sample that
stand at or before it (Flamingo-style, through a learned tanh gate; a gate starting at 0 is a no-op). Each
query also sees a zero key with a zero value, an "attend to nothing" slot: a position with no image
before it reads exactly 0, so text-only samples are unchanged whatever the gate has learned.

For generation the projected keys and values of the patches, with their sequence positions, are part of
the layer's state (with relative heads, relative_heads.py, their place features too), so `step` after a
prompt gives what the parallel form gives. Batched decoding stacks such states (`stack_states`): rows are
right-padded with never-visible slots and keep their own position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import PLACE_FREQUENCIES, ModelConfig
from .layers import RMSNorm, mark_residual_output, rms_normalize
from .relative_heads import RelativeHeads

NEVER = torch.iinfo(torch.long).max  # the position of a padding entry: no query is ever at or after it


@dataclass
class ImageMemory:
    """The image patches of one forward call, per sample: what cross-attention reads."""

    tokens: torch.Tensor  # (B, M, D) patch embeddings, each sample's images in order, right-padded
    positions: torch.Tensor  # (B, M) long: each patch's index in this call's input_ids; NEVER on padding
    places: torch.Tensor | None = None  # (B, M, F) each patch's place in its picture (vision.positions.patch_places)


def image_memory(
    slots: torch.Tensor, patch_tokens: torch.Tensor, patch_places: torch.Tensor | None = None
) -> ImageMemory:
    """slots: (B, T) bool, True at image positions; patch_tokens: (sum of slots, D) in row-major slot order
    (the order `masked_scatter` fills them in), so sample b's rows are its own images' patches; patch_places,
    (sum of slots, F) in the same order, when the layers read them."""
    counts = slots.sum(1)  # (B,)
    width = int(counts.max()) if slots.numel() else 0
    real = torch.arange(width, device=slots.device)[None, :] < counts[:, None]  # (B, M)
    tokens = patch_tokens.new_zeros(slots.shape[0], width, patch_tokens.shape[-1])
    tokens[real] = patch_tokens  # boolean indexing walks (b, m) row-major: the same order as the slots
    positions = torch.full(real.shape, NEVER, dtype=torch.long, device=slots.device)
    positions[real] = slots.nonzero()[:, 1]  # nonzero() lists (b, t) row-major too
    places = None
    if patch_places is not None:
        places = patch_places.new_zeros(*real.shape, patch_places.shape[-1])
        places[real] = patch_places
    return ImageMemory(tokens, positions, places)


class GatedCrossAttention(nn.Module):
    """x -> tanh(gate) * out(attend(q(norm(x)), k, v of norm(patches))), causal in sequence positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # The relative heads (relative_heads.py) come after the ordinary ones and share their projections.
        self.heads, self.head_dim = cfg.n_heads + cfg.cross_attn_relative_heads, cfg.dim_head()
        relative = cfg.cross_attn_relative_heads
        self.relative = RelativeHeads(relative, PLACE_FREQUENCIES, cfg.cross_attn_relative_init) if relative else None
        self.qk_norm, self.eps = cfg.qk_norm, cfg.norm_eps  # as in the softmax layers: steadier at high lr
        inner = self.heads * self.head_dim
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.memory_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.kv = nn.Linear(cfg.d_model, 2 * inner, bias=False)
        self.out = mark_residual_output(nn.Linear(inner, cfg.d_model, bias=False))
        # The patch's place, added to its key and value: the value then says where the found object is. It
        # starts at zero (`reset_place`), so a run can hold it there until the lookup by appearance has formed.
        self.place = nn.Linear(4 * PLACE_FREQUENCIES, 2 * inner, bias=False) if cfg.cross_attn_pos else None
        self.gate = nn.Parameter(torch.full((), cfg.cross_attn_gate_init))  # 0: the layer starts as a no-op

    def place_parameters(self) -> list[nn.Parameter]:
        """The place maps and the relative heads' place weights."""
        held = [] if self.place is None else list(self.place.parameters())
        return held + ([] if self.relative is None else self.relative.place_parameters())

    def reset_place(self) -> None:
        """Zero place map: the layer reads what it reads without places until training moves it; the relative
        heads back at their start value."""
        if self.place is not None:
            nn.init.zeros_(self.place.weight)
        if self.relative is not None:
            self.relative.reset()

    def init_state(self, batch_size: int, device, dtype) -> dict:
        empty = torch.zeros(batch_size, self.heads, 0, self.head_dim, device=device, dtype=dtype)
        positions = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        state = {"k": empty, "v": empty.clone(), "kpos": positions, "pos": 0}
        if self.relative is not None:
            state["places"] = torch.zeros(batch_size, 0, 4 * PLACE_FREQUENCIES, device=device)
        return state

    @staticmethod
    def stack_states(states: list[dict]) -> dict:
        """One batch state from several (any batch sizes and patch counts); `pos` becomes one per row."""
        longest = max(s["k"].shape[2] for s in states)
        padded = [
            {
                "k": F.pad(s["k"], (0, 0, 0, longest - s["k"].shape[2])),  # (B, H, longest, Dh)
                "v": F.pad(s["v"], (0, 0, 0, longest - s["k"].shape[2])),
                "kpos": F.pad(s["kpos"], (0, longest - s["k"].shape[2]), value=NEVER),
                "pos": torch.as_tensor(s["pos"], device=s["kpos"].device).expand(s["k"].shape[0]),
            }
            | ({"places": F.pad(s["places"], (0, 0, 0, longest - s["k"].shape[2]))} if "places" in s else {})
            for s in states
        ]
        return {name: torch.cat([s[name] for s in padded]) for name in padded[0]}

    @staticmethod
    def select_state(state: dict, rows: torch.Tensor) -> dict:
        """The state of batch rows `rows`, without the trailing slots that are padding in all of them."""
        kpos = state["kpos"][rows]
        real = (kpos != NEVER).any(0)  # (M,)
        used = int(real.nonzero().max()) + 1 if bool(real.any()) else 0
        pos = state["pos"]
        selected = {
            "k": state["k"][rows, :, :used],
            "v": state["v"][rows, :, :used],
            "kpos": kpos[:, :used],
            "pos": pos[rows] if torch.is_tensor(pos) else pos,
        }
        if "places" in state:
            selected["places"] = state["places"][rows, :used]
        return selected

    def _keys(self, memory: ImageMemory, past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Keys, values, sequence positions and (with relative heads, else None) places of the memory's patches."""
        kv = self.kv(self.memory_norm(memory.tokens))
        if self.place is not None:
            if memory.places is None:
                raise ValueError("this model's cross-attention reads patch places; build ImageMemory with them")
            kv = kv + self.place(memory.places.to(kv.dtype))
        if self.relative is not None and memory.places is None:
            raise ValueError(
                "this model's relative cross-attention heads read patch places; build ImageMemory with them"
            )
        k, v = kv.unflatten(-1, (2 * self.heads, self.head_dim)).transpose(1, 2).chunk(2, dim=1)  # each (B, H, M, Dh)
        k = rms_normalize(k, self.eps) if self.qk_norm else k
        places = memory.places if self.relative is not None else None
        return k, v, memory.positions + past * (memory.positions != NEVER), places  # padding stays NEVER

    def forward(
        self, x: torch.Tensor, memory: ImageMemory | None, state: dict | None = None
    ) -> tuple[torch.Tensor | None, dict | None]:
        """x: (B, T, D) -> (what to add to x or None when no patch exists, the new state when one was given)."""
        pos = state["pos"] if state is not None else 0
        past = torch.as_tensor(pos, device=x.device).reshape(-1, 1)  # (1, 1), or (B, 1) in a stacked batch
        if memory is not None and memory.tokens.shape[1]:
            k, v, kpos, places = self._keys(memory, past)
            if state is not None:
                k = torch.cat([state["k"].to(k.dtype), k], dim=2)
                v = torch.cat([state["v"].to(v.dtype), v], dim=2)
                kpos = torch.cat([state["kpos"], kpos], dim=1)
                places = None if places is None else torch.cat([state["places"].to(places.dtype), places], 1)
        elif state is not None:
            k, v, kpos, places = state["k"], state["v"], state["kpos"], state.get("places")
        else:
            return None, None
        new_state = None if state is None else {"k": k, "v": v, "kpos": kpos, "pos": pos + x.shape[1]}
        if new_state is not None and places is not None:
            new_state["places"] = places
        if k.shape[2] == 0:
            return None, new_state  # no image yet: the output would be exactly 0
        return self._attend(x, k, v, kpos, past, places), new_state

    def _inputs(
        self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpos: torch.Tensor, past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Queries; keys and values behind the "attend to nothing" slot; the (B, 1, T, 1 + M) visibility mask."""
        batch, length, _ = x.shape
        q = self.q(self.norm(x)).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # (B, H, T, Dh)
        q = rms_normalize(q, self.eps) if self.qk_norm else q
        k, v = k.to(q.dtype), v.to(q.dtype)
        qpos = past + torch.arange(length, device=x.device)  # (1 or B, T)
        allowed = kpos[:, None, :] <= qpos[:, :, None]  # (B, T, M): patches at or before the query
        # The "attend to nothing" slot: a zero key (logit 0) with a zero value, visible to every query.
        sink = k.new_zeros(batch, self.heads, 1, self.head_dim)
        mask = torch.cat([allowed.new_ones(batch, length, 1), allowed], dim=-1)[:, None]  # (B, 1, T, 1 + M)
        return q, torch.cat([sink, k], 2), torch.cat([sink, v], 2), mask

    def _attend(
        self,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kpos: torch.Tensor,
        past: torch.Tensor,
        places: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q, k, v, mask = self._inputs(x, k, v, kpos, past)
        ordinary = self.heads - (0 if self.relative is None else len(self.relative.weights))
        read = F.scaled_dot_product_attention(q[:, :ordinary], k[:, :ordinary], v[:, :ordinary], attn_mask=mask)
        if self.relative is not None:
            query, key = self.relative.extend(q, k, places, mask)
            second = F.scaled_dot_product_attention(query, key, v[:, ordinary:], attn_mask=mask, scale=1.0)
            read = torch.cat([read, second], 1)
        return torch.tanh(self.gate).to(x.dtype) * self.out(read.transpose(1, 2).flatten(-2))  # (B, T, D)

    def attention_weights(self, x: torch.Tensor, memory: ImageMemory) -> torch.Tensor:
        """(B, H, T, 1 + M): what share each head (the ordinary ones, then the relative ones) at each position
        gives the nothing slot, then each patch, in the parallel form of `forward(x, memory)`. For diagnostics
        (benchmarks/vqa_probe.py)."""
        start = torch.zeros((1, 1), dtype=torch.long, device=x.device)
        k, v, kpos, places = self._keys(memory, start)
        q, k, _, mask = self._inputs(x, k, v, kpos, start)
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # the scale SDPA uses
        if self.relative is not None:
            query, key = self.relative.extend(q, k, places, mask)
            relative = query @ key.transpose(-1, -2)
            scores = torch.cat([scores[:, : -relative.shape[1]], relative], 1)
        return scores.masked_fill(~mask, float("-inf")).softmax(-1)

    def step(self, x: torch.Tensor, state: dict) -> tuple[torch.Tensor | None, dict]:
        """x: (B, D): one position reads every patch in the state."""
        read, new_state = self.forward(x[:, None], None, state)
        return (None if read is None else read[:, 0]), new_state
