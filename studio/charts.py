"""Plotly figures for the Metrics tab, built from registry rows ({step, key, value}) of one or more runs.

Every function takes `runs`: a mapping from a run's label to its metric rows, so a single run and an
overlay of several are the same call. Keys are matched by name patterns because the trainer's records are
flat and namespaced (`train/loss`, `val/loss`, `lr`, `throughput/tok_s`, ...); a chart with no matching
data shows a note saying what will fill it instead of an empty grid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import plotly.graph_objects as go

Rows = list[dict[str, Any]]

# chart name -> (title, y-axis label, key predicate, log y)
CHARTS: dict[str, tuple[str, str, Callable[[str], bool], bool]] = {
    "loss": ("Loss", "nats / token", lambda k: k in ("train/loss", "val/loss"), False),
    "lr": ("Learning rate", "lr", lambda k: k == "lr" or k.endswith("/lr"), False),
    "grad_norm": ("Gradient norm", "global norm", lambda k: "grad_norm" in k, True),
    "throughput": ("Throughput", "tokens / s", lambda k: "tok_s" in k or "tokens_per_s" in k, False),
    "mfu": ("Model FLOPs utilisation", "MFU", lambda k: "mfu" in k.lower(), False),
    "system": ("CPU / RAM / GPU", "percent or GiB", lambda k: k.startswith("system/"), False),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _empty(figure: go.Figure, note: str) -> go.Figure:
    figure.add_annotation(text=note, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5, font={"size": 13})
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False)
    return figure


def _layout(figure: go.Figure, title: str, ylabel: str) -> go.Figure:
    figure.update_layout(
        title={"text": title, "x": 0.02},
        height=300,
        margin={"l": 50, "r": 10, "t": 40, "b": 40},
        legend={"orientation": "h", "y": -0.25},
        xaxis_title="step",
        yaxis_title=ylabel,
        template="plotly_white",
    )
    return figure


def numeric_series(rows: Rows, predicate: Callable[[str], bool]) -> dict[str, tuple[list[int], list[float]]]:
    """key -> (steps, values) for the numeric rows whose key matches."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        if predicate(row["key"]) and _is_number(row["value"]):
            steps, values = series.setdefault(row["key"], ([], []))
            steps.append(row["step"])
            values.append(row["value"])
    return series


def metric_figure(runs: dict[str, Rows], chart: str) -> go.Figure:
    """One line chart (see CHARTS) with a trace per run and key."""
    title, ylabel, predicate, log_y = CHARTS[chart]
    figure = _layout(go.Figure(), title, ylabel)
    for label, rows in runs.items():
        for key, (steps, values) in sorted(numeric_series(rows, predicate).items()):
            name = key if len(runs) == 1 else f"{label} · {key}"
            mode = "lines+markers" if key.startswith("val/") or len(steps) < 30 else "lines"
            figure.add_trace(go.Scatter(x=steps, y=values, name=name, mode=mode))
    if not figure.data:
        return _empty(figure, "no data yet: start a run, or pick one that has logged this metric")
    if log_y:
        figure.update_yaxes(type="log")
    return figure


def expert_heatmap(rows: Rows) -> go.Figure:
    """Fraction of tokens routed to each expert (rows: layer × expert) over steps (columns)."""
    figure = _layout(go.Figure(), "Expert utilisation", "layer · expert")
    per_layer: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        if "expert" in row["key"] and isinstance(row["value"], list):
            per_layer.setdefault(row["key"], {})[row["step"]] = row["value"]
    if not per_layer:
        return _empty(figure, "no expert statistics: this model has no AES layers, or no step has been logged yet")
    steps = sorted({step for by_step in per_layer.values() for step in by_step})
    labels, z = [], []
    for key in sorted(per_layer):
        by_step = per_layer[key]
        width = max(len(v) for v in by_step.values())
        layer = key.split("/")[-1]
        for expert in range(width):
            labels.append(f"{layer} · e{expert}")
            z.append([_at(by_step.get(step), expert) for step in steps])
    figure.add_trace(go.Heatmap(x=steps, y=labels, z=z, colorscale="Viridis", zmin=0, colorbar={"title": "share"}))
    figure.update_layout(height=max(300, 18 * len(labels) + 100))
    return figure


def _at(values: list[float] | None, index: int) -> float | None:
    return values[index] if values is not None and index < len(values) and _is_number(values[index]) else None


def sample_timeline(rows: Rows) -> list[list[Any]]:
    """[step, prompt, generated text] rows, newest first. The trainer logs each sample as a record with
    `sample/prompt` and `sample/text`, which arrive as consecutive rows of one step."""
    table, prompt = [], ""
    for row in rows:
        if row["key"] == "sample/prompt":
            prompt = str(row["value"])
        elif row["key"] == "sample/text":
            table.append([row["step"], prompt, str(row["value"])])
    return sorted(table, key=lambda r: -r[0])


def length_histogram(length: dict[str, Any]) -> go.Figure:
    """Bar chart of a dataset's record lengths (the `length` statistics of a validation report)."""
    unit = length.get("unit", "characters")
    figure = _layout(go.Figure(), f"Record length ({unit})", "records")
    bins = length.get("histogram") or []
    if not bins:
        return _empty(figure, "no records to measure")
    labels = [f"{b['from']}–{b['to'] - 1}" for b in bins]
    figure.add_trace(go.Bar(x=labels, y=[b["count"] for b in bins], name="records"))
    figure.update_xaxes(title=unit)
    return figure


def all_figures(runs: dict[str, Rows], expert_run: Iterable[dict[str, Any]] | None = None) -> dict[str, go.Figure]:
    """Every chart of the Metrics tab; the heat map uses `expert_run` (one run's rows), else the first run."""
    figures = {chart: metric_figure(runs, chart) for chart in CHARTS}
    first = next(iter(runs.values()), [])
    figures["experts"] = expert_heatmap(list(expert_run) if expert_run is not None else first)
    return figures
