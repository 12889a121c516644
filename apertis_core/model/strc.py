"""State Tracking Recurrent Cell: a gated recurrence whose gates depend on the input only.

h_t = (1 - z_t) * h_{t-1} + z_t * c_t with z_t = sigmoid(.) and a positive candidate c_t (minGRU), so
h_t = a_t * h_{t-1} + b_t is a linear recurrence with a in (0, 1) and b > 0. Training runs it in linear
space as a chunked scan (a loop inside chunks of about sqrt(T) steps, all chunks at once, then a loop
across chunks): every product stays in (0, 1), so nothing overflows, and it costs O(T) work in about
2 sqrt(T) small ops, where the former log-space form spent most of the layer's time in `logcumsumexp`.
Gates, scan and output gate are one autograd Function with a hand-written backward (a reverse scan).
Generation steps it in O(1) with a state of fixed width. On CUDA with fla-core installed the scan runs on
fla's HGRN kernels instead (`_fla_recurrence`, `kernels.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .config import ModelConfig
from .layers import mark_residual_output, updatable_in_place


def _scan_chunk_length(length: int) -> int:
    """A power of two near sqrt(T): the inner and the outer loop then take about the same number of steps."""
    return 1 << max(0, round(math.log2(max(length, 1)) / 2))


def _scan_(a: torch.Tensor, b: torch.Tensor, start: torch.Tensor | None, reverse: bool = False) -> torch.Tensor:
    """In place over b (B, T, W), fp32: b becomes h with h_t = a_t h_{t-1} + b_t, h_{-1} = start (or 0).

    reverse walks from the last step to the first (h_t = a_t h_{t+1} + b_t). Returns b.
    """
    batch, length, width = b.shape
    chunk = _scan_chunk_length(length)
    pad = -length % chunk
    h = b
    if pad:  # padding after the real steps (before them when reversed): a = 1, b = 0 passes h through
        a, h = F.pad(a, (0, 0, 0, pad), value=1.0), F.pad(b, (0, 0, 0, pad))
    n_chunks = h.shape[1] // chunk
    a4, h4 = a.view(batch, n_chunks, chunk, width), h.view(batch, n_chunks, chunk, width)
    # decay: the product of a from the chunk's entry up to each step (one cumprod; flipped when reversed)
    decay = a4.flip(2).cumprod(2).flip(2) if reverse else a4.cumprod(2)
    inner = range(chunk - 1, -1, -1) if reverse else range(chunk)
    previous = None
    for c in inner:  # every chunk at once, one step at a time
        if previous is not None:
            h4[:, :, c].addcmul_(a4[:, :, c], h4[:, :, previous])
        previous = c
    last = previous
    # The state entering each chunk, chunk by chunk; then each step adds its decayed share of it.
    entering = torch.empty(batch, n_chunks, width, device=b.device, dtype=b.dtype)
    order = range(n_chunks - 1, -1, -1) if reverse else range(n_chunks)
    before = None
    for n in order:
        if before is None:
            entering[:, n] = start if start is not None else 0.0
        else:
            torch.addcmul(h4[:, before, last], decay[:, before, last], entering[:, before], out=entering[:, n])
        before = n
    if n_chunks > 1 or start is not None:
        h4.addcmul_(decay, entering[:, :, None])
    if pad:
        b.copy_(h[:, :length])
    return b


def _gates(projected: torch.Tensor):
    """(B, T, 3W) -> z = sigmoid(update), g(candidate) (minGRU's positive map: x + 0.5 for x >= 0, else
    sigmoid(x)), out_gate (a view); all fp32."""
    update, candidate, out_gate = projected.float().chunk(3, dim=-1)
    z = torch.sigmoid(update)
    positive = torch.where(candidate >= 0, candidate + 0.5, torch.sigmoid(candidate))
    return z, positive, out_gate


def _recurrence_forward(projected, h0, y):
    """`_GatedRecurrence.forward`'s work: writes y (B, T, W); returns the last h and what the backward
    needs."""
    z, positive, out_gate = _gates(projected)
    h = _scan_(1.0 - z, z * positive, h0.float() if h0 is not None else None)
    torch.mul(F.silu(out_gate), h, out=y)
    return h[:, -1].clone(), (z, positive, h)  # a copy: an output must not be a view of a saved tensor


def _recurrence_backward(projected, h0, saved, grad_y, grad_last, grad):
    """`_GatedRecurrence.backward`'s work: writes the projection's gradient into grad (B, T, 3W) fp32;
    returns h0's gradient (fp32) or None."""
    z, positive, h = saved
    width = h.shape[-1]
    _, candidate, out_gate = projected.float().chunk(3, dim=-1)
    grad_update, grad_candidate, grad_out_gate = grad.split(width, dim=-1)
    if grad_y is None:
        grad_y = torch.zeros_like(h)
    torch.ops.aten.silu_backward.grad_input(grad_y * h, out_gate, grad_input=grad_out_gate)
    grad_h = grad_y * F.silu(out_gate)  # through y = silu(o) h
    if grad_last is not None:
        grad_h[:, -1] += grad_last
    a_next = torch.empty_like(z)  # a_{t+1}: what carries h_t into h_{t+1}; none after the last step
    torch.sub(1.0, z[:, 1:], out=a_next[:, :-1])
    a_next[:, -1] = 0.0
    grad_h = _scan_(a_next, grad_h, None, reverse=True)
    h_before = torch.empty_like(h)
    h_before[:, 1:] = h[:, :-1]
    h_before[:, 0] = h0 if h0 is not None else 0.0
    grad_z = grad_h * (positive - h_before)
    torch.mul(grad_z, z * (1.0 - z), out=grad_update)
    # g'(c) = 1 for c >= 0, else sigmoid(c) (1 - sigmoid(c)) = g (1 - g)
    slope = torch.where(candidate >= 0, 1.0, positive * (1.0 - positive))
    torch.mul(grad_h * z, slope, out=grad_candidate)
    return (1.0 - z[:, 0]) * grad_h[:, 0] if h0 is not None else None


