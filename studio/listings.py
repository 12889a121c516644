"""What the tabs' pickers and tables list, and how each item is labelled: runs (with their state word from
run_states) and models (checkpoints folded under their run). Reads the registry only."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_label(run: dict[str, Any]) -> str:
    return f"{run['name']} · {run['status']}"


def run_options(services) -> list[tuple[str, str]]:
    """(label, run id) for every run, newest first, as the Train and Metrics pickers list them."""
    return [(run_label(run), run["id"]) for run in services.store.list_runs()]


def step_of(folder: Path) -> int:
    """The step of a checkpoints/step_NNNNNNN folder (0 for any other name)."""
    digits = folder.name.removeprefix("step_")
    return int(digits) if digits.isdigit() else 0


def listed_models(services, show_checkpoints: bool = False) -> list[tuple[dict[str, Any], bool]]:
    """(model row, folded) in the order the tab lists them, newest first: every trained, imported and demo
    model, followed by its run's checkpoints (folded) when `show_checkpoints`. A run with no final model yet
    (stopped, failed, still training) is listed by its newest checkpoint, so it never disappears."""
    rows = services.store.list_models()
    checkpoints: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["kind"] == "checkpoint":
            checkpoints.setdefault(row["run_id"], []).append(row)
    for group in checkpoints.values():
        group.sort(key=lambda row: step_of(Path(row["path"])), reverse=True)
    runs_with_model = {row["run_id"] for row in rows if row["kind"] != "checkpoint" and row["run_id"]}
    listed, runs_done = [], set()
    for row in rows:
        run_id = row["run_id"]
        if row["kind"] != "checkpoint":
            listed.append((row, False))
            folded = checkpoints.get(run_id, []) if run_id else []
        elif run_id in runs_with_model or run_id in runs_done:
            continue  # listed under its run's model
        else:
            newest, *folded = checkpoints[run_id]
            listed.append((newest, False))
        runs_done.add(run_id)
        if show_checkpoints:
            listed += [(checkpoint, True) for checkpoint in folded]
    return listed


def kind_label(row: dict[str, Any]) -> str:
    if row["kind"] == "bundle":
        return "trained" if row["run_id"] else "imported"
    return row["kind"]  # demo, checkpoint


def model_label(row: dict[str, Any], folded: bool = False) -> str:
    """How a model is named in lists: a checkpoint folded under its run is indented with an arrow."""
    return f"{'↳ ' if folded else ''}{row['name']} · {kind_label(row)}"


def model_options(services, show_checkpoints: bool = False) -> list[tuple[str, str]]:
    """(label, model id) in listed_models' order, as the Models and Chat pickers list them."""
    return [(model_label(row, folded), row["id"]) for row, folded in listed_models(services, show_checkpoints)]


NEW_MODEL = ("none: a new model of the chosen size", "")  # the Train tab's "Start from model" default


def start_model_options(services) -> list[tuple[str, str]]:
    """The Train tab's "Start from model" choices: a new model, or any listed model to fine-tune."""
    return [NEW_MODEL, *model_options(services)]
