"""Sizing a model from its config: the arithmetic parameter count equals the built model's for every preset
and every optional part, absurd values are refused with the field named, and memory refusals give the
figure and what to do."""

import re

import pytest
import torch

from apertis_core import ApertisModel, ModelConfig
from apertis_core.configio import ConfigError
from apertis_core.sizing import (
    _RESNET_PARAMETERS,
    SKIP_MEMORY_CHECK_ENV,
    ModelSizeError,
    check_config,
    check_loadable,
    check_model_mapping,
    check_trainable,
    human_bytes,
    loading_bytes,
    parameter_count,
    training_bytes,
)


def built_parameters(cfg: ModelConfig) -> int:
    with torch.device("meta"):  # shapes only
        return ApertisModel(cfg).num_parameters()


@pytest.mark.parametrize("preset", ModelConfig.presets())
def test_parameter_count_matches_every_preset(preset):
    cfg = ModelConfig.from_preset(preset, vocab_size=4096)
    assert parameter_count(cfg) == built_parameters(cfg)


VARIANTS = [
    ("apertis-nano", dict(tie_embeddings=False, n_shared_experts=0, sla_conv_size=0)),
    ("apertis-nano", dict(n_shared_experts=2, expert_hidden=40, moe_every=1, strc_every=1, strc_hidden=24)),
    ("apertis-hybrid-nano", dict(head_dim=48, n_kv_heads=1, ffn_hidden=100, n_layers=7)),
    ("transformer-nano", dict(n_experts=3, moe_top_k=1, moe_every=3, ffn_type="geglu")),
    ("apertis-nano", dict(image_encoder="vit", image_encoder_width=128, image_encoder_layers=3, image_patch_size=14)),
    ("apertis-nano", dict(image_encoder="vit", image_stem="conv", image_encoder_width=48, image_patch_size=16)),
    ("apertis-nano", dict(image_encoder="vit", image_distance_bias=True, image_pos="none")),
    ("apertis-nano", dict(image_encoder="resnet18", image_patch_size=16)),
    ("apertis-nano", dict(image_encoder="resnet34", image_patch_size=4)),
    ("apertis-nano", dict(image_encoder="resnet50", image_patch_size=32)),
    ("apertis-hybrid-nano", dict(max_loops=3, loop_blocks="1-2")),
]


@pytest.mark.parametrize(("preset", "overrides"), VARIANTS, ids=[str(o) for _, o in VARIANTS])
def test_parameter_count_matches_every_optional_part(preset, overrides):
    cfg = ModelConfig.from_preset(preset, vocab_size=300, **overrides)
    assert parameter_count(cfg) == built_parameters(cfg)


@pytest.mark.parametrize("name", sorted(_RESNET_PARAMETERS))
def test_resnet_table_matches_torchvision(name):
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        net = getattr(torchvision.models, name)(weights=None)
    for stages, expected in enumerate(_RESNET_PARAMETERS[name], start=1):
        parts = ["conv1", "bn1"] + [f"layer{k}" for k in range(1, stages + 1)]
        assert sum(p.numel() for part in parts for p in getattr(net, part).parameters()) == expected


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"d_model": 65536}, r"d_model is 65,536, beyond 32,768"),
        ({"n_layers": -4}, r"n_layers is -4; it must be positive"),
        ({"n_heads": 0}, r"n_heads is 0; it must be positive"),
        ({"n_kv_heads": -1}, r"n_kv_heads is -1; it must be at least 0"),
        ({"d_model": 256.5}, r"d_model: expected an integer, got 256.5"),
        ({"d_model": "wide"}, r"d_model: expected an integer"),
        ({"n_layers": True}, r"n_layers: expected an integer"),
        ({"vocab_size": 10**40}, r"vocab_size is a 41-digit number"),
        ({"norm_eps": float("nan")}, r"norm_eps is nan; it must be a finite number"),
        ({"rope_theta": 0}, r"rope_theta is 0.0; it must be above 0"),
        ({"dropout": 1.5}, r"dropout is 1.5"),
        ({"layer_pattern": "S" * 5000}, r"layer_pattern has 5,000 characters"),
    ],
)
def test_absurd_values_are_refused_naming_the_field(mapping, message):
    with pytest.raises(ConfigError, match=message):
        check_model_mapping(mapping)


def test_a_model_beyond_any_machine_is_refused_before_building():
    cfg = ModelConfig.from_preset("apertis-base", d_model=16384, n_heads=128, n_layers=256)
    with pytest.raises(ModelSizeError, match=r"1.5 trillion parameters .* more than any model this app can build"):
        check_config(cfg)


