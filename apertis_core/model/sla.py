"""Selective Linear Attention: linear attention with a data-dependent per-head decay.

Per head, the state S (Dk x Dv) evolves as  S_t = exp(g_t) * S_{t-1} + k_t v_t^T  and  o_t = q_t^T S_t,
where g_t <= 0 is computed from the input (the "selective" decay of Mamba-2 / GLA). Training uses the
chunked parallel form (`chunked_linear_attention`): inside a chunk of C tokens the interactions form a
masked C x C matrix, across chunks a state is carried, so cost is O(T * C) and no T x T matrix exists.
Generation uses `recurrent_step` with a constant-size state; both give the same outputs.

The layer's training path is one autograd Function from the input projection's output to the output
projection's input (`_SelectiveAttentionLayer`: conv, gates, norms and the chunked core with hand-written
backwards), so autograd sees a handful of nodes instead of about sixty. Every path is tested against the
plain references in `naive.py` (tests/test_sla_reference.py). On CUDA with fla-core installed the same
layer runs on fla's Triton kernels instead (`kernels.py`; the model's `kernels` field decides).

Numerics: cumulative log-decays and states are fp32; every exponent is a difference that is <= 0, and
masking happens before exponentiating, so nothing overflows however long the sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .config import ModelConfig
from .layers import CausalDepthwiseConv, l2_normalize, mark_residual_output, updatable_in_place

# How the chunk-to-chunk state recurrence runs: "loop" (N small in-place steps, the CPU's choice) or
# "matmul" (one (N + 1) x (N + 1) matmul, the accelerators' choice). Both are selectable on any device so
# tests can prove each against the reference on a CPU.
SCANS = ("loop", "matmul")


def default_scan(device: torch.device) -> str:
    return "loop" if device.type == "cpu" else "matmul"


def chunked_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
    scan: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: (B, H, T, Dk); v: (B, H, T, Dv); log_decay: (B, H, T), <= 0.

    Returns outputs (B, H, T, Dv) in v's dtype and the final state (B, H, Dk, Dv) in fp32. The
    chunk-local matmuls run in the autocast dtype when autocast is on (else in the inputs' dtype);
    decays and the carried states are always fp32. `scan` picks the chunk-to-chunk recurrence (SCANS;
    default: the device's choice).
    """
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    scan = scan or default_scan(q.device)
    if scan not in SCANS:
        raise ValueError(f"scan must be one of {SCANS}, not {scan!r}")
    return _apply(_ChunkedLinearAttention, q, k, v, log_decay, initial_state, chunk_size, compute_dtype, scan)


@torch.compiler.disable
def _apply(function, *args):
    """function.apply(*args), left out of torch.compile graphs: the hand-written kernels write into
    buffers (`out=`), which Inductor does not take, and are already fused where it counts."""
    return function.apply(*args)


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
    values: torch.Tensor, chunk_decay: torch.Tensor, start: torch.Tensor | None, method: str, reverse: bool = False
) -> torch.Tensor:
    """The chunk-to-chunk recurrence, in place over values (B, H, N, Dk, Dv), fp32, contiguous.

    chunk_decay a: (B, H, N), each chunk's total log-decay (<= 0).
    Forward, X_{n+1} = exp(a_n) X_n + values_n with X_0 = start (or 0): values[n] becomes X_n (the state
    entering chunk n) and X_N is returned.
    Reverse, its backward G_n = exp(a_n) G_{n+1} + values_n with G_N = start (or 0): values[n] becomes
    G_{n+1} (the gradient of chunk n's update) and G_0 is returned.
    """
    n_chunks = values.shape[2]
    if method == "loop":
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


def _chunk_forward(q, k, v, log_decay, initial_state, chunk_size, compute_dtype, scan):
    """The chunked form's forward without autograd: (B, H, T, D) inputs -> outputs (B, H, T, Dv) in v's
    dtype (a view of the chunked buffer), the final state (fp32), and what `_chunk_backward` needs.

    Per chunk n (decays fp32, cum the chunk-local cumulative log-decay, S_n the state entering it):
      A = (q k^T) * within,  o = A v + exp(cum) * (q S_n),  U_n = k^T (exp(cum_last - cum) * v),
      S_{n+1} = exp(cum_last) S_n + U_n.
    """
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
        final_state = _scan(states, cum[..., -1], initial_state, scan)  # ... now the state entering chunk n
        _bmm(qc.float(), states, out=out).mul_(cum.exp()[..., None])
        _bmm_add(out, scores, v_)
    saved = (qc, kc, vc, log_decay, within, scores, states, final_state)
    return _from_chunks(out, length, v.dtype), final_state, saved


