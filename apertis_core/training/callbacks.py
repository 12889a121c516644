"""How the trainer reports: a tiny Callback interface, a JSONL metrics sink, an optional TensorBoard sink,
a tqdm progress bar.

Callbacks receive a narrow `TrainState` (numbers and paths), never the trainer, so a sink cannot reach into
the optimizer or the model. The base class does nothing, so it doubles as the null sink.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_text

TENSORBOARD_DIR = "tensorboard"  # train.tensorboard: event files go to <run dir>/tensorboard


@dataclass
class TrainState:
    step: int  # optimizer steps completed
    total_steps: int  # planned steps (changes once if a time budget is re-planned)
    out_dir: str  # the run directory
    epoch: float = 0.0  # passes over the training set so far
    tokens_seen: int = 0  # training tokens consumed, all processes together
    elapsed_s: float = 0.0  # wall-clock seconds since this process started training
    best_val_loss: float | None = None  # lowest validation loss so far
    metrics: dict[str, Any] = field(default_factory=dict)  # the latest record (train/loss, val/loss, ...)
    checkpoint_dir: str | None = None  # set for on_save: the checkpoint just written
    stop_requested: bool = False  # a callback sets this (request_stop) to end the run after this step

    def request_stop(self) -> None:
        """Ask the trainer to save a checkpoint and stop after the current step."""
        self.stop_requested = True


class Callback:
    """Override what you need; every method is a no-op here."""

    def on_train_start(self, state: TrainState) -> None: ...

    def on_step_end(self, state: TrainState) -> None: ...

    def on_eval_end(self, state: TrainState) -> None: ...

    def on_save(self, state: TrainState) -> None: ...

    def on_train_end(self, state: TrainState) -> None: ...

    def log(self, record: dict[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


class CallbackList(Callback):
    """Fans every event out to several callbacks, in order."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks = list(callbacks)

    def on_train_start(self, state: TrainState) -> None:
        for callback in self.callbacks:
            callback.on_train_start(state)

    def on_step_end(self, state: TrainState) -> None:
        for callback in self.callbacks:
            callback.on_step_end(state)

    def on_eval_end(self, state: TrainState) -> None:
        for callback in self.callbacks:
            callback.on_eval_end(state)

    def on_save(self, state: TrainState) -> None:
        for callback in self.callbacks:
            callback.on_save(state)

    def on_train_end(self, state: TrainState) -> None:
        for callback in self.callbacks:
            callback.on_train_end(state)

    def log(self, record: dict[str, Any], step: int) -> None:
        for callback in self.callbacks:
            callback.log(record, step)

    def close(self) -> None:
        for callback in self.callbacks:
            callback.close()


class JsonlLogger(Callback):
    """Appends one JSON object per record to a file: {"step": N, "time": unix_s, ...record}."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._handle = None

    def on_train_start(self, state: TrainState) -> None:
        # A resumed run repeats the steps after its checkpoint; drop their old records so every step
        # appears once in the file.
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if _record_step(line) is not None and _record_step(line) <= state.step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any], step: int) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("a", encoding="utf-8")
        self._handle.write(json.dumps({"step": step, "time": round(time.time(), 3), **record}) + "\n")
        self._handle.flush()  # readers (the studio) poll the file while the run goes on

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class TensorBoardLogger(Callback):
    """Writes every numeric value of each record as a TensorBoard scalar (tag = the record key) into a folder,
    beside metrics.jsonl; lists, strings and other non-numbers are skipped. Needs the optional `tensorboard`
    package: constructing the logger without it raises an ImportError that says how to install it."""

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self._writer_class = _summary_writer_class()  # fail before training starts, not at the first record
        self._writer = None

    def on_train_start(self, state: TrainState) -> None:
        # A resumed run repeats the steps after its checkpoint: purge_step drops their old events, as the
        # JSONL logger drops their old lines.
        self._open(purge_step=state.step + 1 if state.step > 0 else None)

    def _open(self, purge_step: int | None = None) -> None:
        if self._writer is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = self._writer_class(log_dir=str(self.log_dir), purge_step=purge_step)

    def log(self, record: dict[str, Any], step: int) -> None:
        self._open()
        for key, value in record.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            self._writer.add_scalar(key, float(value), global_step=step)
        self._writer.flush()  # TensorBoard reads the files while the run goes on

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:  # torch raises this when the tensorboard package is missing or too old
        raise ImportError(
            "train.tensorboard needs the tensorboard package: pip install tensorboard "
            "(or pip install 'apertis[tensorboard]'), or set train.tensorboard=false"
        ) from error
    return SummaryWriter


def _record_step(line: str) -> int | None:
    """The step of a record line; None for a line torn by a crash mid-write."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file, skipping a torn last line."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


class ProgressBar(Callback):
    """A tqdm bar over optimizer steps with the latest loss and learning rate."""

    def __init__(self, **tqdm_kwargs: Any):
        self.tqdm_kwargs = tqdm_kwargs
        self.bar = None
        self.shown: dict[str, float] = {}  # latest value per shown key: val/loss stays visible between evals

    def on_train_start(self, state: TrainState) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=state.total_steps, initial=state.step, unit="step", dynamic_ncols=True, **self.tqdm_kwargs
        )

    def on_step_end(self, state: TrainState) -> None:
        if self.bar is None:
            return
        self.bar.total = state.total_steps  # a time budget may re-plan the total once
        self.bar.update(state.step - self.bar.n)

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.bar is None:
            return
        self.shown.update({label: record[key] for key, label in _SHOWN.items() if key in record})
        if self.shown:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in self.shown.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


_SHOWN = {"train/loss": "loss", "val/loss": "val", "lr": "lr", "throughput/tok_s": "tok/s"}  # record key -> label
