"""The training worker process: runs one registered run with apertis_core's trainer and records it.

Started by the job manager as `python -m studio.worker --workspace W --run-id ID` (or, in the frozen app,
as the executable re-entered with a `worker` argument). Its stdout/stderr go to `<out_dir>/worker.log`.
Metrics and lifecycle events are buffered and written to the registry by a background thread, so a
slow disk or a busy database never stalls a training step. Stop is cooperative: the UI writes the
trainer's STOP file into the run folder; the trainer saves a checkpoint and returns. SIGTERM or SIGHUP (a
`kill`, logging out, the computer shutting down) is turned into the same request, so even then a checkpoint
is saved; the run then ends "interrupted" rather than "stopped". The worker records its own ending through
run_states' table and prints it as its last log line. A run on several GPUs (train.gpus=all) starts this
module once per GPU through torchrun: rank 0 does all of the above, the other ranks only train beside it.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from apertis_core.training import Callback

from . import run_states as rs
from .run_config import flatten
from .runfiles import FINAL_NAME, clear_stop, log_tail, request_stop
from .store import Store

FLUSH_INTERVAL_S = 0.5  # well under the charts' 2 s refresh (TIMER_S, studio/app.py): a point shows within ~2.5 s
SYSTEM_EVERY_S = 2.0  # CPU/RAM samples: often enough for a chart, rare enough to cost nothing


def system_record() -> dict[str, float]:
    """CPU and memory of this machine and process (and GPU memory when there is one), for the charts."""
    import psutil

    record = {
        "system/cpu_percent": psutil.cpu_percent(interval=None),
        "system/ram_percent": psutil.virtual_memory().percent,
        "system/worker_rss_gib": psutil.Process().memory_info().rss / 2**30,
    }
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        record["system/gpu_mem_gib"] = torch.cuda.memory_allocated() / 2**30
    return record


class RegistryCallback(Callback):
    """Buffers the trainer's records and events; a daemon thread writes them to the registry."""

    def __init__(self, store: Store, run_id: str, flush_interval: float = FLUSH_INTERVAL_S):
        self.store, self.run_id = store, run_id
        self._metrics: list[tuple[int, str, Any]] = []
        self._events: list[tuple[float, str, Any]] = []
        self._progress: dict[str, int] = {}
        self._stop_wanted = False
        self._last_step: int | None = None  # system samples are filed under the latest step
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(flush_interval,), name="registry-flush", daemon=True)
        self._thread.start()

    def _event(self, kind: str, payload: dict[str, Any]) -> None:
        with self._lock:
            self._events.append((time.time(), kind, payload))

    def on_train_start(self, state) -> None:
        # Synchronous on purpose: rows from steps after the checkpoint must go before new ones arrive.
        self.store.drop_metrics_after(self.run_id, state.step)
        self._backfill(Path(state.out_dir) / "metrics.jsonl", state.step)
        self.store.update_run(self.run_id, step=state.step, total_steps=state.total_steps)
        self._event("train_start", {"step": state.step, "total_steps": state.total_steps})

    def _backfill(self, path: Path, step: int) -> None:
        """Rows of metrics.jsonl (up to the checkpoint's step; the trainer's logger has just cut the rest) that
        the registry lacks: a worker killed before its last flush never sent them, and the resume will not
        train those steps again."""
        from apertis_core.training import read_metrics

        if not path.exists():
            return
        have = {(row["step"], row["key"]) for row in self.store.metrics(self.run_id)}
        rows = []
        for record in read_metrics(path):
            at = int(record.get("step", -1))
            if 0 <= at <= step:
                rows += [
                    (at, k, v) for k, v in flatten(record).items() if k not in ("step", "time") and (at, k) not in have
                ]
        self.store.add_metrics(self.run_id, rows)

    def on_step_end(self, state) -> None:
        if self._stop_wanted:
            state.request_stop()
        with self._lock:
            self._progress = {"step": state.step, "total_steps": state.total_steps}
            self._last_step = state.step

    def on_eval_end(self, state) -> None:
        self._event("eval", {"step": state.step, "best_val_loss": state.best_val_loss})

    def on_save(self, state) -> None:
        self._event("save", {"step": state.step, "checkpoint": state.checkpoint_dir})

    def on_train_end(self, state) -> None:
        self.on_step_end(state)
        self._event("train_end", {"step": state.step, "total_steps": state.total_steps})

    def log(self, record: dict[str, Any], step: int) -> None:
        rows = [(step, key, value) for key, value in flatten(record).items() if key != "step"]
        with self._lock:
            self._metrics.extend(rows)

    def flush(self) -> None:
        with self._lock:
            metrics, events, progress = self._metrics, self._events, self._progress
            self._metrics, self._events, self._progress = [], [], {}
        self.store.add_metrics(self.run_id, metrics)
        self.store.add_events(self.run_id, events)
        if progress:
            self.store.update_run(self.run_id, **progress)
        # Second stop channel: a Stop pressed while the trainer started up may have had its STOP file
        # cleared by the trainer; the registry still says "stopping".
        run = self.store.get_run(self.run_id)
        self._stop_wanted = run is not None and run["status"] == rs.STOPPING

    def _loop(self, interval: float) -> None:
        last_system = 0.0
        while not self._done.wait(interval):
            try:
                if time.monotonic() - last_system >= SYSTEM_EVERY_S and self._last_step is not None:
                    self.log(system_record(), self._last_step)
                    last_system = time.monotonic()
                self.flush()
            except Exception:  # a locked or full disk must not kill training; the next flush retries
                traceback.print_exc()

    def close(self) -> None:
        self._done.set()
        self._thread.join()
        self.flush()


