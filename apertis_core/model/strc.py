"""State Tracking Recurrent Cell: a gated recurrence whose gates depend on the input only.

h_t = (1 - z_t) * h_{t-1} + z_t * c_t with z_t = sigmoid(.) and a positive candidate c_t (minGRU), so
h_t = a_t * h_{t-1} + b_t is a linear recurrence. Training solves it in parallel: inside short chunks in
log space (logcumsumexp), across chunks with a log-depth scan in linear space (a in (0, 1) cannot
overflow). Generation steps it in O(1) with a state of fixed width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .layers import mark_residual_output

# Short chunks keep the log-space values small, so fp32 keeps full relative precision inside a chunk.
_SCAN_CHUNK = 32


def _log_positive(x: torch.Tensor) -> torch.Tensor:
    """log g(x) for minGRU's positive map g(x) = x + 0.5 (x >= 0), sigmoid(x) (x < 0)."""
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))


def _shift(x: torch.Tensor, steps: int, fill: float) -> torch.Tensor:
    """Shift along dim 1 by `steps`, filling the front."""
    return F.pad(x[:, :-steps], (0, 0, steps, 0), value=fill)


def linear_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Inclusive scan of h_n = a_n * h_{n-1} + b_n along dim 1 (h_{-1} = 0), in log2(N) parallel steps."""
    step = 1
    while step < a.shape[1]:
        a, b = a * _shift(a, step, 1.0), b + a * _shift(b, step, 0.0)
        step *= 2
    return b


def log_space_recurrence(log_a: torch.Tensor, log_b: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """h_t = exp(log_a_t) * h_{t-1} + exp(log_b_t) for inputs (B, T, W) in fp32 -> h (B, T, W)."""
    batch, length, width = log_a.shape
    chunk = min(_SCAN_CHUNK, length)
    pad = (-length) % chunk
    if pad:  # padding comes after every real step, so it cannot affect real outputs
        log_a, log_b = F.pad(log_a, (0, 0, 0, pad)), F.pad(log_b, (0, 0, 0, pad))
    n_chunks = log_a.shape[1] // chunk
    log_a = log_a.view(batch, n_chunks, chunk, width)
    log_b = log_b.view(batch, n_chunks, chunk, width)
    decay = log_a.cumsum(2)  # (B, N, C, W), <= 0
    local = torch.exp(decay + torch.logcumsumexp(log_b - decay, dim=2))  # each chunk started from zero
    chunk_decay = decay[:, :, -1].exp()  # (B, N, W)
    chunk_end = local[:, :, -1]
    if h0 is not None:
        chunk_end = torch.cat([chunk_end[:, :1] + chunk_decay[:, :1] * h0[:, None], chunk_end[:, 1:]], dim=1)
    ends = linear_scan(chunk_decay, chunk_end)  # state at the end of each chunk
    entering = _shift(ends, 1, 0.0)
    if h0 is not None:
        entering = torch.cat([h0[:, None], entering[:, 1:]], dim=1)
    h = local + decay.exp() * entering[:, :, None]
    return h.reshape(batch, n_chunks * chunk, width)[:, :length]


class StateTrackingCell(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.width = cfg.strc_width()
        self.in_proj = nn.Linear(cfg.d_model, 3 * self.width, bias=False)  # update gate, candidate, output gate
        self.out_proj = mark_residual_output(nn.Linear(self.width, cfg.d_model, bias=False))

    def init_state(self, batch_size: int, device, dtype) -> dict:
        return {"h": torch.zeros(batch_size, self.width, device=device)}

    def _coefficients(self, x: torch.Tensor):
        update, candidate, out_gate = self.in_proj(x).float().chunk(3, dim=-1)
        log_a = -F.softplus(update)  # log(1 - z)
        log_b = -F.softplus(-update) + _log_positive(candidate)  # log(z * g(c))
        return log_a, log_b, out_gate

    def _finish(self, h: torch.Tensor, out_gate: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.out_proj((F.silu(out_gate) * h).to(dtype))

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict | None]:
        with torch.autocast(x.device.type, enabled=False):
            log_a, log_b, out_gate = self._coefficients(x.float())
            h = log_space_recurrence(log_a, log_b, state["h"] if state is not None else None)
        new_state = {"h": h[:, -1]} if state is not None else None
        return self._finish(h, out_gate, x.dtype), new_state

    def step(self, x: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        with torch.autocast(x.device.type, enabled=False):
            log_a, log_b, out_gate = self._coefficients(x.float())
            h = log_a.exp() * state["h"] + log_b.exp()
        return self._finish(h, out_gate, x.dtype), {"h": h}
