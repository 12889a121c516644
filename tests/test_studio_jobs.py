"""The job manager: queue, stop, resume, dead-worker detection and re-attach, then a real tiny training run.

The queue tests use a stand-in worker (a short Python script) so they take seconds; the last tests run the
real worker with the apertis_core trainer on a tiny model and skip if the trainer is not importable.
"""

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from studio import jobs
from studio.jobs import JobError, JobManager
from studio.runfiles import STOP_NAME
from studio.store import Store

FAKE_WORKER = (
    "import sys, time; from studio.store import Store; "
    "store, run_id, seconds = Store(sys.argv[1]), sys.argv[2], float(sys.argv[3]); "
    "print('fake worker up', flush=True); time.sleep(seconds); "
    "store.update_run(run_id, status='finished', exit_code=0, exit_reason='finished')"
)


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
    monkeypatch.setattr(jobs, "worker_command", lambda ws, run_id: [sys.executable, "-c", FAKE_WORKER, str(ws), run_id, str(seconds[0])])
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


def test_sigkilled_worker_is_interrupted_with_exit_code_and_resumable(tmp_path, fake_worker):
    manager = JobManager(Store(tmp_path))
    run = manager.submit("r", "{}")
    assert wait_for(lambda: "fake worker up" in (Path(run["out_dir"]) / "worker.log").read_text())
    os.kill(run["pid"], signal.SIGKILL)
    assert wait_for(lambda: manager.poll() or manager.store.get_run(run["id"])["status"] == "interrupted")
    dead = manager.store.get_run(run["id"])
    assert dead["exit_code"] == -signal.SIGKILL and "killed by signal 9" in dead["exit_reason"]
    assert "fake worker up" in dead["log_tail"]
    assert "start over" in manager.resume(run["id"])  # no checkpoint was recorded
    assert manager.store.get_run(run["id"])["status"] == "running"
    os.kill(manager.store.get_run(run["id"])["pid"], signal.SIGKILL)


def test_new_manager_reattaches_live_worker_and_detects_its_death(tmp_path, fake_worker):
    first = JobManager(Store(tmp_path))
    run = first.submit("r", "{}")
    later = JobManager(Store(tmp_path))  # the studio restarted
    later.poll()
    assert later.store.get_run(run["id"])["status"] == "running"
    os.kill(run["pid"], signal.SIGKILL)
    first._procs[run["id"]].wait()  # reap, as the old studio process would have on exit
    later.poll()
    dead = later.store.get_run(run["id"])
    assert dead["status"] == "interrupted" and "while the studio was closed" in dead["exit_reason"]


def test_pid_reused_by_another_process_is_not_the_worker(tmp_path):
    store = Store(tmp_path)
    run = store.create_run("r", "{}")
    store.update_run(run["id"], status="running", pid=os.getpid())  # alive, but it is the test process
    JobManager(store).poll()
    assert store.get_run(run["id"])["status"] == "interrupted"


def test_stop_queued_cancels_and_stop_running_writes_stop_file(tmp_path, fake_worker):
    manager = JobManager(Store(tmp_path))
    running = manager.submit("a", "{}")
    queued = manager.submit("b", "{}")
    assert "removed from the queue" in manager.stop(queued["id"])
    assert manager.store.get_run(queued["id"])["status"] == "interrupted"
    assert "stopping" in manager.stop(running["id"])
    assert (Path(running["out_dir"]) / STOP_NAME).exists()
    assert manager.store.get_run(running["id"])["status"] == "stopping"
    os.kill(running["pid"], signal.SIGKILL)


def test_invalid_actions_explain_what_to_do(tmp_path):
    manager = JobManager(Store(tmp_path))
    with pytest.raises(JobError, match="pick one from the list"):
        manager.stop("nope")
    run = manager.store.create_run("r", "{}")
    manager.store.update_run(run["id"], status="finished")
    with pytest.raises(JobError, match="Train N more"):
        manager.resume(run["id"])
    with pytest.raises(JobError, match="nothing to stop"):
        manager.stop(run["id"])
    with pytest.raises(JobError, match="YAML mapping"):
        manager.submit("bad", "- a list\n")


# -- the real worker --------------------------------------------------------------------------------

training = pytest.importorskip("apertis_core.training", reason="apertis_core.training is not importable yet")


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
    store.update_run(run_id, status="stopping")
    callback.flush()
    assert {r["key"] for r in store.metrics(run_id)} == {"train/loss", "experts/layer1"}
    assert store.get_run(run_id)["step"] == 4
    callback.on_step_end(state)
    assert state.stop_requested
    callback.close()


def tiny_run_yaml(data_path, steps=6):
    import yaml

    return yaml.safe_dump({
        "model": {"preset": "apertis-nano", "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32},
        "data": {"path": str(data_path), "seq_len": 32, "vocab_size": 262},
        "train": {"max_steps": steps, "batch_size": 2, "log_every": 1, "save_every": 2, "eval_every": 3,
                  "eval_batches": 1, "warmup_steps": 1, "threads": 1, "device": "cpu"},
    })


def _wait_status(manager, run_id, statuses, timeout=120):
    def done():
        manager.poll()
        return manager.store.get_run(run_id)["status"] in statuses

    assert wait_for(done, timeout, 0.3), manager.store.get_run(run_id)


def test_real_run_stop_resume_finish_and_train_more(tmp_path):
    from studio.tabs.dataset import write_demo_text

    manager = JobManager(Store(tmp_path))
    data = write_demo_text(tmp_path / "data" / "sample.txt", lines=200)
    run = manager.submit("tiny", tiny_run_yaml(data, steps=40))
    assert wait_for(lambda: manager.store.get_run(run["id"])["step"] >= 1, 120, 0.05)
    manager.stop(run["id"])
    _wait_status(manager, run["id"], ["interrupted", "failed"])
    stopped = manager.store.get_run(run["id"])
    assert stopped["status"] == "interrupted" and "stopped on request" in stopped["exit_reason"], stopped
    assert "resume from step_" in manager.resume(run["id"])
    _wait_status(manager, run["id"], ["finished", "failed", "interrupted"])
    done = manager.store.get_run(run["id"])
    assert done["status"] == "finished" and done["step"] == 40, done["log_tail"]
    steps = manager.store.series(run["id"], "train/loss")[0]
    assert steps == list(range(1, 41))  # resumed steps are not counted twice
    assert [m["kind"] for m in manager.store.list_models()] == ["bundle"]
    manager.train_more(run["id"], 2)
    _wait_status(manager, run["id"], ["finished", "failed", "interrupted"])
    assert manager.store.get_run(run["id"])["step"] == 42


def test_real_run_failure_records_reason_and_log_tail(tmp_path):
    manager = JobManager(Store(tmp_path))
    run = manager.submit("broken", tiny_run_yaml(tmp_path / "missing.txt"))
    _wait_status(manager, run["id"], ["failed", "interrupted", "finished"])
    failed = manager.store.get_run(run["id"])
    assert failed["status"] == "failed" and failed["exit_code"] == 1
    assert failed["exit_reason"] and "Traceback" in failed["log_tail"]
