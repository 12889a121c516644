"""The configs in assets/configs load as they are, and demo.yaml builds the architecture of the shipped demo model."""

from pathlib import Path

import pytest

from apertis_core.bundle import read_model_config
from apertis_core.training import RunConfig

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "assets" / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert {path.stem for path in CONFIGS} >= {"apertis-nano", "transformer-nano", "demo"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_each_shipped_config_loads(path):
    RunConfig.load(path)  # strict: unknown keys, bad values and keys given twice are errors


def test_demo_yaml_builds_the_shipped_demo_models_architecture():
    run = RunConfig.load(REPO / "assets" / "configs" / "demo.yaml")
    shipped = read_model_config(REPO / "assets" / "demo-model" / "config.json")
    # The tokenizer's size and the image token are set by the data when training starts.
    for name in ("vocab_size", "image_token_id"):
        setattr(run.model, name, getattr(shipped, name))
    assert run.model == shipped
