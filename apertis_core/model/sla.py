"""Selective Linear Attention: linear attention with a data-dependent per-head decay.

Per head, the state S (Dk x Dv) evolves as  S_t = exp(g_t) * S_{t-1} + k_t v_t^T  and  o_t = q_t^T S_t,
where g_t <= 0 is computed from the input (the "selective" decay of Mamba-2 / GLA). Training uses the
chunked parallel form (`chunked_linear_attention`): inside a chunk of C tokens the interactions form a
masked C x C matrix, across chunks a state is carried, so cost is O(T * C) and no T x T matrix exists.
Generation uses `recurrent_step` with a constant-size state; both give the same outputs.

Numerics: cumulative log-decays and states are fp32; every exponent is a difference that is <= 0, and
masking happens before exponentiating, so nothing overflows however long the sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .layers import CausalDepthwiseConv, l2_normalize, mark_residual_output


def chunked_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: (B, H, T, Dk); v: (B, H, T, Dv); log_decay: (B, H, T), <= 0.

    Returns outputs (B, H, T, Dv) in v's dtype and the final state (B, H, Dk, Dv) in fp32.
    """
    batch, heads, length, dk = q.shape
    dv = v.shape[-1]
    chunk = min(chunk_size, length)
    pad = (-length) % chunk
    if pad:  # padded steps have zero keys and zero decay: they leave the state untouched
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        log_decay = F.pad(log_decay, (0, pad))
    n_chunks = q.shape[2] // chunk
    q, k, v = (t.reshape(batch, heads, n_chunks, chunk, t.shape[-1]) for t in (q, k, v))  # (B, H, N, C, D)
    cum = log_decay.float().reshape(batch, heads, n_chunks, chunk).cumsum(-1)  # (B, H, N, C)

    # Within a chunk: o_t += sum_{s<=t} exp(cum_t - cum_s) (q_t . k_s) v_s
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    gaps = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, -math.inf)  # (B, H, N, C, C)
    scores = (q @ k.transpose(-1, -2)) * gaps.exp()
    out = scores.to(v.dtype) @ v  # (B, H, N, C, Dv)

    with torch.autocast(q.device.type, enabled=False):
        chunk_total = cum[..., -1]  # (B, H, N)
        k_to_end = k.float() * (chunk_total[..., None] - cum).exp()[..., None]
        updates = k_to_end.transpose(-1, -2) @ v.float()  # (B, H, N, Dk, Dv): each chunk's own contribution
        through = chunk_total.cumsum(-1)  # log-decay from the sequence start through the end of chunk n
        before = through - chunk_total  # ... through the end of chunk n - 1
        # State entering chunk n: sum over m < n of exp(before_n - through_m) * updates_m (+ decayed initial).
        strictly_lower = torch.ones(n_chunks, n_chunks, dtype=torch.bool, device=q.device).tril(-1)
        carry = (before[..., :, None] - through[..., None, :]).masked_fill(~strictly_lower, -math.inf).exp()
        states_in = (carry @ updates.flatten(-2)).view(batch, heads, n_chunks, dk, dv)  # (B, H, N, Dk, Dv)
        if initial_state is not None:
            states_in = states_in + before.exp()[..., None, None] * initial_state.float()[:, :, None]
        final_state = states_in[:, :, -1] * chunk_total[..., -1].exp()[..., None, None] + updates[:, :, -1]
        inter = (q.float() * cum.exp()[..., None]) @ states_in  # (B, H, N, C, Dv)

    out = (out.float() + inter).to(v.dtype).reshape(batch, heads, n_chunks * chunk, dv)
    return out[:, :, :length], final_state


