"""Export a trained model: as an Apertis bundle, or as a Hugging Face Llama folder for Transformer presets.

`export_model(source, out, format)` takes a checkpoint folder, a run folder (its newest checkpoint or
final bundle) or a bundle. The `hf-llama` format writes what `transformers.LlamaForCausalLM` loads:
config.json, model.safetensors under HF tensor names, tokenizer.json (+ tokenizer_config.json with the
chat template). Only models that *are* Llama can go there: all-softmax layers, dense SwiGLU, RoPE, no
STRC, no experts, no images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .bundle import BUNDLE_FILES, MAX_TEXT_BYTES, atomic_directory, load_bundle, save_bundle
from .fileio import atomic_write_text
from .finetune import ADAPTER_WEIGHTS, is_adapter_dir
from .model import ApertisModel, ModelConfig
from .model_card import card_title
from .quantize import dequantize_model, quantize_model

FORMATS = ("apertis", "hf", "hf-llama", "gguf", "bitnet")


class ExportError(ValueError):
    """The source cannot be exported in the requested format; the message says why and what to do."""


# ---- finding the model --------------------------------------------------------------------------------
def is_model_dir(path: Path) -> bool:
    """A bundle or checkpoint folder, or a LoRA adapter folder (finetune.py), which loads with its base."""
    return path.is_dir() and (all((path / name).is_file() for name in BUNDLE_FILES) or is_adapter_dir(path))


def _weights_file(model_dir: Path) -> Path:
    plain = model_dir / "model.safetensors"
    return plain if plain.is_file() else model_dir / ADAPTER_WEIGHTS


def find_model_dir(path: str | Path) -> Path:
    """A checkpoint or bundle folder as is; for a run folder, its newest checkpoint or final bundle."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(2, "no such checkpoint, run or bundle folder", str(path))
    if not path.is_dir():
        raise ExportError(f"{path}: expected a folder (a checkpoint, a run or a bundle), not a file")
    if is_model_dir(path):
        return path
    # A run folder: its final bundle or its latest checkpoint, whichever was written last, so a run that
    # was stopped, resumed or trained further exports what it reached last.
    from .training import latest_checkpoint

    candidates = [d for d in (path / "final", latest_checkpoint(path)) if d is not None and is_model_dir(d)]
    if not candidates:
        raise ExportError(
            f"{path}: no model here; expected a checkpoint or bundle folder ({', '.join(BUNDLE_FILES)}), "
            "or a run folder with final/ or checkpoints/step_*"
        )
    return max(candidates, key=lambda d: _weights_file(d).stat().st_mtime_ns)


