"""`--format hf` folders load in transformers (trust_remote_code) and compute what apertis_core computes;
`--format hf-llama` folders load in transformers' own LlamaForCausalLM with the same logits."""

import json
import os
import sys

import pytest
import torch

from apertis_core import ApertisModel
from apertis_core.bundle import save_bundle
from apertis_core.export import export_model
from apertis_core.generation import GenerationConfig, generate
from apertis_core.tokenizer import Tokenizer

from conftest import REPO, tiny_config, tiny_image_config

transformers = pytest.importorskip("transformers")

PRESETS = ["apertis-nano", "apertis-hybrid-nano", "transformer-nano"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing may be fetched; the folder's code runs on this checkout's apertis_core, as it would on an
    installed apertis-studio."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.syspath_prepend(str(REPO))


@pytest.fixture(autouse=True)
def _modules_cache(tmp_path, monkeypatch):
    """transformers copies remote code into HF_MODULES_CACHE; keep that out of the user's home."""
    import transformers.dynamic_module_utils as dynamic
    import transformers.utils.hub as hub

    cache = str(tmp_path / "hf_modules")
    monkeypatch.setenv("HF_MODULES_CACHE", cache)
    monkeypatch.setattr(hub, "HF_MODULES_CACHE", cache, raising=False)
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", cache, raising=False)
    monkeypatch.setattr(sys, "path", [*sys.path, cache])


def _tiny_bundle(path, preset, **overrides):
    tokenizer = Tokenizer.byte_level()
    model = ApertisModel(tiny_config(preset, vocab_size=tokenizer.vocab_size, **overrides)).eval()
    with torch.no_grad():  # larger than init scale, so that a wrong mapping shows in the logits
        for param in model.parameters():
            param.normal_(0.0, 0.2).add_(1.0 if param.dim() == 1 else 0.0)
    save_bundle(path, model, tokenizer)
    return model, tokenizer


def _ids(vocab, length=24):
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(1))


def _load_hf(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, local_files_only=True)
    return model.eval()


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("tied", [True, False])
def test_hf_export_loads_in_transformers_with_the_same_logits_and_greedy_tokens(tmp_path, preset, tied):
    model, tokenizer = _tiny_bundle(tmp_path / "src", preset, tie_embeddings=tied)
    out = export_model(tmp_path / "src", tmp_path / "hf", format="hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "apertis" and cfg["tie_word_embeddings"] is tied
    assert set(cfg["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert {"configuration_apertis.py", "modeling_apertis.py", "model.safetensors", "tokenizer.json"} <= set(
        os.listdir(out)
    )

    hf = _load_hf(out)
    assert type(hf).__name__ == "ApertisForCausalLM" and isinstance(hf, transformers.PreTrainedModel)
    ids = _ids(tokenizer.vocab_size)
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert ours.abs().max() > 1.0  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    if not tied:  # the separate head really was loaded, not tied to the embeddings on the way
        assert not torch.equal(hf.model.lm_head.weight, hf.model.embed.weight)

    prompt = tokenizer.encode("To be, or not")
    greedy = GenerationConfig(max_new_tokens=8, temperature=0, repetition_penalty=1.0, stop_ids=[tokenizer.eot_id])
    expected = list(generate(model, prompt, greedy))
    with torch.no_grad():
        produced = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt) :].tolist()
    if tokenizer.eot_id in produced:  # transformers stops after emitting eos; ours stops before yielding it
        produced = produced[: produced.index(tokenizer.eot_id)]
    assert produced == expected and len(expected) > 0


def test_hf_export_tokenizer_loads_with_auto_tokenizer_and_encodes_as_ours(tmp_path):
    _, tokenizer = _tiny_bundle(tmp_path / "src", "apertis-hybrid-nano")
    out = export_model(tmp_path / "src", tmp_path / "hf", format="hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "Bonjour, naïve café! <image>\n  spaces"
    assert hf_tokenizer(text).input_ids == tokenizer.encode(text)
    assert hf_tokenizer.decode(tokenizer.encode(text)) == text
    assert hf_tokenizer.eos_token_id == tokenizer.eot_id and hf_tokenizer.pad_token_id == tokenizer.pad_id
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    chat = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert hf_tokenizer(chat).input_ids == tokenizer.encode_chat(messages, add_generation_prompt=True)[0]
    from apertis_core.export import chat_template
    from apertis_core.hf_export import CHAT_TEMPLATE

    assert CHAT_TEMPLATE == chat_template()  # hf and hf-llama folders chat alike


def test_hf_export_loss_is_the_shifted_cross_entropy(tmp_path):
    model, tokenizer = _tiny_bundle(tmp_path / "src", "apertis-nano")
    hf = _load_hf(export_model(tmp_path / "src", tmp_path / "hf", format="hf"))
    ids = _ids(tokenizer.vocab_size)
    with torch.no_grad():
        logits = model(ids).logits
        expected = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )
        torch.testing.assert_close(hf(ids, labels=ids).loss, expected, atol=1e-5, rtol=1e-5)


