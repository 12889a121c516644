"""GGUF export (llama.cpp, Ollama, LM Studio...) for Llama-compatible models: the transformer-* presets.

`export.export_model(source, out, "gguf", gguf_type)` checks that the model is a Llama and calls
`write_gguf(config, hf_llama_tensors, tokenizer, path, gguf_type)`, which writes one `.gguf` file with
the `gguf` package (an optional dependency: `pip install gguf`): architecture "llama", llama.* hyperparameters,
the byte-level BPE tokenizer as tokenizer.ggml.model "gpt2" (tokens, token types, merges, special ids, chat template),
and the weights under llama.cpp's tensor names, as f16 or q8_0 (1-D norm weights stay f32, as
llama.cpp's own converter keeps them).

Weights come in under Hugging Face Llama names (the `hf-llama` mapping, `export.llama_state_dict`; this
module does not import `export`, which imports it). Our RoPE is the half-split "rotate_half" layout that
Hugging Face Llama uses; llama.cpp's LLAMA architecture rotates adjacent pairs
(interleaved) instead, so - exactly as llama.cpp's convert_hf_to_gguf.py does for HF Llama checkpoints -
the rows of the Q and K projections are permuted within each head (`permute_for_llama_cpp`); the
dot products, and so the model's outputs, are unchanged. `unpermute_from_llama_cpp` undoes it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

GGUF_TYPES = ("f16", "q8_0")
Q8_0_BLOCK = 32  # values per q8_0 block; a row must be a whole number of blocks


class GGUFExportError(ValueError):
    """The GGUF file cannot be written; the message says why and what to do (export.py re-raises it as
    an ExportError)."""


def _import_gguf():
    try:
        import gguf
    except ImportError as exc:
        raise GGUFExportError(
            "GGUF export needs the optional `gguf` package: pip install gguf (then run the export again)"
        ) from exc
    return gguf


# ---- tensors ------------------------------------------------------------------------------------------
def permute_for_llama_cpp(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF (rotate_half) row order -> llama.cpp (interleaved pairs) row order within each head: the
    `permute` of llama.cpp's convert_hf_to_gguf.py. For K, pass the number of KV heads."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_from_llama_cpp(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_for_llama_cpp`."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(cfg: Any, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF Llama-named weights (`export.llama_state_dict`) under llama.cpp's tensor names, Q/K permuted
    for its RoPE; `output.weight` only for untied embeddings."""
    tensors = {"token_embd.weight": hf["model.embed_tokens.weight"]}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}"
        tensors.update({
            f"blk.{i}.attn_norm.weight": hf[f"{p}.input_layernorm.weight"],
            f"blk.{i}.attn_q.weight": permute_for_llama_cpp(hf[f"{p}.self_attn.q_proj.weight"], cfg.n_heads),
            f"blk.{i}.attn_k.weight": permute_for_llama_cpp(hf[f"{p}.self_attn.k_proj.weight"], cfg.kv_heads()),
            f"blk.{i}.attn_v.weight": hf[f"{p}.self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": hf[f"{p}.self_attn.o_proj.weight"],
            f"blk.{i}.ffn_norm.weight": hf[f"{p}.post_attention_layernorm.weight"],
            f"blk.{i}.ffn_gate.weight": hf[f"{p}.mlp.gate_proj.weight"],
            f"blk.{i}.ffn_up.weight": hf[f"{p}.mlp.up_proj.weight"],
            f"blk.{i}.ffn_down.weight": hf[f"{p}.mlp.down_proj.weight"],
        })  # fmt: skip
    tensors["output_norm.weight"] = hf["model.norm.weight"]
    if not cfg.tie_embeddings:  # tied: llama.cpp uses token_embd for the output when `output` is absent
        tensors["output.weight"] = hf["lm_head.weight"]
    return {name: t.contiguous() for name, t in tensors.items()}


def _encode_tensor(gguf: Any, array: np.ndarray, gguf_type: str) -> tuple[np.ndarray, Any]:
    """(data, raw_dtype) for GGUFWriter.add_tensor: 1-D tensors f32, matrices f16 or q8_0 (f16 when a
    row is not a whole number of q8_0 blocks, as llama.cpp falls back)."""
    if array.ndim == 1:
        return array.astype(np.float32), gguf.GGMLQuantizationType.F32
    if gguf_type == "q8_0" and array.shape[-1] % Q8_0_BLOCK == 0:
        q8 = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(array.astype(np.float32), q8), q8
    return array.astype(np.float16), gguf.GGMLQuantizationType.F16


# ---- tokenizer ----------------------------------------------------------------------------------------
def tokenizer_vocab(tokenizer: Any, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, GGUF token types, merges "a b") from the tokenizer.json; ids past the tokenizer's
    vocabulary (an embedding larger than it) become unused [PAD<id>] tokens, as llama.cpp's converter does."""
    from gguf import TokenType

    data = json.loads(tokenizer.to_json_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(f"GGUF export supports byte-level BPE tokenizers, not {model.get('type')!r}")
    by_id: dict[int, tuple[str, int]] = {i: (tok, TokenType.NORMAL) for tok, i in model["vocab"].items()}
    for added in data.get("added_tokens") or []:
        kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    if by_id and max(by_id) >= n_vocab:
        raise GGUFExportError(
            f"the tokenizer has ids up to {max(by_id)} but the model's vocabulary is {n_vocab}; "
            "the model and its tokenizer do not belong together"
        )
    tokens, types = [], []
    for i in range(n_vocab):
        tok, kind = by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED))
        tokens.append(tok)
        types.append(int(kind))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return tokens, types, merges


