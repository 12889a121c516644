"""Mixed precision: which number format to train in on a device, its autocast context and loss scaler."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..configio import ConfigError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str  # "fp32", "bf16" or "fp16": what the forward pass computes in (weights stay fp32)
    device_type: str  # "cpu", "cuda" or "mps"

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    def autocast(self):
        """Context for forward passes; fp32 runs without autocast."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """fp16 needs loss scaling so small gradients do not underflow; other formats get a disabled scaler."""
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")


def resolve_precision(preference: str, device: torch.device) -> Precision:
    """Turn train.precision ("auto" or a format) into what this device can run."""
    kind = device.type
    if preference == "auto":
        return Precision(_auto(kind), kind)
    if preference not in _DTYPES:
        raise ConfigError(f"train.precision={preference!r}: use auto, fp32, bf16 or fp16")
    if preference == "fp16" and kind != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA GPU (loss scaling); use bf16 or fp32 on this device")
    if preference == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bf16 support; use train.precision=fp16 (or auto)")
    return Precision(preference, kind)


def _auto(kind: str) -> str:
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if kind == "cpu" and _cpu_has_native_bf16():
        return "bf16"
    # CPUs without bf16 matrix units emulate it, far slower than fp32; MPS autocast covers fewer ops.
    return "fp32"


def _cpu_has_native_bf16() -> bool:
    # AMX tiles (Sapphire Rapids and later) make bf16 matmuls faster than fp32. The check is private in
    # torch, hence the guard: without it we keep the safe choice, fp32.
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check and check())
