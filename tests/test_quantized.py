"""Int8 weights and inference dtypes: close to fp32 but not equal, smaller bundles that load and generate."""

import copy
import json

import pytest
import torch

from apertis_core import ApertisModel, Tokenizer, load_bundle, save_bundle
from apertis_core.bundle import BundleError
from apertis_core.cli.main import main
from apertis_core.export import ExportError, export_model
from apertis_core.generation import GenerationConfig, generate, generate_many
from apertis_core.quantize import (
    Int8Embedding,
    Int8Linear,
    dequantize_model,
    prepare_for_inference,
    quantization_of,
    quantize_model,
)

from conftest import tiny_config

TOKENIZER = Tokenizer.byte_level()
GREEDY = GenerationConfig(max_new_tokens=8, temperature=0, repetition_penalty=1.0)


def model_of(preset: str) -> ApertisModel:
    return ApertisModel(tiny_config(preset, vocab_size=TOKENIZER.vocab_size)).eval()


@pytest.mark.parametrize("preset", ["apertis-nano", "transformer-nano", "apertis-hybrid-nano"])
def test_int8_logits_are_close_to_fp32_but_not_equal(preset):
    model = model_of(preset)
    ids = torch.randint(0, TOKENIZER.vocab_size, (2, 24))
    with torch.no_grad():
        reference = model(ids).logits
        quantized = quantize_model(copy.deepcopy(model))(ids).logits
    error = (quantized - reference).abs().max()
    assert 0 < error < 0.05 * reference.abs().max()


def test_every_block_linear_head_and_embedding_become_int8_but_routers_do_not():
    model = quantize_model(model_of("apertis-nano"))
    assert quantization_of(model) == "int8"
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.embed, Int8Embedding)
    assert model.embed.weight is model.lm_head.weight  # tied: one int8 matrix
    plain = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert plain and all(name.endswith("router") for name in plain)
    assert model.num_parameters() == model_of("apertis-nano").num_parameters()


def test_an_int8_model_refuses_to_train():
    model = quantize_model(model_of("apertis-nano")).train()
    with pytest.raises(ValueError, match="cannot be trained"):
        model(torch.tensor([[1, 2, 3]]))


def test_cpu_kernels_agree_with_the_dequantising_path_a_gpu_takes():
    layer = Int8Linear.from_float(torch.nn.Linear(64, 48, bias=False).eval())
    x = torch.randn(3, 5, 64)
    kernel, plain = layer(x), layer(x, use_kernels=False)
    assert kernel.shape == plain.shape == (3, 5, 48)
    torch.testing.assert_close(kernel, plain, atol=0.05 * plain.abs().max().item(), rtol=0)


def test_batched_int8_generation_equals_one_at_a_time():
    model = quantize_model(model_of("apertis-hybrid-nano"))
    prompts = [[5, 6, 7], [9], list(range(20, 31))]
    batched = [[] for _ in prompts]
    for index, token in generate_many(model, prompts, GREEDY):
        batched[index].append(token)
    assert batched == [list(generate(model, p, GREEDY)) for p in prompts]


def test_int8_export_is_smaller_records_itself_and_generates_like_the_quantized_model(tmp_path):
    model = model_of("apertis-nano")
    save_bundle(tmp_path / "fp32", model, TOKENIZER)
    out = export_model(tmp_path / "fp32", tmp_path / "int8", quantize="int8")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == "int8"
    assert (out / "model.safetensors").stat().st_size < 0.6 * (tmp_path / "fp32" / "model.safetensors").stat().st_size
    loaded, _ = load_bundle(out)
    assert quantization_of(loaded) == "int8"
    expected = quantize_model(copy.deepcopy(model))
    prompt = TOKENIZER.encode("To be")
    assert list(generate(loaded, prompt, GREEDY)) == list(generate(expected, prompt, GREEDY))
    assert "int8" in (out / "README.md").read_text()