# ---- the file -----------------------------------------------------------------------------------------
def write_gguf(
    cfg: Any,
    tensors: dict[str, torch.Tensor],
    tokenizer: Any,
    out: str | Path,
    gguf_type: str = "f16",
    chat_template: str | None = None,
    description: str = "",
) -> Path:
    """Write a Llama model to the GGUF file `out` (replaced atomically); returns its path. `cfg` is its
    ModelConfig (already checked to be Llama-compatible), `tensors` its weights under HF Llama names."""
    if gguf_type not in GGUF_TYPES:
        raise GGUFExportError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    gguf = _import_gguf()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch="llama")
        _add_metadata(gguf, writer, cfg, tokenizer, gguf_type, out.stem, chat_template, description)
        with torch.no_grad():
            for name, tensor in gguf_tensors(cfg, tensors).items():
                data, raw_dtype = _encode_tensor(gguf, tensor.detach().to("cpu", torch.float32).numpy(), gguf_type)
                writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _add_metadata(
    gguf: Any,
    writer: Any,
    cfg: Any,
    tokenizer: Any,
    gguf_type: str,
    name: str,
    chat_template: str | None,
    description: str,
) -> None:
    writer.add_name(name)
    if description:
        writer.add_description(description)
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if gguf_type == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_file_type(file_type)
    if gguf_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    head_dim = cfg.dim_head()
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.dense_hidden())
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.kv_heads())
    if head_dim * cfg.n_heads != cfg.d_model:  # llama.cpp assumes d_model / n_heads otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    if cfg.rope_scaling != 1.0:  # positions divided by the factor: llama.cpp's "linear" scaling
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(cfg.rope_scaling))
    writer.add_layer_norm_rms_eps(float(cfg.norm_eps))

    tokens, types, merges = tokenizer_vocab(tokenizer, cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")  # byte-level BPE
    writer.add_tokenizer_pre("gpt-2")  # HF ByteLevel(use_regex=True) splits text with GPT-2's regex
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    # as the hf-llama export: documents are separated (so preceded) by <|eot|>; no BOS is added to prompts
    writer.add_bos_token_id(tokenizer.eot_id)
    writer.add_eos_token_id(tokenizer.eot_id)
    writer.add_eot_token_id(tokenizer.eot_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)