def _chunk_backward(saved, length, compute_dtype, scan, grad_out, grad_final):
    """Gradients of q, k, v (B, H, T, D; views of chunked buffers), log_decay (B, H, T) and the initial
    state (fp32 or None) from `_chunk_forward`'s saved tensors.

    The log-decay gradient uses d(cumulative log-decay at t) = q_t . dq_t - k_t . dk_t (every output term
    pairs a query's decay with a key's), summed backwards over the sequence.
    """
    qc, kc, vc, log_decay, within, scores, states, final_state = saved
    chunk, dtype = qc.shape[3], compute_dtype
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
        grad_initial = _scan(leaving, cum[..., -1], grad_final, scan, reverse=True)
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
            grad_cum = torch.linalg.vecdot(q32, grad_q) - torch.linalg.vecdot(k32, grad_k)  # across chunks
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
            grad_cum = torch.linalg.vecdot(q32, grad_q) - torch.linalg.vecdot(k32, grad_k)  # (B, H, N, C)
        grad_cum = grad_cum.flatten(2)  # (B, H, N * C)
        if grad_final is not None:
            grad_cum[..., -1] += (grad_final.float() * final_state).sum((-1, -2))
        grad_decay = grad_cum.flip(-1).cumsum(-1).flip(-1)[..., :length]
    return (
        _from_chunks(grad_q, length, qc.dtype),
        _from_chunks(grad_k, length, kc.dtype),
        _from_chunks(grad_v, length, vc.dtype),
        grad_decay.to(log_decay.dtype),
        grad_initial,
    )


class _ChunkedLinearAttention(torch.autograd.Function):
    """The chunked parallel form with a hand-written backward (`_chunk_forward`, `_chunk_backward`).

    Autograd through the chunked expression keeps extra (B, H, N, C, C) intermediates and runs matmuls on
    badly strided operands; here every matmul runs on contiguous blocks, into existing buffers where it can.
    """

    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, chunk_size, compute_dtype, scan):
        ctx.set_materialize_grads(False)
        out, final_state, saved = _chunk_forward(q, k, v, log_decay, initial_state, chunk_size, compute_dtype, scan)
        ctx.save_for_backward(*saved)
        ctx.length, ctx.compute_dtype, ctx.scan = q.shape[2], compute_dtype, scan
        ctx.initial_dtype = initial_state.dtype if initial_state is not None else None
        return out, final_state

    @staticmethod
    def backward(ctx, grad_out, grad_final):
        *grads, grad_initial = _chunk_backward(
            ctx.saved_tensors, ctx.length, ctx.compute_dtype, ctx.scan, grad_out, grad_final
        )
        grad_initial = grad_initial.to(ctx.initial_dtype) if ctx.initial_dtype is not None else None
        return (*grads, grad_initial, None, None, None)