def test_an_int8_bundle_exports_to_float_formats_dequantized(tmp_path):
    model = quantize_model(model_of("transformer-nano"))
    save_bundle(tmp_path / "int8", model, TOKENIZER)
    ids = torch.randint(0, TOKENIZER.vocab_size, (1, 12))
    with torch.no_grad():
        expected = model(ids).logits
        plain = dequantize_model(model)
        assert quantization_of(plain) == "none" and plain.lm_head.weight is plain.embed.weight
        torch.testing.assert_close(plain(ids).logits, expected, atol=0.05, rtol=0)
    out = export_model(tmp_path / "int8", tmp_path / "hf", format="hf-llama")
    assert (out / "model.safetensors").is_file()


def test_bad_quantization_settings_are_refused_clearly(tmp_path):
    save_bundle(tmp_path / "b", model_of("apertis-nano"), TOKENIZER)
    with pytest.raises(ExportError, match="format apertis"):
        export_model(tmp_path / "b", tmp_path / "x", format="hf", quantize="int8")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    (tmp_path / "b" / "config.json").write_text(json.dumps({**config, "quantization": "int3"}))
    with pytest.raises(BundleError, match="config.json: quantization 'int3'"):
        load_bundle(tmp_path / "b")
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_model(model_of("apertis-nano"), "int4")
    with pytest.raises(ValueError, match="GPU only"):
        prepare_for_inference(model_of("apertis-nano"), dtype="fp16")


def test_bf16_on_the_cpu_generates_what_fp32_mostly_does():
    model = model_of("apertis-hybrid-nano")
    prompt = [3, 14, 15, 92, 65]
    expected = list(generate(model, prompt, GREEDY))
    half = prepare_for_inference(copy.deepcopy(model), dtype="bf16")
    assert half.norm.weight.dtype == torch.bfloat16
    assert len(list(generate(half, prompt, GREEDY))) == len(expected)


def test_cli_generates_with_int8_weights_and_several_prompts(tmp_path, capsys):
    save_bundle(tmp_path / "b", model_of("apertis-nano"), TOKENIZER)
    common = ["generate", "--model", str(tmp_path / "b"), "--max-new-tokens", "5", "--temperature", "0"]
    assert main([*common, "--quantize", "int8", "--prompt", "To be", "--prompt", "Or not"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("To be") and "\n\nOr not" in out
    assert main([*common, "--dtype", "fp16", "--prompt", "x"]) == 2  # fp16 needs a GPU: one clear line
    assert "GPU only" in capsys.readouterr().err
    assert (
        main(["export", "--checkpoint", str(tmp_path / "b"), "--out", str(tmp_path / "q"), "--quantize", "int8"]) == 0
    )
    assert quantization_of(load_bundle(tmp_path / "q")[0]) == "int8"


def test_studio_chat_answers_with_int8_weights_kept_apart_from_fp32(services):
    from studio.tabs import chat

    store = services.store
    save_bundle(store.models_dir / "tiny", model_of("apertis-nano"), TOKENIZER)
    model_id = store.add_model("tiny", store.models_dir / "tiny", kind="bundle")
    settings = ("", 0.0, 20, 0.95, 4, 1.0)  # system prompt, greedy, top-k, top-p, max new tokens, penalty
    *_, (history, speed) = chat.chat(services, {"text": "Hi", "files": []}, [], model_id, *settings, "int8")
    assert history[-1]["role"] == "assistant" and "tiny (int8)" in speed and "tokens/s" in speed
    folder = store.get_model(model_id)["path"]
    int8, fp32 = services.model_cache.get(folder, "int8")[0], services.model_cache.get(folder)[0]
    assert quantization_of(int8) == "int8" and quantization_of(fp32) == "none"


def test_a_run_refuses_to_train_from_an_int8_bundle(tmp_path):
    from apertis_core import ConfigError
    from apertis_core.training import RunConfig
    from apertis_core.training.build import start_model

    save_bundle(tmp_path / "fp32", model_of("apertis-nano"), TOKENIZER)
    export_model(tmp_path / "fp32", tmp_path / "int8", quantize="int8")
    run = RunConfig.from_dict({"init_from": str(tmp_path / "int8"), "out_dir": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match="int8 weights for inference, which cannot be trained"):
        start_model(run)
    assert start_model(RunConfig.from_dict({"init_from": str(tmp_path / "fp32")}))[0].training
