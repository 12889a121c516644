"""The job manager: queue, stop, resume, how a dead worker's run ends, re-attach, then real tiny training runs.

The queue tests use a stand-in worker (a short Python script) so they take seconds; the last tests run the
real worker with the apertis_core trainer on a tiny model.
"""

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from apertis_core import training
from studio import jobs
from studio.jobs import JobError, JobManager
from studio.runfiles import STOP_NAME
from studio.store import Store

FAKE_WORKER = (
    "import sys, time; from studio.store import Store; "
    "store, run_id, seconds = Store(sys.argv[1]), sys.argv[2], float(sys.argv[3]); "
    "print('fake worker up', flush=True); time.sleep(seconds); "
    "store.transition_run(run_id, 'finished', exit_code=0, exit_reason='finished')"
)
SLEEPER = "import sys, time; time.sleep(float(sys.argv[1]))"  # a stand-in worker: its run id is on its command line


def wait_for(predicate, timeout=30.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


@pytest.fixture
def fake_worker(monkeypatch):
    """Make workers sleep `seconds[0]` then record 'finished'."""
    seconds = [30.0]
    monkeypatch.setattr(
        jobs, "worker_command", lambda ws, run_id: [sys.executable, "-c", FAKE_WORKER, str(ws), run_id, str(seconds[0])]
    )
    return seconds


def test_queue_runs_one_at_a_time_and_advances(tmp_path, fake_worker):
    fake_worker[0] = 1.0
    manager = JobManager(Store(tmp_path))
    first = manager.submit("first", "train: {max_steps: 2}\n")
    second = manager.submit("second", "train: {max_steps: 2}\n")
    assert first["status"] == "running" and first["pid"]
    assert second["status"] == "queued"
    assert (Path(first["out_dir"]) / "config.yaml").read_text().find(f"out_dir: {first['out_dir']}") >= 0

    def second_started():
        manager.poll()
        return manager.store.get_run(second["id"])["status"] != "queued"

    assert wait_for(second_started)
    assert manager.store.get_run(first["id"])["status"] == "finished"


def test_setting_allows_two_runs_at_once(tmp_path, fake_worker):
    manager = JobManager(Store(tmp_path), max_concurrent=2)
    runs = [manager.submit(f"r{i}", "{}") for i in range(3)]
    try:
        assert [manager.store.get_run(r["id"])["status"] for r in runs] == ["running", "running", "queued"]
    finally:
        for run in runs[:2]:
            os.kill(manager.store.get_run(run["id"])["pid"], signal.SIGKILL)


def _dead_run(manager, run):
    assert wait_for(lambda: manager.poll() or manager.store.get_run(run["id"])["status"] not in ("running", "stopping"))
    return manager.store.get_run(run["id"])


def test_sigkilled_worker_failed_with_exit_code_and_log_tail_and_resumes(tmp_path, fake_worker):
    manager = JobManager(Store(tmp_path))
    run = manager.submit("r", "{}")
    assert wait_for(lambda: "fake worker up" in (Path(run["out_dir"]) / "worker.log").read_text())
    os.kill(run["pid"], signal.SIGKILL)
    dead = _dead_run(manager, run)
    assert dead["status"] == "failed" and dead["exit_code"] == -signal.SIGKILL
    assert "signal 9 (SIGKILL)" in dead["exit_reason"] and "ran out of memory" in dead["exit_reason"]
    assert "studio was closed" not in dead["exit_reason"]
    assert "fake worker up" in dead["log_tail"]
    assert "start over" in manager.resume(run["id"])  # no checkpoint was recorded
    assert manager.store.get_run(run["id"])["status"] == "running"
    os.kill(manager.store.get_run(run["id"])["pid"], signal.SIGKILL)


def test_worker_ended_from_outside_is_interrupted(tmp_path, fake_worker):
    manager = JobManager(Store(tmp_path))
    run = manager.submit("r", "{}")
    os.kill(run["pid"], signal.SIGTERM)
    dead = _dead_run(manager, run)
    assert dead["status"] == "interrupted" and dead["exit_code"] == -signal.SIGTERM
    assert "from outside the studio by signal 15 (SIGTERM)" in dead["exit_reason"]


def test_reattached_worker_that_dies_while_watched_failed_not_closed(tmp_path, fake_worker):
    """A restarted studio re-attaches a worker; the worker dies while this studio is open."""
    first = JobManager(Store(tmp_path))
    run = first.submit("r", "{}")
    log = Path(run["out_dir"]) / "worker.log"
    assert wait_for(lambda: "fake worker up" in log.read_text()), log.read_text()  # running, not still starting
    later = JobManager(Store(tmp_path))  # the studio restarted
    later.poll()
    assert later.store.get_run(run["id"])["status"] == "running"
    os.kill(run["pid"], signal.SIGKILL)
    first._procs[run["id"]].wait()  # reap, as the old studio process would have on exit
    later.poll()
    dead = later.store.get_run(run["id"])
    assert dead["status"] == "failed" and "while the studio was watching it" in dead["exit_reason"]
    assert "closed" not in dead["exit_reason"] and "exit code is unknown" in dead["exit_reason"]


def test_worker_gone_before_the_studio_started_is_interrupted(tmp_path, fake_worker):
    first = JobManager(Store(tmp_path))
    run = first.submit("r", "{}")
    os.kill(run["pid"], signal.SIGKILL)
    first._procs[run["id"]].wait()  # the first studio is gone too: nobody recorded the death
    JobManager(Store(tmp_path)).poll()
    dead = Store(tmp_path).get_run(run["id"])
    assert dead["status"] == "interrupted" and dead["exit_code"] is None
    assert f"(pid {run['pid']}) had ended before this studio started" in dead["exit_reason"]


def test_pid_reused_by_another_process_is_not_the_worker(tmp_path):
    store = Store(tmp_path)
    run = store.create_run("r", "{}")
    store.transition_run(run["id"], "running", pid=os.getpid())  # alive, but it is the test process
    JobManager(store).poll()
    assert store.get_run(run["id"])["status"] == "interrupted"


def test_worker_that_cannot_start_fails_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "worker_command", lambda ws, run_id: [str(tmp_path / "no-such-program"), run_id])
    manager = JobManager(Store(tmp_path))
    run = manager.submit("r", "{}")
    assert run["status"] == "failed" and "could not start" in run["exit_reason"] and "Resume" in run["exit_reason"]


