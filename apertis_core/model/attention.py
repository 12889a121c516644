"""Softmax attention for Transformer and hybrid layers: GQA, RoPE or NoPE, QK-norm, KV cache, sliding window."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .layers import Rotary, mark_residual_output, rms_normalize


class SoftmaxAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.heads = cfg.n_heads
        self.kv_heads = cfg.kv_heads()
        self.head_dim = cfg.dim_head()
        self.window = cfg.sliding_window
        self.qk_norm = cfg.qk_norm
        self.eps = cfg.norm_eps
        self.rotary = None if layer in cfg.nope_layers else Rotary(self.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.qkv = nn.Linear(cfg.d_model, (self.heads + 2 * self.kv_heads) * self.head_dim, bias=False)
        self.out_proj = mark_residual_output(nn.Linear(self.heads * self.head_dim, cfg.d_model, bias=False))

    def init_state(self, batch_size: int, device, dtype) -> dict:
        empty = torch.zeros(batch_size, self.kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return {"k": empty, "v": empty.clone(), "pos": 0}

    def _project(self, x: torch.Tensor, start: int):
        """x: (B, T, D) -> q (B, H, T, Dh), k and v (B, Hkv, T, Dh), positioned from `start`."""
        q, k, v = (
            self.qkv(x)
            .unflatten(-1, (self.heads + 2 * self.kv_heads, self.head_dim))
            .transpose(1, 2)
            .split([self.heads, self.kv_heads, self.kv_heads], dim=1)
        )
        if self.qk_norm:
            q, k = rms_normalize(q, self.eps), rms_normalize(k, self.eps)
        if self.rotary is not None:
            # `start` is a (B,) tensor when a batch of prompts stands at different positions (stack_states)
            offset = start[:, None] if torch.is_tensor(start) else start
            positions = torch.arange(x.shape[1], device=x.device) + offset  # (T,) or (B, T)
            cos, sin = self.rotary.cos_sin(positions.flatten(), q.dtype)
            if positions.dim() == 2:
                cos, sin = cos.unflatten(0, positions.shape)[:, None], sin.unflatten(0, positions.shape)[:, None]
            q, k = Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)
        return q, k, v

    def _mask(self, length: int, past: int, device, valid: torch.Tensor | None = None) -> torch.Tensor | None:
        """Boolean (T, past + T) mask of allowed keys, or None when plain causal attention applies. With
        `valid` (B, past + T), the cache slots that hold a key (stack_states), it is (B, 1, T, past + T)."""
        if valid is None and not self.window and (past == 0 or length == 1):
            return None  # plain causal (past == 0) or a single query that may see every key
        query_pos = torch.arange(past, past + length, device=device)[:, None]
        key_pos = torch.arange(past + length, device=device)[None, :]
        allowed = key_pos <= query_pos
        if self.window:
            allowed &= key_pos > query_pos - self.window
        return allowed if valid is None else allowed & valid[:, None, None, :]

    def _attend(self, q, k, v, mask):
        gqa = self.heads != self.kv_heads
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict | None]:
        past = state["pos"] if state is not None else 0
        q, k, v = self._project(x, past)
        new_state = None
        if state is not None:
            k = torch.cat([state["k"].to(k.dtype), k], dim=2)
            v = torch.cat([state["v"].to(v.dtype), v], dim=2)
            cached = state["k"].shape[2]  # fewer than `past` once a sliding window has dropped old keys
            keep = k.shape[2] if not self.window else min(k.shape[2], self.window)
            new_state = {"k": k[:, :, -keep:], "v": v[:, :, -keep:], "pos": past + x.shape[1]}
            valid = state.get("valid")
            if valid is not None:  # a stacked batch: the new keys are real in every row
                valid = torch.cat([valid, valid.new_ones(x.shape[0], x.shape[1])], dim=1)
                new_state["valid"] = valid[:, -keep:]
            mask = self._mask(x.shape[1], cached, x.device, valid)
        else:
            mask = self._mask(x.shape[1], 0, x.device)
        out = self._attend(q, k, v, mask)  # (B, H, T, Dh)
        return self.out_proj(out.transpose(1, 2).flatten(-2)), new_state

    def step(self, x: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """x: (B, D): one token attends to the (windowed) cache plus itself."""
        out, new_state = self.forward(x[:, None], state)
        return out[:, 0], new_state

    @staticmethod
    def stack_states(states: list[dict]) -> dict:
        """One batch state from several (any batch sizes, any cache lengths): caches left-padded to the
        longest, `valid` marking the slots that hold keys, `pos` per row. Keys sit at the same distance from
        the query in every row, so causal and window masks by slot stay right, and RoPE is relative."""
        longest = max(s["k"].shape[2] for s in states)
        parts: dict[str, list[torch.Tensor]] = {"k": [], "v": [], "valid": [], "pos": []}
        for s in states:
            rows, length = s["k"].shape[0], s["k"].shape[2]
            for name in ("k", "v"):
                parts[name].append(F.pad(s[name], (0, 0, longest - length, 0)))  # (B, Hkv, longest, Dh)
            valid = s.get("valid", s["k"].new_ones(rows, length, dtype=torch.bool))
            parts["valid"].append(F.pad(valid, (longest - length, 0), value=False))
            pos = s["pos"]
            parts["pos"].append(pos if torch.is_tensor(pos) else torch.full((rows,), pos, device=s["k"].device))
        stacked = {name: torch.cat(tensors) for name, tensors in parts.items()}
        if bool(stacked["valid"].all()):
            del stacked["valid"]
        return stacked

    @staticmethod
    def select_state(state: dict, rows: torch.Tensor) -> dict:
        """The state of the batch rows `rows` (B',), dropping cache slots that are padding in all of them."""
        pos = state["pos"]
        picked = {"k": state["k"][rows], "v": state["v"][rows], "pos": pos[rows] if torch.is_tensor(pos) else pos}
        if "valid" in state:
            valid = state["valid"][rows]
            first = int(valid.any(0).int().argmax())  # the first slot some remaining row uses
            picked["k"], picked["v"] = picked["k"][:, :, first:], picked["v"][:, :, first:]
            if not bool(valid[:, first:].all()):
                picked["valid"] = valid[:, first:]
        return picked
