"""RunConfig: YAML + --set overrides, presets, type checks and unknown keys with suggestions."""

import pytest
import yaml

from apertis_core import ConfigError
from apertis_core.training import RunConfig, TrainConfig


@pytest.fixture
def run_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"preset": "apertis-nano", "d_model": 128},
                "data": {"path": "corpus.txt", "seq_len": 64},
                "train": {"lr": 3e-4, "max_steps": 500},
                "out_dir": "runs/x",
            }
        )
    )
    return path


def test_load_applies_preset_then_file_then_overrides(run_yaml):
    run = RunConfig.load(run_yaml, ["train.lr=1e-3", "model.n_layers=2", "train.betas=0.9,0.99", "out_dir=runs/y"])
    assert run.model.preset == "apertis-nano" and run.model.n_experts == 8  # from the preset
    assert (run.model.d_model, run.model.n_layers) == (128, 2)
    assert (run.train.lr, run.train.max_steps, run.train.betas) == (1e-3, 500, (0.9, 0.99))
    assert run.data.seq_len == 64 and run.out_dir == "runs/y"


def test_changing_the_preset_brings_its_defaults_and_keeps_explicit_fields(run_yaml):
    run = RunConfig.load(run_yaml)
    other = run.override(["model.preset=transformer-nano"])
    assert other.model.layer_pattern == "A" and other.model.n_experts == 0  # transformer defaults
    assert other.model.d_model == 128  # still the user's choice


def test_save_and_load_round_trip(tmp_path, run_yaml):
    run = RunConfig.load(run_yaml, ["model.vocab_size=300", 'train.sample_prompts=["Hi", "Once"]'])
    run.save(tmp_path / "again.yaml")
    assert RunConfig.load(tmp_path / "again.yaml") == run
    assert run.to_dict()["model"] == {"preset": "apertis-nano", "vocab_size": 300, "d_model": 128}  # only the changes


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown run.train key 'lrr'. Did you mean 'lr'"),
        ("trian.lr=1", "unknown run key 'trian'. Did you mean 'train'"),
        ("model.d_modle=64", "Did you mean 'd_model'"),
        ("train.batch_size=many", "batch_size: expected an integer"),
        ("train.schedule=linear", "schedule: 'linear' is not one of"),
        ("train.grad_accum=0", "batch_size and grad_accum must be at least 1"),
        ("out_dir.x=1", "out_dir has no sub-keys"),
        ("lr", "expected KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_key_and_suggest(run_yaml, override, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.load(run_yaml, [override])


@pytest.mark.parametrize(
    "name, text, message",
    [
        # YAML's own rule keeps the last one: the first train: block, and its lr, would vanish without a word.
        ("run.yaml", "train:\n  lr: 1.0e-3\nmodel:\n  d_model: 64\ntrain:\n  max_steps: 5\n", "line 5: key 'train'"),
        ("run.yaml", "train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", "line 3: key 'lr' is given twice \\(first on line 2\\)"),
        ("run.json", '{"train": {"lr": 0.001, "lr": 0.002}}', "key 'lr' is given twice"),
        (
            "run.yaml",
            "? [a, b]\n: 1\n",
            r"not valid YAML: [\s\S]*line 1[\s\S]*found unhashable key",
        ),  # refused by yaml itself
    ],
)
def test_a_key_given_twice_or_unhashable_is_an_error_naming_it(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"{name}: {message}"):
        RunConfig.load(path)


def test_the_same_key_in_different_sections_is_fine(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  seed: 3\ntrain:\n  seed: 4\n")
    run = RunConfig.load(path)
    assert (run.data.seed, run.train.seed) == (3, 4)


@pytest.mark.parametrize("start", ["init_from=runs/base/final", "finetune.base=runs/base/final"])
def test_model_settings_for_a_run_that_starts_from_a_bundle_are_refused_not_dropped(run_yaml, start):
    with pytest.raises(ConfigError, match="--set model.n_layers: this run starts from the bundle runs/base/final"):
        RunConfig.load(run_yaml, [start, "model.n_layers=2"])
    started = RunConfig.load(run_yaml, [start, "train.lr=1e-3"])  # other settings still apply
    assert started.train.lr == 1e-3
    with pytest.raises(ConfigError, match="model settings have no effect"):
        started.override(["model.cross_attn_every=1"])  # also when the bundle was named earlier


def test_model_may_be_given_as_a_preset_name():
    run = RunConfig.from_dict({"model": "transformer-nano"})
    assert run.model.preset == "transformer-nano" and run.model.layer_pattern == "A"


def test_tokens_per_step_counts_accumulation_and_processes():
    assert TrainConfig(batch_size=8, grad_accum=4).tokens_per_step(seq_len=128, world_size=2) == 8 * 4 * 128 * 2