def recurrent_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token. q, k: (B, H, Dk); v: (B, H, Dv); log_decay: (B, H); state: (B, H, Dk, Dv) fp32.

    Without autograd (generation) the state is updated in place and returned; with it, a new one."""
    with torch.autocast(q.device.type, enabled=False):
        decay = log_decay.float().exp()[..., None, None]  # (B, H, 1, 1)
        outer = (k.float()[..., :, None], v.float()[..., None, :])  # (B, H, Dk, 1), (B, H, 1, Dv)
        if updatable_in_place(state):
            state = state.mul_(decay).addcmul_(*outer)
        else:
            state = torch.addcmul(state * decay, *outer)
        out = (q.float()[..., None, :] @ state).squeeze(-2)  # (B, H, Dv)
    return out.to(v.dtype), state


# ---- The layer between its two projections, fused ------------------------------------------------------------
# in_proj's output [conv input for q, k, v | output gate | decay input] goes through: short causal conv,
# silu, unit-norm q and k, the per-head decay, the chunked core, RMS norm of each head's output, times
# silu(gate). As separate autograd ops that is about 60 kernels and a dozen full-size intermediates per
# layer (and a `cat` in backward to reassemble the projection's gradient); `_SelectiveAttentionLayer`
# does it with a hand-written backward that writes the projection's gradient into one buffer.


@dataclass(frozen=True)
class _LayerSpec:
    heads: int
    dim: int
    chunk: int
    eps: float  # the output RMS norm's
    compute_dtype: torch.dtype  # of the chunk-local matmuls
    scan: str


_QK_EPS = 1e-6  # as l2_normalize


def _conv_taps(weight: torch.Tensor) -> torch.Tensor:
    """Depthwise conv weight (C, 1, K) -> (K, C) fp32; tap j multiplies x_{t - (K - 1) + j}."""
    return weight[:, 0, :].t().float()


def _history_by_time(history: torch.Tensor | None) -> torch.Tensor | None:
    """Conv state (B, C, K - 1), oldest first -> a (B, K - 1, C) view."""
    return history.transpose(1, 2) if history is not None else None


def _causal_conv_into(out, x, taps, history):
    """out (B, T, C) = causal depthwise conv of x (B, T, C) with taps (K, C), after history (B, K - 1, C)
    or zeros: K shifted multiply-adds over rows whose C channels are contiguous, no padded copy."""
    kernel, length = taps.shape[0], x.shape[1]
    torch.mul(x, taps[-1], out=out)
    for shift in range(1, kernel):
        tap = taps[kernel - 1 - shift]
        if shift < length:
            out[:, shift:].addcmul_(x[:, : length - shift], tap)
        if history is not None:
            n = min(shift, length)  # steps t < shift read x_{t - shift} from the history
            out[:, :n].addcmul_(history[:, kernel - 1 - shift : kernel - 1 - shift + n], tap)
    return out


def _causal_conv_backward(grad, x, taps, history, grad_x):
    """Gradients of `_causal_conv_into` for grad (B, T, C): writes grad_x (B, T, C), returns the taps'
    gradient (K, C) and the history's (B, K - 1, C) or None."""
    kernel, length = taps.shape[0], x.shape[1]
    grad_taps = torch.empty_like(taps)
    torch.mul(grad, taps[-1], out=grad_x)
    grad_taps[-1] = (grad * x).sum((0, 1))
    grad_history = torch.zeros_like(history, dtype=torch.float32) if history is not None else None
    for shift in range(1, kernel):
        j = kernel - 1 - shift
        total = torch.zeros_like(taps[j])
        if shift < length:
            grad_x[:, : length - shift].addcmul_(grad[:, shift:], taps[j])
            total += (grad[:, shift:] * x[:, : length - shift]).sum((0, 1))
        if history is not None:
            n = min(shift, length)
            total += (grad[:, :n] * history[:, j : j + n]).sum((0, 1))
            grad_history[:, j : j + n].addcmul_(grad[:, :n], taps[j])
        grad_taps[j] = total
    return grad_taps, grad_history


def _unit_norm_backward(units, inv_norms, grads, out):
    """d x = (d y - y (y . d y)) / |x| for y = x / |x|, per row of each (unit, 1 / |x|, d y), into out[i]."""
    for index, (unit, inv_norm, grad) in enumerate(zip(units, inv_norms, grads, strict=True)):
        dot = torch.linalg.vecdot(unit, grad)[..., None]
        torch.addcmul(grad, unit, dot, value=-1.0, out=out[index]).mul_(inv_norm)


def _conv_state_backward(grad, grad_history, history, grad_tail, inner):
    """Add the gradient of the conv's new state (B, C, K - 1), the last K - 1 conv inputs, to the inputs'
    gradient (grad, the projection's) and to the old state's (returned; it supplied the oldest entries
    when T < K - 1)."""
    length, width = grad.shape[1], grad_tail.shape[-1]
    kept = min(length, width)
    grad[:, length - kept :, : 3 * inner] += grad_tail[..., width - kept :].float().transpose(1, 2)
    if history is not None and kept < width:
        grad_history = grad_history if grad_history is not None else torch.zeros_like(history)
        grad_history[..., kept:] += grad_tail[..., : width - kept].to(grad_history.dtype)
    return grad_history