class LogLines(Callback):
    """One readable line per logged record, for the log tail the UI shows."""

    def log(self, record: dict[str, Any], step: int) -> None:
        if "sample/text" in record:
            print(f"step {step}: sample {record.get('sample/prompt', '')!r} -> {record['sample/text']!r}", flush=True)
            return
        shown = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        parts = [f"{k}={v:.4g}" if isinstance(v, float) and math.isfinite(v) else f"{k}={v}" for k, v in shown.items()]
        if parts:
            print(f"step {step}: " + " ".join(parts), flush=True)

    def on_save(self, state) -> None:
        print(f"step {state.step}: checkpoint saved to {state.checkpoint_dir}", flush=True)


def load_run_config(config_yaml: str, out_dir: str | Path):
    """The RunConfig stored with the run, with out_dir pinned to the run's folder in the workspace."""
    import dataclasses

    import yaml

    from apertis_core.training import RunConfig

    mapping = yaml.safe_load(config_yaml) or {}
    return dataclasses.replace(RunConfig.from_dict(mapping), out_dir=str(out_dir))


class OutsideStop:
    """Turns SIGTERM/SIGHUP into the trainer's stop request, so a worker ended from outside still saves a
    checkpoint. A second signal ends the worker at once (KeyboardInterrupt), for a save that hangs."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.signal_name: str | None = None  # set once a signal arrived

    def install(self) -> OutsideStop:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for signum in self.SIGNALS:
                signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, _frame) -> None:
        if self.signal_name is not None:
            raise KeyboardInterrupt(f"{self.signal_name} again while saving")
        self.signal_name = signal.Signals(signum).name
        print(f"worker {os.getpid()}: {self.signal_name} received; saving a checkpoint, then ending", flush=True)
        request_stop(self.out_dir)

    def reason(self, saved: bool) -> str:
        what = "a checkpoint was saved - " if saved else ""
        return (
            f"the worker was ended from outside the studio by {self.signal_name} (a `kill`, logging out or the "
            f"computer shutting down); {what}press Resume to continue from the last checkpoint"
        )


def _end(store: Store, run_id: str, status: str, **fields: Any) -> None:
    """Record how the run ended, through the state table, and say it as the log's last line."""
    if not store.transition_run(run_id, status, rs.ACTIVE, ended=time.time(), **fields):
        run = store.get_run(run_id)
        print(
            f"worker {os.getpid()}: run {run_id} ended {status}, but the registry already says "
            f"{run and run['status']}; left as it is",
            flush=True,
        )
        return
    print(
        f"worker {os.getpid()}: run {run_id} {status}: {fields.get('exit_reason') or rs.MEANINGS[status]}", flush=True
    )


