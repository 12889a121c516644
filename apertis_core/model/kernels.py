"""Kernel choice: flash-linear-attention's Triton kernels (fla-core) for SLA, its short conv and STRC on CUDA,
the PyTorch paths everywhere else.

`use_fla(choice, x)` decides per call from the model's `kernels` field (or APERTIS_KERNELS), the tensor's
device and dtype, and whether fla-core is installed. fla is imported only inside the functions below that
run it, so on a CPU or an Apple GPU it is never imported. Both paths read the same parameters and the same
state layout, so a bundle trained on either runs on either.

How Apertis maps onto fla-core 0.6 (checked against the references in naive.py, tests/test_kernels.py):
- SLA core. S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = q_t^T S_t is simple GLA with a per-head scalar gate:
  chunk_simple_gla(q, k, v, g, scale=1.0, initial_state=S, output_final_state=...) with q, k, v [B, T, H, D]
  (q and k are unit-norm, so no 1/sqrt(D) scale), g [B, T, H] the log-decay (fp32, <= 0) and S [B, H, Dk, Dv]
  fp32, fla's [N, H, K, V] layout. Decode: fused_recurrent_simple_gla, same arguments with T = 1.
- Short conv: causal_conv1d(x [B, T, C], weight [C, K] = conv.weight[:, 0], activation="silu") is the
  depthwise conv plus silu, taps in nn.Conv1d's order. fla's conv state holds the last K inputs [B, C, K],
  Apertis's the last K - 1 [B, C, K - 1]: fla's oldest entry is never read, so ours is zero-padded in front
  on the way in and fla's [..., 1:] on the way out. The weight stays a (C, 1, K) `conv.weight`, which is
  exactly fla's ShortConvolution parameter, so state dicts are the same whichever path trained them.
- Norms: l2norm (x / sqrt(|x|^2 + 1e-6), as layers.l2_normalize) on q and k; rms_norm_gated(o, gate, w,
  activation="swish", eps) = rms_norm(o) * w * silu(gate), the output norm and gate.
- STRC: h_t = (1 - z_t) h_{t-1} + z_t c_t is HGRN's h_t = exp(g_t) h_{t-1} + x_t with x_t = z_t c_t and
  g_t = log(1 - sigmoid(u_t)) = -softplus(u_t) (smooth, where log(1 - z) has an infinite slope at z = 1):
  chunk_hgrn without a start state, fused_recurrent_hgrn with one, because chunk_hgrn's backward gives no
  gradients for the start and the final state.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

from .layers import updatable_in_place

KERNELS = ("auto", "torch", "fla")
ENV_VAR = "APERTIS_KERNELS"  # overrides every model's `kernels` field, e.g. to rule fla out on one machine
INSTALL_HINT = "pip install 'apertis-studio[cuda]' (or pip install fla-core)"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what fla's kernels take
_MAX_HEAD_DIM = 256  # fla's chunk kernels hold one head's K x V state block on chip


def chosen(choice: str) -> str:
    """The kernel choice in force: APERTIS_KERNELS when set, else `choice` (the model's `kernels` field)."""
    value = os.environ.get(ENV_VAR, "").strip().lower() or choice
    if value not in KERNELS:
        raise ValueError(f"{ENV_VAR}={value!r} is not a kernel choice: use one of {', '.join(KERNELS)}")
    return value


def use_fla(choice: str, x: torch.Tensor, head_dim: int = 0) -> bool:
    """Whether this call runs fla's kernels: never for "torch"; for "auto" where they can run; "fla" raises
    (naming what is missing) where they cannot."""
    mode = chosen(choice)
    if mode == "torch":
        return False
    reason = fla_unusable(x, head_dim, allow_interpreter=mode == "fla")
    if reason is not None and mode == "fla":
        raise RuntimeError(
            f"kernels='fla' was asked for, but {reason}. Set the model's kernels to 'auto' (or "
            f"{ENV_VAR}=auto) to run the PyTorch path instead."
        )
    return reason is None


def fla_unusable(x: torch.Tensor, head_dim: int = 0, allow_interpreter: bool = False) -> str | None:
    """Why fla's kernels cannot take x, or None. `allow_interpreter`: under TRITON_INTERPRET=1 Triton runs
    kernels on CPU tensors in Python, which is how tests check this path without a GPU; "auto" never takes
    it (far slower than PyTorch)."""
    interpreted = allow_interpreter and os.environ.get("TRITON_INTERPRET") == "1"
    if not x.is_cuda and not interpreted:
        return f"the tensors are on {x.device.type} and fla's Triton kernels need CUDA"
    if x.dtype not in _DTYPES:
        return f"fla's kernels take fp32, fp16 or bf16, not {x.dtype}"
    if head_dim > _MAX_HEAD_DIM:
        return f"the head dimension {head_dim} is above fla's {_MAX_HEAD_DIM}"
    if not fla_installed():
        return f"fla-core is not installed ({INSTALL_HINT})"
    return None


_INSTALLED: list[bool] = []  # fla_installed's answer once looked up


@torch.compiler.assume_constant_result  # torch.compile calls it once instead of tracing the import machinery
def fla_installed() -> bool:
    """fla-core and Triton are importable (found without importing them; looked up once per process)."""
    if not _INSTALLED:
        _INSTALLED.append(all(importlib.util.find_spec(name) is not None for name in ("fla", "triton")))
    return _INSTALLED[0]


# ---- SLA -----------------------------------------------------------------------------------------------------
@torch.compiler.disable  # fla's autograd Functions launch their own Triton kernels: nothing for Inductor to fuse
def sla_layer(layer, projected: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, dict | None]:
    """A `SelectiveLinearAttention` between its two projections on fla's kernels, the computation of
    sla._SelectiveAttentionLayer: projected (B, T, 4I + H) -> gated outputs (B, T, I) and, with a state,
    the new one ({"S", "conv"} as the layer's init_state makes them)."""
    from fla.modules.fused_norm_gate import rms_norm_gated
    from fla.modules.l2norm import l2norm
    from fla.ops.simple_gla import chunk_simple_gla

    heads, dim, inner = layer.heads, layer.head_dim, layer.inner
    qkv, gate, decay_in = projected.split([3 * inner, inner, heads], dim=-1)
    new_state = {} if state is not None else None
    if layer.conv is not None:
        qkv, history = short_conv(qkv, layer.conv.weight, state["conv"] if state is not None else None)
        if new_state is not None:
            new_state["conv"] = history
    else:
        qkv = F.silu(qkv)
    q, k, v = qkv.unflatten(-1, (3, heads, dim)).unbind(2)  # (B, T, H, D) each
    out, final = chunk_simple_gla(
        l2norm(q),
        l2norm(k),
        v,
        g=layer.log_decay(decay_in),  # (B, T, H) fp32
        scale=1.0,
        initial_state=state["S"] if state is not None else None,
        output_final_state=state is not None,
    )  # out: (B, T, H, D)
    if new_state is not None:
        new_state["S"] = final
    gate = gate.unflatten(-1, (heads, dim))
    gated = rms_norm_gated(out, gate, layer.out_norm_weight, None, activation="swish", eps=layer.eps)
    return gated.flatten(-2), new_state


def short_conv(
    x: torch.Tensor, weight: torch.Tensor, history: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """silu(causal depthwise conv) on fla's kernel: x (B, T, C), weight (C, 1, K), history (B, C, K - 1) or
    None -> (y (B, T, C), the new history when one was given)."""
    from fla.modules.convolution import causal_conv1d

    initial = F.pad(history.to(x.dtype), (1, 0)) if history is not None else None  # (B, C, K): fla's layout
    y, final = causal_conv1d(
        x, weight=weight[:, 0], initial_state=initial, output_final_state=history is not None, activation="silu"
    )
    return y, (final[..., 1:].to(history.dtype) if history is not None else None)


@torch.compiler.disable
def sla_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """sla.recurrent_step on fused_recurrent_simple_gla: q, k (B, H, Dk), v (B, H, Dv), log_decay (B, H),
    state (B, H, Dk, Dv) fp32 -> (out (B, H, Dv) in v's dtype, state). Without autograd the state is
    overwritten in place (a captured decode graph relies on its address staying the same)."""
    from fla.ops.simple_gla import fused_recurrent_simple_gla

    out, final = fused_recurrent_simple_gla(
        q[:, None],
        k[:, None],
        v[:, None],
        g=log_decay[:, None],
        scale=1.0,
        initial_state=state,
        output_final_state=True,
    )
    if updatable_in_place(state):
        final = state.copy_(final)
    return out[:, 0].to(v.dtype), final


# ---- STRC ----------------------------------------------------------------------------------------------------
@torch.compiler.disable
def hgrn(x: torch.Tensor, log_keep: torch.Tensor, h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = exp(log_keep_t) h_{t-1} + x_t over (B, T, W) fp32, from h0 (B, W) or zeros -> (h (B, T, W),
    h at the last step)."""
    from fla.ops.hgrn import chunk_hgrn, fused_recurrent_hgrn

    if h0 is None:
        h, _ = chunk_hgrn(x, log_keep)
        return h, h[:, -1]
    return fused_recurrent_hgrn(x, log_keep, h0.float(), output_final_state=True)