def test_memory_refusal_gives_the_figure_and_what_to_do(monkeypatch):
    monkeypatch.delenv(SKIP_MEMORY_CHECK_ENV, raising=False)
    monkeypatch.setattr("apertis_core.sizing.available_memory", lambda device="cpu": (4 * 10**9, "this computer"))
    cfg = ModelConfig.from_preset("apertis-large", vocab_size=32000)
    needed = loading_bytes(cfg)
    assert needed > 4 * 10**9
    with pytest.raises(ModelSizeError) as refused:
        check_loadable(cfg)
    text = str(refused.value)
    assert human_bytes(needed) in text and "this computer has 4.0 GB free" in text and "smaller model" in text
    with pytest.raises(ModelSizeError, match=r"Lower train.batch_size or data.seq_len"):
        check_trainable(ModelConfig.from_preset("apertis-base", vocab_size=32000), 16, 2048, "cpu")
    assert check_trainable(ModelConfig.from_preset("apertis-nano", vocab_size=512), 4, 64, "cpu") > 0
    monkeypatch.setenv(SKIP_MEMORY_CHECK_ENV, "1")  # the escape hatch the message names
    assert check_loadable(cfg) == parameter_count(cfg)


def test_training_needs_more_than_loading():
    cfg = ModelConfig.from_preset("apertis-nano", vocab_size=512)
    assert training_bytes(cfg, 1, 1) > 16 * parameter_count(cfg) > loading_bytes(cfg)
    assert human_bytes(68_719_476_736) == "68.7 GB" and human_bytes(999) == "999 bytes"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.n_heads=0"], r"n_heads is 0; it must be positive"),
        (["model.d_model=65536", "model.n_layers=64"], r"d_model is 65,536, beyond 32,768"),
        (["model.d_model=256.5"], r"model.d_model: expected an integer, got '256.5'"),
        (
            ["model.d_model=1024", "model.n_layers=24", "model.n_heads=16"],
            r"Training this model \(.* parameters; .*\) needs about .* GB of memory, but this computer has 1.0 GB free\. "
            r"Lower train.batch_size or data.seq_len, or pick a smaller preset",
        ),
    ],
)
def test_apertis_train_refuses_before_building_anything(tmp_path, monkeypatch, capsys, overrides, message):
    from apertis_core.cli.main import main as apertis

    from conftest import REPO, SHAKESPEARE

    monkeypatch.delenv(SKIP_MEMORY_CHECK_ENV, raising=False)
    monkeypatch.setattr("apertis_core.sizing.available_memory", lambda device="cpu": (10**9, "this computer"))
    monkeypatch.setattr("apertis_core.training.plan_run", lambda *a, **k: pytest.fail("planned a refused run"))
    args = [
        "train",
        str(REPO / "assets/configs/apertis-nano.yaml"),
        "--no-plan",
        "--out",
        str(tmp_path / "run"),
        "--set",
        f"data.path={SHAKESPEARE}",
    ]
    for item in overrides:
        args += ["--set", item]
    assert apertis(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "run").exists()


def test_a_run_mapping_is_checked_before_its_config_is_built(monkeypatch):
    from apertis_core.sizing import check_run_mapping

    monkeypatch.setattr("apertis_core.sizing.available_memory", lambda device="cpu": (10**9, "this computer"))
    run = {"model": {"preset": "apertis-nano"}, "data": {"vocab_size": 512, "seq_len": 64}, "train": {"batch_size": 2}}
    assert check_run_mapping(run) == parameter_count(ModelConfig.from_preset("apertis-nano", vocab_size=512))
    with pytest.raises(ModelSizeError, match=r"model config: n_heads is 0"):
        check_run_mapping({**run, "model": {"preset": "apertis-nano", "n_heads": 0}})
    with pytest.raises(ModelSizeError, match=r"Training this model .* but this computer has 1.0 GB free"):
        check_run_mapping({**run, "model": {"preset": "apertis-large"}})


def test_fsdp_runs_are_sized_per_process(monkeypatch):
    """FSDP splits the weights and optimizer state over the processes, so a model that only fits sharded
    passes the check inside each of them (torchrun's WORLD_SIZE) and is refused without sharding."""
    from apertis_core.sizing import check_run
    from apertis_core.training import RunConfig

    monkeypatch.delenv(SKIP_MEMORY_CHECK_ENV, raising=False)
    cfg = ModelConfig.from_preset("apertis-base", vocab_size=512)
    one_process = training_bytes(cfg, 1, 64)
    assert training_bytes(cfg, 1, 64, shards=4) < one_process / 3
    free = one_process // 2
    monkeypatch.setattr("apertis_core.sizing.available_memory", lambda device="cpu": (free, "this computer"))
    mapping = {"model": "apertis-base", "data": {"seq_len": 64, "vocab_size": 512}, "train": {"batch_size": 1}}
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ModelSizeError):
        check_run(RunConfig.from_dict({**mapping, "train": {"batch_size": 1, "parallel": "ddp"}}))
    assert check_run(RunConfig.from_dict({**mapping, "train": {"batch_size": 1, "parallel": "fsdp"}})) > 0
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ModelSizeError, match="apertis-base|parameters"):
        check_run(RunConfig.from_dict({**mapping, "train": {"batch_size": 1, "parallel": "fsdp"}}))