def _finish(store: Store, run_id: str, result: Any, out_dir: Path, outside: OutsideStop) -> None:
    stopped = clear_stop(out_dir) | bool(getattr(result, "stopped", False))
    at = f" at step {result.steps}" if getattr(result, "steps", None) is not None else ""
    if outside.signal_name is not None and stopped:
        _end(store, run_id, rs.INTERRUPTED, exit_code=0, exit_reason=outside.reason(saved=True))
        return
    if stopped:
        _end(
            store,
            run_id,
            rs.STOPPED,
            exit_code=0,
            exit_reason=f"stopped on request{at}; a checkpoint was saved - press Resume to continue",
        )
        return
    _end(store, run_id, rs.FINISHED, exit_code=0, exit_reason=f"finished{at}")
    bundle = Path(getattr(result, "bundle_dir", None) or out_dir / FINAL_NAME)
    if bundle.is_dir():
        card_path = Path(bundle) / "README.md"
        card = card_path.read_text(encoding="utf-8") if card_path.exists() else ""
        store.add_model(store.get_run(run_id)["name"], bundle, kind="bundle", run_id=run_id, card=card)


def _take_run(store: Store, run: dict[str, Any]) -> str | None:
    """Move the run to running if it is ours to train; else the reason it is not (the worker then exits)."""
    if run["status"] in rs.ACTIVE:  # the studio marked it when it started this process
        return None
    if run["status"] == rs.QUEUED and store.transition_run(run["id"], rs.RUNNING, [rs.QUEUED]):
        return None  # a worker started by hand takes its run out of the queue itself
    current = store.get_run(run["id"])["status"]
    return (
        f"run {run['id']} is not queued ({rs.describe(current)}). Press Resume (or Train N more) in the studio "
        "to queue it, then start the worker"
    )


def _continuation(run: dict[str, Any]) -> dict[str, Any]:
    """train()'s resume_from and extra_steps for the run's mode (new, resume, or "more" steps)."""
    mode = run["mode"]
    return {
        "resume_from": run["out_dir"] if mode in ("resume", "more") else None,
        "extra_steps": int(run["extra_steps"] or 0) if mode == "more" else 0,
    }


def _train_beside(run: dict[str, Any]) -> int:
    """A torchrun process other than rank 0 (train.gpus=all): it trains its share of every step and leaves
    the registry, the log lines and the run's ending to rank 0, so each is written once."""
    from apertis_core.training import train

    out_dir = Path(run["out_dir"])
    OutsideStop(out_dir).install()  # torchrun passes a SIGTERM on to every rank: all of them save, together
    train(load_run_config(run["config"], out_dir), **_continuation(run))
    return 0


def run_worker(workspace: str | Path, run_id: str) -> int:
    """Train run `run_id` of `workspace`; returns the process exit code (0 also when stopped on request)."""
    from apertis_core.training import train

    store = Store(workspace)
    run = store.get_run(run_id)
    if run is None:
        print(f"run {run_id!r} is not in the registry {store.db_path}; start it from the studio", file=sys.stderr)
        return 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) > 0:
        return _train_beside(run)
    refusal = _take_run(store, run)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    out_dir = Path(run["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    outside = OutsideStop(out_dir).install()
    store.update_run(
        run_id, pid=os.getpid(), started=time.time(), ended=None, exit_code=None, exit_reason=None, log_tail=None
    )
    print(f"worker {os.getpid()}: run {run_id} ({run['mode']}) in {out_dir}", flush=True)
    registry = RegistryCallback(store, run_id)
    try:
        config = load_run_config(run["config"], out_dir)
        result = train(config, callbacks=[registry, LogLines()], **_continuation(run))
    except BaseException as exc:  # KeyboardInterrupt/SystemExit too: the registry must learn why it ended
        traceback.print_exc()
        sys.stdout.flush()
        registry.close()
        if outside.signal_name is not None:
            _end(
                store,
                run_id,
                rs.INTERRUPTED,
                exit_code=1,
                exit_reason=outside.reason(saved=False),
                log_tail=log_tail(out_dir),
            )
            return 1
        reason = f"{type(exc).__name__}: {exc}".strip()
        _end(
            store,
            run_id,
            rs.FAILED,
            exit_code=1,
            exit_reason=reason or "the trainer failed; see the log tail",
            log_tail=log_tail(out_dir),
        )
        return 1
    registry.close()
    _finish(store, run_id, result, out_dir, outside)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="studio.worker", description="Run one Apertis Studio training run.")
    parser.add_argument("--workspace", required=True, help="the studio workspace folder")
    parser.add_argument("--run-id", required=True, help="the run to train, as registered in the workspace")
    args = parser.parse_args(argv)
    return run_worker(args.workspace, args.run_id)


if __name__ == "__main__":
    sys.exit(main())
