"""Exact resume: N steps uninterrupted == N/2 steps, stop, resume to N (same losses, same weights; fp32 CPU)."""

import os

import pytest
import torch
from test_training import tiny_run

from apertis_core.bundle import load_bundle
from apertis_core.training import Callback, read_metrics, train

# An Apertis model with every stateful part: experts (router), STRC, SLA, and dropout (so the RNG matters).
APERTIS_TINY = {
    "preset": "apertis-nano",
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 2,
    "n_experts": 4,
    "moe_every": 1,
    "strc_every": 2,
    "sla_chunk_size": 8,
    "dropout": 0.1,
    "router_noise": 0.1,
}


class StopFileAt(Callback):
    """Writes the run's STOP file after `step` steps, as the studio's Stop button does."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, state):
        if state.step == self.step:
            with open(os.path.join(state.out_dir, "STOP"), "w"):
                pass


def losses(run_dir):
    records = read_metrics(run_dir / "metrics.jsonl")
    return (
        [(r["step"], r["train/loss"]) for r in records if "train/loss" in r],
        [(r["step"], r["val/loss"]) for r in records if "val/loss" in r],
    )


def check_exact_resume(tmp_path, total, **train_cfg):
    straight = tiny_run(tmp_path, "straight", model=APERTIS_TINY, max_steps=total, **train_cfg)
    interrupted = tiny_run(tmp_path, "interrupted", model=APERTIS_TINY, max_steps=total, **train_cfg)
    train(straight)
    first = train(interrupted, callbacks=[StopFileAt(total // 2)])
    assert first.stopped and first.steps == total // 2
    second = train(interrupted, resume_from=str(tmp_path / "interrupted"))
    assert second.steps == total and not second.stopped

    train_a, val_a = losses(tmp_path / "straight")
    train_b, val_b = losses(tmp_path / "interrupted")
    assert [s for s, _ in train_b] == list(range(1, total + 1))
    assert train_a == train_b  # bit-identical, not approximately equal
    assert val_a == val_b and len(val_a) >= 2
    samples = [
        [r for r in read_metrics(tmp_path / run / "metrics.jsonl") if "sample/text" in r]
        for run in ("straight", "interrupted")
    ]
    assert [(r["step"], r["sample/text"]) for r in samples[0]] == [(r["step"], r["sample/text"]) for r in samples[1]]
    model_a, _ = load_bundle(tmp_path / "straight" / "final")
    model_b, _ = load_bundle(tmp_path / "interrupted" / "final")
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_stop_and_resume_matches_an_uninterrupted_run(tmp_path):
    # Evaluations, periodic saves and sample generations happen on both sides: none may disturb the RNG.
    check_exact_resume(
        tmp_path, 24, batch_size=2, grad_accum=2, eval_every=6, save_every=5, warmup_steps=4, lr=3e-3,
        sample_every=7, sample_prompts=["The"], sample_tokens=4,
    )  # fmt: skip


@pytest.mark.slow  # minutes on a laptop CPU: python -m pytest -m slow tests/test_resume.py
def test_2k_steps_equal_1k_stop_and_resume_to_2k(tmp_path):
    check_exact_resume(
        tmp_path,
        2000,
        batch_size=2,
        grad_accum=2,
        eval_every=250,
        eval_batches=4,
        save_every=300,
        log_every=1,
        warmup_steps=100,
        lr=3e-3,
    )