def _layer_forward(projected, conv_weight, A_log, dt_bias, norm_weight, initial_state, history, spec, result):
    """`_SelectiveAttentionLayer.forward`'s work: writes result (B, T, I); returns the final state, the
    conv's new state and the tensors the backward needs."""
    batch, length, _ = projected.shape
    heads, dim = spec.heads, spec.dim
    inner = heads * dim
    mixed = projected[..., : 3 * inner]  # (B, T, 3I), a view
    pre = mixed.float()
    if conv_weight is not None:
        pre = torch.empty(mixed.shape, device=mixed.device, dtype=torch.float32)
        _causal_conv_into(pre, mixed, _conv_taps(conv_weight), _history_by_time(history))
    # silu(pre), written straight into the chunk kernel's (3, B, H, T, D) layout
    act = projected.new_empty(3, batch, heads, length, dim, dtype=torch.float32)
    torch.ops.aten.silu.out(pre.view(batch, length, 3, heads, dim), out=act.permute(1, 3, 0, 2, 4))
    inv_norm = (torch.linalg.vector_norm(act[:2], dim=-1, keepdim=True).square_() + _QK_EPS).rsqrt_()
    act[:2].mul_(inv_norm)  # unit-norm q and k
    softplus = F.softplus(projected[..., 4 * inner :].float() + dt_bias.float())  # (B, T, H)
    log_decay = (softplus * -A_log.float().exp()).transpose(1, 2).contiguous()  # (B, H, T)
    out, final_state, saved = _chunk_forward(
        *act.unbind(0), log_decay, initial_state, spec.chunk, spec.compute_dtype, spec.scan
    )  # out: (B, H, T, D) fp32
    inv_rms = (out.square().mean(-1, keepdim=True) + spec.eps).rsqrt_()  # (B, H, T, 1)
    normed = out.mul_(inv_rms)
    gate_act = F.silu(projected[..., 3 * inner : 4 * inner].float())  # (B, T, I)
    torch.mul(
        normed.transpose(1, 2) * norm_weight.float(),
        gate_act.reshape(batch, length, heads, dim),
        out=result.view(batch, length, heads, dim),
    )
    new_history = None
    if history is not None:  # the last K - 1 conv inputs, (B, 3I, K - 1)
        tail = mixed[:, -history.shape[-1] :].transpose(1, 2).to(history.dtype)
        new_history = torch.cat([history[..., tail.shape[-1] :], tail], dim=-1)
    return final_state, new_history, (pre, act, inv_norm, softplus, normed, inv_rms, gate_act, *saved)


