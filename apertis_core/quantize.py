"""Inference precision: int8 weights (one fp32 scale per output channel) for the CPU, bf16/fp16 for a GPU.

`quantize_model` swaps, in place, the linears inside the blocks, the output head and the embedding (which
shares the head's int8 matrix when they are tied) for int8 modules. Routers, the routed experts' weight
stacks, norms, the conv and the vision encoder stay floating point: routing flips on small rounding, the
experts have no int8 kernel here, and the rest is small or runs once per image. On a CPU the int8 matmuls
are PyTorch's own dynamic-quantisation kernels (fbgemm/oneDNN: activations quantised per call, int8 x int8
into int32); on the CPU here they beat fp32 and torchao's int8 weight-only kernels (benchmarks/generate.py,
docs/INFERENCE.md). Elsewhere (CUDA, a CPU build without them) the weight is dequantised for each call,
which is right and small in memory but not faster.

A bundle saved from an int8 model keeps the int8 matrices and their scales in model.safetensors (I8 and
F32) and records "quantization": "int8" in config.json; load_bundle builds the int8 modules before loading.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model.strc import StateTrackingCell

QUANTIZATIONS = ("none", "int8")
CONFIG_KEY = "quantization"  # in a bundle's config.json, beside the model settings
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_kernels_work: bool | None = None  # whether this torch packs int8 weights for its CPU kernels; found on first use


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) float -> int8 codes (rows, cols) and fp32 scales (rows,): symmetric, one scale per row."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # an all-zero row keeps a harmless scale
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def _int8_weight(rows: int, cols: int, device) -> nn.Parameter:
    # A frozen parameter, not a buffer: parameter counts, tied-weight bookkeeping and bundle checks treat it as
    # the weight it replaces (under the same state-dict name).
    return nn.Parameter(torch.zeros(rows, cols, dtype=torch.int8, device=device), requires_grad=False)


def _pack(codes: torch.Tensor, scale: torch.Tensor) -> Any:
    """The weight in the layout of PyTorch's CPU int8 kernels, or None where this build has none."""
    global _kernels_work
    if _kernels_work is False:
        return None
    zero = torch.zeros(codes.shape[0], dtype=torch.long)
    try:
        with warnings.catch_warnings():  # torch marks its quantised tensors deprecated; the kernels remain
            warnings.simplefilter("ignore")
            quantized = torch._make_per_channel_quantized_tensor(codes.cpu(), scale.double().cpu(), zero, 0)
            packed = torch.ops.quantized.linear_prepack(quantized, None)
    except (RuntimeError, AttributeError, NotImplementedError):  # no quantised engine in this build
        _kernels_work = False
        return None
    _kernels_work = True
    return packed


