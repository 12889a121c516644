"""LoRA adapters with peft: which linear layers take one, adding them, their files in PEFT's layout, and
folding them into a plain model.

A LoRA run (`finetune.method: lora`) freezes its base bundle and trains, beside chosen nn.Linear layers,
the low-rank pair peft adds (output = W x + alpha / r * B A x). Everything LoRA-specific is peft's own code:
`inject_adapter_in_model` adds the layers in place (the model stays an ApertisModel, so training, sampling
and accounting need no wrapper), `get_peft_model_state_dict` / `set_peft_model_state_dict` name the
adapter weights as every PEFT tool expects, and `get_delta_weight` gives the update that merging adds.

An adapter folder holds `adapter_model.safetensors` + `adapter_config.json` (PEFT's layout: loads with
`PeftModel.from_pretrained` or `set_peft_model_state_dict`), whose `base_model_name_or_path` is the base
bundle's absolute path, plus the base's `config.json` and `tokenizer.json`. bundle.py reads and checks
these folders; this module never touches the disk except to write an adapter's two files.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .configio import ConfigError
from .fileio import atomic_write_bytes, atomic_write_text
from .model import ApertisModel

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's file names (peft.utils.SAFETENSORS_WEIGHTS_NAME)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_NAME = "default"  # peft's name for a model's one adapter
# PeftModel.save_pretrained names each weight from the PeftModel, which holds the model as base_model.model;
# adapters on the Hub, and PeftModel.from_pretrained, use these names, so our files do too.
PEFT_PREFIX = "base_model.model."
# What an empty finetune.target_modules adapts: the mixers' and FFNs' projections (SLA and STRC in/out,
# softmax attention qkv/out, dense FFN and shared expert gate_up/down). Routed experts are raw 3-D
# parameters, not nn.Linear, so they stay frozen; the AES router is left alone unless named.
DEFAULT_TARGETS = ("in_proj", "qkv", "out_proj", "gate_up", "down")


class AdapterError(ValueError):
    """An adapter folder or its config cannot be used; the message says why and what to do."""


# ---- which layers ------------------------------------------------------------------------------------
def adaptable_layers(model: nn.Module) -> list[str]:
    """Full names of the nn.Linear layers that can take an adapter. A tied LM head is left out: it is the
    embedding table too, so folding an update into it would also change every input embedding."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return [name for name in names if not (name == "lm_head" and model.config.tie_embeddings)]


def resolve_targets(model: nn.Module, targets: list[str] | tuple[str, ...]) -> list[str]:
    """Full layer names for finetune.target_modules: a name matches a layer it equals or ends (after a dot),
    as in peft; empty means DEFAULT_TARGETS inside the language model's blocks. ConfigError lists the valid
    names when one matches nothing."""
    layers = adaptable_layers(model)
    if not targets:
        return [n for n in layers if n.startswith("blocks.") and n.rpartition(".")[2] in DEFAULT_TARGETS]
    chosen: set[str] = set()
    for target in targets:
        hits = [n for n in layers if n == target or n.endswith("." + target)]
        if not hits:
            raise ConfigError(_unknown_target(model, target, layers))
        chosen.update(hits)
    return [n for n in layers if n in chosen]


def _unknown_target(model: nn.Module, target: str, layers: list[str]) -> str:
    if target == "lm_head" and model.config.tie_embeddings:
        return (
            "finetune.target_modules: lm_head shares its weights with the token embedding in this model "
            "(tie_embeddings), so it cannot take an adapter; leave it out"
        )
    leaves = sorted({n.rpartition(".")[2] for n in layers})
    suffix = ".".join(layers[0].split(".")[-2:])
    return (
        f"finetune.target_modules: {target!r} names no linear layer of this model. Valid names: "
        f"{', '.join(leaves)} (or a dotted suffix such as {suffix}, or a full name like {layers[0]}). "
        "Routed experts are not linear layers and cannot take adapters."
    )