def _layer_backward(projected, conv_weight, A_log, norm_weight, history, spec, saved, grads_in, grad):
    """`_SelectiveAttentionLayer.backward`'s work: writes the projection's gradient into grad (B, T, 4I + H)
    fp32; returns the gradients of the conv taps (K, C), A_log, dt_bias and the norm weight (fp32), the
    initial state and the conv history."""
    grad_result, grad_final, grad_history_out = grads_in
    pre, act, inv_norm, softplus, normed, inv_rms, gate_act, *chunk_saved = saved
    batch, length, _ = projected.shape
    heads, dim = spec.heads, spec.dim
    inner = heads * dim
    if grad_result is None:
        grad_result = torch.zeros(batch, length, inner, device=projected.device)
    # result = normed * w * silu(gate), with normed = o / rms(o)
    by_head = grad_result.float().reshape(batch, length, heads, dim)
    normed_by_time = normed.transpose(1, 2)  # (B, T, H, D)
    weighted = by_head * gate_act.reshape_as(by_head)  # dL/d(normed * w)
    grad_norm_weight = torch.linalg.vecdot(weighted.flatten(0, 2).t(), normed_by_time.flatten(0, 2).t())
    grad_gate_act = (by_head * normed_by_time * norm_weight.float()).reshape(batch, length, inner)
    gate = projected[..., 3 * inner : 4 * inner].float()
    torch.ops.aten.silu_backward.grad_input(grad_gate_act, gate, grad_input=grad[..., 3 * inner : 4 * inner])
    grad_normed = torch.empty_like(normed)  # (B, H, T, D), the chunk kernel's layout
    torch.mul(weighted.transpose(1, 2), norm_weight.float(), out=grad_normed)
    mean = torch.linalg.vecdot(grad_normed, normed)[..., None] / dim  # d o = r (d n - n mean(d n n))
    grad_out = torch.addcmul(grad_normed, normed, mean, value=-1.0).mul_(inv_rms)
    grad_q, grad_k, grad_v, grad_log_decay, grad_initial = _chunk_backward(
        chunk_saved, length, spec.compute_dtype, spec.scan, grad_out, grad_final
    )
    grad_act = torch.empty_like(act)
    _unit_norm_backward(act[:2], inv_norm, (grad_q, grad_k), grad_act)
    grad_act[2].copy_(grad_v)
    grad_mixed = grad[..., : 3 * inner]  # (B, T, 3I)
    grad_pre = grad_mixed if conv_weight is None else torch.empty_like(pre)
    split = (batch, length, 3, heads, dim)
    torch.ops.aten.silu_backward.grad_input(
        grad_act.permute(1, 3, 0, 2, 4), pre.view(split), grad_input=grad_pre.view(split)
    )
    grad_taps = grad_history = None
    if conv_weight is not None:
        grad_taps, grad_hist = _causal_conv_backward(
            grad_pre, projected[..., : 3 * inner], _conv_taps(conv_weight), _history_by_time(history), grad_mixed
        )
        if grad_hist is not None:
            grad_history = grad_hist.transpose(1, 2).to(history.dtype)
    if grad_history_out is not None:
        grad_history = _conv_state_backward(grad, grad_history, history, grad_history_out, inner)
    # g = -exp(A) softplus(z), z = decay_in + dt_bias: dg/dz = -exp(A) sigmoid(z), dg/dA_log = g
    grad_log_decay = grad_log_decay.transpose(1, 2)  # (B, T, H)
    rate = -A_log.float().exp()
    grad_A_log = (grad_log_decay * softplus * rate).sum((0, 1))
    sigmoid = 1.0 - (-softplus).exp()  # sigmoid(z) = 1 - exp(-softplus(z))
    grad_decay_in = grad[..., 4 * inner :]
    torch.mul(grad_log_decay * rate, sigmoid, out=grad_decay_in)
    return grad_taps, grad_A_log, grad_decay_in.sum((0, 1)), grad_norm_weight, grad_initial, grad_history


