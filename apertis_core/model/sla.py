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

    Returns outputs (B, H, T, Dv) in v's dtype and the final state (B, H, Dk, Dv) in fp32. The
    chunk-local matmuls run in the autocast dtype when autocast is on (else in the inputs' dtype);
    decays and the carried states are always fp32.
    """
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return _ChunkedLinearAttention.apply(q, k, v, log_decay, initial_state, chunk_size, compute_dtype)


# The chunked tensors are (B, H, N, C, D): a contiguous (B, H, T, D) input is already in that layout and
# the outputs are views of it, so no copies; each large allocation also costs page faults on a CPU, so the
# code below reuses buffers and writes matmul results in place where it can.


def _to_chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """(B, H, T, D) -> contiguous (B, H, N, C, D), zero-padded at the end to a whole number of chunks."""
    pad = (-x.shape[2]) % chunk
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.unflatten(2, (-1, chunk)).contiguous()


def _from_chunks(x: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, N, C, D) -> (B, H, T, D) in `dtype`, without the padding (a view where nothing changes)."""
    return x.flatten(2, 3)[:, :, :length].to(dtype)


def _bmm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Matmul batched over all leading dims: (..., I, K) @ (..., K, J) -> (..., I, J), optionally into
    `out` (contiguous, a's dtype)."""
    a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    if out is None:
        return torch.bmm(a3, b3).view(*a.shape[:-1], b.shape[-1])
    torch.bmm(a3, b3, out=out.view(-1, *out.shape[-2:]))
    return out


def _bmm_add(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc += a @ b in place (batched like `_bmm`; acc contiguous)."""
    acc3 = acc.view(-1, *acc.shape[-2:])
    a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    if acc.dtype == a.dtype == b.dtype:
        acc3.baddbmm_(a3, b3)
    else:
        acc3.add_(torch.bmm(a3, b3))
    return acc


def _mul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """a * b, written into `out` when one is given (a reusable scratch buffer of the result's shape)."""
    return torch.mul(a, b, out=out) if out is not None else a * b


def _masked(scores: torch.Tensor, within: torch.Tensor) -> torch.Tensor:
    """scores * within (the fp32 masked decays), in place when scores are fp32, else in scores' dtype."""
    if scores.dtype == torch.float32:
        return scores.mul_(within)
    return (scores.float() * within).to(scores.dtype)


def _chunk_cumsum(log_decay: torch.Tensor, chunk: int) -> torch.Tensor:
    """(B, H, T) -> fp32 cumulative log-decay within each chunk, (B, H, N, C); padding decays by 0."""
    pad = (-log_decay.shape[-1]) % chunk
    log_decay = log_decay.float()
    if pad:
        log_decay = F.pad(log_decay, (0, pad))
    return log_decay.unflatten(-1, (-1, chunk)).cumsum(-1)


def _within_chunk_decay(cum: torch.Tensor) -> torch.Tensor:
    """(B, H, N, C) -> (B, H, N, C, C): exp(cum_t - cum_s) for s <= t, else 0 (masked before exp)."""
    chunk = cum.shape[-1]
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=cum.device).triu(1)
    return (cum[..., :, None] - cum[..., None, :]).masked_fill_(upper, -math.inf).exp_()


def _scan(
    values: torch.Tensor, chunk_decay: torch.Tensor, start: torch.Tensor | None, reverse: bool = False
) -> torch.Tensor:
    """The chunk-to-chunk recurrence, in place over values (B, H, N, Dk, Dv), fp32, contiguous.

    chunk_decay a: (B, H, N), each chunk's total log-decay (<= 0).
    Forward, X_{n+1} = exp(a_n) X_n + values_n with X_0 = start (or 0): values[n] becomes X_n (the state
    entering chunk n) and X_N is returned.
    Reverse, its backward G_n = exp(a_n) G_{n+1} + values_n with G_N = start (or 0): values[n] becomes
    G_{n+1} (the gradient of chunk n's update) and G_0 is returned.
    """
    n_chunks = values.shape[2]
    if values.device.type == "cpu":
        # N small elementwise steps: on a CPU far cheaper than the (N + 1) x (N + 1) matmul below.
        decay = chunk_decay.exp()[..., None, None]  # (B, H, N, 1, 1)
        state = start.float().clone() if start is not None else torch.zeros_like(values[:, :, 0])
        spare = torch.empty_like(state)
        for n in range(n_chunks - 1, -1, -1) if reverse else range(n_chunks):
            torch.addcmul(values[:, :, n], state, decay[:, :, n], out=spare)
            values[:, :, n].copy_(state)
            state, spare = spare, state
        return state
    # On accelerators one matmul over [X_0, U_0, ..., U_{N-1}] (forward) or [D_0, ..., D_{N-1}, G_N]
    # (reverse). With A_j = a_0 + ... + a_{j-1}: slot j becomes sum_{i<=j} exp(A_j - A_i) slot_i, or
    # sum_{i>=j} exp(A_i - A_j) slot_i for the reverse; every exponent is <= 0.
    end = start.float() if start is not None else torch.zeros_like(values[:, :, 0])
    slots = torch.cat([end[:, :, None], values] if not reverse else [values, end[:, :, None]], dim=2)
    cumulative = F.pad(chunk_decay.cumsum(-1), (1, 0))  # (B, H, N + 1)
    later = torch.ones(n_chunks + 1, n_chunks + 1, dtype=torch.bool, device=values.device).triu(1)
    weights = (cumulative[..., :, None] - cumulative[..., None, :]).masked_fill(later, -math.inf).exp()
    if reverse:
        weights = weights.transpose(-1, -2)
    mixed = (weights @ slots.flatten(-2)).view(slots.shape)  # (B, H, N + 1, Dk, Dv)
    if reverse:
        values.copy_(mixed[:, :, 1:])
        return mixed[:, :, 0]
    values.copy_(mixed[:, :, :-1])
    return mixed[:, :, -1]


class _ChunkedLinearAttention(torch.autograd.Function):
    """The chunked parallel form with a hand-written backward.

    Per chunk n (decays fp32, cum the chunk-local cumulative log-decay, S_n the state entering it):
      A = (q k^T) * within,  o = A v + exp(cum) * (q S_n),  U_n = k^T (exp(cum_last - cum) * v),
      S_{n+1} = exp(cum_last) S_n + U_n.
    Autograd through that expression keeps extra (B, H, N, C, C) intermediates and runs matmuls on badly
    strided operands; here every matmul runs on contiguous blocks, into existing buffers where it can. The
    log-decay gradient uses d(cumulative log-decay at t) = q_t . dq_t - k_t . dk_t (every output term pairs
    a query's decay with a key's), summed backwards over the sequence.
    """

    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, chunk_size, compute_dtype):
        ctx.set_materialize_grads(False)
        length = q.shape[2]
        chunk = min(chunk_size, length)
        with torch.autocast(q.device.type, enabled=False):
            qc, kc, vc = (_to_chunks(t, chunk) for t in (q, k, v))  # (B, H, N, C, D), inputs' dtypes
            q_, k_, v_ = (t.to(compute_dtype) for t in (qc, kc, vc))
            cum = _chunk_cumsum(log_decay, chunk)  # (B, H, N, C)
            within = _within_chunk_decay(cum)  # (B, H, N, C, C)
            scores = _masked(_bmm(q_, k_.transpose(-1, -2)), within)
            # The output buffer first holds exp(cum_last - cum) * v, the scaled values of the chunk updates.
            out = vc.float() * (cum[..., -1:] - cum).exp()[..., None]  # (B, H, N, C, Dv)
            states = _bmm(kc.float().transpose(-1, -2), out)  # U_n: (B, H, N, Dk, Dv) ...
            final_state = _scan(states, cum[..., -1], initial_state)  # ... now the state entering chunk n
            _bmm(qc.float(), states, out=out).mul_(cum.exp()[..., None])
            _bmm_add(out, scores, v_)
        ctx.save_for_backward(qc, kc, vc, log_decay, within, scores, states, final_state)
        ctx.chunk, ctx.length, ctx.compute_dtype = chunk, length, compute_dtype
        ctx.initial_dtype = initial_state.dtype if initial_state is not None else None
        return _from_chunks(out, length, v.dtype), final_state

    @staticmethod
    def backward(ctx, grad_out, grad_final):
        qc, kc, vc, log_decay, within, scores, states, final_state = ctx.saved_tensors
        chunk, length, dtype = ctx.chunk, ctx.length, ctx.compute_dtype
        with torch.autocast(qc.device.type, enabled=False):
            cum = _chunk_cumsum(log_decay, chunk)
            to_query, to_end = cum.exp()[..., None], (cum[..., -1:] - cum).exp()[..., None]  # (B, H, N, C, 1)
            if grad_out is None:
                grad_out = torch.zeros(*qc.shape[:2], length, vc.shape[-1], device=qc.device)
            go = _to_chunks(grad_out, chunk)  # (B, H, N, C, Dv)
            q32, k32, v32, go32 = (t.float() for t in (qc, kc, vc, go))
            q_, k_, v_, go_ = (t.to(dtype) for t in (qc, kc, vc, go))
            # Across chunks: the gradient each entering state gets from its own chunk's outputs; the reverse
            # scan turns it into the gradient of each chunk's update U_n ("leaving").
            scratch = go32 * to_query  # (B, H, N, C, Dv); reused below
            leaving = _bmm(q32.transpose(-1, -2), scratch)  # (B, H, N, Dk, Dv)
            grad_initial = _scan(leaving, cum[..., -1], grad_final, reverse=True)
            key_scratch = scratch if kc.shape == go.shape else None  # (Dk = Dv in every model here)
            grad_v = _bmm(_mul(k32, to_end, key_scratch), leaving)
            grad_k = _bmm(v32, leaving.transpose(-1, -2)).mul_(to_end)
            grad_q = _bmm(go32, states.transpose(-1, -2)).mul_(to_query)
            # Log-decays: d cum_t = q_t . dq_t - k_t . dk_t (+ <dS_final, S_final> at the last step). In fp32
            # one pass over the full gradients does it; with low-precision chunk matmuls their rounding,
            # summed over the whole sequence, would swamp it, so the within-chunk part then comes from the
            # fp32 products dA * A of the score matrices instead (row sums: t as query; column sums: as key).
            exact = dtype == torch.float32
            if not exact:
                grad_cum = _mul(q32, grad_q, key_scratch).sum(-1)
                grad_cum -= _mul(k32, grad_k, key_scratch).sum(-1)  # (B, H, N, C), across-chunk part
            # Within chunks.
            _bmm_add(grad_v, scores.transpose(-1, -2), go_)
            grad_scores = _bmm(go_, v_.transpose(-1, -2))  # dA
            if exact:
                grad_scores.mul_(within)
            else:
                grad_scores = grad_scores.float()
                products = grad_scores * scores.float()  # dA * A
                grad_cum += products.sum(-1) - products.sum(-2)
                grad_scores = grad_scores.mul_(within).to(dtype)
            _bmm_add(grad_q, grad_scores, k_)
            _bmm_add(grad_k, grad_scores.transpose(-1, -2), q_)
            if exact:
                grad_cum = _mul(q32, grad_q, key_scratch).sum(-1)
                grad_cum -= _mul(k32, grad_k, key_scratch).sum(-1)  # (B, H, N, C)
            grad_cum = grad_cum.flatten(2)  # (B, H, N * C)
            if grad_final is not None:
                grad_cum[..., -1] += (grad_final.float() * final_state).sum((-1, -2))
            grad_decay = grad_cum.flip(-1).cumsum(-1).flip(-1)[..., :length]
        grad_initial = grad_initial.to(ctx.initial_dtype) if ctx.initial_dtype is not None else None
        return (
            _from_chunks(grad_q, length, qc.dtype),
            _from_chunks(grad_k, length, kc.dtype),
            _from_chunks(grad_v, length, vc.dtype),
            grad_decay.to(log_decay.dtype),
            grad_initial,
            None,
            None,
        )


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
