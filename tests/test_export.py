"""Export: Apertis bundles round-trip exactly; hf-llama folders compute what our Transformer computes."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from apertis_core import ApertisModel
from apertis_core.bundle import load_bundle, save_bundle
from apertis_core.export import ExportError, export_model, find_model_dir
from apertis_core.tokenizer import Tokenizer

from conftest import tiny_config


def _tiny_bundle(path, preset="apertis-hybrid-nano", **overrides):
    tokenizer = Tokenizer.byte_level()
    model = ApertisModel(tiny_config(preset, vocab_size=tokenizer.vocab_size, **overrides)).eval()
    with torch.no_grad():  # larger than init scale, so that a wrong mapping shows in the logits
        for param in model.parameters():
            param.normal_(0.0, 0.2).add_(1.0 if param.dim() == 1 else 0.0)
    save_bundle(path, model, tokenizer, card={"steps": 123})
    return model, tokenizer


def _ids(vocab, length=24):
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(1))


def test_apertis_export_round_trips_with_identical_logits(tmp_path):
    model, tokenizer = _tiny_bundle(tmp_path / "src")
    out = export_model(tmp_path / "src", tmp_path / "out")
    loaded, loaded_tokenizer = load_bundle(out)
    ids = _ids(tokenizer.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded_tokenizer.to_json_str() == tokenizer.to_json_str()
    card = (out / "README.md").read_text()
    assert "steps | 123" in card and "exported from | src" in card


def test_a_run_folder_exports_its_newest_model(tmp_path):
    run = tmp_path / "run"
    _tiny_bundle(run / "checkpoints" / "step_0000010", "transformer-nano")
    _tiny_bundle(run / "final", "transformer-nano")
    os.utime(run / "checkpoints" / "step_0000010" / "model.safetensors", (1e9, 1e9))
    assert find_model_dir(run) == run / "final"
    os.utime(run / "final" / "model.safetensors", (1e8, 1e8))
    assert find_model_dir(run) == run / "checkpoints" / "step_0000010"


def test_an_exported_final_bundle_names_its_run_not_final(tmp_path):
    _tiny_bundle(tmp_path / "shakespeare-run" / "final", "transformer-nano")
    card = (export_model(tmp_path / "shakespeare-run" / "final", tmp_path / "out") / "README.md").read_text()
    assert "exported from | shakespeare-run" in card and "| final |" not in card


def test_export_refuses_an_empty_folder_and_its_own_source(tmp_path):
    with pytest.raises(ExportError, match="no model here"):
        find_model_dir(tmp_path)
    _tiny_bundle(tmp_path / "src", "transformer-nano")
    with pytest.raises(ExportError, match="new folder"):
        export_model(tmp_path / "src", tmp_path / "src")


def _reference_llama_logits(folder, ids):
    """Llama forward written from the HF config and tensor names alone (torch only, no transformers)."""
    cfg = json.loads((folder / "config.json").read_text())
    w = load_file(folder / "model.safetensors")
    heads, kv_heads, head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps = cfg["rms_norm_eps"]

    def rms_norm(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return torch.cat((-x2, x1), dim=-1)

    batch, length = ids.shape
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    causal = torch.full((length, length), float("-inf")).triu(1)

    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(batch, length, heads, head_dim).transpose(1, 2)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(batch, length, kv_heads, head_dim).transpose(1, 2)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(batch, length, kv_heads, head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + causal
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, heads * head_dim)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"])
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    return rms_norm(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


@pytest.mark.parametrize("tied", [True, False])
def test_hf_llama_export_matches_an_independent_llama_forward(tmp_path, tied):
    model, tokenizer = _tiny_bundle(
        tmp_path / "src",
        "transformer-nano",
        n_heads=4,
        n_kv_heads=2,
        rope_theta=500.0,
        tie_embeddings=tied,
        ffn_hidden=48,
    )
    out = export_model(tmp_path / "src", tmp_path / "hf", format="hf-llama")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is tied
    assert (cfg["intermediate_size"], cfg["num_key_value_heads"], cfg["rope_theta"]) == (48, 2, 500.0)
    assert Tokenizer.load(out / "tokenizer.json").vocab_size == cfg["vocab_size"]
    ids = _ids(tokenizer.vocab_size, 40)
    with torch.no_grad():
        ours = model(ids).logits
        reference = _reference_llama_logits(out, ids)
    assert ours.abs().max() > 1.0  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(reference, ours, atol=1e-4, rtol=1e-4)


def test_hf_llama_refuses_an_apertis_model_and_says_why(tmp_path):
    _tiny_bundle(tmp_path / "src", "apertis-nano")
    with pytest.raises(ExportError) as error:
        export_model(tmp_path / "src", tmp_path / "hf", format="hf-llama")
    message = str(error.value)
    assert "not Llama-compatible" in message
    assert "Selective Linear Attention" in message and "experts" in message and "STRC" in message
    assert not (tmp_path / "hf").exists()
