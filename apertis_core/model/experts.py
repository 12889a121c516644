"""Adaptive Expert System: a shared expert plus routed SwiGLU experts with top-k or dynamic routing.

Only the tokens routed to an expert reach it: token-expert assignments are sorted by expert and run either
as two grouped matmuls ("grouped": counts and offsets stay on the device, so nothing waits for the host;
the default on CUDA with bf16) or as two matmuls per expert over its contiguous slice ("loop": the
default elsewhere). Both are selectable on any device (`dispatch`), so tests prove each against the
per-token reference in `naive.py` on a CPU. The layer returns its auxiliary loss (load balancing +
router z-loss) and keeps per-expert utilisation of the last forward for the studio's charts. `step`
serves a few tokens at a time (generation) without sorting, statistics or auxiliary loss.
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


DISPATCHES = ("loop", "grouped")


def _grouped_mm_applies(x: torch.Tensor) -> bool:
    """Whether the grouped kernel is the default for x: on CUDA (where it is bf16-only), with bf16 inputs or
    under bf16 autocast. On a CPU torch's grouped kernel runs any dtype but is no faster than the loop."""
    if not x.is_cuda or _grouped_mm() is None or x.shape[-1] % 8:  # rows must be 16-byte aligned
        return False
    if torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda") == torch.bfloat16
    return x.dtype == torch.bfloat16


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


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
        self.dispatch: str | None = None  # "loop" or "grouped" (DISPATCHES); None: the device's choice
        # What the expert matmuls see of the weight stacks and their inputs; BitNet (bitnet.use_bitlinear)
        # swaps in its ternary-weight and int8-input quantisers. The router always sees x as it is.
        self.quantise_weight = self.quantise_input = _unchanged
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
        grouped = (self.dispatch or ("grouped" if _grouped_mm_applies(flat) else "loop")) == "grouped"
        slot_weight, slot_expert = weights.flatten(), experts.flatten()  # (N k,)
        kept = slot_weight > 0 if self.routing == "dynamic" else None  # dynamic routing drops weight-0 slots
        counts = self._count(slot_expert, kept)
        with torch.no_grad():
            self.last_utilisation.copy_(counts.float() / max(n_tokens, 1))
            self.last_experts_per_token.copy_(counts.sum().float() / max(n_tokens, 1))
        token_of_slot = torch.arange(n_tokens, device=flat.device).repeat_interleave(k)
        if kept is not None and not grouped:  # dropped slots never reach an expert
            token_of_slot, slot_weight, slot_expert = token_of_slot[kept], slot_weight[kept], slot_expert[kept]
        elif kept is not None:  # grouped: shapes stay fixed (no host sync); dropped slots run with weight 0
            counts = self._count(slot_expert, None)
        order = slot_expert.argsort(stable=True)
        token_of_slot, slot_weight = token_of_slot[order], slot_weight[order]
        inputs = self.quantise_input(flat)[token_of_slot]  # (M, D), grouped by expert
        if grouped:
            outputs = self._experts_grouped(inputs, counts, slot_weight)
        else:
            outputs = self._experts(inputs, counts, slot_weight)
        combined = flat.new_zeros(flat.shape, dtype=outputs.dtype)
        return combined.index_add_(0, token_of_slot, outputs)

    def _count(self, slot_expert: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
        """Slots per expert (E,), counting only `kept` ones when given, computed on the device (bincount
        would wait for the host to size its output)."""
        ones = kept.long() if kept is not None else torch.ones_like(slot_expert)
        return torch.zeros(self.n_experts, dtype=torch.long, device=slot_expert.device).index_add_(0, slot_expert, ones)

    def _experts(self, inputs: torch.Tensor, counts: torch.Tensor, slot_weight: torch.Tensor) -> torch.Tensor:
        """Run each expert's SwiGLU on its contiguous slice of `inputs` (M, D), outputs scaled by the
        slots' routing weights (folded into the hidden activations, which are narrower than the output)."""
        # One unbind per weight, not an index per expert: an index gives the weight a full-size zero
        # gradient per expert in backward (E fills and adds of the whole tensor); unbind stacks once.
        gate_up, down = (self.quantise_weight(w).to(inputs.dtype).unbind(0) for w in (self.gate_up, self.down))
        sizes = counts.tolist()
        scale = slot_weight[:, None].to(inputs.dtype).split(sizes)
        pieces = []
        # split, not slicing: a slice's backward fills a zero tensor of the whole input per expert
        for expert, chunk in enumerate(inputs.split(sizes)):
            if chunk.shape[0] == 0:
                continue
            gate, up = (chunk @ gate_up[expert]).chunk(2, dim=-1)
            pieces.append(self.quantise_input(self.activation(gate) * up * scale[expert]) @ down[expert])
        if not pieces:
            return inputs.new_zeros(0, self.down.shape[-1])
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def _experts_grouped(self, inputs: torch.Tensor, counts: torch.Tensor, slot_weight: torch.Tensor) -> torch.Tensor:
        """The same with two grouped matmuls, offsets computed on the device. On CUDA the kernel is
        bf16-only; on a CPU it runs in the inputs' dtype. Operands: inputs (M, K) row-major, weights
        (E, K, N) as stored (x @ W layout), offsets = end row of each expert's slice (int32). The kernel
        needs 16-byte aligned row strides, so an expert width that is not a multiple of 8 is padded with
        zero hidden units (they add nothing and their gradients are dropped)."""
        grouped_mm = _grouped_mm()
        dtype = torch.bfloat16 if inputs.is_cuda else inputs.dtype
        inputs = inputs.to(dtype)
        width = self.down.shape[1]
        pad = -width % 8
        gate_up, down = self.quantise_weight(self.gate_up).to(dtype), self.quantise_weight(self.down).to(dtype)
        if pad:
            gate, up = gate_up.chunk(2, dim=-1)  # (E, D, W) each
            gate_up = torch.cat([F.pad(gate, (0, pad)), F.pad(up, (0, pad))], dim=-1)  # (E, D, 2 (W + pad))
            down = F.pad(down, (0, 0, 0, pad))  # (E, W + pad, D)
        offsets = counts.cumsum(0).to(torch.int32)
        hidden = grouped_mm(inputs, gate_up, offs=offsets)  # (M, 2 (W + pad))
        gate, up = hidden.chunk(2, dim=-1)
        scaled = self.activation(gate) * up * slot_weight[:, None].to(dtype)
        return grouped_mm(self.quantise_input(scaled), down, offs=offsets)  # (M, D)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, D) for a few tokens (generation) -> y (N, D): each token through its own experts, no
        sorting, no statistics, no auxiliary loss. With the "loop" dispatch the experts are picked by index
        on the host; with "grouped" their weights are gathered on the device (no host sync, so the step
        can be graphed). By default a CPU loops and every other device gathers, whatever the dtype."""
        if x.shape[0] * self.top_k > self.n_experts:  # a wide batch: the sorted dispatch is cheaper
            return self.forward(x)[0]
        probs = self.router(x).float().softmax(-1)  # (N, E); no router noise: this is inference
        weights, experts = route(probs, self.top_k, self.routing, self.threshold)  # (N, k)
        inputs = self.quantise_input(x)
        all_gate_up, all_down = self.quantise_weight(self.gate_up), self.quantise_weight(self.down)
        if (self.dispatch or ("loop" if x.device.type == "cpu" else "grouped")) == "loop":
            rows = []
            for token, chosen in enumerate(experts.tolist()):
                row, out = inputs[token : token + 1], None
                for slot, expert in enumerate(chosen):
                    gate, up = (row @ all_gate_up[expert].to(x.dtype)).chunk(2, dim=-1)
                    hidden = self.activation(gate) * up * weights[token, slot].to(x.dtype)
                    term = self.quantise_input(hidden) @ all_down[expert].to(x.dtype)
                    out = term if out is None else out + term
                rows.append(out)
            routed = torch.cat(rows) if len(rows) > 1 else rows[0]
        else:
            gate_up = all_gate_up[experts].to(x.dtype)  # (N, k, D, 2W)
            gate, up = (inputs[:, None, None, :] @ gate_up).chunk(2, dim=-1)  # (N, k, 1, W)
            hidden = self.activation(gate) * up * weights[..., None, None].to(x.dtype)
            routed = (self.quantise_input(hidden) @ all_down[experts].to(x.dtype)).sum(1)[:, 0]  # (N, D)
        if self.shared is not None:
            routed = routed + self.shared(x)
        return routed

    def _aux_loss(self, logits, probs, weights, experts) -> torch.Tensor:
        # Switch-Transformer balance loss: E * sum_e (share of assignments to e) * (mean router prob of e).
        # It is 1 for a perfectly balanced router and E for a collapsed one.
        assigned = torch.zeros_like(probs).scatter_(1, experts, (weights > 0).float())
        share = assigned.sum(0) / assigned.sum().clamp_min(1.0)
        balance = self.n_experts * (share * probs.mean(0)).sum()
        z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        return self.aux_coef * balance + self.z_coef * z_loss