class _GatedRecurrence(torch.autograd.Function):
    """projected (B, T, 3W) = [update, candidate, out_gate], h0 (B, W) or None ->
    y = silu(out_gate) * h (B, T, W) and h at the last step, with h_t = (1 - z_t) h_{t-1} + z_t g(c_t).

    Backward (gb = dL/dh_t in total, a reverse scan of dL/dh_t's direct part with a_{t+1}):
    dz = gb (g - h_{t-1}), dupdate = dz z (1 - z), dcandidate = gb z g'(c), dout_gate = dy h silu'(o);
    the three land in one (B, T, 3W) gradient, so the input projection's backward sees one tensor.
    """

    @staticmethod
    def forward(ctx, projected, h0):
        ctx.set_materialize_grads(False)
        batch, length, width = projected.shape[0], projected.shape[1], projected.shape[2] // 3
        y = torch.empty(batch, length, width, device=projected.device, dtype=torch.float32)
        last, saved = _recurrence_forward(projected, h0, y)
        ctx.save_for_backward(projected, h0, *saved)
        return y, last

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        projected, h0, *saved = ctx.saved_tensors
        grad = torch.empty(projected.shape, device=projected.device, dtype=torch.float32)
        grad_h0 = _recurrence_backward(projected, h0, saved, grad_y, grad_last, grad)
        if grad_h0 is not None:
            grad_h0 = grad_h0.to(h0.dtype) if ctx.needs_input_grad[1] else None
        return grad.to(projected.dtype), grad_h0


def gated_recurrence(projected: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The STRC core: (B, T, 3W) projected input, optional (B, W) start -> (silu(out_gate) * h, last h), fp32."""
    return _apply(projected, h0)


@torch.compiler.disable
def _apply(projected, h0):
    """Left out of torch.compile graphs: the scan writes into buffers (`out=`, in place), which Inductor
    does not take."""
    return _GatedRecurrence.apply(projected, h0)


def _fla_recurrence(projected: torch.Tensor, h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`gated_recurrence` on fla's HGRN kernels: h_t = (1 - z_t) h_{t-1} + z_t g(c_t) is HGRN's
    h_t = exp(a_t) h_{t-1} + x_t with x_t = z_t g(c_t) and a_t = log(1 - sigmoid(u_t)) = -softplus(u_t)."""
    z, positive, out_gate = _gates(projected)
    log_keep = -F.softplus(projected[..., : z.shape[-1]].float())  # smooth where log(1 - z) is not, at z = 1
    h, last = kernels.hgrn(z * positive, log_keep, h0)
    return F.silu(out_gate) * h, last


class StateTrackingCell(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.width = cfg.strc_width()
        self.in_proj = nn.Linear(cfg.d_model, 3 * self.width, bias=False)  # update gate, candidate, output gate
        self.out_proj = mark_residual_output(nn.Linear(self.width, cfg.d_model, bias=False))
        self.kernels = cfg.kernels  # PyTorch's scan or fla-core's HGRN kernels (kernels.use_fla)

    def init_state(self, batch_size: int, device, dtype) -> dict:
        return {"h": torch.zeros(batch_size, self.width, device=device)}

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict | None]:
        with torch.autocast(x.device.type, enabled=False):  # gates and state in fp32
            projected = self.in_proj(x.float())
            recurrence = _fla_recurrence if kernels.use_fla(self.kernels, projected) else gated_recurrence
            gated, last = recurrence(projected, state["h"] if state is not None else None)
        return self.out_proj(gated.to(x.dtype)), ({"h": last} if state is not None else None)

    def step(self, x: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """x: (B, D) -> (B, D). Without autograd (generation) the state is updated in place."""
        with torch.autocast(x.device.type, enabled=False):
            z, positive, out_gate = _gates(self.in_proj(x.float()))
            h = state["h"]  # (1 - z) h + z g(c):
            h = h.lerp_(positive, z) if updatable_in_place(h) else torch.lerp(h, positive, z)
        return self.out_proj((F.silu(out_gate) * h).to(x.dtype)), {"h": h}
