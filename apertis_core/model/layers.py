"""Small building blocks shared by the mixers: RMSNorm, gated FFNs, rotary positions, causal conv."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), None, eps)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def updatable_in_place(state: torch.Tensor) -> bool:
    """Whether a decode step may overwrite `state` instead of allocating a new one: not when autograd
    records (it may need the old value), nor for an inference-mode tensor outside inference mode (torch
    forbids it)."""
    if torch.is_grad_enabled():
        return False
    return torch.is_inference_mode_enabled() or not state.is_inference()


def mark_residual_output(linear: nn.Linear) -> nn.Linear:
    """Flag a projection that writes into the residual stream, so init scales it down with depth."""
    linear.is_residual_output = True
    return linear


class GatedFFN(nn.Module):
    """SwiGLU or GeGLU: down(act(gate(x)) * up(x)), with gate and up fused into one matmul."""

    def __init__(self, d_model: int, hidden: int, kind: str = "swiglu"):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = mark_residual_output(nn.Linear(hidden, d_model, bias=False))
        self.activation = F.silu if kind == "swiglu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.activation(gate) * up)


class Rotary:
    """Rotary position embedding (half-split layout) computed for arbitrary positions on the fly."""

    def __init__(self, dim: int, theta: float, scaling: float = 1.0):
        self.dim = dim
        self.theta = theta
        self.scaling = scaling

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (
            self.theta ** (torch.arange(0, self.dim, 2, device=positions.device, dtype=torch.float32) / self.dim)
        )
        angles = (positions.float() / self.scaling)[:, None] * inv_freq[None, :]  # (T, dim/2)
        angles = torch.cat([angles, angles], dim=-1)  # (T, dim)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, H, T, D); cos/sin: (T, D)."""
        first, second = x.chunk(2, dim=-1)
        rotated = torch.cat([-second, first], dim=-1)
        return x * cos + rotated * sin


class CausalDepthwiseConv(nn.Module):
    """Short causal depthwise convolution over time with an explicit state for step-by-step decoding.

    The state holds the last (kernel - 1) inputs, so generation reproduces the parallel output exactly.
    SLA runs the parallel form inside its fused layer function (`sla._causal_conv_into`, same weight and
    state); `forward` here is the plain version.
    """

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))
        nn.init.uniform_(self.weight, -(kernel**-0.5), kernel**-0.5)

    def init_state(self, batch_size: int, device, dtype) -> torch.Tensor:
        return torch.zeros(batch_size, self.weight.shape[0], self.kernel - 1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, T, C) -> (B, T, C), plus the new state when a state was given."""
        x = x.transpose(1, 2)  # (B, C, T)
        history = state.to(x.dtype) if state is not None else x.new_zeros(x.shape[0], x.shape[1], self.kernel - 1)
        padded = torch.cat([history, x], dim=-1)  # (B, C, K - 1 + T)
        y = F.conv1d(padded, self.weight.to(x.dtype), groups=x.shape[1])
        new_state = padded[..., -(self.kernel - 1) :] if state is not None else None
        return y.transpose(1, 2), new_state

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C) -> (B, C)."""
        window = torch.cat([state.to(x.dtype), x[:, :, None]], dim=-1)  # (B, C, K)
        y = (window * self.weight[:, 0, :].to(x.dtype)).sum(-1)
        return y, window[..., 1:]