def test_stop_queued_takes_it_out_and_stop_running_writes_stop_file(tmp_path, fake_worker):
    manager = JobManager(Store(tmp_path))
    running = manager.submit("a", "{}")
    queued = manager.submit("b", "{}")
    assert "taken out of the queue" in manager.stop(queued["id"])
    assert manager.store.get_run(queued["id"])["status"] == "stopped"
    assert "stopping" in manager.stop(running["id"])
    assert (Path(running["out_dir"]) / STOP_NAME).exists()
    assert manager.store.get_run(running["id"])["status"] == "stopping"
    os.kill(running["pid"], signal.SIGKILL)


def test_close_leaves_workers_running_and_starts_nothing(tmp_path, monkeypatch):
    """Closing the studio keeps a long run training (the next studio re-attaches it) and launches no queued run."""
    monkeypatch.setattr(jobs, "worker_command", lambda ws, run_id: [sys.executable, "-c", SLEEPER, "60", run_id])
    manager = JobManager(Store(tmp_path))
    running = manager.submit("a", "{}")
    queued = manager.submit("b", "{}")
    try:
        assert [run["id"] for run in manager.close()] == [running["id"]]
        assert manager._procs[running["id"]].poll() is None
        assert manager.store.get_run(queued["id"])["status"] == "queued"
        later = JobManager(Store(tmp_path))
        assert later.reap() == 1 and later.store.get_run(running["id"])["status"] == "running"
    finally:
        os.kill(running["pid"], signal.SIGKILL)


def test_worker_commands_have_no_repeated_flags(tmp_path, monkeypatch):
    for frozen in (False, True):
        monkeypatch.setattr(sys, "frozen", frozen, raising=False)
        flags = [arg for arg in jobs.worker_command(tmp_path, "run-1") if arg.startswith("--")]
        assert flags == ["--workspace", "--run-id"], flags


def _finished(store, run_id):
    for status in ("running", "finished"):
        assert store.transition_run(run_id, status)


def test_invalid_actions_explain_what_to_do(tmp_path):
    manager = JobManager(Store(tmp_path))
    with pytest.raises(JobError, match="pick one from the list"):
        manager.stop("nope")
    run = manager.store.create_run("r", "{}")
    _finished(manager.store, run["id"])
    with pytest.raises(JobError, match="Train N more"):
        manager.resume(run["id"])
    with pytest.raises(JobError, match="nothing to stop"):
        manager.stop(run["id"])
    with pytest.raises(JobError, match="YAML mapping"):
        manager.submit("bad", "- a list\n")


# -- the real worker --------------------------------------------------------------------------------


def test_registry_callback_batches_records_and_relays_stop(tmp_path):
    from studio.worker import RegistryCallback

    store = Store(tmp_path)
    run_id = store.create_run("r", "{}")["id"]
    store.add_metrics(run_id, [(5, "train/loss", 9.0)])  # from a previous process, past the checkpoint
    state = training.TrainState(step=3, total_steps=10, out_dir=str(tmp_path))
    callback = RegistryCallback(store, run_id, flush_interval=60)  # only explicit flushes in this test
    callback.on_train_start(state)
    assert store.metrics(run_id) == []
    callback.log({"train/loss": 2.0, "experts": {"layer1": [0.5, 0.5]}}, 4)
    state.step = 4
    callback.on_step_end(state)
    assert store.metrics(run_id) == []  # nothing written on the training thread
    store.transition_run(run_id, "running")
    store.transition_run(run_id, "stopping")
    callback.flush()
    assert {r["key"] for r in store.metrics(run_id)} == {"train/loss", "experts/layer1"}
    assert store.get_run(run_id)["step"] == 4
    callback.on_step_end(state)
    assert state.stop_requested
    callback.close()


