"""ModelConfig: presets, YAML/JSON round trips, typed overrides and helpful unknown-key errors."""

import pytest

from apertis_core import ApertisModel, ConfigError, ModelConfig


def test_contract_presets_exist_with_documented_shapes():
    names = ModelConfig.presets()
    for name in [
        "apertis-nano",
        "apertis-small",
        "apertis-base",
        "apertis-large",
        "transformer-nano",
        "transformer-small",
    ]:
        assert name in names
    assert any("hybrid" in n for n in names)
    shapes = {n: (c.d_model, c.n_layers, c.n_heads) for n in names for c in [ModelConfig.from_preset(n)]}
    assert shapes["apertis-small"] == (512, 8, 8)
    assert shapes["apertis-base"] == (768, 12, 12)
    assert shapes["apertis-large"] == (1024, 24, 16)
    hybrid = ModelConfig.from_preset("apertis-hybrid-small")
    kinds = [hybrid.mixer_kind(i) for i in range(hybrid.n_layers)]
    assert kinds.count("S") > kinds.count("A") > 0


def test_nano_preset_is_a_few_million_parameters():
    model = ApertisModel(ModelConfig.from_preset("apertis-nano", vocab_size=512))
    assert 1_000_000 < model.num_parameters() < 10_000_000


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_round_trips_through_files(tmp_path, suffix):
    config = ModelConfig.from_preset("apertis-hybrid-nano", vocab_size=300, nope_layers=[3], qk_norm=True)
    config.save(tmp_path / f"model{suffix}")
    assert ModelConfig.load(tmp_path / f"model{suffix}") == config


def test_overrides_are_type_checked():
    config = ModelConfig.from_preset("apertis-nano").override(["d_model=128", "qk_norm=true", "nope_layers=1,2"])
    assert (config.d_model, config.qk_norm, config.nope_layers) == (128, True, [1, 2])
    with pytest.raises(ConfigError, match="expected an integer"):
        config.override(["d_model=wide"])
    with pytest.raises(ConfigError, match="'swiglu'"):
        config.override(["ffn_type=relu"])


def test_unknown_override_key_suggests_the_closest_name():
    with pytest.raises(ConfigError, match="Did you mean 'd_model'"):
        ModelConfig.from_preset("apertis-nano").override(["d_modle=64"])
    with pytest.raises(ConfigError, match="Did you mean 'apertis-nano'"):
        ModelConfig.from_preset("apertis-nan")


def test_invalid_combinations_name_the_field():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        ModelConfig.from_preset("transformer-nano", n_kv_heads=3)
    with pytest.raises(ConfigError, match="layer_pattern"):
        ModelConfig.from_preset("apertis-nano", layer_pattern="SX")


@pytest.mark.parametrize("field", ["n_heads", "d_model", "n_layers"])
def test_a_zero_size_is_a_config_error_not_a_crash(field):
    with pytest.raises(ConfigError, match="must be positive"):
        ModelConfig.from_preset("apertis-nano", **{field: 0})
