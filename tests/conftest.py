"""Shared pytest fixtures: tiny model configs and the repository paths tests use."""

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(preset: str, **overrides):
    from apertis_core import ModelConfig

    base = dict(vocab_size=97, d_model=32, n_layers=4, n_heads=4, sla_chunk_size=8, max_seq_len=64)
    if preset.startswith("apertis"):
        base.update(n_experts=4, moe_top_k=2, moe_every=2, strc_every=2, strc_hidden=24)
    base.update(overrides)
    return ModelConfig.from_preset(preset, **base)
