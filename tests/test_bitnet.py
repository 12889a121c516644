"""BitNet b1.58 (model/bitnet.py, bitnet_pack.py): the quantisers, parity of the parallel and step forms,
training, the 2-bit packed export and its loading, and the switch from the CLI and the studio."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from apertis_core import ApertisModel
from apertis_core.bitnet_pack import latent_from_ternary, pack_ternary, unpack_ternary
from apertis_core.bundle import BundleError, load_bundle, save_bundle
from apertis_core.cli.main import main
from apertis_core.configio import ConfigError
from apertis_core.export import ExportError, export_model, llama_incompatibilities
from apertis_core.generation import GenerationConfig, generate
from apertis_core.model.bitnet import (
    BitLinear,
    quantise_activations,
    quantise_weights,
    ternary_parameters,
    ternary_parts,
)
from apertis_core.model.experts import AdaptiveExpertSystem
from apertis_core.tokenizer import Tokenizer

from conftest import SHAKESPEARE, tiny_config

FAMILIES = ["apertis-nano", "apertis-hybrid-nano", "transformer-nano"]


def _bitnet_bundle(path, preset="apertis-nano"):
    tokenizer = Tokenizer.byte_level()
    model = ApertisModel(tiny_config(preset, vocab_size=tokenizer.vocab_size, bitnet=True)).eval()
    save_bundle(path, model, tokenizer)
    return model, tokenizer


# ---- quantisers -------------------------------------------------------------------------------------
def test_weights_become_ternary_with_one_absmean_scale_per_matrix():
    stack = torch.randn(3, 8, 12) * torch.tensor([0.1, 1.0, 5.0])[:, None, None]  # three experts, three scales
    quantised = quantise_weights(stack)
    scales = stack.abs().mean(dim=(1, 2))
    for expert in range(3):
        levels = set((quantised[expert] / scales[expert]).round().unique().tolist())
        assert levels <= {-1.0, 0.0, 1.0} and len(levels) == 3
        assert torch.allclose(quantised[expert].abs().max(), scales[expert])
    codes, scale = ternary_parts(stack)
    assert codes.dtype == torch.int8 and scale.shape == (3,)
    assert torch.equal(codes.float() * scale[:, None, None], quantised)
    assert torch.equal(quantise_weights(torch.zeros(4, 4)), torch.zeros(4, 4))


def test_activations_are_rounded_to_int8_levels_of_each_tokens_absmax():
    x = torch.randn(2, 5, 16) * torch.logspace(-3, 3, 5)[None, :, None]  # tokens of very different sizes
    quantised = quantise_activations(x)
    levels = quantised * 127 / x.abs().amax(-1, keepdim=True)
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert levels.round().min() >= -128 and levels.round().max() == 127  # each row's largest is +-127
    assert (quantised - x).abs().max(-1).values.le(x.abs().amax(-1) / 254 * 1.001).all()  # half a level
    assert torch.equal(quantise_activations(torch.zeros(3, 4)), torch.zeros(3, 4))


def test_gradients_pass_straight_through_both_quantisers():
    layer = BitLinear(16, 8, bias=False)
    x = torch.randn(4, 16, requires_grad=True)
    grad = torch.randn(4, 8)
    layer(x).backward(grad)
    assert torch.allclose(x.grad, grad @ quantise_weights(layer.weight.detach()), atol=1e-6)
    assert torch.allclose(layer.weight.grad, grad.T @ quantise_activations(x.detach()), atol=1e-5)


def test_cpu_inference_multiplies_int8_codes_to_the_float_forms_numbers():
    layer = BitLinear(40, 24, bias=True)
    x = torch.randn(3, 5, 40)
    with torch.no_grad():
        fast = layer(x)
    expected = F.linear(quantise_activations(x), quantise_weights(layer.weight.detach()), layer.bias.detach())
    assert torch.allclose(fast, expected, atol=1e-5)
    (codes, scale), *_ = [value for _, value in layer._ternary_cache.values()]
    assert codes.dtype == torch.int8 and codes.shape == (24, 40)  # 1 byte per weight kept for decoding


# ---- the model --------------------------------------------------------------------------------------
def test_only_the_block_linears_and_experts_go_ternary_and_state_dicts_are_interchangeable():
    cfg = tiny_config("apertis-hybrid-nano")
    plain, bitnet = ApertisModel(cfg), ApertisModel(cfg.replace(bitnet=True))
    names = ternary_parameters(bitnet)
    assert "blocks.0.mixer.in_proj.weight" in names and "blocks.1.ffn.gate_up" in names
    assert not any("router" in n or "embed" in n or "norm" in n or "lm_head" in n for n in names)
    assert type(bitnet.lm_head) is torch.nn.Linear and ternary_parameters(plain) == {}
    experts = [m for m in bitnet.modules() if isinstance(m, AdaptiveExpertSystem)]
    assert experts and type(experts[0].router) is torch.nn.Linear
    bitnet.load_state_dict(plain.state_dict(), strict=True)  # same names and shapes
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits, bitnet(ids).logits)  # same weights, quantised forward


@pytest.mark.parametrize("preset", FAMILIES)
def test_step_matches_parallel_forward(preset):
    model = ApertisModel(tiny_config(preset, bitnet=True)).eval()
    ids = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        parallel = model(ids).logits
        prompt = model(ids[:, :15], state=model.init_state(2))
        logits, state = [prompt.logits], prompt.state
        for t in range(15, 23):
            step, state = model.step(ids[:, t], state)
            logits.append(step[:, None])
    assert (parallel - torch.cat(logits, 1)).abs().max() <= 1e-4


@pytest.mark.parametrize("dispatch", ["loop", "grouped"])
def test_expert_dispatches_agree_on_quantised_experts(dispatch):
    model = ApertisModel(tiny_config("apertis-nano", bitnet=True)).eval()
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        reference = model(ids).logits
        for module in model.modules():
            if isinstance(module, AdaptiveExpertSystem):
                module.dispatch = dispatch
        state, stepped = model.init_state(2), []
        for t in range(16):
            logits, state = model.step(ids[:, t], state)
            stepped.append(logits)
        assert (model(ids).logits - reference).abs().max() <= 1e-4
    assert (torch.stack(stepped, 1) - reference).abs().max() <= 1e-4


def test_the_inference_cache_follows_weight_updates():
    model = ApertisModel(tiny_config("apertis-nano", bitnet=True)).eval()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        before = model(ids).logits  # fills the cache
        for parameter in ternary_parameters(model).values():
            parameter.add_(torch.randn_like(parameter) * 0.05)
        cached = model(ids).logits
    fresh = model(ids).logits.detach()  # autograd on: quantised afresh, no cache
    assert not torch.allclose(before, cached) and torch.allclose(cached, fresh, atol=1e-5)


def test_a_tiny_bitnet_model_learns_shakespeare_in_80_steps():
    tokenizer = Tokenizer.byte_level()
    ids = torch.tensor(tokenizer.encode(SHAKESPEARE.read_text(encoding="utf-8")[:20000]))
    model = ApertisModel(tiny_config("apertis-nano", vocab_size=tokenizer.vocab_size, d_model=64, bitnet=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(80):
        starts = torch.randint(0, len(ids) - 33, (8,), generator=generator)
        batch = torch.stack([ids[s : s + 33] for s in starts])
        out = model(batch[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        (loss + out.aux_loss).backward()
        optimizer.step()
        losses.append(loss.item())
    last = sum(losses[-10:]) / 10
    assert losses[0] > 5.0 and last < 3.0  # from ln(262) = 5.6 to below the unigram entropy of English bytes


def test_bf16_autocast_runs_on_cpu():
    model = ApertisModel(tiny_config("apertis-hybrid-nano", bitnet=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randint(0, 97, (2, 16)))
    (out.logits.float().mean() + out.aux_loss).backward()
    assert torch.isfinite(out.logits.float()).all() and model.blocks[0].mixer.in_proj.weight.grad is not None


# ---- packing ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 12), (3, 7, 9), (1, 1), (2, 4, 2)])
def test_pack_unpack_round_trip_is_bit_exact(shape):
    codes = torch.randint(-1, 2, shape, dtype=torch.int8)
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], -(-shape[-1] // 4))
    assert torch.equal(unpack_ternary(packed, shape[-1]), codes)


@pytest.mark.parametrize("nonzero", [1, 7, 30])
def test_a_rebuilt_latent_weight_quantises_to_exactly_the_packed_codes(nonzero):
    codes = torch.zeros(30, dtype=torch.int8)
    codes[:nonzero] = torch.tensor([1, -1] * 15)[:nonzero]
    codes = codes[torch.randperm(30)].view(5, 6)
    rebuilt_codes, rebuilt_scale = ternary_parts(latent_from_ternary(codes, torch.tensor(0.37)))
    assert torch.equal(rebuilt_codes, codes) and torch.allclose(rebuilt_scale, torch.tensor(0.37))
    assert torch.equal(latent_from_ternary(torch.zeros(3, 4, dtype=torch.int8), torch.tensor(1.0)), torch.zeros(3, 4))


@pytest.mark.parametrize("preset", ["apertis-nano", "transformer-nano"])
def test_the_packed_bundle_loads_smaller_with_the_same_logits(tmp_path, preset):
    model, tokenizer = _bitnet_bundle(tmp_path / "src", preset)
    out = export_model(tmp_path / "src", tmp_path / "packed", "bitnet")
    assert json.loads((out / "config.json").read_text())["weight_packing"] == "ternary-2bit"
    stored, full = load_file(out / "model.safetensors"), load_file(tmp_path / "src" / "model.safetensors")
    ternary = ternary_parameters(model)
    for name in ternary:
        assert name not in stored and stored[name + ".ternary2"].dtype == torch.uint8
    packed_bytes = sum(stored[n + s].nbytes for n in ternary for s in (".ternary2", ".scale"))
    assert sum(full[n].nbytes for n in ternary) >= 15 * packed_bytes  # 32 bits -> 2 bits, and a scale
    assert (out / "model.safetensors").stat().st_size < (tmp_path / "src" / "model.safetensors").stat().st_size
    loaded, _ = load_bundle(out)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 20))
    with torch.no_grad():
        assert (loaded(ids).logits - model(ids).logits).abs().max() <= 1e-5
    for name, parameter in ternary_parameters(loaded).items():
        assert torch.equal(ternary_parts(parameter)[0], ternary_parts(ternary[name])[0])
    assert "packed 2 bits" in (out / "README.md").read_text()


def test_the_packed_bundle_generates_what_the_trained_model_does(tmp_path, capsys):
    model, tokenizer = _bitnet_bundle(tmp_path / "src")
    export_model(tmp_path / "src", tmp_path / "packed", "bitnet")
    loaded, _ = load_bundle(tmp_path / "packed")
    config = GenerationConfig(max_new_tokens=12, temperature=0.0)
    prompt = tokenizer.encode("To be")
    assert list(generate(loaded, prompt, config)) == list(generate(model, prompt, config))
    assert main(["generate", "--model", str(tmp_path / "packed"), "--prompt", "To be", "--max-new-tokens", "4"]) == 0


def test_bad_packing_is_refused(tmp_path):
    _bitnet_bundle(tmp_path / "src")
    tokenizer = Tokenizer.byte_level()
    save_bundle(
        tmp_path / "plain", ApertisModel(tiny_config("apertis-nano", vocab_size=tokenizer.vocab_size)), tokenizer
    )
    with pytest.raises(ExportError, match="not a BitNet model"):
        export_model(tmp_path / "plain", tmp_path / "nope", "bitnet")
    out = export_model(tmp_path / "src", tmp_path / "packed", "bitnet")
    config = json.loads((out / "config.json").read_text())
    for change, says in [({"bitnet": False}, "needs bitnet: true"), ({"weight_packing": "ternary-1bit"}, "not one")]:
        (out / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(BundleError, match=says):
            load_bundle(out)


def test_llama_exports_refuse_a_bitnet_model():
    assert any("BitNet" in p for p in llama_incompatibilities(tiny_config("transformer-nano", bitnet=True)))
    assert llama_incompatibilities(tiny_config("transformer-nano")) == []


# ---- CLI and studio ---------------------------------------------------------------------------------
def test_the_cli_trains_exports_and_generates_a_bitnet_model(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        "model: {preset: apertis-nano, d_model: 32, n_layers: 2, max_seq_len: 32}\n"
        f"data: {{path: {SHAKESPEARE.as_posix()}, seq_len: 32, vocab_size: 262}}\n"
        "train: {batch_size: 4, max_steps: 6, warmup_steps: 2, eval_every: 0, eval_batches: 2, device: cpu, "
        "precision: fp32, threads: 1}\n"
        f"out_dir: {(tmp_path / 'run').as_posix()}\n"
    )
    assert main(["train", str(config), "--set", "model.bitnet=true", "--no-plan"]) == 0
    assert json.loads((tmp_path / "run" / "final" / "config.json").read_text())["bitnet"] is True
    packed = tmp_path / "packed"
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(packed), "--format", "bitnet"]) == 0
    assert "bitnet format" in capsys.readouterr().out
    assert main(["generate", "--model", str(packed), "--prompt", "To be", "--max-new-tokens", "4"]) == 0


def test_studio_extra_settings_accept_bitnet(tmp_path):
    from studio import run_config
    from studio.app import Services
    from studio.jobs import JobManager
    from studio.store import Store
    from studio.tabs import dataset, train

    store = Store(tmp_path / "ws")
    services = Services(store=store, jobs=JobManager(store))
    data_id = dataset.add_demo(services, "text")[1]
    form = dict(train.BASIC_DEFAULTS, **train.ADVANCED_DEFAULTS)
    mapping = run_config.run_mapping(services, data_id, "apertis-nano", dict(form, extra="model.bitnet=true"))
    assert mapping["model"]["bitnet"] is True
    assert "bitnet" not in run_config.run_mapping(services, data_id, "apertis-nano", form)["model"]  # the default: off
    with pytest.raises(ConfigError, match="bitnet"):
        run_config.run_mapping(services, data_id, "apertis-nano", dict(form, extra="model.bitnet=maybe"))


def test_the_benchmark_runs_at_toy_sizes(capsys, tmp_path):
    from benchmarks import bitnet as bench

    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--json", str(tmp_path / "results.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    for title in ("1. Validation loss at equal steps", "2. model.safetensors size", "3. CPU decode"):
        assert title in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["bundle_bytes"]["bitnet packed"] < results["bundle_bytes"]["fp32"]
