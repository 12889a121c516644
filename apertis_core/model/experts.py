"""Adaptive Expert System: a shared expert plus routed SwiGLU experts with top-k or dynamic routing.

Only the tokens routed to an expert reach it: token-expert assignments are sorted by expert and run as
one grouped matmul where torch supports it (CUDA, bf16), else as one matmul per expert over its
contiguous slice. The layer returns its auxiliary loss (load balancing + router z-loss) and keeps
per-expert utilisation of the last forward for the studio's charts.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .layers import GatedFFN


def route(probs: torch.Tensor, top_k: int, mode: str, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """probs: (N, E) router probabilities -> (weights (N, k), experts (N, k)).

    Top-k keeps k experts. Dynamic keeps experts in order of probability until their cumulative
    probability reaches `threshold` (at least one, at most k); dropped slots get weight 0.
    Kept weights are renormalised to sum to 1 per token.
    """
    weights, experts = probs.topk(top_k, dim=-1)  # (N, k), descending
    if mode == "dynamic":
        mass_before = weights.cumsum(-1) - weights
        weights = weights * (mass_before < threshold)
    return weights / weights.sum(-1, keepdim=True), experts


def _grouped_mm():
    """torch's grouped matmul (public `F.grouped_mm` in newer releases, `torch._grouped_mm` before), or None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _grouped_mm_applies(x: torch.Tensor) -> bool:
    """Whether the (bf16-only) grouped kernel serves x: on CUDA, with bf16 inputs or under bf16 autocast."""
    if not x.is_cuda or _grouped_mm() is None or x.shape[-1] % 8:  # rows must be 16-byte aligned
        return False
    if torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda") == torch.bfloat16
    return x.dtype == torch.bfloat16


class AdaptiveExpertSystem(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        width = cfg.expert_width()
        self.n_experts = cfg.n_experts
        self.top_k = cfg.moe_top_k
        self.routing = cfg.moe_routing
        self.threshold = cfg.moe_threshold
        self.noise = cfg.router_noise
        self.aux_coef = cfg.moe_aux_loss_coef
        self.z_coef = cfg.moe_z_loss_coef
        self.activation = F.silu if cfg.ffn_type == "swiglu" else F.gelu
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.gate_up = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model, 2 * width))  # x @ W layout
        self.down = nn.Parameter(torch.empty(cfg.n_experts, width, cfg.d_model))
        self.down.is_residual_output = True
        self.shared = (
            GatedFFN(cfg.d_model, width * cfg.n_shared_experts, cfg.ffn_type) if cfg.n_shared_experts else None
        )
        self.register_buffer("last_utilisation", torch.zeros(cfg.n_experts), persistent=False)
        self.register_buffer("last_experts_per_token", torch.zeros(()), persistent=False)

    def reset_parameters(self, std: float, residual_std: float) -> None:
        nn.init.normal_(self.gate_up, std=std)
        nn.init.normal_(self.down, std=residual_std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, D) -> (y (B, T, D), aux_loss scalar)."""
        flat = x.reshape(-1, x.shape[-1])  # (N, D)
        logits = self.router(flat).float()  # (N, E)
        if self.training and self.noise > 0:
            logits = logits + torch.randn_like(logits) * self.noise
        probs = logits.softmax(-1)
        weights, experts = route(probs, self.top_k, self.routing, self.threshold)
        routed = self._dispatch(flat, weights, experts)
        if self.shared is not None:
            routed = routed + self.shared(flat)
        return routed.view_as(x), self._aux_loss(logits, probs, weights, experts)

    def _dispatch(self, flat: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        n_tokens, k = experts.shape
        token_of_slot = torch.arange(n_tokens, device=flat.device).repeat_interleave(k)
        slot_weight, slot_expert = weights.flatten(), experts.flatten()
        if self.routing == "dynamic":  # dropped slots never reach an expert
            kept = slot_weight > 0
            token_of_slot, slot_weight, slot_expert = token_of_slot[kept], slot_weight[kept], slot_expert[kept]
        order = slot_expert.argsort(stable=True)
        token_of_slot, slot_weight = token_of_slot[order], slot_weight[order]
        counts = torch.bincount(slot_expert, minlength=self.n_experts)
        with torch.no_grad():
            self.last_utilisation.copy_(counts.float() / max(n_tokens, 1))
            self.last_experts_per_token.copy_(counts.sum().float() / max(n_tokens, 1))
        inputs = flat[token_of_slot]  # (M, D), grouped by expert
        outputs = self._experts(inputs, counts)
        combined = flat.new_zeros(flat.shape, dtype=outputs.dtype)
        return combined.index_add_(0, token_of_slot, outputs * slot_weight[:, None].to(outputs.dtype))

    def _experts(self, inputs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Run each expert's SwiGLU on its contiguous slice of `inputs` (M, D)."""
        if _grouped_mm_applies(inputs):
            return self._experts_grouped(inputs.to(torch.bfloat16), counts)
        # One unbind per weight, not an index per expert: an index gives the weight a full-size zero
        # gradient per expert in backward (E fills and adds of the whole tensor); unbind stacks once.
        gate_up, down = self.gate_up.to(inputs.dtype).unbind(0), self.down.to(inputs.dtype).unbind(0)
        pieces = []
        for expert, chunk in enumerate(inputs.split(counts.tolist())):
            if chunk.shape[0] == 0:
                continue
            gate, up = (chunk @ gate_up[expert]).chunk(2, dim=-1)
            pieces.append((self.activation(gate) * up) @ down[expert])
        return torch.cat(pieces) if pieces else inputs.new_zeros(0, inputs.shape[-1])

    def _experts_grouped(self, inputs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The same with two grouped matmuls (bf16, CUDA). Operands: inputs (M, K) row-major, weights
        (E, K, N) as stored (x @ W layout), offsets = end row of each expert's slice (int32). The kernel
        needs 16-byte aligned row strides, so an expert width that is not a multiple of 8 is padded with
        zero hidden units (they add nothing and their gradients are dropped)."""
        grouped_mm = _grouped_mm()
        width = self.down.shape[1]
        pad = -width % 8
        gate_up, down = self.gate_up.to(torch.bfloat16), self.down.to(torch.bfloat16)
        if pad:
            gate, up = gate_up.chunk(2, dim=-1)  # (E, D, W) each
            gate_up = torch.cat([F.pad(gate, (0, pad)), F.pad(up, (0, pad))], dim=-1)  # (E, D, 2 (W + pad))
            down = F.pad(down, (0, 0, 0, pad))  # (E, W + pad, D)
        offsets = counts.cumsum(0).to(torch.int32)
        hidden = grouped_mm(inputs, gate_up, offs=offsets)  # (M, 2 (W + pad))
        gate, up = hidden.chunk(2, dim=-1)
        return grouped_mm(self.activation(gate) * up, down, offs=offsets)  # (M, D)

    def _aux_loss(self, logits, probs, weights, experts) -> torch.Tensor:
        # Switch-Transformer balance loss: E * sum_e (share of assignments to e) * (mean router prob of e).
        # It is 1 for a perfectly balanced router and E for a collapsed one.
        assigned = torch.zeros_like(probs).scatter_(1, experts, (weights > 0).float())
        share = assigned.sum(0) / assigned.sum().clamp_min(1.0)
        balance = self.n_experts * (share * probs.mean(0)).sum()
        z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return self.aux_coef * balance + self.z_coef * z_loss
