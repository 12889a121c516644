"""The job manager: queues training runs, starts each as a worker process, stops, resumes and watches them.

Everything it knows lives in the workspace registry, so a restarted studio picks up where it left off:
workers still alive are re-attached (their pid and command line are checked). A worker that ends without
recording an ending is marked from what this studio saw: "failed" with its exit code and log tail when it
died while the studio watched, "interrupted" when it was ended from outside (SIGTERM, SIGHUP, SIGINT) or was
already gone when the studio started. Status words and moves come from run_states. Workers start in their
own session, so closing the studio does not stop a run; `close()` leaves them to the next studio.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from . import run_states as rs
from .gpus import gpu_processes, torchrun_command
from .runfiles import CONFIG_NAME, LOG_NAME, clear_stop, log_tail, request_stop
from .store import Store

PACKAGE_PARENT = Path(__file__).resolve().parents[1]  # puts `studio` and `apertis_core` on a worker's path
# Signals that ask a process to end (a `kill`, logging out, the computer shutting down): the run was
# interrupted, not broken. Any other death (SIGKILL from the out-of-memory killer, a crash) is a failure.
ASKED_TO_END = frozenset(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, name))
RESUME_HINT = "press Resume to continue from the last checkpoint"


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


def exit_description(code: int) -> str:
    """'exit code 1', or 'signal 9 (SIGKILL)' for a process a signal ended (Popen reports those as -N)."""
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"signal {-code} ({signal.Signals(-code).name})"
    except ValueError:
        return f"signal {-code}"


def ending_of(code: int | None, pid: int | None, seen_alive: bool) -> tuple[str, str]:
    """(status, reason) for a worker that ended without recording an ending, from what this studio saw.

    `code` is known only for workers this studio process started; `seen_alive` says whether it watched the
    worker while it lived (if not, it was gone before this studio started)."""
    worker = f"the worker process (pid {pid})" if pid else "the worker process"
    if code is None and not seen_alive:
        return rs.INTERRUPTED, (
            f"{worker} had ended before this studio started, without recording why (the "
            f"computer may have restarted, or the process was ended); {RESUME_HINT}"
        )
    if code is None:
        return rs.FAILED, (
            f"{worker} ended while the studio was watching it, without recording why; it was started "
            f"by an earlier studio session, so its exit code is unknown. The log tail may say why; "
            f"{RESUME_HINT}"
        )
    if code < 0 and -code in ASKED_TO_END:
        return rs.INTERRUPTED, (
            f"{worker} was ended from outside the studio by {exit_description(code)} (a `kill`, "
            f"logging out or the computer shutting down); {RESUME_HINT}"
        )
    killed = hasattr(signal, "SIGKILL") and code == -signal.SIGKILL
    hint = " (often the system ran out of memory: try a smaller batch or model)" if killed else ""
    return rs.FAILED, (
        f"{worker} ended with {exit_description(code)}{hint} without finishing; the log tail may say why; {RESUME_HINT}"
    )


class JobManager:
    """One per studio process. `poll()` advances everything; `start_watcher()` calls it in the background."""

    def __init__(self, store: Store, max_concurrent: int | None = None):
        self.store = store
        if max_concurrent is not None:
            store.set_setting("max_concurrent", max_concurrent)
        self._procs: dict[str, subprocess.Popen] = {}  # workers this process started (to reap and read exit codes)
        self._seen_alive: set[str] = set()  # runs whose worker this process has watched alive
        self._lock = threading.RLock()  # one actor at a time: the watcher, and the UI's Stop/Resume
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
        mapping.setdefault("name", name)  # the model card is titled with it
        config_yaml = yaml.safe_dump(mapping, sort_keys=False)
        self.store.update_run(run["id"], config=config_yaml)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / CONFIG_NAME).write_text(config_yaml, encoding="utf-8")
        self.poll()
        return self.store.get_run(run["id"])

    def stop(self, run_id: str) -> str:
        """Take a queued run out of the queue, or ask a running one to save and stop after its current step."""
        with self._lock:
            run = self._get(run_id)
            if run["status"] == rs.QUEUED:
                if self.store.transition_run(
                    run_id,
                    rs.STOPPED,
                    [rs.QUEUED],
                    ended=time.time(),
                    exit_reason="taken out of the queue before it started; press Resume to queue it again",
                ):
                    return f"{run['name']}: taken out of the queue (stopped); Resume queues it again"
                run = self._get(run_id)  # a worker started by hand took it meanwhile
            if run["status"] in rs.ACTIVE:
                request_stop(run["out_dir"])  # the file first: the trainer may see it before the registry changes
                self.store.transition_run(run_id, rs.STOPPING, [rs.RUNNING])
                return f"{run['name']}: stopping after the current step (a checkpoint is saved first)"
            raise JobError(f"{run['name']} is {run['status']}, not running or queued; there is nothing to stop")

    def resume(self, run_id: str) -> str:
        """Queue a stopped, failed or interrupted run to continue from its last checkpoint."""
        with self._lock:
            run = self._get(run_id)
            if run["status"] in rs.EXTENDABLE:
                raise JobError(f"{run['name']} already finished; use 'Train N more' to continue it")
            if run["status"] not in rs.RESUMABLE:
                raise JobError(
                    f"{run['name']} is {run['status']}; only a stopped, failed or interrupted run can resume"
                )
            from apertis_core.training import latest_checkpoint

            # The disk, not the registry: a worker killed right after saving may not have recorded the save.
            checkpoint = latest_checkpoint(run["out_dir"]) if Path(run["out_dir"]).is_dir() else None
            self._requeue(run, rs.RESUMABLE, mode="resume" if checkpoint else "new", extra_steps=0)
        where = f"resume from {Path(checkpoint).name}" if checkpoint else "start over (no checkpoint was saved)"
        return f"{run['name']}: queued to {where}"

    def train_more(self, run_id: str, steps: int) -> str:
        """Queue a finished run to train `steps` more steps (the schedule is re-planned by the trainer)."""
        with self._lock:
            run = self._get(run_id)
            if run["status"] not in rs.EXTENDABLE:
                raise JobError(
                    f"{run['name']} is {run['status']}; 'Train N more' continues a finished run (use Resume otherwise)"
                )
            if int(steps) < 1:
                raise JobError(f"steps must be at least 1, got {steps}")
            self._requeue(run, rs.EXTENDABLE, mode="more", extra_steps=int(steps))
        return f"{run['name']}: queued for {int(steps)} more steps"

    def _requeue(self, run: dict[str, Any], expected: tuple[str, ...], mode: str, extra_steps: int) -> None:
        if not self.store.transition_run(
            run["id"],
            rs.QUEUED,
            expected,
            mode=mode,
            extra_steps=extra_steps,
            pid=None,
            exit_code=None,
            exit_reason=None,
            log_tail=None,
        ):
            raise JobError(f"{run['name']} changed state meanwhile; refresh and try again")
        self.poll()

    def _get(self, run_id: str) -> dict[str, Any]:
        run = self.store.get_run(run_id) if run_id else None
        if run is None:
            raise JobError(f"no run {run_id!r} in this workspace; pick one from the list")
        return run

    # -- watching -----------------------------------------------------------------------------------

    def poll(self) -> None:
        """Record the ending of workers that died, then start queued runs while slots are free."""
        with self._lock:
            active = self.reap()
            for run in self.store.list_runs([rs.QUEUED])[: max(0, self.max_concurrent - active)]:
                self._launch(run)

    def reap(self) -> int:
        """Mark runs whose worker has ended; returns how many workers are still alive."""
        with self._lock:
            alive = 0
            for run in self.store.list_runs(rs.ACTIVE):
                if self._alive(run):
                    self._seen_alive.add(run["id"])
                    alive += 1
                else:
                    self._mark_dead(run)
            return alive

    def _alive(self, run: dict[str, Any]) -> bool:
        proc = self._procs.get(run["id"])
        if proc is not None:
            return proc.poll() is None
        return _pid_runs(run["pid"], run["id"])

    def _mark_dead(self, run: dict[str, Any]) -> None:
        """The worker is gone and the run still reads running or stopping: record why, as far as we know.
        A worker that recorded its own ending meanwhile wins (the transition then changes nothing)."""
        proc = self._procs.pop(run["id"], None)
        code = proc.returncode if proc is not None else None
        status, reason = ending_of(code, run["pid"], run["id"] in self._seen_alive)
        self._seen_alive.discard(run["id"])
        self.store.transition_run(
            run["id"],
            status,
            rs.ACTIVE,
            ended=time.time(),
            exit_code=code,
            exit_reason=reason,
            log_tail=log_tail(run["out_dir"]),
        )

    def _launch(self, run: dict[str, Any]) -> None:
        out_dir = Path(run["out_dir"])
        out_dir.mkdir(parents=True, exist_ok=True)
        clear_stop(out_dir)  # a request left from an earlier session must not stop this one
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_PARENT), env.get("PYTHONPATH", "")) if p)
        # Own session / process group: Ctrl-C in the studio's terminal must not kill the training.
        detach = (
            {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt" else {"start_new_session": True}
        )
        command = worker_command(self.store.root, run["id"])
        processes, refusal = gpu_processes(run["config"])
        if refusal:  # asks for GPUs this computer does not have (or no longer has: a resumed run)
            self.store.transition_run(run["id"], rs.FAILED, [rs.QUEUED], ended=time.time(), exit_reason=refusal)
            return
        if processes > 1:
            command = torchrun_command(command, processes)
        try:
            with (out_dir / LOG_NAME).open("ab") as log:
                proc = subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    cwd=str(out_dir),
                    **detach,
                )
        except OSError as exc:  # a missing executable, no memory for a process, an unwritable run folder
            self.store.transition_run(
                run["id"],
                rs.FAILED,
                [rs.QUEUED],
                ended=time.time(),
                exit_reason=f"the worker process could not start ({exc}); check that {command[0]} exists and "
                f"the workspace is writable, then press Resume",
            )
            return
        self._procs[run["id"]] = proc
        self._seen_alive.add(run["id"])
        self.store.transition_run(run["id"], rs.RUNNING, [rs.QUEUED], pid=proc.pid, started=time.time(), ended=None)

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

    def close(self) -> list[dict[str, Any]]:
        """Stop watching, record workers that ended up to now (their exit codes die with this process), and
        return the runs still training. Their workers keep running and the next studio re-attaches them:
        closing the studio, on purpose or by accident, must not throw away a long run."""
        self._stop_watch.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        with self._lock:
            self.reap()
            return self.store.list_runs(rs.ACTIVE)
