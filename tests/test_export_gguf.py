"""GGUF export: a transformer-* bundle becomes a llama-architecture .gguf that gguf's own reader reads back
with the right metadata, llama.cpp tensor names and shapes, the weights (f16 / q8_0) and the tokenizer."""

import math

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from apertis_core import ApertisModel  # noqa: E402
from apertis_core.bundle import save_bundle  # noqa: E402
from apertis_core.export import ExportError, export_model  # noqa: E402
from apertis_core.gguf_export import permute_for_llama_cpp, unpermute_from_llama_cpp  # noqa: E402
from apertis_core.model.layers import Rotary  # noqa: E402
from apertis_core.tokenizer import Tokenizer  # noqa: E402

from conftest import SHAKESPEARE, tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A tokenizer with real merges, so merges and tokens round-trip through the GGUF."""
    return Tokenizer.train([SHAKESPEARE.read_text(encoding="utf-8")[:20000]], vocab_size=300)


def _bundle(path, tokenizer, preset="transformer-nano", **overrides):
    model = ApertisModel(tiny_config(preset, vocab_size=tokenizer.vocab_size, **overrides)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2).add_(1.0 if param.dim() == 1 else 0.0)
    save_bundle(path, model, tokenizer)
    return model


def _fields(reader):
    """Scalar / string / array metadata as Python values."""
    out = {}
    for name, field in reader.fields.items():
        if not field.types:
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            if field.types[-1] == gguf.GGUFValueType.STRING:
                out[name] = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            else:
                out[name] = [field.parts[i][0].item() for i in field.data]
        elif field.types[0] == gguf.GGUFValueType.STRING:
            out[name] = bytes(field.parts[field.data[0]]).decode("utf-8")
        else:
            out[name] = field.parts[field.data[0]][0].item()
    return out


def _expected(model):
    """Our weights under llama.cpp names, in HF (un-permuted) row order."""
    cfg = model.config
    q_rows, kv_rows, hidden = cfg.n_heads * cfg.dim_head(), cfg.kv_heads() * cfg.dim_head(), cfg.dense_hidden()
    out = {"token_embd.weight": model.embed.weight, "output_norm.weight": model.norm.weight}
    if not cfg.tie_embeddings:
        out["output.weight"] = model.lm_head.weight
    for i, block in enumerate(model.blocks):
        q, k, v = block.mixer.qkv.weight.split([q_rows, kv_rows, kv_rows], dim=0)
        gate, up = block.ffn.gate_up.weight.split([hidden, hidden], dim=0)
        out.update({
            f"blk.{i}.attn_q.weight": q, f"blk.{i}.attn_k.weight": k, f"blk.{i}.attn_v.weight": v,
            f"blk.{i}.attn_output.weight": block.mixer.out_proj.weight,
            f"blk.{i}.ffn_gate.weight": gate, f"blk.{i}.ffn_up.weight": up,
            f"blk.{i}.ffn_down.weight": block.ffn.down.weight,
            f"blk.{i}.attn_norm.weight": block.mixer_norm.weight, f"blk.{i}.ffn_norm.weight": block.ffn_norm.weight,
        })  # fmt: skip
    return {name: t.detach().float().numpy() for name, t in out.items()}


def _read_weights(reader, cfg):
    """Dequantised weights from the file, Q/K permutation undone."""
    out = {}
    for tensor in reader.tensors:
        data = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        data = data.reshape([int(n) for n in reversed(tensor.shape)])  # ggml ne order is reversed
        if tensor.name.endswith("attn_q.weight"):
            data = unpermute_from_llama_cpp(torch.from_numpy(data), cfg.n_heads).numpy()
        elif tensor.name.endswith("attn_k.weight"):
            data = unpermute_from_llama_cpp(torch.from_numpy(data), cfg.kv_heads()).numpy()
        out[tensor.name] = data
    return out


def test_f16_gguf_metadata_tensors_weights_and_tokenizer(tmp_path, bpe_tokenizer):
    model = _bundle(tmp_path / "src", bpe_tokenizer, tie_embeddings=False, rope_scaling=2.0)
    cfg = model.config
    out = export_model(tmp_path / "src", tmp_path / "model.gguf", "gguf")
    assert out == tmp_path / "model.gguf" and out.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    reader = gguf.GGUFReader(out)
    meta = _fields(reader)

    assert meta["general.architecture"] == "llama"
    assert meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    assert meta["llama.context_length"] == cfg.max_seq_len
    assert meta["llama.embedding_length"] == cfg.d_model
    assert meta["llama.block_count"] == cfg.n_layers
    assert meta["llama.feed_forward_length"] == cfg.dense_hidden()
    assert meta["llama.attention.head_count"] == cfg.n_heads
    assert meta["llama.attention.head_count_kv"] == cfg.kv_heads() != cfg.n_heads  # GQA
    assert meta["llama.rope.dimension_count"] == cfg.dim_head()
    assert meta["llama.vocab_size"] == cfg.vocab_size
    assert math.isclose(meta["llama.attention.layer_norm_rms_epsilon"], cfg.norm_eps, rel_tol=1e-6)
    assert math.isclose(meta["llama.rope.freq_base"], cfg.rope_theta, rel_tol=1e-6)
    assert meta["llama.rope.scaling.type"] == "linear" and meta["llama.rope.scaling.factor"] == 2.0

    # the tokenizer round-trips: tokens by id, types, merges, special ids
    import json

    tok_json = json.loads(bpe_tokenizer.to_json_str())
    vocab = {tok: i for tok, i in tok_json["model"]["vocab"].items()}
    vocab.update({t["content"]: t["id"] for t in tok_json["added_tokens"]})
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    assert merges and meta["tokenizer.ggml.merges"] == merges
    types = meta["tokenizer.ggml.token_type"]
    assert types[bpe_tokenizer.eot_id] == types[bpe_tokenizer.pad_id] == int(gguf.TokenType.CONTROL)
    assert types.count(int(gguf.TokenType.NORMAL)) == len(types) - 6
    assert meta["tokenizer.ggml.bos_token_id"] == meta["tokenizer.ggml.eos_token_id"] == bpe_tokenizer.eot_id
    assert meta["tokenizer.ggml.padding_token_id"] == bpe_tokenizer.pad_id
    assert "<|assistant|>" in meta["tokenizer.chat_template"]

    # tensors: llama.cpp names, ggml shapes (reversed), f32 norms, f16 matrices, values to fp16 precision
    expected = _expected(model)
    assert {t.name for t in reader.tensors} == set(expected)
    for tensor in reader.tensors:
        assert [int(n) for n in tensor.shape] == list(reversed(expected[tensor.name].shape)), tensor.name
        want = gguf.GGMLQuantizationType.F32 if expected[tensor.name].ndim == 1 else gguf.GGMLQuantizationType.F16
        assert tensor.tensor_type == want, tensor.name
    for name, data in _read_weights(reader, cfg).items():
        np.testing.assert_allclose(data, expected[name], rtol=1e-3, atol=1e-4, err_msg=name)
        if name.endswith(("attn_q.weight", "attn_k.weight")):  # really permuted, not copied
            raw = next(t for t in reader.tensors if t.name == name).data
            assert not np.allclose(np.asarray(raw, dtype=np.float32), expected[name], rtol=1e-3, atol=1e-4)


def test_q8_0_gguf_weights_within_quantisation_error(tmp_path, bpe_tokenizer):
    # ffn_hidden 48: ffn_down rows are not a whole number of 32-value blocks, so that tensor falls back to f16
    model = _bundle(tmp_path / "src", bpe_tokenizer, ffn_hidden=48)
    cfg = model.config
    out = export_model(tmp_path / "src", tmp_path / "q8.gguf", "gguf", gguf_type="q8_0")
    reader = gguf.GGUFReader(out)
    meta = _fields(reader)
    assert meta["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert meta["llama.feed_forward_length"] == 48
    expected = _expected(model)
    assert "output.weight" not in expected  # tied embeddings: llama.cpp reuses token_embd
    assert {t.name for t in reader.tensors} == set(expected)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["token_embd.weight"] == types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    for name, data in _read_weights(reader, cfg).items():
        want = expected[name]
        if types[name] == gguf.GGMLQuantizationType.Q8_0:
            blocks = want.reshape(-1, 32)  # the permutation moves whole rows, and rows are whole blocks...
            got = data.reshape(-1, 32)
            if name.endswith(("attn_q.weight", "attn_k.weight")):  # ...but blocks are made after permuting
                heads = cfg.n_heads if "attn_q" in name else cfg.kv_heads()
                perm = permute_for_llama_cpp(torch.from_numpy(want), heads).numpy()
                blocks = perm.reshape(-1, 32)
                got = permute_for_llama_cpp(torch.from_numpy(data), heads).numpy().reshape(-1, 32)
            scale = np.abs(blocks).max(axis=1, keepdims=True) / 127
            # q8_0 rounds to the nearest step of `scale` (stored as f16): at most half a step, plus f16 slack
            assert np.all(np.abs(got - blocks) <= scale * 0.5 + np.abs(blocks) * 2e-3 + 1e-6), name
            assert np.abs(got - blocks).max() > 0, name  # really quantised
        else:
            np.testing.assert_allclose(data, want, rtol=1e-3, atol=1e-4, err_msg=name)


def test_the_permutation_turns_our_rope_into_llama_cpp_interleaved_rope():
    """q.k after our half-split RoPE == q'.k' after llama.cpp's interleaved RoPE on the permuted weights."""
    heads, head_dim, d_model, seq = 2, 8, 16, 5
    wq, wk = torch.randn(heads * head_dim, d_model), torch.randn(heads * head_dim, d_model)
    x = torch.randn(seq, d_model)
    rotary = Rotary(head_dim, 10000.0)
    cos, sin = rotary.cos_sin(torch.arange(seq), torch.float32)

    def ours(w):
        h = (x @ w.T).view(seq, heads, head_dim).transpose(0, 1)  # (H, T, D)
        return Rotary.apply(h[None], cos, sin)[0]

    def interleaved(w):  # llama.cpp's normal (GGML_ROPE_TYPE_NORM) RoPE: pairs (2i, 2i+1) rotate by theta_i
        h = (x @ w.T).view(seq, heads, head_dim // 2, 2).transpose(0, 1)
        angle = torch.arange(seq)[:, None] / 10000.0 ** (torch.arange(0, head_dim, 2) / head_dim)[None, :]
        c, s = angle.cos(), angle.sin()
        a, b = h[..., 0], h[..., 1]
        return torch.stack([a * c - b * s, a * s + b * c], dim=-1).reshape(heads, seq, head_dim)

    ref = ours(wq) @ ours(wk).transpose(-1, -2)
    q, k = interleaved(permute_for_llama_cpp(wq, heads)), interleaved(permute_for_llama_cpp(wk, heads))
    got = q @ k.transpose(-1, -2)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(unpermute_from_llama_cpp(permute_for_llama_cpp(wq, heads), heads), wq)


def test_a_hybrid_preset_is_refused_and_no_file_is_left(tmp_path, bpe_tokenizer):
    _bundle(tmp_path / "src", bpe_tokenizer, preset="apertis-hybrid-nano")
    with pytest.raises(ExportError, match="GGUF runners .*known architectures.*transformer-\\*"):
        export_model(tmp_path / "src", tmp_path / "m.gguf", "gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_an_unknown_gguf_type_is_refused(tmp_path, bpe_tokenizer):
    _bundle(tmp_path / "src", bpe_tokenizer)
    with pytest.raises(ExportError, match="unknown GGUF type 'q4_0'"):
        export_model(tmp_path / "src", tmp_path / "m.gguf", "gguf", gguf_type="q4_0")


def test_cli_exports_gguf(tmp_path, bpe_tokenizer, capsys):
    from apertis_core.cli.main import main

    _bundle(tmp_path / "src", bpe_tokenizer)
    args = ["export", "--checkpoint", str(tmp_path / "src"), "--out", str(tmp_path / "m.gguf"), "--format", "gguf"]
    assert main([*args, "--gguf-type", "q8_0"]) == 0
    assert "gguf q8_0 format" in capsys.readouterr().out
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.architecture"]


def test_without_the_gguf_package_the_error_says_how_to_install_it(tmp_path, bpe_tokenizer, monkeypatch):
    import sys

    _bundle(tmp_path / "src", bpe_tokenizer)
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(ExportError, match="pip install gguf"):
        export_model(tmp_path / "src", tmp_path / "m.gguf", "gguf")
    assert not (tmp_path / "m.gguf").exists()
