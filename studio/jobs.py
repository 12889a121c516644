"""The job manager: queues training runs, starts each as a worker process, stops, resumes and watches them.

Everything it knows lives in the workspace registry, so a restarted studio picks up where it left off:
workers still alive are re-attached (their pid and command line are checked), and runs whose worker died
without recording an ending are marked interrupted with the exit code and log tail, ready to Resume.
Workers start in their own session so closing the studio does not kill a run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .runfiles import CONFIG_NAME, LOG_NAME, clear_stop, log_tail, request_stop
from .store import ACTIVE_STATUSES, RESUMABLE_STATUSES, Store

PACKAGE_PARENT = Path(__file__).resolve().parents[1]  # puts `studio` and `apertis_core` on a worker's path


class JobError(RuntimeError):
    """An action on a run that cannot be done now; the message says why and what to do instead."""


def worker_command(workspace: Path, run_id: str) -> list[str]:
    """How to start a worker. In the frozen (PyInstaller) app there is no `python -m`: the executable is
    re-entered with a `worker` argument, and its entry script must dispatch that to `studio.worker.main`."""
    args = ["--workspace", str(workspace), "--run-id", run_id]
    if getattr(sys, "frozen", False):
        return [sys.executable, "worker", *args]
    return [sys.executable, "-m", "studio.worker", *args]


def _pid_runs(pid: int | None, run_id: str) -> bool:
    """True if `pid` is alive and is the worker of `run_id` (a reused pid belongs to someone else)."""
    import psutil

    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return run_id in proc.cmdline()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # alive but not ours to inspect: trust the pid
        return True


class JobManager:
    """One per studio process. `poll()` advances everything; `start_watcher()` calls it in the background."""

    def __init__(self, store: Store, max_concurrent: int | None = None):
        self.store = store
        if max_concurrent is not None:
            store.set_setting("max_concurrent", max_concurrent)
        self._procs: dict[str, subprocess.Popen] = {}  # workers this process started (to reap and read exit codes)
        self._lock = threading.RLock()
        self._stop_watch = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def max_concurrent(self) -> int:
        return max(1, int(self.store.get_setting("max_concurrent", 1)))

    # -- actions ------------------------------------------------------------------------------------

    def submit(self, name: str, config_yaml: str, dataset_id: str | None = None) -> dict[str, Any]:
        """Register a run (queued), write its config.yaml, and start it now if a slot is free."""
        import yaml

        mapping = yaml.safe_load(config_yaml) or {}
        if not isinstance(mapping, dict):
            raise JobError("the run config must be a YAML mapping (model:, data:, train:); check the YAML text")
        run = self.store.create_run(name, config_yaml, dataset_id)
        out_dir = Path(run["out_dir"])
        mapping["out_dir"] = str(out_dir)  # so the saved file alone repeats the run: apertis train <it>
        config_yaml = yaml.safe_dump(mapping, sort_keys=False)
        self.store.update_run(run["id"], config=config_yaml)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / CONFIG_NAME).write_text(config_yaml, encoding="utf-8")
        self.poll()
        return self.store.get_run(run["id"])

    def stop(self, run_id: str) -> str:
        """Cancel a queued run, or ask a running one to save and stop after its current step."""
        run = self._get(run_id)
        if run["status"] == "queued":
            if self.store.transition_run(run_id, ["queued"], status="interrupted", ended=time.time(),
                                         exit_reason="cancelled before it started; press Resume to queue it again"):
                return f"{run['name']}: removed from the queue"
        if run["status"] in ACTIVE_STATUSES:
            request_stop(run["out_dir"])
            self.store.transition_run(run_id, ["running"], status="stopping")
            return f"{run['name']}: stopping after the current step (a checkpoint is saved first)"
        raise JobError(f"{run['name']} is {run['status']}, not running or queued; there is nothing to stop")

    def resume(self, run_id: str) -> str:
        """Queue a stopped, failed or interrupted run to continue from its last checkpoint."""
        run = self._get(run_id)
        if run["status"] not in RESUMABLE_STATUSES:
            raise JobError(f"{run['name']} is {run['status']}; only a stopped, failed or interrupted run can resume")
        if run["status"] == "finished":
            raise JobError(f"{run['name']} already finished; use 'Train N more' to continue it")
        from apertis_core.training import latest_checkpoint

        # The disk, not the registry: a worker killed right after saving may not have recorded the save.
        checkpoint = latest_checkpoint(run["out_dir"]) if Path(run["out_dir"]).is_dir() else None
        self._requeue(run, mode="resume" if checkpoint else "new", extra_steps=0)
        where = f"resume from {Path(checkpoint).name}" if checkpoint else "start over (no checkpoint was saved)"
        return f"{run['name']}: queued to {where}"

    def train_more(self, run_id: str, steps: int) -> str:
        """Queue a finished run to train `steps` more steps (the schedule is re-planned by the trainer)."""
        run = self._get(run_id)
        if run["status"] != "finished":
            raise JobError(f"{run['name']} is {run['status']}; 'Train N more' continues a finished run (use Resume otherwise)")
        if int(steps) < 1:
            raise JobError(f"steps must be at least 1, got {steps}")
        self._requeue(run, mode="more", extra_steps=int(steps))
        return f"{run['name']}: queued for {int(steps)} more steps"

    def _requeue(self, run: dict[str, Any], mode: str, extra_steps: int) -> None:
        if not self.store.transition_run(run["id"], RESUMABLE_STATUSES, status="queued", mode=mode,
                                         extra_steps=extra_steps, pid=None, exit_code=None, exit_reason=None):
            raise JobError(f"{run['name']} changed state meanwhile; refresh and try again")
        self.poll()

    def _get(self, run_id: str) -> dict[str, Any]:
        run = self.store.get_run(run_id) if run_id else None
        if run is None:
            raise JobError(f"no run {run_id!r} in this workspace; pick one from the list")
        return run

    # -- watching -----------------------------------------------------------------------------------

    def poll(self) -> None:
        """Mark dead workers interrupted, then start queued runs while slots are free."""
        with self._lock:
            active = []
            for run in self.store.list_runs(ACTIVE_STATUSES):
                if self._alive(run):
                    active.append(run)
                else:
                    self._mark_dead(run)
            free = self.max_concurrent - len(active)
            for run in self.store.list_runs(["queued"])[: max(0, free)]:
                self._launch(run)

    def _alive(self, run: dict[str, Any]) -> bool:
        proc = self._procs.get(run["id"])
        if proc is not None:
            return proc.poll() is None
        return _pid_runs(run["pid"], run["id"])

    def _mark_dead(self, run: dict[str, Any]) -> None:
        proc = self._procs.pop(run["id"], None)
        code = proc.returncode if proc is not None else None
        how = f"with exit code {code}" if code is not None else "while the studio was closed"
        if code is not None and code < 0:
            how = f"killed by signal {-code}"
        self.store.transition_run(
            run["id"], ACTIVE_STATUSES, status="interrupted", ended=time.time(), exit_code=code,
            exit_reason=f"the worker process ended {how} without finishing; press Resume to continue from the last checkpoint",
            log_tail=log_tail(run["out_dir"]),
        )

    def _launch(self, run: dict[str, Any]) -> None:
        out_dir = Path(run["out_dir"])
        out_dir.mkdir(parents=True, exist_ok=True)
        clear_stop(out_dir)  # a request left from an earlier session must not stop this one
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_PARENT), env.get("PYTHONPATH", "")) if p)
        # Own session / process group: Ctrl-C in the studio's terminal must not kill the training.
        detach = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt" else {"start_new_session": True}
        with (out_dir / LOG_NAME).open("ab") as log:
            proc = subprocess.Popen(worker_command(self.store.root, run["id"]), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, cwd=str(out_dir), **detach)
        self._procs[run["id"]] = proc
        self.store.transition_run(run["id"], ["queued"], status="running", pid=proc.pid, started=time.time(), ended=None)

    def start_watcher(self, interval: float = 1.0) -> None:
        """Poll in a daemon thread so the queue advances with no browser open."""
        if self._watcher is not None:
            return
        self._watcher = threading.Thread(target=self._watch, args=(interval,), name="job-watcher", daemon=True)
        self._watcher.start()

    def _watch(self, interval: float) -> None:
        while not self._stop_watch.wait(interval):
            try:
                self.poll()
            except Exception as exc:  # a locked database for a moment must not end the watcher
                print(f"studio: job watcher: {exc}", file=sys.stderr)

    def close(self) -> None:
        """Stop watching (workers keep running; the next studio re-attaches them)."""
        self._stop_watch.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
