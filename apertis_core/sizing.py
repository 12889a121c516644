"""Sizing a model from its config alone: parameters and bytes, before anything is built or allocated.

A config can come from anywhere (a downloaded bundle, a typo in `--set`), and building it is the first
thing that allocates: a config.json with d_model 65536 and 64 layers asks for 68.7 GB in its first tensor.
So every path that builds a model (loading a bundle, importing one, training, chatting) first checks the
config here: values that no model this app trains could have (negative, zero, non-integers, widths of
millions) are refused outright, and the memory the model needs is compared with what the machine has free.

The parameter count is arithmetic over the ModelConfig fields, the same sum the modules' constructors make;
tests/test_sizing.py checks it against ApertisModel(cfg).num_parameters() for every preset.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Mapping
from typing import Any

from .configio import ConfigError, coerce
from .model.config import DISTANCE_KNOTS, PLACE_FREQUENCIES, ModelConfig

# Set to 1 to skip the free-memory comparison (the absurd-value checks still apply): for a machine whose
# free memory is misreported, or when you know the estimate is too cautious for your case.
SKIP_MEMORY_CHECK_ENV = "APERTIS_SKIP_MEMORY_CHECK"

# Bounds no model this app can train or run reaches; a value outside them is a damaged or hostile config,
# refused whatever the machine. (Memory is the usual limit well before these.)
INT_LIMITS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 20),
    "d_model": (1, 1 << 15),
    "n_layers": (1, 1024),
    "n_heads": (1, 1024),
    "n_kv_heads": (0, 1024),
    "head_dim": (0, 1 << 12),
    "max_seq_len": (1, 1 << 20),
    "sla_chunk_size": (1, 1 << 14),
    "sla_conv_size": (0, 64),
    "sliding_window": (0, 1 << 20),
    "ffn_hidden": (0, 1 << 18),
    "n_experts": (0, 1024),
    "n_shared_experts": (0, 64),
    "expert_hidden": (0, 1 << 18),
    "moe_every": (1, 1024),
    "moe_top_k": (0, 1024),
    "strc_every": (0, 1024),
    "strc_hidden": (0, 1 << 16),
    "image_patch_size": (1, 1024),
    "image_max_patches": (1, 1 << 16),
    "image_encoder_layers": (0, 256),
    "image_encoder_width": (0, 1 << 15),
    "image_token_id": (-1, 1 << 20),
    "cross_attn_every": (0, 1024),
    "cross_attn_relative_heads": (0, 1024),
    "max_loops": (1, 64),
}
POSITIVE_FLOATS = ("rope_theta", "rope_scaling", "norm_eps")  # zero or below breaks the maths
MAX_PATTERN = 1024  # layer_pattern characters
MAX_PARAMETERS = 100_000_000_000  # 400 GB of fp32 weights: beyond any machine this app targets
TRAIN_BYTES_PER_PARAMETER = 16  # fp32 weights, gradients and AdamW's two moments
LOAD_COPIES = 2  # loading holds the model and the file's tensors at once until they are copied in

# Parameters of torchvision's ResNets cut after stage 1..4 (conv1, bn1, layer1..N; see vision/encoder.py),
# and the feature width they end on. tests/test_sizing.py checks these against torchvision.
_RESNET_PARAMETERS = {
    "resnet18": (157_504, 683_072, 2_782_784, 11_176_512),
    "resnet34": (231_488, 1_347_904, 8_170_304, 21_284_672),
    "resnet50": (225_344, 1_444_928, 8_543_296, 23_508_032),
}
_RESNET_EXPANSION = {"resnet18": 1, "resnet34": 1, "resnet50": 4}
_RESNET_STAGE_FOR_STRIDE = {4: 1, 8: 2, 16: 3, 32: 4}


class ModelSizeError(ConfigError):
    """A model config that is absurd or does not fit in this machine's memory; the message gives the figure
    and what to do."""


# ---- values --------------------------------------------------------------------------------------------
def check_model_mapping(mapping: Mapping[str, Any], where: str = "model config") -> None:
    """Refuse absurd values in a raw model mapping (config.json, a run's `model:` section with its `--set`
    strings) before ModelConfig sees them: its own checks assume sane numbers (n_heads 0 divides by zero)."""
    if not isinstance(mapping, Mapping):
        return  # not a mapping: the config parser says so in its own words
    types = typing.get_type_hints(ModelConfig)
    for key, value in mapping.items():
        if key in INT_LIMITS:
            _check_int(key, coerce(value, int, f"{where}.{key}"), where)
        elif types.get(key) is float:
            _check_float(key, coerce(value, float, f"{where}.{key}"), where)
    pattern = mapping.get("layer_pattern")
    if isinstance(pattern, str) and len(pattern) > MAX_PATTERN:
        raise ModelSizeError(
            f"{where}: layer_pattern has {len(pattern):,} characters (at most {MAX_PATTERN}); "
            "it repeats over the depth, so a few letters such as SSSA are enough"
        )
    nope = mapping.get("nope_layers")
    if isinstance(nope, (list, tuple)) and len(nope) > INT_LIMITS["n_layers"][1]:
        raise ModelSizeError(
            f"{where}: nope_layers lists {len(nope):,} layers; a model has at most {INT_LIMITS['n_layers'][1]}"
        )


def _check_int(key: str, value: int, where: str) -> None:
    low, high = INT_LIMITS[key]
    if value < low:
        need = "positive" if low == 1 else f"at least {low}"
        raise ModelSizeError(
            f"{where}: {key} is {_number(value)}; it must be {need}. Set it to a sane value "
            "(a preset's, for example); a bundle with this config is damaged, re-export it"
        )
    if value > high:
        raise ModelSizeError(
            f"{where}: {key} is {_number(value)}, beyond {high:,}, more than any model this app "
            "can build; the config is damaged or not meant for Apertis. Use a preset's value"
        )


def _check_float(key: str, value: float, where: str) -> None:
    if not math.isfinite(value):
        raise ModelSizeError(f"{where}: {key} is {value}; it must be a finite number")
    if key in POSITIVE_FLOATS and value <= 0:
        raise ModelSizeError(f"{where}: {key} is {value}; it must be above 0")
    if key == "dropout" and not 0 <= value < 1:
        raise ModelSizeError(f"{where}: dropout is {value}; it must be in [0, 1)")


def _number(value: int) -> str:
    """An integer for a message: a 4,000-digit one is named by its length, not printed."""
    digits = len(str(abs(value))) if abs(value) < 10**4000 else 4000
    return f"{value:,}" if digits <= 15 else f"a {digits}-digit number"


def check_config(cfg: ModelConfig, where: str = "model config") -> int:
    """Its parameter count, once every value is sane and the total is not absurd; ModelSizeError otherwise."""
    check_model_mapping(dataclasses.asdict(cfg), where)
    total = parameter_count(cfg)
    if total > MAX_PARAMETERS:
        raise ModelSizeError(
            f"{where}: this model would have {_count(total)} parameters "
            f"({human_bytes(4 * total)} of weights), more than any model this app can build "
            f"({_count(MAX_PARAMETERS)}); use fewer layers or a narrower d_model"
        )
    return total


# ---- parameters ----------------------------------------------------------------------------------------
def parameter_count(cfg: ModelConfig) -> int:
    """Unique parameters of ApertisModel(cfg) (tied embeddings counted once), without building it."""
    d = cfg.d_model
    total = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2) + d  # embeddings (+ untied head), final norm
    total += sum(_layer_parameters(cfg, layer) for layer in range(cfg.n_layers))
    if cfg.image_encoder != "none":
        total += _vision_parameters(cfg)
    if cfg.max_loops > 1:  # the halting heads: one (d_model -> 1) linear with bias per extra pass
        total += (cfg.max_loops - 1) * (d + 1)
    return total


def _layer_parameters(cfg: ModelConfig, layer: int) -> int:
    d = cfg.d_model
    total = 2 * d + _mixer_parameters(cfg, layer)  # two RMSNorms (mixer, ffn)
    if cfg.uses_experts(layer):
        width = cfg.expert_width()
        total += d * cfg.n_experts + cfg.n_experts * 3 * d * width  # router, routed SwiGLU experts
        total += 3 * d * width * cfg.n_shared_experts  # the shared experts, fused into one gated FFN
    else:
        total += 3 * d * cfg.dense_hidden()  # gate_up (2 x hidden) and down
    if cfg.uses_strc(layer):
        total += d + 4 * d * cfg.strc_width()  # its norm, in_proj (3 x width) and out_proj
    if cfg.uses_cross_attn(layer):  # norms, q, kv and out projections, gate, place map, relative place weights
        inner = (cfg.n_heads + cfg.cross_attn_relative_heads) * cfg.dim_head()
        total += 2 * d + 4 * d * inner + 1 + cfg.cross_attn_relative_heads * 4 * PLACE_FREQUENCIES
        total += 2 * inner * 4 * PLACE_FREQUENCIES if cfg.cross_attn_pos else 0
    return total


def _mixer_parameters(cfg: ModelConfig, layer: int) -> int:
    d, heads, head_dim = cfg.d_model, cfg.n_heads, cfg.dim_head()
    inner = heads * head_dim
    if cfg.mixer_kind(layer) == "A":  # fused qkv (GQA: kv heads for k and v) and out_proj
        return d * (heads + 2 * cfg.kv_heads()) * head_dim + inner * d
    conv = 3 * inner * cfg.sla_conv_size if cfg.sla_conv_size > 1 else 0
    # in_proj (q, k, v, gate, decay per head), conv, A_log and dt_bias per head, output norm, out_proj
    return d * (4 * inner + heads) + conv + 2 * heads + head_dim + inner * d


def _vision_parameters(cfg: ModelConfig) -> int:
    d = cfg.d_model
    if cfg.image_encoder == "vit":
        width = cfg.image_encoder_width or d
        backbone = _vit_parameters(cfg, width)
    else:
        stages = _RESNET_STAGE_FOR_STRIDE.get(cfg.image_patch_size)
        if stages is None or cfg.image_encoder not in _RESNET_PARAMETERS:
            raise ConfigError(
                f"model config: image_patch_size must be one of {sorted(_RESNET_STAGE_FOR_STRIDE)} "
                f"for {cfg.image_encoder}, got {cfg.image_patch_size}"
            )
        backbone = _RESNET_PARAMETERS[cfg.image_encoder][stages - 1]
        width = 64 * 2 ** (stages - 1) * _RESNET_EXPANSION[cfg.image_encoder]
    projector = width * d + d + d * d + d  # Linear(width, d) and Linear(d, d), with biases
    return backbone + projector + d  # + the modality embedding


def _vit_parameters(cfg: ModelConfig, width: int) -> int:
    patch = cfg.image_patch_size
    hidden = -(-int(width * 8 / 3) // 64) * 64
    block = 2 * width + 3 * width * width + width * width + 3 * width * hidden  # norms, qkv, out, SwiGLU
    if cfg.image_stem == "conv":  # 3x3 convs without bias, batch-norm gains and biases, a 1x1 conv with bias
        widths = cfg.image_stem_widths()
        stem = (
            sum(9 * i * o + 2 * o for i, o in zip([3, *widths[:-1]], widths, strict=True)) + widths[-1] * width + width
        )
    else:
        stem = 3 * width * patch * patch + width  # the patchify conv, with bias
    return (
        stem
        + (2 * cfg.image_max_patches * width if cfg.image_pos == "learned2d" else 0)  # row and column tables
        + (cfg.n_heads * DISTANCE_KNOTS if cfg.image_distance_bias else 0)  # each head's distance curve
        + cfg.image_encoder_layers * block
        + width
    )  # blocks, final norm


# ---- bytes ---------------------------------------------------------------------------------------------
def weight_bytes(cfg: ModelConfig, element_bytes: int = 4) -> int:
    return parameter_count(cfg) * element_bytes


def loading_bytes(cfg: ModelConfig) -> int:
    """Peak memory of loading a bundle: the fp32 model and the tensors read from its file, side by side."""
    return LOAD_COPIES * weight_bytes(cfg)


def training_bytes(cfg: ModelConfig, batch_size: int, seq_len: int, element_bytes: int = 4, shards: int = 1) -> int:
    """Weights, gradients and AdamW moments (16 bytes per parameter, split over `shards` FSDP processes)
    plus activations and logits, the same estimate training.planning gives (~34 bytes per token per width
    unit per layer at 16 bits, Korthikanti et al. 2022; logits in fp32 with their gradient). Good to a
    factor of ~1.5."""
    tokens = batch_size * seq_len
    activations = 34 * tokens * cfg.d_model * cfg.n_layers * element_bytes // 2
    logits = tokens * cfg.vocab_size * (element_bytes + 4 + 4)
    return TRAIN_BYTES_PER_PARAMETER * parameter_count(cfg) // shards + activations + logits


# ---- the machine ---------------------------------------------------------------------------------------
def available_memory(device: Any = "cpu") -> tuple[int | None, str]:
    """(bytes free, where) for `device`: the GPU's free memory for CUDA, else the machine's available RAM
    (Apple's MPS shares it). None when it cannot be told."""
    kind = str(device).split(":")[0]
    if kind == "cuda":
        import torch

        if torch.cuda.is_available():
            index = torch.device(device).index
            free, _total = torch.cuda.mem_get_info(index if index is not None else torch.cuda.current_device())
            return int(free), f"the GPU ({device})"
    return _available_ram(), "this computer"


def _available_ram() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil comes with the studio; the bare library reads Linux's own figure
        try:
            with open("/proc/meminfo", encoding="ascii") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    return None


def check_fits(needed: int, device: Any, what: str, advice: str) -> None:
    """ModelSizeError when `needed` bytes exceed what `device` has free (no check when that is unknown or
    the user turned the check off)."""
    if os.environ.get(SKIP_MEMORY_CHECK_ENV) == "1":
        return
    free, where = available_memory(device)
    if free is not None and needed > free:
        raise ModelSizeError(
            f"{what} needs about {human_bytes(needed)} of memory, but {where} has {human_bytes(free)} free. "
            f"{advice} (If you are sure it fits, set {SKIP_MEMORY_CHECK_ENV}=1 to skip this check.)"
        )


def check_loadable(cfg: ModelConfig, device: Any = "cpu", where: str = "model config") -> int:
    """Refuse, before anything is allocated, a model that is absurd or too big to load on `device`; returns
    its parameter count. Loading builds on the CPU and then moves the model, so a GPU needs room for one
    copy and the computer for the loading peak."""
    total = check_config(cfg, where)
    what = f"Loading this model ({_count(total)} parameters, {human_bytes(4 * total)} of weights)"
    advice = "Close other programs, or use a smaller model."
    check_fits(loading_bytes(cfg), "cpu", what, advice)
    if str(device).startswith("cuda"):
        check_fits(weight_bytes(cfg), device, f"Putting this model on {device}", "Load it on the CPU (--device cpu).")
    return total


def check_trainable(
    cfg: ModelConfig, batch_size: int, seq_len: int, device: Any, element_bytes: int = 4, shards: int = 1
) -> int:
    """Refuse a training run whose model is absurd or whose estimated peak memory exceeds what `device` has
    free (with FSDP, each of the `shards` processes holds its share of the weights and optimizer state);
    returns the parameter count."""
    total = check_config(cfg)
    needed = training_bytes(cfg, batch_size, seq_len, element_bytes, shards)
    split = f" split over {shards} processes" if shards > 1 else ""
    what = (
        f"Training this model ({_count(total)} parameters; weights, gradients and Adam moments take "
        f"{human_bytes(TRAIN_BYTES_PER_PARAMETER * total)}{split}, plus activations for batch_size {batch_size} "
        f"x seq_len {seq_len})"
    )
    check_fits(needed, device, what, "Lower train.batch_size or data.seq_len, or pick a smaller preset.")
    return total


def check_run(run_config: Any, model: ModelConfig | None = None) -> int:
    """check_trainable for a RunConfig, on the device and in the precision the trainer will use. `model`
    replaces the run's model config (a resumed run trains its checkpoint's)."""
    from .training.config import planned_vocab_size
    from .training.hardware import pick_device
    from .training.precision import resolve_precision

    train = run_config.train
    device = pick_device(train.device)
    element = resolve_precision(train.precision, device).dtype.itemsize
    if model is None:
        model = run_config.model.replace(vocab_size=planned_vocab_size(run_config))
    shards = _fsdp_processes(train) if train.parallel == "fsdp" else 1
    return check_trainable(model, train.batch_size, run_config.data.seq_len, device, element, shards)


def _fsdp_processes(train: Any) -> int:
    """The processes an FSDP run shards over: torchrun's WORLD_SIZE inside a run, or the local GPUs that
    the studio will start when asked for all of them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and train.gpus == "all":
        import torch

        world = max(1, torch.cuda.device_count())
    return world


def check_run_mapping(mapping: Mapping[str, Any]) -> int:
    """check_run for a run given as a mapping (a YAML file's content, the studio's form): the model's values
    are checked before the config is built from them, so n_heads 0 is a refusal, not a division by zero."""
    from .training import RunConfig

    model = mapping.get("model")
    if isinstance(model, Mapping):
        check_model_mapping(model, where="model config")
    return check_run(RunConfig.from_dict(dict(mapping)))


# ---- words ---------------------------------------------------------------------------------------------
def human_bytes(count: int) -> str:
    """Decimal units, as disks and memory are sold: 68.7 GB."""
    value = float(count)
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB"):
        if value < 1000 or unit == "PB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _count(count: int) -> str:
    for size, word in ((10**12, "trillion"), (10**9, "billion"), (10**6, "million")):
        if count >= size:
            return f"{count / size:.1f} {word}"
    return f"{count:,}"