# ---- adding adapters ---------------------------------------------------------------------------------
def add_lora(
    model: ApertisModel, base: str | Path, rank: int, alpha: float, dropout: float = 0.0, targets: list[str] = ()
) -> ApertisModel:
    """Add trainable LoRA adapters to `model` in place (peft freezes every other weight); `base` is the
    bundle the model was loaded from, recorded as the adapter's base_model_name_or_path."""
    from peft import LoraConfig

    # Exact full names, as one regex (peft full-matches a string): a plain name list would be matched as
    # suffixes, and blocks.0.ffn.gate_up also ends the image encoder's vision.backbone.blocks.0.ffn.gate_up.
    pattern = "|".join(re.escape(name) for name in resolve_targets(model, targets))
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=f"(?:{pattern})",
        base_model_name_or_path=str(Path(base).resolve()),  # the adapter may be loaded from another folder
    )
    return _inject(model, config)


def _inject(model: nn.Module, config: Any, meta: bool = False) -> Any:
    from peft.functional import inject_adapter_in_model

    try:
        return inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME, low_cpu_mem_usage=meta)
    except ValueError as exc:  # peft: a target module that is not in the model, or one it cannot adapt
        raise AdapterError(f"peft cannot add these adapters to the model: {exc}") from exc


def lora_parameter_count(model_config: Any, targets: list[str], rank: int) -> int:
    """Parameters LoRA of `rank` adds on `targets` to a model of `model_config`, before anything is built
    (a meta-device skeleton): r x (inputs + outputs) per adapted layer, peft's A and B."""
    with torch.device("meta"):
        skeleton = ApertisModel(model_config)
    layers = dict(skeleton.named_modules())
    return sum(rank * (layers[n].in_features + layers[n].out_features) for n in resolve_targets(skeleton, targets))


def has_adapter(model: nn.Module) -> bool:
    """Whether peft added adapters to `model` (inject_adapter_in_model leaves its config on the model)."""
    return ADAPTER_NAME in getattr(model, "peft_config", {})


def adapter_parameters(model: nn.Module) -> int:
    """The adapters' parameter count: what a LoRA run trains."""
    return sum(p.numel() for name, p in model.named_parameters() if ".lora_" in name)