class Int8Linear(nn.Module):
    """A bias-free linear layer whose weight is int8 with one fp32 scale per output channel."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _int8_weight(out_features, in_features, device)
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        self._packed: tuple[tuple, Any] | None = None  # (which weight it was made from, the packed weight)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        module = cls(linear.in_features, linear.out_features, device=linear.weight.device)
        module.weight.data, module.weight_scale.data = int8_rows(linear.weight)
        return module.train(linear.training)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale.float()[:, None]

    def _kernel_weight(self) -> Any:
        """The packed weight, re-packed whenever the weight changed (a load, a move)."""
        key = (self.weight.data_ptr(), self.weight._version, self.weight_scale.data_ptr(), self.weight_scale._version)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, _pack(self.weight, self.weight_scale))
        return self._packed[1]

    def forward(self, x: torch.Tensor, use_kernels: bool = True) -> torch.Tensor:
        """`use_kernels=False` takes the dequantising path a GPU takes, so a CPU test can check it."""
        if self.training and torch.is_grad_enabled():  # frozen int8 weights would silently not learn
            raise ValueError(
                "this model has int8 weights (an int8 bundle) and cannot be trained or fine-tuned; start from "
                "the fp32 bundle it was exported from"
            )
        packed = self._kernel_weight() if use_kernels and x.device.type == "cpu" else None
        if packed is None:
            return F.linear(x, self.dequantized().to(x.dtype))
        # reduce_range: 7-bit activations, PyTorch's default for x86, where 8 bits can saturate without VNNI
        return torch.ops.quantized.linear_dynamic(x.float().contiguous(), packed, reduce_range=True).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows with a scale each; tied to an Int8Linear head, it shares both."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None):
        super().__init__()
        self.weight = _int8_weight(num_embeddings, embedding_dim, device)
        self.register_buffer("weight_scale", torch.ones(num_embeddings, device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(self.weight_scale.dtype) * self.weight_scale[ids][..., None]


def _int8_embedding(embed: nn.Embedding, head: Int8Linear | None) -> Int8Embedding:
    module = Int8Embedding(embed.num_embeddings, embed.embedding_dim, device=embed.weight.device).train(embed.training)
    if head is not None:  # tied: one int8 matrix and one scale per row serve both
        module.weight = head.weight
        module.weight_scale = head.weight_scale
    else:
        module.weight.data, module.weight_scale.data = int8_rows(embed.weight)
    return module


def quantize_model(model: nn.Module, quantization: str = "int8") -> nn.Module:
    """Swap the model's linears (see the module docstring) for int8 ones made from their weights, in place;
    returns the model. On a model built on the meta device it only changes the layout (load_bundle)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if quantization == "none" or quantization_of(model) == quantization:
        return model
    if getattr(model.config, "bitnet", False):
        raise ValueError("this is a BitNet model: its block weights are ternary already; run it without --quantize")
    for parent in model.blocks.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear and child.bias is None and name != "router":
                setattr(parent, name, Int8Linear.from_float(child))
    model.lm_head = Int8Linear.from_float(model.lm_head)
    model.embed = _int8_embedding(model.embed, model.lm_head if model.config.tie_embeddings else None)
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """The inverse layout: plain float linears and embedding with the int8 weights' values, in place (for
    exports to other formats, which know nothing of int8 modules); returns the model."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, Int8Linear):
                linear = nn.Linear(child.in_features, child.out_features, bias=False, device=child.weight.device)
                linear.weight.data = child.dequantized().to(child.weight_scale.dtype)
                setattr(parent, name, linear)
    if isinstance(model.embed, Int8Embedding):
        rows, dim = model.embed.weight.shape
        embed = nn.Embedding(rows, dim, device=model.embed.weight.device)
        embed.weight.data = model.embed.weight.float() * model.embed.weight_scale.float()[:, None]
        model.embed = embed
        if model.config.tie_embeddings:
            model.lm_head.weight = model.embed.weight
    return model


def quantization_of(model: nn.Module) -> str:
    return "int8" if any(isinstance(m, Int8Linear) for m in model.modules()) else "none"


def bundle_entry(model: nn.Module) -> dict[str, str]:
    """What a bundle's config.json records about the weights' storage (nothing for plain float weights)."""
    quantization = quantization_of(model)
    return {CONFIG_KEY: quantization} if quantization != "none" else {}


def read_bundle_entry(data: dict[str, Any], where: str) -> str:
    """Pop and check config.json's quantization (absent: "none"); ValueError naming the file if unknown."""
    quantization = data.pop(CONFIG_KEY, "none")
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"{where}: quantization {quantization!r} is not one this Apertis runs ({', '.join(QUANTIZATIONS)}); "
            "update Apertis or re-export the model"
        )
    return quantization


def prepare_for_inference(
    model: nn.Module, quantization: str = "none", dtype: str = "auto", device: str | torch.device = "cpu"
) -> nn.Module:
    """The model as chat and generate run it: int8 weights where asked, in `dtype` ("auto": bf16 on a GPU
    that has it, else fp16 there, fp32 on a CPU). fp16 is refused on a CPU, whose fp16 matmuls are slow."""
    device = torch.device(device)
    if dtype == "auto":
        if device.type != "cuda":
            dtype = "fp32"
        else:
            dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto or one of {', '.join(DTYPES)}")
    if dtype == "fp16" and device.type == "cpu":
        raise ValueError("--dtype fp16 runs on a GPU only; on a CPU use fp32, bf16 or --quantize int8")
    quantize_model(model, quantization)
    model = model.to(device=device, dtype=DTYPES[dtype])
    for module in model.modules():
        if isinstance(
            module, StateTrackingCell
        ):  # it computes its gates from in_proj in fp32, whatever the model's dtype
            module.in_proj.float()
    return model
