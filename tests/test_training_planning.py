"""Planning and the machine: the plan's numbers, time budgets, devices, precision, optimizer groups."""

import dataclasses
import time
from types import SimpleNamespace

import pytest
import torch
from test_training import tiny_run

from apertis_core import ApertisModel, ConfigError
from apertis_core.training import TrainConfig, hardware, plan_run, read_metrics, train
from apertis_core.training.hardware import peak_flops, pick_device
from apertis_core.training.measure import Measurement, measure_run
from apertis_core.training.optim import parameter_groups
from apertis_core.training.planning import budget_steps, format_duration
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


class TickingClock:
    """A perf_counter that moves a fixed amount each time it is read: the budget's arithmetic sees the same
    time passing on a quiet or a busy machine, so the test counts steps and never depends on the load."""

    def __init__(self, tick_s: float):
        self.now, self.tick_s = 0.0, tick_s

    def perf_counter(self) -> float:
        self.now += self.tick_s
        return self.now


def test_time_budget_plans_the_steps_and_completes_the_schedule(tmp_path, monkeypatch):
    """Counted in steps, not seconds: the run takes the steps it planned and ends its schedule there."""
    from apertis_core.training import measure, session, trainer

    clock = TickingClock(0.05)
    for module in (measure, session, trainer):
        monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=clock.perf_counter, time=time.time))
    run = tiny_run(tmp_path, max_steps=100_000, max_minutes=6.0 / 60, warmup_steps=2, log_every=5)
    result = train(run)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    totals = [m["progress/total_steps"] for m in records if "train/loss" in m]
    assert all(total < 100_000 for total in totals)  # planned from measured steps, never max_steps
    assert result.steps == totals[-1] and not result.stopped  # ran exactly the steps it planned last
    lrs = [m["lr"] for m in records if "lr" in m]
    assert lrs[-1] == pytest.approx(run.train.lr * run.train.min_lr_ratio, rel=0.05)  # the schedule completed


def test_measurement_uses_the_run_threads_and_gives_back_the_callers(tmp_path):
    """What a plan times runs with the thread count train() will use, whatever the caller's own setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # like the studio's process
    try:
        run = tiny_run(tmp_path, threads=2)
        assert measure_run(run, steps=1).threads == 2
        assert torch.get_num_threads() == 1
        assert measure_run(tiny_run(tmp_path, threads=0), steps=1).threads == 1  # 0: the process's own count
    finally:
        torch.set_num_threads(before)


def test_eta_adds_start_up_first_step_evaluations_and_samples(tmp_path):
    run = tiny_run(
        tmp_path,
        max_steps=100,
        eval_every=20,
        eval_batches=6,
        grad_accum=1,
        sample_every=50,
        sample_prompts=["a", "b"],
        sample_tokens=10,
    )
    measured = Measurement(step_s=0.5, first_step_s=2.0, setup_s=3.0, sample_token_s=0.01, threads=2, startup_s=4.0)
    plan = plan_run(run, measurement=measured)
    evaluation = 6 * 0.5 / 3  # a forward pass is about a third of a step
    steps = 100 * (0.5 + evaluation / 20)
    start = 4.0 + 3.0 + (2.0 - 0.5) + evaluation  # process, setup, the slow first step, the final evaluation
    samples = 2 * 2 * 10 * 0.01  # at steps 50 and 100, two prompts of ten tokens
    assert plan.eta_seconds == pytest.approx(steps + start + samples)
    assert plan.start_seconds == pytest.approx(start) and plan.sample_seconds == pytest.approx(samples)
    assert plan.threads == 2 and "2 threads" in plan.to_text()
    small_validation = plan_run(run, measurement=dataclasses.replace(measured, val_batches=2))  # one pass: 2 batches
    assert plan.eta_seconds - small_validation.eta_seconds == pytest.approx((100 / 20 + 1) * (6 - 2) * 0.5 / 3)


def test_measurement_refuses_data_it_cannot_train(tmp_path):
    run = tiny_run(tmp_path)
    (tmp_path / "data.txt").write_text("   \n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no usable records"):
        measure_run(run, steps=1)


def test_durations_read_in_days_and_years():
    assert format_duration(65) == "1m 05s" and format_duration(3 * 3600 + 120) == "3h 02m"
    assert format_duration(30 * 3600) == "30h 00m" and format_duration(12 * 86400 + 4 * 3600) == "12 days 4h"
    assert format_duration(377286 * 3600) == "43.0 years"


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
    assert peak_flops(torch.device("cpu"), torch.float32) == first  # cached until a run asks to re-measure


def test_a_remeasured_peak_keeps_the_best_reading(monkeypatch):
    # A reading taken while another program loaded the machine is low; MFU must not be computed against it
    # once a quieter moment has shown what the machine reaches.
    readings = iter([(512, 2e9), (1024, 5e9), (1024, 3e9)])
    starts = []

    def fake_measure(device, dtype, n):
        starts.append(n)
        return next(readings)

    monkeypatch.setattr(hardware, "_best_peaks", {})
    monkeypatch.setattr(hardware, "_measure_peak", fake_measure)
    cpu = torch.device("cpu")
    assert peak_flops(cpu, torch.float32) == 2e9
    assert peak_flops(cpu, torch.float32) == 2e9  # no re-measurement unless asked
    assert peak_flops(cpu, torch.float32, remeasure=True) == 5e9
    assert peak_flops(cpu, torch.float32, remeasure=True) == 5e9  # a later, busier reading does not lower it
    assert starts == [256, 512, 1024]  # each re-measurement starts at the size the last one settled on


def test_weight_decay_skips_norms_biases_and_embeddings():
    model = ApertisModel(tiny_config("transformer-nano", tie_embeddings=False))
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "embed.weight" in no_decay_names and all("norm" in n or n == "embed.weight" for n in no_decay_names)
    assert "lm_head.weight" in {names[id(p)] for p in decay["params"]}  # an untied head is a linear map
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