def adapter_facts(model: nn.Module) -> dict[str, Any]:
    """Model-card rows of an adapted model: its base and its LoRA settings."""
    config = model.peft_config[ADAPTER_NAME]
    layers = {name.partition(".lora_A.")[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    kinds = ", ".join(sorted({name.rpartition(".")[2] for name in layers}))
    return {
        "fine-tuned from": config.base_model_name_or_path,  # the card shows the folder's name only
        "LoRA": f"rank {config.r}, alpha {config.lora_alpha:g} on {len(layers)} layers ({kinds})",
        "trainable parameters": f"{adapter_parameters(model):,}",
    }


# ---- files -------------------------------------------------------------------------------------------
def write_adapter(directory: Path, model: nn.Module) -> None:
    """adapter_model.safetensors and adapter_config.json into an existing folder, as PEFT's save_pretrained
    writes them (the config with inference_mode true, its sets as lists, sorted keys)."""
    from peft.functional import get_peft_model_state_dict
    from safetensors.torch import save

    # save_embedding_layers=False: peft's "auto" would look for the base's config on the Hugging Face Hub
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)
    tensors = {PEFT_PREFIX + name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
    atomic_write_bytes(directory / ADAPTER_WEIGHTS, save(tensors, metadata={"format": "pt"}))
    config = copy.copy(model.peft_config[ADAPTER_NAME])
    config.inference_mode = True
    data = {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}
    atomic_write_text(directory / ADAPTER_CONFIG, json.dumps(data, indent=2, sort_keys=True) + "\n")


def is_adapter_dir(directory: str | Path) -> bool:
    """A folder holding a LoRA adapter and no plain weights (a merged final/ holds both: it loads as plain)."""
    directory = Path(directory)
    return (directory / ADAPTER_CONFIG).is_file() and not (directory / "model.safetensors").exists()


def adapter_config(raw: bytes, where: str) -> Any:
    """peft's LoraConfig from adapter_config.json's bytes, refusing what is not a LoRA adapter's config."""
    from peft import LoraConfig

    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AdapterError(f"{where} cannot be read as JSON ({exc}); save the adapter again") from exc
    if not isinstance(data, dict) or data.get("peft_type") != "LORA":
        found = data.get("peft_type") if isinstance(data, dict) else type(data).__name__
        raise AdapterError(f"{where}: not a LoRA adapter config (peft_type {found!r}); only LoRA adapters load here")
    base, rank = data.get("base_model_name_or_path"), data.get("r")
    if not isinstance(base, str) or not base:
        raise AdapterError(f"{where} names no base model (base_model_name_or_path); the adapter cannot be applied")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"{where}: r (the LoRA rank) must be a positive whole number, not {rank!r}")
    try:
        return LoraConfig.from_peft_type(**data)
    except (TypeError, ValueError, KeyError) as exc:
        raise AdapterError(f"{where}: peft cannot read these LoRA settings ({exc}); save the adapter again") from exc


def base_path(directory: str | Path, config: Any) -> Path:
    """The adapter's base bundle: base_model_name_or_path, a relative one taken from the adapter's folder."""
    base = Path(config.base_model_name_or_path).expanduser()
    return base if base.is_absolute() else Path(directory) / base


def adapter_shapes(model_config: Any, config: Any) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the adapter weights `config` gives a model of `model_config`, from a skeleton on
    the meta device (nothing is allocated, whatever the rank says)."""
    from peft.functional import get_peft_model_state_dict

    with torch.device("meta"):
        skeleton = ApertisModel(model_config)
    _inject(skeleton, copy.copy(config), meta=True)
    state = get_peft_model_state_dict(skeleton, adapter_name=ADAPTER_NAME, save_embedding_layers=False)
    return {PEFT_PREFIX + name: tuple(tensor.shape) for name, tensor in state.items()}


def load_adapter(model: ApertisModel, config: Any, weights: dict[str, torch.Tensor], trainable: bool) -> ApertisModel:
    """Add `config`'s adapters to `model` and fill them with `weights` (as in an adapter file, already checked
    against adapter_shapes); `trainable` to go on training them (a resumed LoRA run)."""
    from peft.functional import set_peft_model_state_dict

    config = copy.copy(config)
    config.inference_mode = not trainable  # peft freezes the adapters too in inference mode
    _inject(model, config)
    weights = {name.removeprefix(PEFT_PREFIX): tensor for name, tensor in weights.items()}
    result = set_peft_model_state_dict(model, weights, adapter_name=ADAPTER_NAME)
    if result.unexpected_keys:
        raise AdapterError(f"adapter weights that fit no layer: {', '.join(result.unexpected_keys[:5])}")
    return model


# ---- merging -----------------------------------------------------------------------------------------
@torch.no_grad()
def merged_model(model: ApertisModel) -> ApertisModel:
    """A new plain ApertisModel (on the CPU, in eval mode) whose adapted layers hold W + peft's
    get_delta_weight: its outputs equal the adapted model's. `model` is left as it was."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuned = {name: module for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}
    state = {}
    for key, value in model.state_dict().items():
        owner = next((name for name in tuned if key.startswith(name + ".")), None)
        if owner is None:
            state[key] = value
            continue
        leaf = key.removeprefix(owner + ".base_layer.")
        if leaf == key:  # lora_A / lora_B themselves: their product goes into the base weight below
            continue
        if leaf == "weight":
            layer = tuned[owner]
            value = value + sum(layer.get_delta_weight(name) for name in layer.active_adapters)
        state[f"{owner}.{leaf}"] = value
    plain = ApertisModel(model.config)
    plain.load_state_dict(state, strict=True)  # every plain weight is accounted for, and nothing else
    return plain.eval()
