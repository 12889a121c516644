"""Train tab: choose data, preset and hyper-parameters; see the plan and the exact command; start, stop,
resume or extend runs; watch progress, the log tail and the queue.

Plans, Start's refusals and the live ETA are services in studio/run_plan.py; this file lays out the form
and turns its values into calls to them.

The form becomes a RunConfig mapping (`studio/run_config.py`), so what the studio trains is exactly what
`apertis train config.yaml` would train from the YAML it shows.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import gradio as gr
import yaml

from apertis_core.model.config import ModelConfig  # the config modules import without torch

from .. import run_config, run_plan, run_states
from ..jobs import JobError
from ..listings import run_options, start_model_options
from ..runfiles import CONFIG_NAME, log_tail

# (name, label, default, kind) of the form fields, in the order the handlers receive them. The defaults
# train the nano preset on a laptop CPU in a few minutes.
BASIC = [
    ("start_from", "Start from model (fine-tune it; none: a new model)", "", "model"),
    ("max_steps", "Training steps", 300, "int"),
    ("batch_size", "Examples per step (batch size)", 8, "int"),
    ("seq_len", "Tokens per example (sequence length)", 128, "int"),
    ("lr", "Learning rate", 1e-3, "float"),
    ("max_minutes", "Time budget in minutes (0 = train for the steps above)", 0.0, "float"),
]
ADVANCED = [
    ("vocab_size", "Vocabulary size of a new tokenizer", 2048, "int"),
    ("warmup_steps", "Warm-up steps (learning rate rises)", 30, "int"),
    ("eval_every", "Check validation loss every N steps", 50, "int"),
    ("save_every", "Save a checkpoint every N steps", 100, "int"),
    ("log_every", "Record metrics every N steps", 5, "int"),
    ("sample_every", "Write sample text every N steps (0 = never)", 100, "int"),
    ("schedule", "Learning-rate schedule", "cosine", ["cosine", "wsd"]),
    ("precision", "Number precision", "auto", ["auto", "fp32", "bf16", "fp16"]),
    ("device", "Train on", "auto", ["auto", "cpu", "cuda", "mps"]),
    ("gpus", "GPUs to use (all: one process per GPU, through torchrun)", "one", ["one", "all"]),
    ("finetune_method", "Fine-tuning a start model: LoRA adapters or all weights", "lora", ["lora", "full"]),
    ("lora_rank", "LoRA rank (adapter width) when fine-tuning with LoRA", 8, "int"),
    ("extra", "More settings, one key=value per line (e.g. model.d_model=128)", "", "text"),
]
FIELDS = [f[0] for f in BASIC + ADVANCED]
BASIC_DEFAULTS = {f[0]: f[2] for f in BASIC}
ADVANCED_DEFAULTS = {f[0]: f[2] for f in ADVANCED}
HELP = (
    "Train a model on one of your datasets: pick the dataset and a model size, press **Plan** to see how "
    "long it will take on this computer, then **Start**. Runs train in the background; follow them below "
    "or in the Metrics tab."
)


def _form(services, dataset_id, preset, *values) -> dict[str, Any]:
    return run_config.run_mapping(services, dataset_id, preset, dict(zip(FIELDS, values, strict=True)))


def show_command(services, dataset_id, preset, *values) -> tuple[str, str]:
    try:
        text = yaml.safe_dump(_form(services, dataset_id, preset, *values), sort_keys=False)
    except ValueError as exc:
        return f"Cannot build the config: {exc}", ""
    return f"apertis train {CONFIG_NAME}\n# the studio saves this file as runs/<run id>/{CONFIG_NAME}", text


def plan(services, dataset_id, preset, *values) -> str:
    """API `plan_run`: parameters, tokens, memory and ETA before Start, from a few real steps timed the way
    the worker will train (see studio/run_plan.py), and what Start would refuse."""
    try:
        mapping = _form(services, dataset_id, preset, *values)
    except ValueError as exc:
        return f"Cannot plan this run: {exc}"
    return run_plan.plan_text(services, dataset_id, mapping)


def start_run(services, name, dataset_id, preset, *values) -> tuple[str, str]:
    """API `start_run`: queue a run from the form -> (message, run id or "" if not started). It starts at
    once when no other run is training. After the FIELDS values may come one more: True confirms a run
    planned longer than 7 days (the "I understand..." box). Start refuses, saying what to do, a dataset
    without usable records, a config the trainer would reject, and a run that is absurdly long."""
    form, confirmed = values[: len(FIELDS)], bool(values[len(FIELDS)]) if len(values) > len(FIELDS) else False
    try:
        mapping = _form(services, dataset_id, preset, *form)
        check = run_plan.check_start(services, dataset_id, mapping, confirmed_long=confirmed)
        if not check.ok:
            return f"Not started: {check.message}", ""
        run = services.jobs.submit(
            name or f"{preset} on {services.store.get_dataset(dataset_id)['name']}",
            yaml.safe_dump(mapping, sort_keys=False),
            dataset_id,
        )
    except (ValueError, JobError, OSError) as exc:
        return f"Not started: {exc}", ""
    return f"{run['name']} ({run['id']}) is {run['status']}; {check.message}.", run["id"]


def confirm_box(message: str) -> gr.Checkbox:
    """Shows the long-run confirmation when Plan or Start said the run needs it (its label names the days);
    hides and clears it otherwise, so one confirmation never carries over to another run."""
    import re

    days = re.search(r"tick '(I understand this run will take about \d+ days)'", message or "")
    if days:
        return gr.Checkbox(visible=True, value=False, label=days.group(1))
    return gr.Checkbox(visible=False, value=False)


def select_run(services, run_id: str | None) -> gr.Dropdown:
    choices = run_options(services)
    return gr.Dropdown(choices=choices, value=run_id) if run_id else gr.Dropdown(choices=choices)


def _progress_text(run: dict[str, Any], eta: str) -> str:
    step, total = int(run["step"] or 0), int(run["total_steps"] or 0)
    fraction = step / total if total else 0.0
    bar = "█" * round(20 * fraction) + "░" * (20 - round(20 * fraction))
    reason = f"\n\n{run['exit_reason']}" if run["exit_reason"] else ""
    return f"**{run['name']}** — {run['status']}\n\n`{bar}` {step}/{total} steps ({fraction:.0%}){eta}{reason}"


def queue_rows(services) -> list[list[Any]]:
    rows = services.store.list_runs([*run_states.ACTIVE, run_states.QUEUED])
    return [[r["id"], r["name"], r["status"], f"{r['step'] or 0}/{r['total_steps'] or 0}"] for r in rows]


def run_status(services, run_id: str | None) -> tuple[dict[str, Any], str, str, list[list[Any]]]:
    """API `run_status`: (status record, progress text, log tail, queue rows)."""
    run = services.store.get_run(run_id) if run_id else None
    if run is None:
        return {}, "No run selected: start one, or pick one from the list.", "", queue_rows(services)
    keys = ("id", "name", "status", "step", "total_steps", "exit_code", "exit_reason", "out_dir")
    status = {key: run[key] for key in keys}
    return (
        status,
        _progress_text(run, run_plan.live_eta_text(services, run)),
        run["log_tail"] or log_tail(run["out_dir"]),
        queue_rows(services),
    )


def _act(action, run_id, *args) -> str:
    try:
        return action(run_id, *args)
    except JobError as exc:
        return str(exc)


def stop_run(services, run_id) -> str:
    """API `stop_run`: cancel a queued run or ask a running one to save and stop."""
    return _act(services.jobs.stop, run_id)


def resume_run(services, run_id) -> str:
    """API `resume_run`: continue a stopped, failed or interrupted run from its last checkpoint."""
    return _act(services.jobs.resume, run_id)


def train_more(services, run_id, steps) -> str:
    """API `train_more`: continue a finished run for `steps` more steps."""
    return _act(services.jobs.train_more, run_id, int(steps or 0))


def _field(name: str, label: str, default: Any, kind: Any, services=None) -> gr.components.Component:
    if kind == "model":  # the Models tab's models (trained, imported, the demo), or none
        return gr.Dropdown(choices=start_model_options(services), value=default, label=label)
    if isinstance(kind, list):
        return gr.Dropdown(choices=kind, value=default, label=label)
    if kind == "text":
        return gr.Textbox(value=default, label=label, lines=3)
    return gr.Number(value=default, label=label, precision=0 if kind == "int" else None)


def build(services, timer_s: float) -> dict[str, Any]:
    from .dataset import dataset_choices

    gr.Markdown(HELP)
    with gr.Row():
        dataset = gr.Dropdown(label="Dataset", choices=dataset_choices(services), allow_custom_value=True)
        preset = gr.Dropdown(label="Model size (preset)", choices=ModelConfig.presets(), value="apertis-nano")
        name = gr.Textbox(label="Run name", placeholder="optional")
    with gr.Row():
        basic = [_field(*f, services=services) for f in BASIC]
    with gr.Accordion("Advanced", open=False):
        advanced = [_field(*f) for f in ADVANCED]
    form = [dataset, preset, *basic, *advanced]
    with gr.Row():
        plan_btn, command_btn = gr.Button("Plan"), gr.Button("Show command")
        start_btn = gr.Button("Start", variant="primary")
    confirm = gr.Checkbox(visible=False, value=False, label="I understand this run will take more than 7 days")
    plan_out = gr.Textbox(label="Plan", lines=9)
    with gr.Accordion("Command and YAML", open=False):
        command, config = gr.Code(label="Command", language="shell"), gr.Code(label="config.yaml", language="yaml")
    with gr.Row():
        run = gr.Dropdown(label="Run to follow", choices=run_options(services), scale=3, allow_custom_value=True)
        stop_btn, resume_btn = gr.Button("Stop", variant="stop"), gr.Button("Resume")
        more_steps = gr.Number(label="More steps (for Train N more)", value=100, precision=0, minimum=1)
        more_btn = gr.Button("Train N more")
    message = gr.Markdown()
    progress = gr.Markdown()
    log = gr.Textbox(label="Latest lines of the run's log", lines=10, max_lines=20, autoscroll=True)
    queue = gr.Dataframe(headers=["id", "name", "status", "step"], label="Runs training or waiting", interactive=False)
    with gr.Accordion("Status record (as the API returns it)", open=False):
        status = gr.JSON()

    plan_btn.click(partial(plan, services), form, plan_out, api_name="plan_run").then(
        confirm_box, plan_out, confirm, api_visibility="private"
    )
    command_btn.click(partial(show_command, services), form, [command, config], api_visibility="private")
    new_run = gr.Textbox(visible=False)
    start_btn.click(
        partial(start_run, services), [name, *form, confirm], [message, new_run], api_name="start_run"
    ).then(partial(select_run, services), new_run, run, api_visibility="private").then(
        confirm_box, message, confirm, api_visibility="private"
    )
    status_outputs = [status, progress, log, queue]
    for button, handler, inputs, api in (
        (stop_btn, stop_run, [run], "stop_run"),
        (resume_btn, resume_run, [run], "resume_run"),
        (more_btn, train_more, [run, more_steps], "train_more"),
    ):
        button.click(partial(handler, services), inputs, message, api_name=api).then(
            partial(select_run, services), run, run, api_visibility="private"
        )
    run.change(partial(run_status, services), run, status_outputs, api_name="run_status")
    gr.Timer(timer_s).tick(
        partial(run_status, services), run, status_outputs, api_visibility="private", show_progress="hidden"
    )

    def refresh():
        return (
            gr.Dropdown(choices=dataset_choices(services)),
            gr.Dropdown(choices=run_options(services)),
            gr.Dropdown(choices=start_model_options(services)),  # a run that finished is a model to start from
        )

    start_from = basic[FIELDS.index("start_from")]
    return {"run": run, "refresh": refresh, "refresh_outputs": [dataset, run, start_from]}