class _SelectiveAttentionLayer(torch.autograd.Function):
    """projected (B, T, 4I + H) -> gated head outputs (B, T, I), the final state and the conv's new state.

    Forward, in fp32 whatever the input dtype (the chunk matmuls in `spec.compute_dtype`): u = conv(x),
    [q, k, v] = silu(u) in (3, B, H, T, D) layout (the chunk kernel's, so no further copies), q and k
    scaled to unit norm, g = -exp(A_log) softplus(decay_in + dt_bias), o = chunked(q, k, v, g),
    out = rms(o) * w * silu(gate).
    """

    @staticmethod
    def forward(ctx, projected, conv_weight, A_log, dt_bias, norm_weight, initial_state, history, spec):
        ctx.set_materialize_grads(False)
        batch, length, _ = projected.shape
        result = projected.new_empty(batch, length, spec.heads * spec.dim)
        with torch.autocast(projected.device.type, enabled=False):
            final, new_history, saved = _layer_forward(
                projected, conv_weight, A_log, dt_bias, norm_weight, initial_state, history, spec, result
            )
        ctx.save_for_backward(projected, conv_weight, history, A_log, norm_weight, *saved)
        ctx.spec, ctx.initial_dtype = spec, initial_state.dtype if initial_state is not None else None
        return result, final, new_history

    @staticmethod
    def backward(ctx, grad_result, grad_final, grad_history_out):
        projected, conv_weight, history, A_log, norm_weight, *saved = ctx.saved_tensors
        grad = torch.empty(projected.shape, device=projected.device, dtype=torch.float32)
        with torch.autocast(projected.device.type, enabled=False):
            grad_taps, grad_A_log, grad_dt_bias, grad_norm_weight, grad_initial, grad_history = _layer_backward(
                projected,
                conv_weight,
                A_log,
                norm_weight,
                history,
                ctx.spec,
                saved,
                (grad_result, grad_final, grad_history_out),
                grad,
            )
        grad_conv_weight = grad_taps.t()[:, None, :].to(conv_weight.dtype) if grad_taps is not None else None
        grad_initial = grad_initial.to(ctx.initial_dtype) if ctx.initial_dtype is not None else None
        return (
            grad.to(projected.dtype),
            grad_conv_weight,
            grad_A_log.to(A_log.dtype),
            grad_dt_bias.to(A_log.dtype),
            grad_norm_weight.to(norm_weight.dtype),
            grad_initial,
            grad_history,
            None,
        )


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
        self.scan: str | None = None  # the chunk-to-chunk scan (sla.SCANS); None: the device's choice
        self.kernels = cfg.kernels  # PyTorch's path or fla-core's kernels (kernels.use_fla)

    def log_decay(self, decay_in: torch.Tensor) -> torch.Tensor:
        """Decay inputs (..., H) -> per-head log-decays -exp(A_log) softplus(decay_in + dt_bias) <= 0, fp32."""
        return -self.A_log.float().exp() * F.softplus(decay_in.float() + self.dt_bias.float())

    def init_state(self, batch_size: int, device, dtype) -> dict:
        state = {"S": torch.zeros(batch_size, self.heads, self.head_dim, self.head_dim, device=device)}
        if self.conv is not None:
            state["conv"] = self.conv.init_state(batch_size, device, dtype)
        return state

    def _spec(self, device: torch.device) -> _LayerSpec:
        autocast = torch.is_autocast_enabled(device.type)
        # the norm weight, not in_proj's: that may be int8 (quantize.py) while the layer computes in float
        compute = torch.get_autocast_dtype(device.type) if autocast else self.out_norm_weight.dtype
        return _LayerSpec(
            self.heads, self.head_dim, self.chunk_size, self.eps, compute, self.scan or default_scan(device)
        )

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict | None]:
        """x: (B, T, D). With a state, continue from it and return the updated one."""
        projected = self.in_proj(x)  # (B, T, 4I + H)
        if kernels.use_fla(self.kernels, projected, self.head_dim):
            gated, new_state = kernels.sla_layer(self, projected, state)
            return self.out_proj(gated), new_state
        history = state.get("conv") if state is not None else None
        conv_weight = self.conv.weight if self.conv is not None else None
        gated, final, new_history = _apply(
            _SelectiveAttentionLayer,
            projected,
            conv_weight,
            self.A_log,
            self.dt_bias,
            self.out_norm_weight,
            state["S"] if state is not None else None,
            history,
            self._spec(x.device),
        )
        new_state = None
        if state is not None:
            new_state = {"S": final}
            if self.conv is not None:
                new_state["conv"] = new_history
        return self.out_proj(gated), new_state

    def step(self, x: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """x: (B, D) -> (B, D). Without autograd the state's tensors are updated in place."""
        qkv, gate, decay_in = self.in_proj(x).split([3 * self.inner, self.inner, self.heads], dim=-1)
        new_state = {}
        if self.conv is not None:
            qkv, new_state["conv"] = self.conv.step(qkv, state["conv"])
        qkv = F.silu(qkv).unflatten(-1, (3, self.heads, self.head_dim))  # (B, 3, H, Dh)
        qk = l2_normalize(qkv[:, :2])
        step = kernels.sla_step if kernels.use_fla(self.kernels, x, self.head_dim) else recurrent_step
        out, new_state["S"] = step(qk[:, 0], qk[:, 1], qkv[:, 2], self.log_decay(decay_in), state["S"])
        out = F.rms_norm(out, (self.head_dim,), self.out_norm_weight.to(out.dtype), self.eps)
        return self.out_proj(out.flatten(-2) * F.silu(gate)), new_state
