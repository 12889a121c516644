"""The Train tab's honest plans and Start's refusals: a dataset without usable records is refused
with its problems named, a run planned longer than 7 days needs a ticked confirmation, an absurd one is
refused, a sensible one starts; the plan is measured with the worker's threads; the live ETA comes from the
run's own pace.

No test here asserts a time: measurements are faked where only their arithmetic matters, and the real ones
are checked for where and how they ran (thread count, process), never for how long they took.
"""

import os
import subprocess
import sys

import pytest
import torch

from apertis_core.training.measure import Measurement
from studio import jobs, run_config, run_plan
from studio.app import Services
from studio.jobs import JobManager
from studio.store import Store
from studio.tabs import dataset, train

FORM = dict(train.BASIC_DEFAULTS, **train.ADVANCED_DEFAULTS)
# A model small enough that a real measurement in a fresh process takes a few seconds on 2 busy cores.
TINY = "model.d_model=32\nmodel.n_layers=2\nmodel.n_heads=2\nmodel.n_kv_heads=1"


@pytest.fixture
def services(tmp_path):
    store = Store(tmp_path / "ws")
    return Services(store=store, jobs=JobManager(store))


@pytest.fixture
def demo_text(services):
    return dataset.add_demo(services, "text")[1]


@pytest.fixture
def no_worker(monkeypatch):
    """Started runs get a process that exits at once instead of a trainer."""
    monkeypatch.setattr(jobs, "worker_command", lambda ws, run_id: [sys.executable, "-c", "pass", run_id])


@pytest.fixture
def half_second_steps(monkeypatch):
    """Plans measure 0.5 s per step without running anything; returns the list of configs measured."""
    measured = []

    def fake(run_config):
        measured.append(run_config)
        # Every core, as a worker takes them by default: runs beside it compete for the CPU.
        return Measurement(step_s=0.5, first_step_s=0.5, setup_s=1.0, threads=os.cpu_count(), where="faked")

    monkeypatch.setattr(run_plan, "_measure_like_a_worker", fake)
    return measured


def _values(**changes):
    values = dict(FORM, **changes)
    return [values[name] for name in train.FIELDS]


def _mapping(services, data_id, **changes):
    return run_config.run_mapping(services, data_id, "transformer-nano", dict(FORM, **changes))


# -- refusals ---------------------------------------------------------------------------------------


def test_dataset_without_usable_records_is_refused_with_its_problems(services, tmp_path, half_second_steps):
    bad = tmp_path / "notes.jsonl"
    bad.write_text('{"txt": "typo"}\nnot json\n', encoding="utf-8")
    _, data_id = dataset.upload_dataset(services, [str(bad)], "notes")
    message, run_id = train.start_run(services, "", data_id, "apertis-nano", *_values())
    assert message.startswith("Not started") and run_id == "" and services.store.list_runs() == []
    assert "no usable records" in message
    assert "notes.jsonl:1" in message and "notes.jsonl:2" in message and "not valid JSON" in message  # named
    assert "add them again in the Dataset tab" in message  # what to do
    assert half_second_steps == []  # refused before anything was measured
    assert train.plan(services, data_id, "apertis-nano", *_values()).startswith("Cannot plan this run: dataset")


def test_dataset_whose_files_are_gone_is_refused(services, demo_text):
    import shutil
    from pathlib import Path

    shutil.rmtree(Path(services.store.get_dataset(demo_text)["path"]).parent)
    check = run_plan.check_start(services, demo_text, _mapping(services, demo_text))
    assert not check.ok and "no longer in the workspace" in check.message and "add them again" in check.message


def test_run_over_seven_days_needs_the_box_ticked(services, demo_text, half_second_steps, no_worker):
    form = _values(max_steps=1_300_000, eval_every=0)  # at 0.5 s a step: 7.5 days
    message, run_id = train.start_run(services, "", demo_text, "apertis-nano", *form, False)
    assert message.startswith("Not started") and run_id == "" and "1,300,000 steps" in message
    assert "tick 'I understand this run will take about 8 days'" in message and "lower Training steps" in message
    box = train.confirm_box(message)
    assert box.visible and box.label == "I understand this run will take about 8 days" and box.value is False
    assert train.confirm_box(train.plan(services, demo_text, "apertis-nano", *form)).visible  # Plan shows it too
    message, run_id = train.start_run(services, "", demo_text, "apertis-nano", *form, True)
    assert run_id and "is running" in message and "planned: 7 days 12h" in message
    assert train.confirm_box(message).visible is False  # one confirmation never carries over to the next run
    assert len(half_second_steps) == 1  # Start reused the measurement of the refused attempt


