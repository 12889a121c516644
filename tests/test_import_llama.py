"""`apertis import`: a Hugging Face Llama folder (made here by transformers from a tiny random
LlamaForCausalLM, nothing downloaded) becomes a bundle whose logits equal transformers' own."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch

from apertis_core.bundle import load_bundle
from apertis_core.cli.main import main
from apertis_core.llama_import import import_llama, import_llama_zip, is_hf_zip
from apertis_core.tokenizer import SPECIAL_TOKENS, Tokenizer

transformers = pytest.importorskip("transformers")

TEXT = "Hello, Llama! héllo 123"


def _llama(folder, vocab_size, tie=False, **extra):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        **extra,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norms too, so a swapped norm would show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _byte_level_without_apertis_specials():
    """A GPT-2/Llama-3 style byte-level BPE tokenizer.json with its own specials and none of Apertis'."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HF

    from apertis_core.tokenizer import _byte_to_char

    vocab = {ch: b for b, ch in _byte_to_char().items()}
    backend = HF(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(s, special=True) for s in ("<|begin_of_text|>", "<|end_of_text|>")])
    return backend.to_str()


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _our_logits(bundle, ids):
    ours, tokenizer = load_bundle(bundle)
    with torch.no_grad():
        return ours(torch.tensor([ids])).logits[0], tokenizer


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_imported_llama_matches_transformers_logits(tmp_path, tie):
    source = tmp_path / "llama"
    tokenizer = Tokenizer.byte_level()  # has Apertis' specials already: the vocabulary is kept as is
    hf = _llama(source, tokenizer.vocab_size, tie=tie)
    tokenizer.save(source / "tokenizer.json")
    out = import_llama(source, tmp_path / "bundle")
    ids = tokenizer.encode(TEXT)
    logits, imported_tok = _our_logits(out, ids)
    assert imported_tok.vocab_size == tokenizer.vocab_size and imported_tok.encode(TEXT) == ids
    torch.testing.assert_close(logits, _hf_logits(hf, ids), rtol=0, atol=1e-5)


def test_tokenizer_without_apertis_specials_gets_them_and_keeps_logits(tmp_path):
    source = tmp_path / "llama"
    text = _byte_level_without_apertis_specials()
    hf = _llama(source, 258, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0})
    (source / "tokenizer.json").write_text(text, encoding="utf-8")
    out = import_llama(source, tmp_path / "bundle")
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 258 + len(SPECIAL_TOKENS) and config["rope_scaling"] == 2.0
    from tokenizers import Tokenizer as HF

    ids = HF.from_str(text).encode(TEXT, add_special_tokens=False).ids
    logits, tokenizer = _our_logits(out, ids)
    assert tokenizer.encode(TEXT) == ids and tokenizer.decode(ids) == TEXT
    assert tokenizer.eot_id >= 258  # added after the source's tokens
    torch.testing.assert_close(logits[:, :258], _hf_logits(hf, ids), rtol=0, atol=1e-5)


def test_sharded_weights_and_padded_vocabulary(tmp_path):
    source = tmp_path / "llama"
    tokenizer = Tokenizer.byte_level()
    hf = _llama(source, tokenizer.vocab_size + 10)  # embedding rows beyond the tokenizer (padding)
    hf.save_pretrained(source, max_shard_size="100KB")
    assert (source / "model.safetensors.index.json").is_file()
    tokenizer.save(source / "tokenizer.json")
    out = import_llama(source, tmp_path / "bundle")
    ids = tokenizer.encode(TEXT)
    logits, imported = _our_logits(out, ids)
    assert imported.vocab_size == tokenizer.vocab_size + 10
    torch.testing.assert_close(logits, _hf_logits(hf, ids), rtol=0, atol=1e-5)