def recurrent_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token. q, k: (B, H, Dk); v: (B, H, Dv); log_decay: (B, H); state: (B, H, Dk, Dv) fp32."""
    with torch.autocast(q.device.type, enabled=False):
        state = state * log_decay.float().exp()[..., None, None] + k.float()[..., :, None] * v.float()[..., None, :]
        out = (q.float()[..., None, :] @ state).squeeze(-2)  # (B, H, Dv)
    return out.to(v.dtype), state


class SelectiveLinearAttention(nn.Module):
    """The SLA token mixer: fused projections, short conv, selective decay, output norm and gate."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads = cfg.n_heads
        self.head_dim = cfg.dim_head()
        self.chunk_size = cfg.sla_chunk_size
        inner = self.heads * self.head_dim
        self.inner = inner
        # One matmul produces q, k, v, the output gate and the per-head decay input.
        self.in_proj = nn.Linear(cfg.d_model, 4 * inner + self.heads, bias=False)
        self.conv = CausalDepthwiseConv(3 * inner, cfg.sla_conv_size) if cfg.sla_conv_size > 1 else None
        # Mamba-2 style decay: g = -exp(A_log) * softplus(x W + dt_bias); A spread over [1, 16] gives heads
        # different memory lengths at init, dt_bias puts softplus(.) in [1e-3, 1e-1].
        self.A_log = nn.Parameter(torch.log(torch.linspace(1.0, 16.0, self.heads)))
        dt = torch.exp(torch.linspace(math.log(1e-3), math.log(1e-1), self.heads))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.out_norm_weight = nn.Parameter(torch.ones(self.head_dim))
        self.out_proj = mark_residual_output(nn.Linear(inner, cfg.d_model, bias=False))
        self.eps = cfg.norm_eps

    def init_state(self, batch_size: int, device, dtype) -> dict:
        state = {"S": torch.zeros(batch_size, self.heads, self.head_dim, self.head_dim, device=device)}
        if self.conv is not None:
            state["conv"] = self.conv.init_state(batch_size, device, dtype)
        return state

    def _split(self, projected: torch.Tensor):
        qkv, gate, decay_in = projected.split([3 * self.inner, self.inner, self.heads], dim=-1)
        return qkv, gate, decay_in

    def _log_decay(self, decay_in: torch.Tensor) -> torch.Tensor:
        return -self.A_log.float().exp() * F.softplus(decay_in.float() + self.dt_bias.float())

    def _heads(self, qkv: torch.Tensor):
        q, k, v = F.silu(qkv).unflatten(-1, (3, self.heads, self.head_dim)).unbind(-3)
        # Unit-norm queries and keys bound each update, so the state cannot blow up.
        return l2_normalize(q), l2_normalize(k), v

    def _finish(self, out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        out = F.rms_norm(out, (self.head_dim,), self.out_norm_weight.to(out.dtype), self.eps)
        return self.out_proj(out.flatten(-2) * F.silu(gate))

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict | None]:
        """x: (B, T, D). With a state, continue from it and return the updated one."""
        qkv, gate, decay_in = self._split(self.in_proj(x))
        new_state = None
        if self.conv is not None:
            qkv, conv_state = self.conv(qkv, state["conv"] if state is not None else None)
        q, k, v = (t.transpose(1, 2) for t in self._heads(qkv))  # (B, H, T, Dh)
        log_decay = self._log_decay(decay_in).transpose(1, 2)  # (B, H, T)
        out, final = chunked_linear_attention(q, k, v, log_decay, self.chunk_size, state["S"] if state else None)
        if state is not None:
            new_state = {"S": final}
            if self.conv is not None:
                new_state["conv"] = conv_state
        return self._finish(out.transpose(1, 2), gate), new_state

    def step(self, x: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """x: (B, D) -> (B, D)."""
        qkv, gate, decay_in = self._split(self.in_proj(x))
        new_state = {}
        if self.conv is not None:
            qkv, new_state["conv"] = self.conv.step(qkv, state["conv"])
        q, k, v = self._heads(qkv)  # (B, H, Dh)
        out, new_state["S"] = recurrent_step(q, k, v, self._log_decay(decay_in), state["S"])
        return self._finish(out, gate), new_state