def tiny_run_yaml(data_path, steps=6, save_every=2):
    import yaml

    return yaml.safe_dump(
        {
            "model": {"preset": "apertis-nano", "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32},
            "data": {"path": str(data_path), "seq_len": 32, "vocab_size": 262},
            "train": {
                "max_steps": steps,
                "batch_size": 2,
                "log_every": 1,
                "save_every": save_every,
                "eval_every": 3,
                "eval_batches": 1,
                "warmup_steps": 1,
                "threads": 1,
                "device": "cpu",
            },
        }
    )


def _wait_status(manager, run_id, statuses, timeout=120):
    def done():
        manager.poll()
        return manager.store.get_run(run_id)["status"] in statuses

    assert wait_for(done, timeout, 0.3), manager.store.get_run(run_id)


def worker_log(run):
    return (Path(run["out_dir"]) / "worker.log").read_text()


STOP_RESUME_STEPS = 400


def test_real_run_stop_resume_finish_and_train_more(tmp_path):
    from apertis_core.data.demo_text import write_demo_text

    manager = JobManager(Store(tmp_path))
    data = write_demo_text(tmp_path / "data" / "sample.txt", lines=200)
    # enough steps that the run is still training when the registry first shows a step (records arrive in
    # half-second batches, and on a quiet machine 40 tiny steps fit in one); stopping saves a checkpoint
    run = manager.submit("tiny", tiny_run_yaml(data, steps=STOP_RESUME_STEPS, save_every=100))
    assert wait_for(lambda: manager.store.get_run(run["id"])["step"] >= 1, 120, 0.05)
    manager.stop(run["id"])
    _wait_status(manager, run["id"], ["stopped", "interrupted", "failed"])
    stopped = manager.store.get_run(run["id"])
    assert stopped["status"] == "stopped" and "stopped on request at step" in stopped["exit_reason"], stopped
    assert f"run {run['id']} stopped: stopped on request" in worker_log(stopped)  # the worker says how it ended
    assert "resume from step_" in manager.resume(run["id"])
    _wait_status(manager, run["id"], ["finished", "failed", "interrupted"])
    done = manager.store.get_run(run["id"])
    assert done["status"] == "finished" and done["step"] == STOP_RESUME_STEPS, done["log_tail"]
    steps = manager.store.series(run["id"], "train/loss")[0]
    assert steps == list(range(1, STOP_RESUME_STEPS + 1))  # resumed steps are not counted twice
    assert [m["kind"] for m in manager.store.list_models()] == ["bundle"]
    manager.train_more(run["id"], 2)
    _wait_status(manager, run["id"], ["finished", "failed", "interrupted"])
    assert manager.store.get_run(run["id"])["step"] == STOP_RESUME_STEPS + 2


def test_real_run_failure_records_reason_and_log_tail(tmp_path):
    manager = JobManager(Store(tmp_path))
    run = manager.submit("broken", tiny_run_yaml(tmp_path / "missing.txt"))
    _wait_status(manager, run["id"], ["failed", "interrupted", "finished"])
    failed = manager.store.get_run(run["id"])
    assert failed["status"] == "failed" and failed["exit_code"] == 1
    assert failed["exit_reason"] and "Traceback" in failed["log_tail"]


def test_real_worker_ended_by_sigterm_saves_and_is_interrupted(tmp_path):
    from apertis_core.data.demo_text import write_demo_text

    manager = JobManager(Store(tmp_path))
    data = write_demo_text(tmp_path / "data" / "sample.txt", lines=200)
    run = manager.submit("tiny", tiny_run_yaml(data, steps=400))
    assert wait_for(lambda: manager.store.get_run(run["id"])["step"] >= 1, 120, 0.05)
    os.kill(run["pid"], signal.SIGTERM)  # a `kill`, or the computer shutting down
    _wait_status(manager, run["id"], ["stopped", "interrupted", "failed", "finished"])
    ended = manager.store.get_run(run["id"])
    assert ended["status"] == "interrupted" and ended["exit_code"] == 0, ended
    assert "SIGTERM" in ended["exit_reason"] and "a checkpoint was saved" in ended["exit_reason"]
    assert "resume from step_" in manager.resume(run["id"])
    manager.stop(run["id"])
    _wait_status(manager, run["id"], ["stopped", "interrupted", "failed", "finished"])


def test_real_worker_refuses_a_run_that_is_not_queued(tmp_path, capsys):
    from studio.worker import run_worker

    store = Store(tmp_path)
    run_id = store.create_run("r", "{}")["id"]
    store.transition_run(run_id, "stopped")
    assert run_worker(tmp_path, run_id) == 2
    assert store.get_run(run_id)["status"] == "stopped"
    assert f"run {run_id} is not queued (stopped: stopped on request" in capsys.readouterr().err