def export_model(
    source: str | Path,
    out: str | Path,
    format: str = "apertis",
    gguf_type: str = "f16",
    merge: bool = False,
    quantize: str = "none",
) -> Path:
    """Write `source`'s model to the folder `out` in `format` ("apertis", "hf" or "hf-llama"); returns `out`.
    "gguf" writes the single file `out` (llama.cpp; `gguf_type` "f16" or "q8_0"; see gguf_export). "bitnet"
    writes an Apertis bundle with a BitNet model's ternary weights packed two bits each (bitnet_pack).
    A LoRA adapter folder is exported as an adapter in the apertis format unless `merge`, which folds it into
    a plain bundle with the same outputs; every other format needs, and gets, the merged model.
    `quantize` "int8" stores an apertis bundle's linears as int8 with per-channel scales (quantize.py)."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if quantize != "none" and format != "apertis":
        raise ExportError(f"quantize {quantize!r} writes an Apertis bundle; export with format apertis")
    model_dir = find_model_dir(source)
    out = Path(out)
    if out.resolve() == model_dir.resolve() or model_dir.resolve() in out.resolve().parents:
        raise ExportError(f"{out}: export to a new folder, not into the source {model_dir}")
    model, tokenizer = load_bundle(model_dir, merge=merge or format != "apertis" or quantize != "none")
    if quantize != "none":
        quantize_model(model, quantize)
    elif format != "apertis":
        dequantize_model(model)  # an int8 bundle, for formats that hold floating-point weights only
    if format == "gguf":
        return export_gguf(model, tokenizer, out, gguf_type)
    if format == "hf-llama":
        return export_hf_llama(model, tokenizer, out)
    if format == "hf":
        from .hf_export import export_hf

        return export_hf(model, tokenizer, out)
    card = _card_facts(model_dir)
    if quantize != "none":
        card["weights"] = "int8 linears and embedding, one scale per output channel (apertis export --quantize)"
    if format == "bitnet":
        if not model.config.bitnet:
            raise ExportError(
                f"{model_dir} is not a BitNet model, so it has no ternary weights to pack; train it with "
                "--set model.bitnet=true, or export it with --format apertis"
            )
        card["weights"] = "block linears ternary, packed 2 bits each (BitNet b1.58)"
    save_bundle(out, model, tokenizer, card=card, pack_ternary=format == "bitnet", merge=merge)
    return out


def _card_facts(model_dir: Path) -> dict[str, Any]:
    """Training facts for the new model card: a checkpoint's meta.json, or the rows of a bundle's card
    that the card does not recompute (data, steps, losses...)."""
    facts: dict[str, Any] = {"exported from": card_title(model_dir)}  # a run's name, not "final"
    meta, readme = model_dir / "meta.json", model_dir / "README.md"
    if meta.is_file():
        try:
            data = json.loads(_read_text(meta))
        except (ValueError, RecursionError):  # damaged: the card is made without its facts
            data = {}
        if isinstance(data, dict):
            facts.update({k: v for k, v in data.items() if isinstance(v, (int, float, str)) and v is not None})
    elif readme.is_file():
        computed = {"preset", "parameters", "layers x width", "vocabulary", "images", "date", "exported from"}
        for line in _read_text(readme).splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if line.startswith("|") and len(cells) == 2 and cells[0] not in computed and set(cells[0]) - set("-"):
                facts[cells[0]] = cells[1]
    return facts


def _read_text(path: Path) -> str:
    """The first MAX_TEXT_BYTES of a card or meta file: a card's facts are at its top, and a file of
    gigabytes (damaged, or made to exhaust memory) must not be read whole."""
    with path.open("rb") as handle:
        return handle.read(MAX_TEXT_BYTES).decode("utf-8", errors="replace")


# ---- Hugging Face Llama -----------------------------------------------------------------------------
def llama_incompatibilities(cfg: ModelConfig) -> list[str]:
    """What keeps this config from being a Llama model (empty when it is one)."""
    problems = []
    if set(cfg.layer_pattern) != {"A"}:
        problems.append(
            f"layer_pattern {cfg.layer_pattern!r} has Selective Linear Attention (S) layers; Llama has softmax attention (A) only"
        )
    if cfg.n_experts:
        problems.append(f"{cfg.n_experts} routed experts (AES mixture of experts); Llama has dense FFNs")
    if cfg.strc_every:
        problems.append("STRC recurrent cells (strc_every > 0)")
    if cfg.ffn_type != "swiglu":
        problems.append(f"ffn_type {cfg.ffn_type!r}; Llama uses swiglu")
    if cfg.qk_norm:
        problems.append("qk_norm (Llama has no query/key norm)")
    if cfg.sliding_window:
        problems.append(f"sliding_window {cfg.sliding_window} (Llama attends to the full context)")
    if cfg.nope_layers:
        problems.append(f"nope_layers {cfg.nope_layers} (Llama uses RoPE in every layer)")
    if cfg.image_encoder != "none":
        problems.append(f"an image encoder ({cfg.image_encoder}); Llama is text only")
    if cfg.bitnet:
        problems.append("BitNet ternary layers (bitnet: true); Llama runs full-precision weights")
    if cfg.max_loops > 1:
        problems.append(f"looped depth (max_loops {cfg.max_loops}); Llama applies each layer once")
    return problems


def llama_config(cfg: ModelConfig, tokenizer: Any) -> dict[str, Any]:
    """config.json for transformers' LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.dense_hidden(),
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads(),
        "head_dim": cfg.dim_head(),
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        # our positions are divided by rope_scaling: exactly HF's "linear" RoPE scaling
        "rope_scaling": None if cfg.rope_scaling == 1.0 else {"rope_type": "linear", "factor": cfg.rope_scaling},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": tokenizer.eot_id,  # documents are separated (and so preceded) by end-of-text
        "eos_token_id": tokenizer.eot_id,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def llama_state_dict(model: ApertisModel) -> dict[str, torch.Tensor]:
    """Our weights under HF Llama names. Fused projections are split: qkv is [q heads | k heads | v heads]
    (head-major, as HF's q/k/v_proj), gate_up is [gate | up]. Both use the same half-split RoPE layout
    (rotate_half), so no permutation of q/k rows is needed."""
    cfg = model.config
    q_rows, kv_rows = cfg.n_heads * cfg.dim_head(), cfg.kv_heads() * cfg.dim_head()
    hidden = cfg.dense_hidden()
    tensors = {"model.embed_tokens.weight": model.embed.weight}
    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}"
        q, k, v = block.mixer.qkv.weight.split([q_rows, kv_rows, kv_rows], dim=0)
        gate, up = block.ffn.gate_up.weight.split([hidden, hidden], dim=0)
        tensors.update({
            f"{prefix}.self_attn.q_proj.weight": q,
            f"{prefix}.self_attn.k_proj.weight": k,
            f"{prefix}.self_attn.v_proj.weight": v,
            f"{prefix}.self_attn.o_proj.weight": block.mixer.out_proj.weight,
            f"{prefix}.mlp.gate_proj.weight": gate,
            f"{prefix}.mlp.up_proj.weight": up,
            f"{prefix}.mlp.down_proj.weight": block.ffn.down.weight,
            f"{prefix}.input_layernorm.weight": block.mixer_norm.weight,
            f"{prefix}.post_attention_layernorm.weight": block.ffn_norm.weight,
        })  # fmt: skip
    tensors["model.norm.weight"] = model.norm.weight
    tensors["lm_head.weight"] = model.lm_head.weight  # written even when tied: loaders accept both ways
    # safetensors refuses shared storage: every tensor gets its own contiguous fp32 copy
    return {name: t.detach().to("cpu", torch.float32).contiguous().clone() for name, t in tensors.items()}


