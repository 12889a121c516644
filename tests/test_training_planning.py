"""Planning and the machine: the plan's numbers, time budgets, devices, precision, optimizer groups."""

import time

import pytest
import torch
from test_training import tiny_run

from apertis_core import ApertisModel
from apertis_core.training import TrainConfig, plan_run, read_metrics, train
from apertis_core.training.hardware import peak_flops, pick_device
from apertis_core.training.optim import parameter_groups
from apertis_core.training.planning import budget_steps
from apertis_core.training.precision import resolve_precision

from conftest import tiny_config


def test_plan_reports_sizes_steps_memory_and_eta(tmp_path):
    run = tiny_run(tmp_path, max_steps=40, batch_size=4, grad_accum=2)
    plan = plan_run(run)
    model = ApertisModel(run.model.replace(vocab_size=300))
    assert plan.parameters == model.num_parameters() and plan.active_parameters == plan.parameters
    assert plan.tokens_per_step == 4 * 2 * 32 and plan.total_steps == 40
    assert plan.flops_per_token == model.flops_per_token(32)
    assert plan.est_memory_bytes > 16 * plan.parameters  # weights, grads, Adam moments, plus activations
    assert plan.step_seconds > 0 and plan.eta_seconds >= 40 * plan.step_seconds
    assert (plan.device, plan.precision) == ("cpu", "fp32")
    text = plan.to_text()
    assert "total steps     40" in text and "ETA" in text


def test_plan_counts_only_active_experts(tmp_path):
    run = tiny_run(
        tmp_path, model={"preset": "apertis-nano", "d_model": 32, "n_layers": 2, "n_heads": 2, "n_experts": 4}
    )
    plan = plan_run(run, measure=False)
    assert plan.active_parameters < plan.parameters and plan.step_seconds == 0 and "ETA" not in plan.to_text()


def test_budget_steps_fit_the_time_including_evaluations():
    cfg = TrainConfig(max_minutes=1.0, eval_every=0, eval_batches=0, grad_accum=1)
    assert budget_steps(cfg, step_s=0.5) == 120
    cfg.eval_every, cfg.eval_batches = 10, 30  # an eval = 30 forwards = 10 steps' time, every 10 steps
    assert budget_steps(cfg, step_s=0.5) == 60
    assert budget_steps(cfg, step_s=0.5, seconds_left=-5) == 1


def test_time_budget_plans_the_steps_and_ends_on_time(tmp_path):
    budget_s = 6.0
    run = tiny_run(tmp_path, max_steps=100_000, max_minutes=budget_s / 60, warmup_steps=2, log_every=5)
    start = time.perf_counter()
    result = train(run)
    elapsed = time.perf_counter() - start
    total = [m["progress/total_steps"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in m]
    assert 5 < result.steps < 100_000 and result.steps == total[-1]  # planned from the warm-up, not max_steps
    assert elapsed < budget_s * 2.5  # generous: the 2 CPU cores of the test machine are shared
    lrs = [m["lr"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "lr" in m]
    assert lrs[-1] == pytest.approx(run.train.lr * run.train.min_lr_ratio, rel=0.05)  # the schedule completed


def test_device_and_precision_choices():
    assert pick_device("cpu") == torch.device("cpu")
    cpu = torch.device("cpu")
    assert resolve_precision("bf16", cpu).dtype == torch.bfloat16
    assert not resolve_precision("fp32", cpu).grad_scaler().is_enabled()
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", cpu)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            pick_device("cuda")


def test_peak_flops_is_measured_once_and_plausible():
    first = peak_flops(torch.device("cpu"), torch.float32)
    assert 1e8 < first < 1e14
    assert peak_flops(torch.device("cpu"), torch.float32) == first  # cached: MFU uses one fixed peak


def test_weight_decay_skips_norms_biases_and_embeddings():
    model = ApertisModel(tiny_config("transformer-nano", tie_embeddings=False))
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "embed.weight" in no_decay_names and all("norm" in n or n == "embed.weight" for n in no_decay_names)
    assert "lm_head.weight" in {names[id(p)] for p in decay["params"]}  # an untied head is a linear map
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
