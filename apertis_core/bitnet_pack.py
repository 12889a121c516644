"""Packed BitNet bundles: ternary weights stored two bits each (four per byte) plus one scale per matrix.

`apertis export --format bitnet` saves a BitNet model (ModelConfig.bitnet) with each ternary weight W (a
BitLinear weight or an expert stack) replaced in model.safetensors by two tensors:

- `W.ternary2`: uint8 (..., ceil(n / 4)), the codes {-1, 0, 1} of model.bitnet.ternary_parts as code + 1 in
  two bits, four per byte along the last dimension, the first in the lowest bits;
- `W.scale`: float32 (...), the matrix's absmean scale (a scalar for a linear weight, one per expert).

config.json records `"weight_packing": "ternary-2bit"` and the file's metadata says the same. Every other
tensor (embeddings, norms, routers, the image encoder) is stored as usual.

Loading (apertis_core.bundle calls `unpacked_header` and `unpack_state`) turns each pair back into a float
latent weight whose ternary form is exactly codes * scale (`latent_from_ternary`), so the loaded model is an
ordinary BitNet model: it runs, generates, exports and trains like the one that was packed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model.bitnet import ternary_parameters, ternary_parts

TERNARY_PACKING = "ternary-2bit"  # config.json's "weight_packing" and the weights file's metadata
PACKED, SCALE = ".ternary2", ".scale"  # suffixes of the two tensors that replace a ternary weight
_SCALE_DTYPES = {"F32", "F16", "BF16", "F64"}


# ---- codes <-> bytes ---------------------------------------------------------------------------------
def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in {-1, 0, 1} (..., n) -> uint8 (..., ceil(n / 4)); a last byte that is not full is padded
    with code 0."""
    pad = -codes.shape[-1] % 4
    twos = F.pad(codes.to(torch.int16) + 1, (0, pad), value=1).to(torch.uint8)  # 0, 1, 2
    twos = twos.unflatten(-1, (-1, 4))  # (..., ceil(n / 4), 4)
    return twos[..., 0] | (twos[..., 1] << 2) | (twos[..., 2] << 4) | (twos[..., 3] << 6)


def unpack_ternary(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 (..., ceil(n / 4)) -> int8 codes (..., n), the inverse of pack_ternary. The two-bit value 3 is
    never written; a damaged file's 3 reads as 1, so the codes stay in {-1, 0, 1}."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    twos = (packed[..., None] >> shifts) & 3  # (..., ceil(n / 4), 4)
    return (twos.flatten(-2)[..., :n].to(torch.int8) - 1).clamp(max=1)


def latent_from_ternary(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A float32 weight whose ternary form is codes * scale: codes * scale / mean|codes|. Its absmean is the
    scale, so the quantiser divides it back to codes / mean|codes|, at least 1 in size where nonzero, which
    rounds and clips to the codes again."""
    codes = codes.float()
    smallest = 1.0 / max(math.prod(codes.shape[-2:]), 1)  # the absmean of a matrix with one nonzero code
    nonzero = codes.abs().mean(dim=(-2, -1), keepdim=True).clamp(min=smallest)  # an all-zero matrix stays 0
    return codes * (scale.float()[..., None, None] / nonzero)


# ---- state dicts and headers -------------------------------------------------------------------------
def pack_state(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors to save, each of the model's ternary weights replaced by its packed codes and scale."""
    names = ternary_parameters(model)
    if not names:
        raise ValueError("this model has no ternary weights to pack; train it with model.bitnet=true")
    packed = {}
    for name, tensor in tensors.items():
        if name in names:
            codes, scale = ternary_parts(tensor.float())
            packed[name + PACKED], packed[name + SCALE] = pack_ternary(codes), scale.contiguous()
        else:
            packed[name] = tensor
    return packed


def unpacked_header(header: dict[str, dict[str, Any]], model: nn.Module) -> dict[str, dict[str, Any]]:
    """A weights file's header with each well-formed packed pair of one of `model`'s ternary weights shown
    as the float32 tensor it unpacks to, so the usual checks compare it with the model. A pair that does not
    fit (other shapes, a missing scale) is left as it is, and those checks name it."""
    out = dict(header)
    for name, parameter in ternary_parameters(model).items():
        codes, scale = header.get(name + PACKED), header.get(name + SCALE)
        shape = list(parameter.shape)
        if (
            codes is None
            or scale is None
            or codes["dtype"] != "U8"
            or codes["shape"] != [*shape[:-1], -(-shape[-1] // 4)]
            or scale["dtype"] not in _SCALE_DTYPES
            or scale["shape"] != shape[:-2]
        ):
            continue
        del out[name + PACKED], out[name + SCALE]
        out[name] = {"dtype": "F32", "shape": shape, "data_offsets": codes["data_offsets"]}
    return out


def unpack_state(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Loaded tensors with each packed pair of `model`'s ternary weights replaced by its float latent weight
    (latent_from_ternary); tensors without packed pairs come back unchanged."""
    out = dict(tensors)
    for name, parameter in ternary_parameters(model).items():
        if name + PACKED in out and name + SCALE in out:
            codes = unpack_ternary(out.pop(name + PACKED), parameter.shape[-1])
            out[name] = latent_from_ternary(codes, out.pop(name + SCALE))
    return out


def packing_problem(config: dict[str, Any]) -> str | None:
    """Pop config.json's "weight_packing" from `config`; what is wrong with it, or None when it is absent or
    the one packing this version reads on a BitNet model."""
    packing = config.pop("weight_packing", None)
    if packing is None:
        return None
    if packing != TERNARY_PACKING:
        return f"weight_packing {packing!r} is not one this Apertis reads ({TERNARY_PACKING!r}); update Apertis"
    if config.get("bitnet") is not True:
        return "weight_packing 'ternary-2bit' needs bitnet: true (only BitNet models have ternary weights)"
    return None