def test_absurd_step_count_is_refused_even_when_confirmed(services, demo_text, half_second_steps):
    message, run_id = train.start_run(
        services, "", demo_text, "apertis-nano", *_values(max_steps=1_000_000_000, eval_every=0), True
    )
    assert message.startswith("Not started") and run_id == "" and services.store.list_runs() == []
    assert "1,000,000,000 steps would take about 15.8 years" in message  # not "ETA 138888h"
    assert "cannot be started" in message and "Lower Training steps" in message and "Time budget" in message
    assert train.confirm_box(message).visible is False  # no box to tick: it cannot be confirmed


def test_long_time_budget_needs_confirmation_too(services, demo_text, half_second_steps):
    check = run_plan.check_start(services, demo_text, _mapping(services, demo_text, max_minutes=8 * 24 * 60))
    assert not check.ok and "a time budget of 11,520 minutes" in check.message and "tick" in check.message


@pytest.mark.parametrize(
    "extra, says",
    [
        ("model.n_heads=0", "n_heads"),  # was a ZeroDivisionError out of the handler
        (
            "model.d_model=8192\nmodel.n_layers=48",
            "memory",
        ),  # hundreds of GB to train: refused before anything is built
    ],
)
def test_model_that_cannot_be_built_here_is_refused_before_planning(services, demo_text, extra, says):
    message, run_id = train.start_run(services, "", demo_text, "transformer-nano", *_values(extra=extra))
    assert message.startswith("Not started") and says in message and run_id == ""
    assert services.store.list_runs() == []


def test_config_the_trainer_would_reject_is_refused_with_its_reason(services, demo_text):
    """Measured for real: the fresh process builds the data as the trainer would and reports why it cannot."""
    message, run_id = train.start_run(
        services, "", demo_text, "transformer-nano", *_values(seq_len=100_000, batch_size=1, extra=TINY)
    )
    assert message.startswith("Not started") and run_id == ""
    assert "too little data for seq_len=100000" in message and "lower data.seq_len" in message


def test_sensible_run_is_planned_in_a_fresh_process_and_starts(services, demo_text, no_worker):
    text = train.plan(services, demo_text, "transformer-nano", *_values(max_steps=60, extra=TINY))
    assert "in a fresh process, as the worker trains" in text and "ETA" in text and "tick" not in text
    message, run_id = train.start_run(services, "", demo_text, "transformer-nano", *_values(max_steps=60, extra=TINY))
    assert run_id and "is running" in message and "planned:" in message


# -- how the plan measures ---------------------------------------------------------------------------


def _fresh_process_threads() -> int:
    code = "import torch; print(torch.get_num_threads())"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_plan_measures_with_the_worker_threads_not_the_studios(services, demo_text):
    """The studio runs torch with one thread; a worker with its run's setting (0: a new process's default).
    The plan must time steps with the worker's count, so this process is set to a different one first."""
    worker_threads = _fresh_process_threads()
    before = torch.get_num_threads()
    torch.set_num_threads(2 if worker_threads == 1 else 1)
    try:
        default = run_plan.plan_for(services, _mapping(services, demo_text, extra=TINY))
        assert default.plan.threads == worker_threads != torch.get_num_threads()
        assert "fresh process" in default.plan.measured_in
        explicit = run_plan.plan_for(services, _mapping(services, demo_text, extra=TINY + "\ntrain.threads=3"))
        assert explicit.plan.threads == 3
    finally:
        torch.set_num_threads(before)


def test_plan_made_while_another_run_trains_says_so_and_scales_a_queued_run(services, demo_text, half_second_steps):
    other = services.store.create_run("other", "train: {device: cpu}\n", demo_text)
    services.store.transition_run(other["id"], expected=["queued"], status="running", step=10, total_steps=100)
    mapping = _mapping(services, demo_text, device="cpu")
    services.jobs.store.set_setting("max_concurrent", 2)  # a free slot: the new run starts now, beside it
    beside = run_plan.plan_for(services, mapping)
    assert (beside.sharing, beside.ahead) == (1, 0) and beside.plan.step_seconds == 0.5
    assert "shares the device with them" in beside.to_text()
    services.jobs.store.set_setting("max_concurrent", 1)  # no slot: it waits, then trains alone
    queued = run_plan.plan_for(services, mapping)
    assert (queued.sharing, queued.ahead) == (1, 1) and queued.plan.step_seconds == pytest.approx(0.25)
    assert "starts after 1 other run ahead of it" in queued.to_text()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two one-thread runs compete on a one-core machine")
