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
            positions = torch.arange(start, start + x.shape[1], device=x.device)
            cos, sin = self.rotary.cos_sin(positions, q.dtype)
            q, k = Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)
        return q, k, v

    def _mask(self, length: int, past: int, device) -> torch.Tensor | None:
        """Boolean (T, past + T) mask of allowed keys, or None when plain causal attention applies."""
        if not self.window and (past == 0 or length == 1):
            return None  # plain causal (past == 0) or a single query that may see every key
        query_pos = torch.arange(past, past + length, device=device)[:, None]
        key_pos = torch.arange(past + length, device=device)[None, :]
        allowed = key_pos <= query_pos
        if self.window:
            allowed &= key_pos > query_pos - self.window
        return allowed

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
            mask = self._mask(x.shape[1], cached, x.device)
        else:
            mask = self._mask(x.shape[1], 0, x.device)
        out = self._attend(q, k, v, mask)  # (B, H, T, Dh)
        return self.out_proj(out.transpose(1, 2).flatten(-2)), new_state

    def step(self, x: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """x: (B, D): one token attends to the (windowed) cache plus itself."""
        out, new_state = self.forward(x[:, None], state)
        return out[:, 0], new_state
