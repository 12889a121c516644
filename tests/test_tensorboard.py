"""train.tensorboard: a run also writes TensorBoard event files whose scalars match metrics.jsonl."""

import builtins
import math

import pytest
from test_training import tiny_run

from apertis_core.training import read_metrics, train
from apertis_core.training.callbacks import TensorBoardLogger, TrainState

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0 = keep every event
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_run_writes_scalars_at_the_logged_steps(tmp_path):
    run = tiny_run(tmp_path, max_steps=6, log_every=2, eval_every=3, tensorboard=True)
    train(run)
    folder = tmp_path / "run" / "tensorboard"
    assert list(folder.glob("events.out.tfevents.*")), "no event file written"
    board = scalars(folder)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    logged = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    assert [step for step, _ in logged] == [2, 4, 6]
    assert [step for step, _ in board["train/loss"]] == [2, 4, 6]
    for (_, want), (_, got) in zip(logged, board["train/loss"], strict=True):
        assert got == pytest.approx(want, rel=1e-6)
    assert {"lr", "grad_norm", "val/loss"} <= set(board)
    assert [step for step, _ in board["val/loss"]] == [r["step"] for r in records if "val/loss" in r]


def test_tensorboard_is_off_by_default(tmp_path):
    run = tiny_run(tmp_path, max_steps=2)
    assert run.train.tensorboard is False
    train(run)
    assert (tmp_path / "run" / "metrics.jsonl").exists()
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert not list((tmp_path / "run").rglob("events.out.tfevents.*"))


def test_logger_skips_non_numbers_and_closes(tmp_path):
    logger = TensorBoardLogger(tmp_path / "tb")
    logger.on_train_start(TrainState(step=0, total_steps=3, out_dir=str(tmp_path)))
    record = {"train/loss": 2.5, "steps": 7, "experts/0": [0.5, 0.5], "note": "text", "flag": True, "bad": math.nan}
    logger.log(record, step=1)
    logger.close()
    logger.close()  # closing twice is harmless
    board = scalars(tmp_path / "tb")
    assert set(board) == {"train/loss", "steps"}
    assert board["train/loss"] == [(1, 2.5)] and board["steps"] == [(1, 7.0)]


def test_resumed_logger_purges_the_repeated_steps(tmp_path):
    first = TensorBoardLogger(tmp_path / "tb")
    first.on_train_start(TrainState(step=0, total_steps=4, out_dir=str(tmp_path)))
    for step in (1, 2, 3, 4):
        first.log({"train/loss": float(step)}, step)
    first.close()
    resumed = TensorBoardLogger(tmp_path / "tb")  # resumed from the checkpoint at step 2
    resumed.on_train_start(TrainState(step=2, total_steps=4, out_dir=str(tmp_path)))
    for step in (3, 4):
        resumed.log({"train/loss": 10.0 + step}, step)
    resumed.close()
    assert scalars(tmp_path / "tb")["train/loss"] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]


def test_missing_tensorboard_is_a_clear_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "torch.utils.tensorboard" or name.startswith("tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        TensorBoardLogger(tmp_path / "tb")
    with pytest.raises(ImportError, match="pip install tensorboard"):
        train(tiny_run(tmp_path, max_steps=2, tensorboard=True))
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_metrics_tab_shows_the_tensorboard_command_and_keeps_the_csv(tmp_path):
    from studio.app import Services
    from studio.jobs import JobManager
    from studio.store import Store
    from studio.tabs import metrics

    store = Store(tmp_path / "ws")
    services = Services(store=store, jobs=JobManager(store))
    run = store.create_run("a", "{}")
    assert "Pick a run" in metrics.tensorboard_hint(services, None)
    assert "train.tensorboard: true" in metrics.tensorboard_hint(services, run["id"])  # no files yet
    folder = tmp_path / "ws" / "runs" / run["id"] / "tensorboard"
    assert str(folder.parent) == str(store.get_run(run["id"])["out_dir"])
    folder.mkdir(parents=True)
    assert f'tensorboard --logdir "{folder}"' in metrics.tensorboard_hint(services, run["id"])
    store.add_metrics(run["id"], [(1, "train/loss", 3.0)])
    assert metrics.metrics_csv(services, run["id"]) is not None