def test_cli_import_then_generate(tmp_path, capsys):
    source = tmp_path / "llama"
    tokenizer = Tokenizer.byte_level()
    _llama(source, tokenizer.vocab_size)
    tokenizer.save(source / "tokenizer.json")
    out = tmp_path / "bundle"
    assert main(["import", str(source), "--out", str(out)]) == 0
    assert "imported" in capsys.readouterr().out
    assert main(["generate", "--model", str(out), "--prompt", "Hi", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("Hi")
    assert main(["generate", "--model", str(out), "--prompt", "Hi", "--chat", "--max-new-tokens", "3"]) == 0


def test_non_llama_folders_are_refused_clearly(tmp_path, capsys):
    source = tmp_path / "gpt2"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert main(["import", str(source), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "model_type is 'gpt2'" in err and "only Llama-architecture" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()

    llama = tmp_path / "llama"
    _llama(
        llama,
        262,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "rope_theta": 10000.0,
            "original_max_position_embeddings": 32,
        },
    )
    Tokenizer.byte_level().save(llama / "tokenizer.json")
    assert main(["import", str(llama), "--out", str(tmp_path / "out")]) == 2
    assert "'yarn' is not supported" in capsys.readouterr().err

    config = json.loads((llama / "config.json").read_text())
    config.pop("rope_parameters")
    (llama / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    assert main(["import", str(llama), "--out", str(tmp_path / "out")]) == 2
    assert "attention_bias" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    (llama / "config.json").write_text(json.dumps(config))  # valid again; now a SentencePiece-style tokenizer
    from tokenizers import decoders

    data = json.loads((llama / "tokenizer.json").read_text())
    data["decoder"] = json.loads(decoders.Metaspace().__getstate__())
    (llama / "tokenizer.json").write_text(json.dumps(data))
    assert main(["import", str(llama), "--out", str(tmp_path / "out")]) == 2
    assert "not a byte-level BPE tokenizer" in capsys.readouterr().err


def test_zip_import_keeps_only_what_it_needs(tmp_path):
    source = tmp_path / "llama"
    tokenizer = Tokenizer.byte_level()
    hf = _llama(source, tokenizer.vocab_size)
    tokenizer.save(source / "tokenizer.json")
    (source / "pytorch_model.bin").write_bytes(b"not a pickle we would ever load")
    archive = tmp_path / "llama.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in source.iterdir():
            zf.write(path, f"llama/{path.name}")
    assert is_hf_zip(archive)
    left_out = import_llama_zip(archive, tmp_path / "models" / "x", work_dir=tmp_path / "work")
    assert "llama/pytorch_model.bin" in left_out
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["x"]  # nothing else left behind
    assert not any((tmp_path / "work").iterdir())
    ids = tokenizer.encode(TEXT)
    logits, _ = _our_logits(tmp_path / "models" / "x", ids)
    torch.testing.assert_close(logits, _hf_logits(hf, ids), rtol=0, atol=1e-5)


def test_studio_models_tab_imports_a_llama_zip(tmp_path):
    pytest.importorskip("gradio")
    from studio.app import Services
    from studio.jobs import JobManager
    from studio.store import Store
    from studio.tabs import models

    store = Store(tmp_path / "ws")
    services = Services(store=store, jobs=JobManager(store))
    source = tmp_path / "llama"
    tokenizer = Tokenizer.byte_level()
    _llama(source, tokenizer.vocab_size)
    tokenizer.save(source / "tokenizer.json")
    archive = tmp_path / "tiny-llama.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in source.iterdir():
            zf.write(path, path.name)  # files at the top of the zip this time
    message, table, _ = models.import_bundle(services, str(archive))
    assert message.startswith("Imported tiny-llama.zip"), message
    row = services.store.list_models()[0]
    model, _ = load_bundle(row["path"])
    assert model.config.layer_pattern == "A" and "imported from" in models.show_card(services, row["id"])

    (source / "config.json").write_text(json.dumps({"model_type": "mistral", "vocab_size": 262}))
    bad = tmp_path / "mistral.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        for path in source.iterdir():
            zf.write(path, path.name)
    message, table, _ = models.import_bundle(services, str(bad))
    assert "Import failed" in message and "only Llama-architecture" in message and len(table) == 1
    assert len(list(store.models_dir.iterdir())) == 1  # the refused zip left nothing in models/


def test_an_imported_llama_fine_tunes_from_its_weights(tmp_path):
    """`init_from` starts a run from the imported bundle: its tokenizer and architecture, and its weights
    (at a vanishing learning rate the run ends with the imported weights)."""
    from apertis_core.training import RunConfig, train

    source = tmp_path / "llama"
    tokenizer = Tokenizer.byte_level()
    _llama(source, tokenizer.vocab_size)
    tokenizer.save(source / "tokenizer.json")
    bundle = import_llama(source, tmp_path / "bundle")
    (tmp_path / "notes.txt").write_text(TEXT * 200)
    run = RunConfig.from_dict({
        "init_from": str(bundle),
        "data": {"path": str(tmp_path / "notes.txt"), "seq_len": 32},
        "train": {"batch_size": 2, "max_steps": 2, "lr": 1e-12, "warmup_steps": 1, "eval_every": 0, "save_every": 0,
                  "sample_every": 0, "precision": "fp32", "device": "cpu"},
        "out_dir": str(tmp_path / "run"),
    })  # fmt: skip
    tuned, tuned_tokenizer = load_bundle(train(run).bundle_dir)
    base, _ = load_bundle(bundle)
    assert tuned.config == base.config and tuned_tokenizer.to_json_str() == tokenizer.to_json_str()
    for (name, a), (_, b) in zip(tuned.state_dict().items(), base.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
