"""BitNet b1.58 (Ma et al. 2024): ternary weights and 8-bit activations for the linears inside the blocks.

Forward, each weight matrix W becomes RoundClip(W / s, -1, 1) * s with s = mean|W| (absmean, one scale per
matrix), and each input row x (one token) is rounded to int8 levels of its absmax: round(x / d) clamped to
[-128, 127], times d, with d = max|x| / 127. Both are applied with a straight-through estimator,
x + (q(x) - x).detach(), so training keeps full-precision latent weights and their gradients pass as if
nothing were rounded.

`use_bitlinear(blocks)` turns a built model's block linears into `BitLinear` (same parameters, so state
dicts are interchangeable with a full-precision model's) and gives the experts the same quantisers. The
embeddings, the LM head, every norm, the expert routers and the image encoder stay full precision: the
paper keeps embeddings, head and norms in high precision, and a router's few logits choose experts, where
rounding would move tokens between experts for no saving.

No extra norm before the quantised input (the paper's BitLinear carries one): the mixer, FFN and STRC
inputs are already RMS-normalised by the block's pre-norms, and per-token absmax rounding is invariant to
the row's scale, so a norm before the output projections would only rescale their outputs and change the
architecture against the full-precision model being compared with.

`ternary_parts` gives the codes and scales that apertis_core.bitnet_pack stores two bits per weight, the same
ones the forward uses, so a packed bundle runs the trained model's ternary weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .experts import AdaptiveExpertSystem

WEIGHT_EPS = 1e-5  # floor of a matrix's absmean scale (an all-zero matrix stays zero, no division by 0)
ACTIVATION_EPS = 1e-5  # floor of a token's absmax (an all-zero row stays zero)


# ---- quantisers (pure tensors) -----------------------------------------------------------------------
def ternary_parts(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in {-1, 0, 1} as int8, scale): one absmean scale per matrix over the last two dimensions,
    so an expert stack (E, K, N) gets E scales and a linear weight (out, in) one."""
    scale = weight.detach().abs().mean(dim=(-2, -1), keepdim=True).clamp(min=WEIGHT_EPS)
    codes = (weight.detach() / scale).round().clamp(-1, 1).to(torch.int8)
    return codes, scale.squeeze(-1).squeeze(-1)


def quantise_weights(weight: torch.Tensor) -> torch.Tensor:
    """The ternary weight codes * scale, in the weight's dtype (no gradient)."""
    codes, scale = ternary_parts(weight)
    return codes.to(weight.dtype) * scale[..., None, None].to(weight.dtype)


def activation_levels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels, step) of each row (the last dimension: one token): step = max|x| / 127 and the int8 levels
    round(x / step), in [-128, 127], as fp32 (no gradient)."""
    rows = x.detach().float()
    step = rows.abs().amax(dim=-1, keepdim=True).clamp_(min=ACTIVATION_EPS).div_(127.0)
    # In place on the fresh quotient (never on x): decoding runs this once per linear per token.
    return (rows / step).round_().clamp_(-128, 127), step


def quantise_activations(x: torch.Tensor) -> torch.Tensor:
    """Each row rounded to its int8 levels, back in x's dtype (no gradient)."""
    levels, step = activation_levels(x)
    return levels.mul_(step).to(x.dtype)


def straight_through(x: torch.Tensor, quantised: torch.Tensor) -> torch.Tensor:
    """`quantised` in the forward pass, the identity's gradient for `x` in the backward pass."""
    return x + (quantised - x).detach()


def _kept(weight: torch.Tensor, cache: dict, make) -> object:
    """make(weight), kept in `cache` until the weight changes (its storage or version counter moves: an
    optimizer step, a load, a .to()), so decoding does not requantise every matrix at every token."""
    key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
    hit = cache.get((id(weight), make))
    if hit is None or hit[0] != key:
        hit = cache[(id(weight), make)] = (key, make(weight))
    return hit[1]


def ternary_weight(weight: torch.Tensor, cache: dict) -> torch.Tensor:
    """The weight's ternary form for a forward pass: afresh with the straight-through estimator while
    autograd records, else kept in `cache`."""
    if torch.is_grad_enabled():
        return straight_through(weight, quantise_weights(weight))
    return _kept(weight, cache, quantise_weights)


def ternary_input(x: torch.Tensor) -> torch.Tensor:
    """An input's 8-bit form, with the straight-through estimator while autograd records."""
    quantised = quantise_activations(x)
    return straight_through(x, quantised) if torch.is_grad_enabled() else quantised


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(quantise_activations(x), codes * scale, bias) computed as integers: x's int8 levels times the
    int8 codes (out, in), summed exactly in int32 by torch's int8 matmul, then scaled once by both steps.
    The same numbers up to fp32 rounding, with a quarter of the weight bytes to read."""
    levels, step = activation_levels(x)
    # codes.t() is the (in, out) operand in the column-major layout the CPU kernel reads fastest
    summed = torch._int_mm(levels.to(torch.int8).view(-1, x.shape[-1]), codes.t())  # (tokens, out)
    out = summed.view(*x.shape[:-1], -1).float().mul_(step * scale)
    return (out if bias is None else out + bias).to(x.dtype)


# ---- modules -----------------------------------------------------------------------------------------
class BitLinear(nn.Linear):
    """nn.Linear with a ternary weight and 8-bit inputs in the forward pass; the parameter is the
    full-precision latent weight, under the same name. Inference on a CPU runs int8_linear on int8 codes
    kept beside the weight (1 byte per weight); elsewhere (training, GPUs, where torch's int8 matmul wants
    larger aligned shapes and bf16 matmuls are fast) the float form."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = self.__dict__.setdefault("_ternary_cache", {})  # plain attribute: not state, not a buffer
        if torch.is_grad_enabled() or x.device.type != "cpu" or x.numel() == 0:
            return F.linear(ternary_input(x), ternary_weight(self.weight, cache), self.bias)
        codes, scale = _kept(self.weight, cache, ternary_parts)
        return int8_linear(x, codes, scale, self.bias)


class _ExpertQuantiser:
    """The experts' weight quantiser: ternary_weight with a cache of its own for the two stacks."""

    def __init__(self):
        self.cache: dict = {}

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return ternary_weight(weight, self.cache)


def use_bitlinear(blocks: nn.Module) -> None:
    """Make every linear under `blocks` a BitLinear in place (parameters, init flags and hooks kept; only
    the forward changes) and give each expert layer the ternary quantisers, except the expert routers."""
    for name, module in blocks.named_modules():
        if type(module) is nn.Linear and name.rpartition(".")[2] != "router":
            module.__class__ = BitLinear
        elif isinstance(module, AdaptiveExpertSystem):
            module.quantise_weight, module.quantise_input = _ExpertQuantiser(), ternary_input


def ternary_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{state-dict name: parameter} of every weight that runs ternary: BitLinear weights and the expert
    stacks of expert layers that quantise."""
    found = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, BitLinear):
            found[f"{prefix}weight"] = module.weight
        elif isinstance(module, AdaptiveExpertSystem) and isinstance(module.quantise_weight, _ExpertQuantiser):
            found[f"{prefix}gate_up"], found[f"{prefix}down"] = module.gate_up, module.down
    return found
