"""Plain references for the model's fast paths: the definitions, written for clarity, not speed.

Every fast path (the chunked SLA op with its hand-written backward, the recurrent step, the STRC scan,
the expert dispatch) is tested against these with autograd through them, as flash-linear-attention
keeps its `naive.py`. Nothing here runs in training or generation; keep it obviously correct:
no in-place updates, no buffer reuse, fp32 throughout (half-precision inputs are upcast, results cast
back; fp64 inputs stay fp64, which makes a near-exact yardstick for the fp32 fast paths).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, or as it is when already wider (fp64 inputs give an fp64 reference for tests)."""
    return x if x.dtype == torch.float64 else x.float()


# ---- SLA: S_t = exp(g_t) S_{t-1} + k_t v_t^T,  o_t = q_t^T S_t -------------------------------------------
def sla_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token at a time. q, k: (B, H, T, Dk); v: (B, H, T, Dv); log_decay: (B, H, T) ->
    outputs (B, H, T, Dv) in v's dtype and the final state (B, H, Dk, Dv) in fp32."""
    batch, heads, length, dk = q.shape
    state = torch.zeros(batch, heads, dk, v.shape[-1], device=q.device, dtype=_wide(v).dtype)
    if initial_state is not None:
        state = _wide(initial_state)
    outputs = []
    for t in range(length):
        decay = _wide(log_decay[:, :, t]).exp()[..., None, None]  # (B, H, 1, 1)
        state = decay * state + _wide(k[:, :, t])[..., :, None] * _wide(v[:, :, t])[..., None, :]
        outputs.append((_wide(q[:, :, t])[..., None, :] @ state).squeeze(-2))  # (B, H, Dv)
    return torch.stack(outputs, dim=2).to(v.dtype), state


def sla_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked parallel form, chunk by chunk, in fp32 (same arguments and results as `sla_recurrent`).

    Inside chunk n, with c the chunk-local cumulative log-decay and S the state entering the chunk:
    o = ((q k^T) * D) v + exp(c) * (q S), D[t, s] = exp(c_t - c_s) for s <= t else 0; then
    S <- exp(c_last) S + k^T (exp(c_last - c) * v).
    """
    batch, heads, length, dk = q.shape
    state = torch.zeros(batch, heads, dk, v.shape[-1], device=q.device, dtype=_wide(v).dtype)
    if initial_state is not None:
        state = _wide(initial_state)
    outputs = []
    for start in range(0, length, chunk_size):
        span = slice(start, min(start + chunk_size, length))
        qc, kc, vc = _wide(q[:, :, span]), _wide(k[:, :, span]), _wide(v[:, :, span])
        cum = _wide(log_decay[:, :, span]).cumsum(-1)  # (B, H, C)
        size = cum.shape[-1]
        causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
        gaps = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, -float("inf"))  # masked before exp
        within = (qc @ kc.transpose(-1, -2)) * gaps.exp()
        outputs.append(within @ vc + cum.exp()[..., None] * (qc @ state))
        to_end = (cum[..., -1:] - cum).exp()[..., None]  # (B, H, C, 1)
        state = cum[..., -1].exp()[..., None, None] * state + kc.transpose(-1, -2) @ (to_end * vc)
    return torch.cat(outputs, dim=2).to(v.dtype), state


# ---- STRC: h_t = a_t h_{t-1} + b_t ----------------------------------------------------------------------
def linear_recurrence(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """a, b: (B, T, W); h0: (B, W) or None (zeros) -> h (B, T, W) in fp32, one step at a time."""
    h = torch.zeros_like(_wide(b[:, 0])) if h0 is None else _wide(h0)
    states = []
    for t in range(a.shape[1]):
        h = _wide(a[:, t]) * h + _wide(b[:, t])
        states.append(h)
    return torch.stack(states, dim=1)


def strc_gates(projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The STRC input projection (B, T, 3W) -> a = 1 - z, b = z * g(c), out_gate (minGRU), in fp32."""
    update, candidate, out_gate = _wide(projected).chunk(3, dim=-1)
    z = torch.sigmoid(update)
    positive = torch.where(candidate >= 0, candidate + 0.5, torch.sigmoid(candidate))
    return 1 - z, z * positive, out_gate