def test_hf_export_of_an_image_model_runs_text_and_images(tmp_path):
    pytest.importorskip("torchvision")
    tokenizer = Tokenizer.byte_level()
    config = tiny_image_config(tokenizer)
    model = ApertisModel(config).eval()
    save_bundle(tmp_path / "vlm", model, tokenizer)
    hf = _load_hf(export_model(tmp_path / "vlm", tmp_path / "hf", format="hf"))
    image = torch.rand(3, 16, 24, generator=torch.Generator().manual_seed(2))
    prompt = model.expand_image_tokens(tokenizer.encode("<image>\nwhat colour?"), [image])
    ids = torch.tensor([prompt])
    with torch.no_grad():
        torch.testing.assert_close(
            hf(ids, images=[image]).logits, model(ids, images=[image]).logits, atol=1e-5, rtol=1e-5
        )
        text = tokenizer.encode("plain text")
        torch.testing.assert_close(
            hf(torch.tensor([text])).logits, model(torch.tensor([text])).logits, atol=1e-5, rtol=1e-5
        )
        produced = hf.generate(ids, images=[image], max_new_tokens=6, do_sample=False)[0, len(prompt) :].tolist()
    greedy = GenerationConfig(max_new_tokens=6, temperature=0, repetition_penalty=1.0, stop_ids=[tokenizer.eot_id])
    expected = list(generate(model, prompt, greedy, images=[image]))
    if tokenizer.eot_id in produced:
        produced = produced[: produced.index(tokenizer.eot_id)]
    assert produced == expected


def test_hf_export_refuses_left_padding_with_a_reason(tmp_path):
    _, tokenizer = _tiny_bundle(tmp_path / "src", "transformer-nano")
    hf = _load_hf(export_model(tmp_path / "src", tmp_path / "hf", format="hf"))
    ids = _ids(tokenizer.vocab_size, 6)
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="left padding"):
        hf(ids, attention_mask=mask)


@pytest.mark.parametrize(("tied", "rope_scaling"), [(True, 1.0), (False, 1.0), (True, 2.0)])
def test_hf_llama_export_matches_transformers_llama_for_causal_lm(tmp_path, tied, rope_scaling):
    model, tokenizer = _tiny_bundle(
        tmp_path / "src",
        "transformer-nano",
        n_heads=4,
        n_kv_heads=2,
        rope_theta=500.0,
        rope_scaling=rope_scaling,
        tie_embeddings=tied,
        ffn_hidden=48,
    )
    out = export_model(tmp_path / "src", tmp_path / "llama", format="hf-llama")
    llama = transformers.LlamaForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()
    assert type(llama) is transformers.LlamaForCausalLM
    assert transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).__class__ is type(llama)
    ids = _ids(tokenizer.vocab_size, 40)
    with torch.no_grad():
        ours, theirs = model(ids).logits, llama(ids).logits
    assert ours.abs().max() > 1.0
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    prompt = tokenizer.encode("To be, or not")
    greedy = GenerationConfig(max_new_tokens=8, temperature=0, repetition_penalty=1.0, stop_ids=[tokenizer.eot_id])
    expected = list(generate(model, prompt, greedy))
    with torch.no_grad():
        produced = llama.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt) :].tolist()
    if tokenizer.eot_id in produced:
        produced = produced[: produced.index(tokenizer.eot_id)]
    assert produced == expected
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf_tokenizer("To be, or not").input_ids == prompt


def test_the_cli_exports_hf(tmp_path, capsys):
    from apertis_core.cli.main import main

    model, tokenizer = _tiny_bundle(tmp_path / "src", "apertis-hybrid-nano")
    assert main(["export", "--checkpoint", str(tmp_path / "src"), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert "(hf format)" in capsys.readouterr().out
    ids = _ids(tokenizer.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(_load_hf(tmp_path / "hf")(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
