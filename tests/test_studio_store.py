"""The workspace registry: runs, metrics, events, datasets and models survive reopening and concurrent writers."""

import multiprocessing as mp
import sqlite3

import pytest

from studio.store import Store


def test_workspace_folders_and_wal_mode(tmp_path):
    store = Store(tmp_path / "ws")
    for name in ("datasets", "runs", "models"):
        assert (tmp_path / "ws" / name).is_dir()
    mode = sqlite3.connect(tmp_path / "ws" / "studio.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    store.close()


def test_run_lifecycle_survives_reopen(tmp_path):
    store = Store(tmp_path)
    run = store.create_run("first", "train:\n  max_steps: 3\n", dataset_id="data-x")
    assert run["status"] == "queued" and run["out_dir"].endswith(run["id"])
    assert store.transition_run(run["id"], "running", pid=123, started=1.0)
    store.close()
    again = Store(tmp_path).get_run(run["id"])
    assert again["status"] == "running" and again["pid"] == 123 and again["config"].startswith("train:")


def test_update_run_rejects_unknown_fields_and_any_status(tmp_path):
    store = Store(tmp_path)
    run = store.create_run("r", "{}")
    with pytest.raises(ValueError, match="cannot set"):
        store.update_run(run["id"], id="other")
    with pytest.raises(ValueError, match="only through transition_run"):
        store.update_run(run["id"], status="running")
    with pytest.raises(ValueError, match="unknown run status"):
        store.transition_run(run["id"], "exploded")
    with pytest.raises(ValueError, match="cannot set"):
        store.transition_run(run["id"], "running", id="other")
    assert store.get_run(run["id"])["status"] == "queued"


def test_transition_run_only_from_expected_status(tmp_path):
    store = Store(tmp_path)
    run = store.create_run("r", "{}")
    assert not store.transition_run(run["id"], "stopping", ["running"])  # legal move, but the run is queued
    assert store.get_run(run["id"])["status"] == "queued"
    assert store.transition_run(run["id"], "running", ["queued"], pid=7)
    assert store.get_run(run["id"])["status"] == "running" and store.get_run(run["id"])["pid"] == 7
    with pytest.raises(ValueError, match="cannot move from"):  # a caller's mistake, whatever the run's state
        store.transition_run(run["id"], "stopping", ["finished"])


def _old_registry(path, rows):
    """A studio.db as the studio wrote it before run_states (user_version 0), holding `rows` of (status, reason)."""
    Store(path).close()
    db = sqlite3.connect(path / "studio.db")
    db.execute("PRAGMA user_version = 0")
    for index, (status, reason) in enumerate(rows):
        db.execute(
            "INSERT INTO runs(id, name, status, config, out_dir, created, exit_reason) VALUES (?, ?, ?, '{}', '', ?, ?)",
            (f"run-{index}", f"r{index}", status, float(index), reason),
        )
    db.commit()
    db.close()


def test_old_registry_statuses_are_migrated_once(tmp_path):
    _old_registry(
        tmp_path,
        [
            ("interrupted", "stopped on request; a checkpoint was saved - press Resume to continue"),
            ("interrupted", "cancelled before it started; press Resume to queue it again"),
            ("interrupted", "the worker process ended while the studio was closed without finishing"),
            ("finished", "finished"),
            ("paused", None),  # a word no studio here ever wrote: from a newer version or a damaged file
        ],
    )
    store = Store(tmp_path)
    runs = {run["id"]: run for run in store.list_runs()}
    assert [runs[f"run-{i}"]["status"] for i in range(5)] == [
        "stopped",
        "stopped",
        "interrupted",
        "finished",
        "interrupted",
    ]
    assert "'paused'" in runs["run-4"]["exit_reason"] and "Resume" in runs["run-4"]["exit_reason"]
    assert sqlite3.connect(tmp_path / "studio.db").execute("PRAGMA user_version").fetchone()[0] == 2
    # Once migrated, a stop reason written by hand (or a future word) is not rewritten on the next open.
    sqlite3.connect(tmp_path / "studio.db", isolation_level=None).execute(
        "UPDATE runs SET status = 'interrupted' WHERE id = 'run-0'"
    )
    assert Store(tmp_path).get_run("run-0")["status"] == "interrupted"


def test_close_reaches_every_thread_and_the_store_still_works_after(tmp_path):
    import threading

    store = Store(tmp_path)
    opened = []
    worker = threading.Thread(target=lambda: opened.append(store._connection()))
    worker.start()
    worker.join()
    store.close()
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        opened[0].execute("SELECT 1")
    assert store.create_run("after", "{}")["status"] == "queued"  # a late request opens a fresh connection


def test_metrics_numbers_and_json_and_csv(tmp_path):
    store = Store(tmp_path)
    run_id = store.create_run("r", "{}")["id"]
    store.add_metrics(
        run_id,
        [
            (1, "train/loss", 2.5),
            (1, "lr", 1e-3),
            (2, "train/loss", 2.0),
            (2, "experts/layer1", [0.5, 0.5]),
            (2, "val/loss", float("nan")),
        ],
    )
    steps, values = store.series(run_id, "train/loss")
    assert steps == [1, 2] and values == [2.5, 2.0]
    assert store.series(run_id, "experts/layer1")[1] == [[0.5, 0.5]]
    assert store.metrics(run_id, after_step=1)[0]["step"] == 2
    assert store.metric_keys(run_id) == ["experts/layer1", "lr", "train/loss", "val/loss"]
    lines = store.metrics_csv(run_id).splitlines()
    assert lines[0] == "step,lr,train/loss"
    assert lines[1] == "1,0.001,2.5" and lines[2] == "2,,2.0"


def test_events_filter_by_kind(tmp_path):
    store = Store(tmp_path)
    run_id = store.create_run("r", "{}")["id"]
    store.add_events(run_id, [(1.0, "train_start", {"total": 5}), (2.0, "save", {"path": "x"})])
    saves = store.events(run_id, kinds=["save"])
    assert [e["payload"] for e in saves] == [{"path": "x"}]
    assert len(store.events(run_id, after_id=saves[0]["id"] - 1)) == 1


def test_datasets_models_settings(tmp_path):
    store = Store(tmp_path)
    data_id = store.add_dataset("demo", tmp_path / "d", {"records": 3})
    assert store.get_dataset(data_id)["summary"] == {"records": 3}
    model_id = store.add_model("m", tmp_path / "m", card="# card")
    assert store.add_model("m2", tmp_path / "m", card="new") == model_id  # same folder: one entry
    assert store.get_model(model_id)["card"] == "new"
    store.delete_model(model_id)
    assert store.list_models() == []
    assert store.get_setting("max_concurrent", 1) == 1
    store.set_setting("max_concurrent", 2)
    assert store.get_setting("max_concurrent") == 2


def _write_metrics(workspace, run_id, offset):
    store = Store(workspace)
    for step in range(50):
        store.add_metrics(run_id, [(offset + step, "train/loss", float(step))])


def test_concurrent_writer_processes_lose_nothing(tmp_path):
    store = Store(tmp_path)
    run_id = store.create_run("r", "{}")["id"]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_metrics, args=(tmp_path, run_id, k * 1000)) for k in range(2)]
    for proc in procs:
        proc.start()
    _write_metrics(tmp_path, run_id, 5000)  # the UI-side process writes at the same time
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    assert len(store.metrics(run_id)) == 150
