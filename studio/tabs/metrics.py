"""Metrics tab: live charts of one or several runs (refreshed by a gr.Timer), the config difference
between two runs, a CSV download of a run's metrics, the command that opens a run's TensorBoard files
(runs with train.tensorboard on), and the timeline of sample generations.

The timer handler first compares a cheap signature (row count and status per run) with the last one it
drew, and skips redrawing when nothing changed, so an idle tab costs one small query every tick. It also
renews the run pickers when a run's status word changes, so a label never shows a state the run has left.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr
import yaml

from apertis_core.training.callbacks import TENSORBOARD_DIR

from ..charts import CHARTS, all_figures, sample_timeline
from ..listings import run_options
from ..run_config import flatten

CHART_NAMES = [*CHARTS, "experts"]


PICKERS = 4  # the dropdowns that list runs: the overlay, run A, run B and the CSV run


def tick(services, run_ids, last, shown_options) -> tuple:
    """The timer: metrics_view's outputs, then the pickers and their options (gr.skip() when unchanged)."""
    view = metrics_view(services, run_ids, last)
    options = run_options(services)
    if options == shown_options:
        return (*view, *[gr.skip()] * PICKERS, shown_options)
    return (*view, *[gr.Dropdown(choices=options) for _ in range(PICKERS)], options)


def _signature(services, run_ids: list[str]) -> list[list[Any]]:
    rows = []
    for run_id in run_ids:
        run = services.store.get_run(run_id)
        if run is not None:
            rows.append([run_id, services.store.metric_count(run_id), run["status"]])
    return rows


def metrics_view(services, run_ids: list[str] | str | None, last: list[list[Any]] | None = None) -> tuple:
    """Figures (CHART_NAMES order), the sample timeline and the new signature; unchanged data -> skip."""
    run_ids = [run_ids] if isinstance(run_ids, str) else list(run_ids or [])
    signature = _signature(services, run_ids)
    if last is not None and signature == last:
        return (*[gr.skip()] * (len(CHART_NAMES) + 1), signature)
    runs = {}
    for run_id, _, _ in signature:
        label = services.store.get_run(run_id)["name"]
        runs[label if label not in runs else f"{label} ({run_id})"] = services.store.metrics(run_id)
    figures = all_figures(runs)
    first = next(iter(runs.values()), [])
    return (*[figures[name] for name in CHART_NAMES], sample_timeline(first), signature)


def config_diff(services, run_a: str | None, run_b: str | None) -> list[list[str]]:
    """[setting, value in A, value in B] for every setting that differs (out_dir excluded)."""
    a, b = (services.store.get_run(r) if r else None for r in (run_a, run_b))
    if a is None or b is None:
        return [["pick two runs to compare", "", ""]]
    flat_a, flat_b = (flatten(yaml.safe_load(run["config"]) or {}, ".") for run in (a, b))
    keys = sorted((set(flat_a) | set(flat_b)) - {"out_dir"})
    rows = [[k, str(flat_a.get(k, "—")), str(flat_b.get(k, "—"))] for k in keys if flat_a.get(k) != flat_b.get(k)]
    return rows or [["the two configs are identical", "", ""]]


def metrics_csv(services, run_id: str | None) -> str | None:
    """Write the run's metrics (one row per step) under the workspace and return the file for download."""
    run = services.store.get_run(run_id) if run_id else None
    if run is None:
        gr.Warning("Pick a run to download its metrics.")
        return None
    folder = services.store.tmp_dir / "exports"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{run_id}-metrics.csv"
    path.write_text(services.store.metrics_csv(run_id), encoding="utf-8")
    return str(path)


def tensorboard_hint(services, run_id: str | None) -> str:
    """Markdown with the command that opens the run's TensorBoard files, or how to get them."""
    run = services.store.get_run(run_id) if run_id else None
    if run is None:
        return "Pick a run to see how to open it in TensorBoard."
    folder = Path(run["out_dir"]) / TENSORBOARD_DIR
    if not folder.is_dir():
        return (
            "This run has no TensorBoard files. Runs write them when their config sets "
            "`train.tensorboard: true` (needs `pip install tensorboard`)."
        )
    return f'Open this run in TensorBoard:\n\n```\ntensorboard --logdir "{folder}"\n```'


HELP = (
    "Follow your runs as they train: loss, learning rate, speed and sample text, updated live. Pick several "
    "runs to compare their curves; the configs, a CSV of every value and the TensorBoard command are in the "
    "last section."
)


def build(services, timer_s: float) -> dict[str, Any]:
    gr.Markdown(HELP)
    choices = run_options(services)
    runs = gr.Dropdown(
        label="Runs (choose several to overlay)",
        choices=choices,
        multiselect=True,
        value=[choices[0][1]] if choices else [],
    )
    last = gr.State(None)
    shown_options = gr.State(choices)
    plots = {}
    with gr.Row():
        plots["loss"] = gr.Plot(label="Loss")
        with gr.Column():
            gr.Markdown("**Sample generations** (fixed probe prompts, newest first)")
            samples = gr.Dataframe(headers=["step", "prompt", "text"], interactive=False, wrap=True, max_height=300)
    for row in (("lr", "grad_norm"), ("throughput", "mfu"), ("system", "experts")):
        with gr.Row():
            for name in row:
                plots[name] = gr.Plot(label=name)
    with gr.Accordion("Compare configs, download, TensorBoard", open=False):
        with gr.Row():
            run_a, run_b = gr.Dropdown(label="Run A", choices=choices), gr.Dropdown(label="Run B", choices=choices)
        diff = gr.Dataframe(headers=["setting", "A", "B"], interactive=False)
        with gr.Row():
            csv_run = gr.Dropdown(label="Run", choices=choices)
            csv_btn = gr.Button("Metrics as CSV")
            csv_file = gr.File(label="Download")
        board = gr.Markdown(tensorboard_hint(services, None))
    outputs = [*(plots[name] for name in CHART_NAMES), samples, last]
    runs.change(partial(metrics_view, services), runs, outputs, api_name="metrics")
    pickers = [runs, run_a, run_b, csv_run]
    gr.Timer(timer_s).tick(
        partial(tick, services),
        [runs, last, shown_options],
        [*outputs, *pickers, shown_options],
        api_visibility="private",
        show_progress="hidden",
    )
    for picker in (run_a, run_b):
        picker.change(partial(config_diff, services), [run_a, run_b], diff, api_visibility="private")
    csv_btn.click(partial(metrics_csv, services), csv_run, csv_file, api_name="metrics_csv")
    csv_run.change(partial(tensorboard_hint, services), csv_run, board, api_visibility="private")

    def refresh():
        options = run_options(services)
        return [gr.Dropdown(choices=options) for _ in range(PICKERS)]

    return {"refresh": refresh, "refresh_outputs": pickers}
