"""LoRA fine-tuning (apertis_core/finetune.py): a run trains only peft's adapters, its adapter files are
PEFT's own layout, merged and unmerged models give the same logits, and the CLI, export, loader and studio
form all handle it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from apertis_core import ApertisModel, Tokenizer, load_bundle, save_bundle
from apertis_core.bundle import BundleError
from apertis_core.cli.main import main
from apertis_core.configio import ConfigError
from apertis_core.finetune import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from apertis_core.training import Callback, RunConfig, train
from apertis_core.training.build import start_model

from conftest import REPO, SHAKESPEARE, tiny_config

peft = pytest.importorskip("peft")

DEMO = REPO / "assets" / "demo-model"
TRAIN = {"batch_size": 2, "max_steps": 4, "lr": 5e-2, "warmup_steps": 1, "eval_every": 0, "save_every": 2,
         "sample_every": 0, "precision": "fp32", "device": "cpu"}  # fmt: skip
IDS = torch.tensor([list(b"To be, or not to be")])


def _run(base, data, out, **finetune) -> RunConfig:
    return RunConfig.from_dict({
        "finetune": {"base": str(base), "rank": 4, **finetune},
        "data": {"path": str(data), "seq_len": 32},
        "train": TRAIN,
        "out_dir": str(out),
    })  # fmt: skip


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny base bundle (SLA, experts, STRC) and a 4-step LoRA run on it, checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    tokenizer = Tokenizer.byte_level()
    save_bundle(root / "base", ApertisModel(tiny_config("apertis-nano", vocab_size=tokenizer.vocab_size)), tokenizer)
    (root / "notes.txt").write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    run = _run(root / "base", root / "notes.txt", root / "run")
    return root, run, train(run)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_a_lora_run_trains_only_the_adapters(tuned):
    root, run, result = tuned
    model, _ = start_model(run)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    state = torch.load(root / "run/checkpoints/step_0000004/trainer_state.pt", weights_only=True)
    assert sum(len(group["params"]) for group in state["optimizer"]["param_groups"]) == len(trainable)

    # final/ is the trained in-memory model, merged. The step-4 adapter merged onto the base *file* gives the
    # same tensors bit for bit, so the run left every base weight as the file has it; only adapted layers moved.
    assert (
        main(["export", "--checkpoint", f"{root}/run/checkpoints/step_0000004", "--out", f"{root}/m", "--merge"]) == 0
    )
    final = load_file(f"{result.bundle_dir}/model.safetensors")
    from_checkpoint = load_file(f"{root}/m/model.safetensors")
    base = load_file(f"{root}/base/model.safetensors")
    adapted = {name.partition(".lora_")[0] + ".weight" for name in trainable}
    assert final.keys() == from_checkpoint.keys() == base.keys() and adapted <= base.keys()
    for name in base:
        assert torch.equal(final[name], from_checkpoint[name]), name
        assert torch.equal(final[name], base[name]) == (name not in adapted), name
    assert not (root / "m" / ADAPTER_WEIGHTS).exists()  # --merge: a plain bundle


def test_merged_and_unmerged_models_give_the_same_logits(tuned):
    root, _, result = tuned
    unmerged, tokenizer = load_bundle(root / "run/checkpoints/step_0000004", merge=False)
    merged, _ = load_bundle(result.bundle_dir)  # final/: the plain merged weights
    assert any(".lora_B." in name for name, _ in unmerged.named_parameters())
    assert not any(".lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged), _logits(unmerged), rtol=1e-5, atol=1e-5)
    base, _ = load_bundle(root / "base")
    assert not torch.allclose(_logits(base), _logits(merged), atol=1e-3)  # the adapters did learn something
    with torch.no_grad():  # the recurrent form used for generation agrees too
        states = [m.init_state(1) for m in (merged, unmerged)]
        for token in IDS[0, :4]:
            steps = [m.step(token[None], s) for m, s in zip((merged, unmerged), states, strict=True)]
            states = [s for _, s in steps]
            torch.testing.assert_close(steps[0][0], steps[1][0], rtol=1e-5, atol=1e-5)


def test_adapter_files_are_peft_layout_and_load_with_peft(tuned):
    """What PeftModel.save_pretrained writes, so peft's own loaders apply it to the base bundle's model."""
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

    root, _, result = tuned
    config = LoraConfig.from_pretrained(result.bundle_dir)
    assert config.r == 4 and config.lora_alpha == 16
    assert config.base_model_name_or_path == str((root / "base").resolve())
    reference, _ = load_bundle(result.bundle_dir)

    peft_model = PeftModel.from_pretrained(load_bundle(config.base_model_name_or_path)[0], result.bundle_dir)
    torch.testing.assert_close(_logits(peft_model), _logits(reference), rtol=1e-5, atol=1e-5)

    config.inference_mode = True
    fresh = get_peft_model(load_bundle(root / "base")[0], config)
    loaded = set_peft_model_state_dict(fresh, load_file(f"{result.bundle_dir}/{ADAPTER_WEIGHTS}"))
    assert not loaded.unexpected_keys and not [key for key in loaded.missing_keys if ".lora_" in key]
    torch.testing.assert_close(_logits(fresh), _logits(reference), rtol=1e-5, atol=1e-5)
    merged = fresh.merge_and_unload()  # peft's own merge agrees with ours
    torch.testing.assert_close(_logits(merged), _logits(reference), rtol=1e-5, atol=1e-5)


def test_a_stopped_lora_run_resumes_exactly(tuned, tmp_path):
    root, run, result = tuned

    class StopAtTwo(Callback):
        def on_step_end(self, state):
            if state.step == 2:
                state.request_stop()

    again = _run(root / "base", root / "notes.txt", tmp_path / "run")
    assert train(again, callbacks=[StopAtTwo()]).stopped
    resumed = train(again, resume_from=str(tmp_path / "run"))
    assert resumed.steps == 4
    ours, straight = (
        load_file(f"{resumed.bundle_dir}/{ADAPTER_WEIGHTS}"),
        load_file(f"{result.bundle_dir}/{ADAPTER_WEIGHTS}"),
    )
    assert ours.keys() == straight.keys()
    assert all(torch.equal(ours[name], straight[name]) for name in ours)


def test_the_demo_model_fine_tunes_from_the_command_line_and_chats(tmp_path):
    from apertis_core.generation import GenerationConfig, generate

    (tmp_path / "notes.txt").write_text("The red square sits on the blue circle.\n" * 200, encoding="utf-8")
    config = tmp_path / "tune.yaml"
    config.write_text(
        json.dumps(
            {
                "finetune": {"base": str(DEMO), "rank": 2, "merge_on_export": False},
                "data": {"path": str(tmp_path / "notes.txt"), "seq_len": 32},
                "train": {**TRAIN, "max_steps": 2, "save_every": 0},
                "out_dir": str(tmp_path / "run"),
            }
        )  # fmt: skip
    )
    assert main(["train", str(config), "--no-plan"]) == 0
    final = tmp_path / "run" / "final"
    assert {p.name for p in final.iterdir()} == {
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
        "config.json",
        "tokenizer.json",
        "README.md",
    }
    weights = load_file(final / ADAPTER_WEIGHTS)
    assert any(".mixer.in_proj." in n for n in weights) and not any(n.startswith("vision.") for n in weights)
    model, tokenizer = load_bundle(final)  # the loader finds the demo base and folds the adapter in
    reply = list(generate(model, tokenizer.encode("The red"), GenerationConfig(max_new_tokens=4, seed=0)))
    assert len(reply) == 4
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "adapter")]) == 0
    assert not (tmp_path / "adapter" / "model.safetensors").exists()  # without --merge an adapter stays one
    torch.testing.assert_close(_logits(load_bundle(tmp_path / "adapter")[0]), _logits(model))


def test_target_modules_that_name_no_linear_layer_are_refused_with_the_valid_names(tuned):
    root, run, _ = tuned
    with pytest.raises(ConfigError, match=r"'attention' names no linear layer.*Valid names: .*gate_up.*in_proj"):
        start_model(run.override(["finetune.target_modules=attention"]))
    with pytest.raises(ConfigError, match="lm_head shares its weights with the token embedding"):
        start_model(run.override(["finetune.target_modules=lm_head"]))
    with pytest.raises(ConfigError, match="is a LoRA adapter; LoRA needs a plain base"):
        start_model(run.override([f"finetune.base={root}/run/checkpoints/step_0000002"]))
    model, _ = start_model(run.override(["finetune.target_modules=mixer.in_proj,router"]))
    adapted = {n.partition(".lora_A.")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert adapted == {f"blocks.{i}.mixer.in_proj" for i in range(4)} | {"blocks.1.ffn.router", "blocks.3.ffn.router"}


def test_finetune_settings_are_validated():
    with pytest.raises(ConfigError, match="finetune: rank"):
        RunConfig.from_dict({"finetune": {"rank": 0}})
    with pytest.raises(ConfigError, match="init_from and finetune.base"):
        RunConfig.from_dict({"finetune": {"base": "a"}, "init_from": "b"})
    with pytest.raises(ConfigError, match="'methd'. Did you mean 'method'"):
        RunConfig.from_dict({"finetune": {"methd": "lora"}})


def test_an_adapter_whose_base_is_gone_or_does_not_fit_is_refused(tuned, tmp_path):
    root, _, _ = tuned
    adapter = tmp_path / "adapter"
    shutil.copytree(root / "run/checkpoints/step_0000002", adapter)
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    (adapter / ADAPTER_CONFIG).write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(BundleError, match=r"does not fit its adapter_config.json .*the adapter needs"):
        load_bundle(adapter)
    (adapter / ADAPTER_CONFIG).write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(BundleError, match="LoRA adapter whose base model cannot be loaded.*no such model folder"):
        load_bundle(adapter)
    (adapter / ADAPTER_CONFIG).write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(BundleError, match="not a LoRA adapter config"):
        load_bundle(adapter)


def test_the_studio_form_starts_from_a_listed_model_and_plans_the_lora_run(tmp_path):
    from apertis_core.training.measure import measure_run
    from studio import run_config, run_plan
    from studio.app import Services
    from studio.jobs import JobManager
    from studio.listings import start_model_options
    from studio.store import Store
    from studio.tabs import dataset, models
    from studio.tabs import train as train_tab

    store = Store(tmp_path / "ws")
    services = Services(store=store, jobs=JobManager(store))
    models.register_bundled_models(services)
    demo_id = next(row["id"] for row in store.list_models() if row["kind"] == "demo")
    data_id = dataset.add_demo(services, "text")[1]
    form = {**train_tab.BASIC_DEFAULTS, **train_tab.ADVANCED_DEFAULTS, "batch_size": 2, "seq_len": 32}
    assert ("none: a new model of the chosen size", "") in start_model_options(services)
    assert demo_id in [value for _, value in start_model_options(services)]

    # the architecture comes from the base model, not from the form's preset
    mapping = run_config.run_mapping(
        services, data_id, "transformer-nano", {**form, "start_from": demo_id, "lora_rank": 4}
    )
    assert mapping["finetune"]["base"] == str(DEMO) and mapping["finetune"]["method"] == "lora"
    demo_preset = json.loads((DEMO / "config.json").read_text())["preset"]
    assert mapping["finetune"]["rank"] == 4 and mapping["model"]["preset"] == demo_preset != "transformer-nano"
    assert mapping["data"]["tokenizer"] == str(DEMO / "tokenizer.json")
    assert "finetune" in run_config.run_mapping(services, data_id, "apertis-nano", form)  # the section is always there
    assert run_config.run_mapping(services, data_id, "apertis-nano", form)["finetune"]["base"] == ""

    text = run_plan.plan_text(services, data_id, mapping, measure=lambda run: measure_run(run, steps=1))
    assert "LoRA rank 4 on demo-model" in text and "trainable" in text and "s/step" in text
    with pytest.raises(ValueError, match="no longer listed"):
        run_config.run_mapping(services, data_id, "apertis-nano", {**form, "start_from": "model-gone"})