def chat_template() -> str:
    """Our chat format (tokenizer.encode_chat) as the Jinja template HF tokenizers use."""
    return (
        "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|eot|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )


def export_hf_llama(model: ApertisModel, tokenizer: Any, out: str | Path) -> Path:
    """Write a folder transformers' LlamaForCausalLM / AutoTokenizer can load, or raise ExportError."""
    from safetensors.torch import save_file

    cfg = model.config
    problems = llama_incompatibilities(cfg)
    if problems:
        raise ExportError(
            f"cannot export preset {cfg.preset!r} as hf-llama: it is not Llama-compatible ({'; '.join(problems)}). "
            "Export it with --format apertis, or train a transformer-* preset for Llama export."
        )
    with atomic_directory(out) as tmp:
        save_file(llama_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_text(tmp / "config.json", json.dumps(llama_config(cfg, tokenizer), indent=2) + "\n")
        tokenizer.save(tmp / "tokenizer.json")
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": "<|eot|>",
            "pad_token": "<|pad|>",
            "model_max_length": cfg.max_seq_len,
            "clean_up_tokenization_spaces": False,
            "chat_template": chat_template(),
        }
        atomic_write_text(tmp / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2) + "\n")
        generation = {
            "bos_token_id": tokenizer.eot_id,
            "eos_token_id": tokenizer.eot_id,
            "pad_token_id": tokenizer.pad_id,
        }
        atomic_write_text(tmp / "generation_config.json", json.dumps(generation, indent=2) + "\n")
        atomic_write_text(tmp / "README.md", _llama_card(model, Path(out).name))
    return Path(out)


def export_gguf(model: ApertisModel, tokenizer: Any, out: str | Path, gguf_type: str = "f16") -> Path:
    """Write the GGUF file `out` (llama.cpp, Ollama...; f16 or q8_0; see gguf_export), or raise ExportError."""
    from .gguf_export import GGUFExportError, write_gguf  # imports the optional `gguf` package lazily

    cfg = model.config
    problems = llama_incompatibilities(cfg)
    if problems:
        raise ExportError(
            f"cannot export preset {cfg.preset!r} as GGUF: GGUF runners (llama.cpp, Ollama...) implement only "
            f"known architectures, and this model is not a Llama ({'; '.join(problems)}). "
            "Export it with --format apertis, or train a transformer-* preset for GGUF export."
        )
    description = (
        f"Apertis Studio {cfg.preset} ({model.num_parameters():,} parameters, {cfg.n_layers} layers x {cfg.d_model})"
    )
    try:
        return write_gguf(cfg, llama_state_dict(model), tokenizer, out, gguf_type, chat_template(), description)
    except GGUFExportError as error:
        raise ExportError(str(error)) from error


def _llama_card(model: ApertisModel, name: str) -> str:
    cfg = model.config
    return (
        f"# {name}\n\nA Llama-architecture language model trained with Apertis Studio (preset {cfg.preset}, "
        f"{model.num_parameters():,} parameters, {cfg.n_layers} layers x {cfg.d_model}, vocabulary {cfg.vocab_size}).\n\n"
        "Hugging Face format: load with `transformers.AutoModelForCausalLM.from_pretrained(folder)` and "
        "`AutoTokenizer.from_pretrained(folder)`; the chat template is in tokenizer_config.json.\n"
    )
