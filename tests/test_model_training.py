"""Gradients reach every parameter, a tiny model overfits a batch, and bf16 autocast runs on CPU."""

import pytest
import torch
import torch.nn.functional as F

from apertis_core import ApertisModel

from conftest import tiny_config


@pytest.mark.parametrize("preset", ["apertis-nano", "apertis-hybrid-nano", "transformer-nano"])
def test_every_parameter_receives_a_gradient(preset):
    model = ApertisModel(tiny_config(preset, tie_embeddings=False))
    ids = torch.randint(0, 97, (4, 24))
    out = model(ids)
    loss = F.cross_entropy(out.logits.flatten(0, 1), ids.roll(-1, 1).flatten()) + out.aux_loss
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_tiny_model_overfits_one_batch():
    model = ApertisModel(tiny_config("apertis-nano", d_model=64))
    ids = torch.randint(0, 97, (4, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        out = model(ids[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        (loss + out.aux_loss).backward()
        optimizer.step()
    assert loss.item() < 0.2  # from ln(97) = 4.6


def test_bf16_autocast_runs_on_cpu():
    model = ApertisModel(tiny_config("apertis-hybrid-nano"))
    ids = torch.randint(0, 97, (2, 20))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids)
        state = model.init_state(2)
        logits, state = model.step(ids[:, 0], state)
    (out.logits.float().mean() + out.aux_loss).backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert state[0]["mixer"]["S"].dtype == torch.float32  # SLA state stays fp32 under autocast


def test_parameter_count_and_flops_estimate_are_consistent():
    model = ApertisModel(tiny_config("apertis-nano"))
    total, active = model.num_parameters(), model.num_parameters(active_only=True)
    assert total == sum(p.numel() for p in model.parameters())
    assert active < total  # 2 of 4 routed experts are active
    assert model.flops_per_token(64) > 6 * model.num_parameters(active_only=True, include_embeddings=False)