def test_queued_run_is_not_scaled_when_the_runs_threads_fit_in_the_cores(services, demo_text, monkeypatch):
    monkeypatch.setattr(
        run_plan,
        "_measure_like_a_worker",
        lambda run_config: Measurement(step_s=0.5, first_step_s=0.5, setup_s=1.0, threads=1),
    )
    other = services.store.create_run("other", "train: {device: cpu, threads: 1}\n", demo_text)
    services.store.transition_run(other["id"], expected=["queued"], status="running", step=10, total_steps=100)
    queued = run_plan.plan_for(services, _mapping(services, demo_text, device="cpu", extra="train.threads=1"))
    assert queued.ahead == 1 and queued.plan.step_seconds == 0.5  # one core each: they barely slow each other


# -- the live ETA ------------------------------------------------------------------------------------


def _training_run(services, data_id, step, total):
    run = services.store.create_run("live", "train: {}\n", data_id)
    services.store.transition_run(run["id"], expected=["queued"], status="running", step=step, total_steps=total)
    services.store.add_events(run["id"], [(0.0, "train_start", {"step": 0, "total_steps": total})])
    return run["id"]


def test_live_eta_comes_from_the_runs_recent_pace(services, demo_text):
    """Slow at first (1 step/s for 300 s), then 10 steps/s: the ETA follows the last minute's pace, not the
    average since the start and not any plan."""
    run_id = _training_run(services, demo_text, step=1300, total=2500)
    slow = [(step, "time/elapsed_s", float(step)) for step in range(10, 301, 10)]
    fast = [(300 + 100 * k, "time/elapsed_s", 300.0 + 10 * k) for k in range(1, 11)]
    services.store.add_metrics(run_id, slow + fast)
    seconds, pace = run_plan.live_eta(services, services.store.get_run(run_id))
    assert pace == pytest.approx(10.0) and seconds == pytest.approx(120.0)  # 1,200 steps left at 10 a second
    _, progress, _, _ = train.run_status(services, run_id)
    assert "10.00 steps/s · ETA 2m 00s" in progress


def test_live_eta_after_a_resume_ignores_the_earlier_workers_clock(services, demo_text):
    run_id = _training_run(services, demo_text, step=140, total=200)
    services.store.add_metrics(run_id, [(step, "time/elapsed_s", step * 10.0) for step in range(10, 101, 10)])
    services.store.add_events(run_id, [(1.0, "train_start", {"step": 100, "total_steps": 200})])
    services.store.add_metrics(run_id, [(120, "time/elapsed_s", 5.0), (140, "time/elapsed_s", 7.0)])  # clock restarted
    seconds, pace = run_plan.live_eta(services, services.store.get_run(run_id))
    assert pace == pytest.approx(10.0) and seconds == pytest.approx(6.0)


def test_no_live_eta_before_the_first_step_or_when_not_training(services, demo_text):
    run_id = _training_run(services, demo_text, step=0, total=100)
    assert run_plan.live_eta(services, services.store.get_run(run_id)) == (None, None)
    services.store.transition_run(run_id, expected=["running"], status="failed", step=50)
    assert run_plan.live_eta(services, services.store.get_run(run_id)) == (None, None)


def test_recent_pace_needs_two_rows_and_uses_the_last_two_when_the_window_is_empty():
    assert run_plan.recent_pace([{"step": 5, "value": 1.0}]) is None
    rows = [{"step": 5, "value": 1.0}, {"step": 10, "value": 101.0}]  # 100 s apart: more than the window
    assert run_plan.recent_pace(rows) == pytest.approx(0.05)


# -- the page -----------------------------------------------------------------------------------------


def test_train_tab_opens_with_a_help_line_and_a_hidden_confirmation(services):
    import gradio as gr

    with gr.Blocks() as page:
        train.build(services, 2.0)
    components = list(page.blocks.values())
    first = next(c for c in components if isinstance(c, gr.Markdown))
    assert "Plan" in first.value and "Start" in first.value and "how long" in first.value
    boxes = [c for c in components if isinstance(c, gr.Checkbox)]
    assert len(boxes) == 1 and boxes[0].visible is False and boxes[0].value is False