def strc_cell(cell, x: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A `StateTrackingCell`'s forward from its parameters: x (B, T, D) -> (y (B, T, D), h at the end)."""
    x_ = _wide(x)
    a, b, out_gate = strc_gates(F.linear(x_, cell.in_proj.weight.to(x_.dtype)))
    h = linear_recurrence(a, b, h0)
    y = F.linear(F.silu(out_gate) * h, cell.out_proj.weight.to(x_.dtype))
    return y.to(x.dtype), h[:, -1]


# ---- SLA layer ---------------------------------------------------------------------------------------------
def causal_conv(x: torch.Tensor, weight: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal conv of x (B, T, C) with weight (C, 1, K), after `history` (B, C, K - 1) or zeros."""
    kernel = weight.shape[-1]
    padded = _wide(x).transpose(1, 2)  # (B, C, T)
    past = history.to(padded.dtype) if history is not None else padded.new_zeros(x.shape[0], x.shape[2], kernel - 1)
    padded = torch.cat([past, padded], dim=-1)  # (B, C, K - 1 + T)
    return F.conv1d(padded, weight.to(padded.dtype), groups=x.shape[2]).transpose(1, 2)


def sla_layer(layer, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
    """A `SelectiveLinearAttention`'s forward from its parameters, in fp32, with `sla_recurrent` as the core:
    x (B, T, D) -> (y (B, T, D), {"S": final state, "conv": last K - 1 conv inputs or None})."""
    heads, dim, inner = layer.heads, layer.head_dim, layer.inner
    x_ = _wide(x)
    projected = F.linear(x_, layer.in_proj.weight.to(x_.dtype))
    qkv, gate, decay_in = projected.split([3 * inner, inner, heads], dim=-1)
    conv_state = None
    if layer.conv is not None:
        history = state.get("conv") if state is not None else None
        kernel = layer.conv.weight.shape[-1]
        past = history.to(qkv.dtype) if history is not None else qkv.new_zeros(x.shape[0], 3 * inner, kernel - 1)
        conv_state = torch.cat([past, qkv.transpose(1, 2)], dim=-1)[..., -(kernel - 1) :]
        qkv = causal_conv(qkv, layer.conv.weight, history)
    q, k, v = F.silu(qkv).unflatten(-1, (3, heads, dim)).unbind(-3)  # (B, T, H, Dh) each
    q, k = (t / (t.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt() for t in (q, k))  # l2_normalize's eps
    log_decay = -layer.A_log.to(x_.dtype).exp() * F.softplus(decay_in + layer.dt_bias.to(x_.dtype))  # (B, T, H)
    out, final = sla_recurrent(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        log_decay.transpose(1, 2),
        state["S"] if state is not None else None,
    )
    out = out.transpose(1, 2)  # (B, T, H, Dh)
    out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + layer.eps) * layer.out_norm_weight.to(x_.dtype)
    y = F.linear(out.flatten(-2) * F.silu(gate), layer.out_proj.weight.to(x_.dtype))
    return y.to(x.dtype), {"S": final, "conv": conv_state}


# ---- AES: every token through its routed experts, one token at a time ----------------------------------------
def expert_mixture(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An `AdaptiveExpertSystem`'s output for x (B, T, D), token by token, in fp32 (router noise off):
    returns (y (B, T, D), routing weights (N, k), experts (N, k))."""
    from .experts import route

    flat = _wide(x.reshape(-1, x.shape[-1]))
    probs = F.linear(flat, layer.router.weight.to(flat.dtype)).softmax(-1)
    weights, experts = route(probs, layer.top_k, layer.routing, layer.threshold)
    rows = []
    for token in range(flat.shape[0]):
        row = flat[token]
        out = torch.zeros_like(row)
        if layer.shared is not None:
            gate, up = (row @ layer.shared.gate_up.weight.to(row.dtype).T).chunk(2)
            out = out + (layer.activation(gate) * up) @ layer.shared.down.weight.to(row.dtype).T
        for slot in range(experts.shape[1]):
            if weights[token, slot] == 0:  # dynamic routing dropped this slot
                continue
            expert = int(experts[token, slot])
            gate, up = (row @ layer.gate_up[expert].to(row.dtype)).chunk(2)
            out = out + weights[token, slot] * ((layer.activation(gate) * up) @ layer.down[expert].to(row.dtype))
        rows.append(out)
    return torch.stack(rows).view(x.shape).to(x.dtype), weights, experts
