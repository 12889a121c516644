"""The training loop end to end on a tiny model: files, records, events, stop requests, "train N more"."""

import io
import json

import pytest
import torch

from apertis_core import ConfigError
from apertis_core.bundle import load_bundle
from apertis_core.training import (
    Callback,
    JsonlLogger,
    ProgressBar,
    RunConfig,
    TrainState,
    best_checkpoint,
    latest_checkpoint,
    read_metrics,
    train,
)
from apertis_core.training.checkpoint import load_trainer_state

from conftest import SHAKESPEARE


def tiny_run(tmp_path, name="run", model=None, **train_overrides) -> RunConfig:
    """A run small enough for a 2-core CPU: 2 layers of width 32, vocabulary 300, 32-token windows."""
    data = tmp_path / "data.txt"
    if not data.exists():
        data.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:12_000], encoding="utf-8")
    train_cfg = dict(
        batch_size=4,
        max_steps=12,
        warmup_steps=3,
        eval_every=0,
        eval_batches=2,
        log_every=1,
        save_every=0,
        precision="fp32",
        device="cpu",
        seed=7,
    )
    train_cfg.update(train_overrides)
    return RunConfig.from_dict(
        {
            "model": model
            or {"preset": "transformer-nano", "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1},
            "data": {"path": str(data), "seq_len": 32, "vocab_size": 300},
            "train": train_cfg,
            "out_dir": str(tmp_path / name),
        }
    )


class Recorder(Callback):
    """Keeps every event and record; asks for a stop after `stop_at` steps."""

    def __init__(self, stop_at=None):
        self.events, self.records, self.stop_at = [], [], stop_at

    def on_train_start(self, state):
        self.events.append(("start", state.step))

    def on_step_end(self, state):
        self.events.append(("step", state.step))
        if state.step == self.stop_at:
            state.request_stop()

    def on_eval_end(self, state):
        self.events.append(("eval", state.step))

    def on_save(self, state):
        self.events.append(("save", state.step))

    def on_train_end(self, state):
        self.events.append(("end", state.step))

    def log(self, record, step):
        self.records.append((step, record))


def test_run_writes_config_tokenizer_metrics_checkpoints_and_bundle(tmp_path):
    run = tiny_run(
        tmp_path, eval_every=4, save_every=4, keep_last=1, sample_every=6, sample_prompts=["ROMEO:"], sample_tokens=5
    )
    recorder = Recorder()
    result = train(run, callbacks=[recorder])
    out = tmp_path / "run"
    assert result.steps == 12 and not result.stopped and result.bundle_dir == str(out / "final")
    resolved = RunConfig.load(out / "run.yaml")
    assert resolved.model.vocab_size == 300 and resolved.train == run.train  # vocab_size set from the tokenizer
    model, tokenizer = load_bundle(out / "final")
    assert tokenizer.vocab_size == model.config.vocab_size == 300
    card = (out / "final" / "README.md").read_text()
    assert "transformer-nano" in card and "final val loss" in card and "steps | 12" in card
    assert card.startswith("# run\n")  # no name given: the run folder's

    metrics = read_metrics(out / "metrics.jsonl")
    train_records = [m for m in metrics if "train/loss" in m]
    assert [m["step"] for m in train_records] == list(range(1, 13))
    for key in ("lr", "grad_norm", "throughput/tok_s", "mfu", "progress/epoch", "time/eta_s"):
        assert all(isinstance(m[key], float) for m in train_records), key
    assert [m["step"] for m in metrics if "val/loss" in m] == [4, 8, 12]
    samples = [m for m in metrics if "sample/text" in m]
    assert [m["step"] for m in samples] == [6, 12] and samples[0]["sample/prompt"] == "ROMEO:"
    assert [(s, r) for s, r in recorder.records] == [
        (m["step"], {k: v for k, v in m.items() if k not in ("step", "time")}) for m in metrics
    ]

    kinds = [kind for kind, _ in recorder.events]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("step") == 12
    assert [step for kind, step in recorder.events if kind == "save"] == [4, 8, 12]
    assert latest_checkpoint(out).name == "step_0000012"
    assert best_checkpoint(out) in (out / "checkpoints").iterdir()


def test_a_named_run_titles_its_model_card_with_the_name(tmp_path):
    run = tiny_run(tmp_path, max_steps=2)
    run.name = "Bedtime stories, first try"
    train(run)
    assert (tmp_path / "run" / "final" / "README.md").read_text().startswith("# Bedtime stories, first try\n")


def test_keep_last_prunes_old_checkpoints_but_keeps_the_best(tmp_path):
    run = tiny_run(tmp_path, max_steps=9, save_every=3, keep_last=1, eval_every=3, lr=0.05, warmup_steps=1)
    result = train(run)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    best = json.loads((tmp_path / "run" / "checkpoints" / "best.json").read_text())
    assert "step_0000009" in names and best["checkpoint"] in names
    assert len(names) == (1 if best["step"] == 9 else 2)
    assert best["val_loss"] == pytest.approx(
        min(m["val/loss"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val/loss" in m)
    )
    assert result.best_val_loss == pytest.approx(best["val_loss"])


def test_stop_file_is_honoured_between_steps_with_a_checkpoint(tmp_path):
    run = tiny_run(tmp_path, max_steps=50)

    class StopFileWriter(Callback):
        def on_step_end(self, state):
            if state.step == 3:
                (tmp_path / "run" / "STOP").write_text("")

    result = train(run, callbacks=[StopFileWriter()])
    assert result.stopped and result.steps == 3 and result.bundle_dir is None
    assert latest_checkpoint(tmp_path / "run").name == "step_0000003"
    assert not (tmp_path / "run" / "STOP").exists()  # consumed, so a resume does not stop at once
    assert load_trainer_state(tmp_path / "run" / "checkpoints" / "step_0000003")["step"] == 3


def test_stop_requested_during_setup_stops_before_the_first_step(tmp_path):
    run = tiny_run(tmp_path, max_steps=4)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "STOP").write_text("")  # e.g. Stop pressed while the data was loading
    result = train(run)
    assert result.stopped and result.steps == 0
    assert latest_checkpoint(tmp_path / "run").name == "step_0000000"
    assert train(run, resume_from=str(tmp_path / "run")).steps == 4  # the request was consumed


def test_train_n_more_steps_extends_a_finished_run_with_a_rewarmed_schedule(tmp_path):
    run = tiny_run(tmp_path, max_steps=8, lr=1e-3, min_lr_ratio=0.1, warmup_steps=2, rewarm_fraction=0.5)
    first = train(run)
    more = train(run, resume_from=str(tmp_path / "run"), extra_steps=6)
    assert (first.steps, more.steps) == (8, 14) and not more.stopped
    lrs = {m["step"]: m["lr"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "lr" in m}
    assert sorted(lrs) == list(range(1, 15))
    assert lrs[8] == pytest.approx(1e-4, rel=0.05)  # the first run annealed to min_lr
    extension = [lrs[s] for s in range(9, 15)]
    assert max(extension) == pytest.approx(5e-4)  # re-warmed to half the peak, not the full peak
    assert extension[-1] == pytest.approx(1e-4) and extension.index(max(extension)) == 0
    assert latest_checkpoint(tmp_path / "run").name == "step_0000014"


def test_fresh_run_refuses_a_folder_with_checkpoints(tmp_path):
    run = tiny_run(tmp_path, max_steps=2)
    train(run)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(run)


def test_image_data_without_an_image_encoder_is_a_clear_error(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "red.png")
    (tmp_path / "caps.jsonl").write_text(json.dumps({"image": "red.png", "text": "a red square"}) + "\n" * 1)
    run = tiny_run(tmp_path).override([f"data.path={tmp_path / 'caps.jsonl'}", "data.val_fraction=0"])
    with pytest.raises(ConfigError, match="model.image_encoder"):
        train(run)


def test_callback_stop_request_saves_and_reports_stopped(tmp_path):
    recorder = Recorder(stop_at=2)
    result = train(tiny_run(tmp_path, max_steps=10), callbacks=[recorder])
    assert result.stopped and result.steps == 2
    assert recorder.events[-2:] == [("save", 2), ("end", 2)]
    assert (
        torch.load(tmp_path / "run" / "checkpoints" / "step_0000002" / "trainer_state.pt", weights_only=True)["step"]
        == 2
    )


def test_jsonl_logger_drops_records_after_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "train/loss": 1.0 / s}) for s in range(1, 6)]
    path.write_text("\n".join(lines) + '\n{"step": 6, "train/lo')  # torn by a crash mid-write
    logger = JsonlLogger(path)
    logger.on_train_start(TrainState(step=3, total_steps=10, out_dir=str(tmp_path)))
    logger.log({"train/loss": 0.2}, step=4)
    logger.close()
    assert [(r["step"], r["train/loss"]) for r in read_metrics(path)] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.2)]


def test_progress_bar_follows_steps_and_shows_the_latest_losses():
    stream = io.StringIO()
    bar = ProgressBar(file=stream, mininterval=0)
    state = TrainState(step=2, total_steps=10, out_dir=".")
    bar.on_train_start(state)
    bar.log({"train/loss": 2.5, "lr": 1e-3}, step=3)
    bar.log({"val/loss": 2.75}, step=3)
    state.step, state.total_steps = 3, 12
    bar.on_step_end(state)
    assert (bar.bar.n, bar.bar.total) == (3, 12)
    bar.close()
    assert "loss=2.5" in stream.getvalue() and "val=2.75" in stream.getvalue()  # val stays shown between evals


def test_bf16_autocast_trains_on_cpu(tmp_path):
    result = train(tiny_run(tmp_path, max_steps=3, precision="bf16"))
    records = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in m]
    assert result.steps == 3 and all(0 < m["train/loss"] < 10 and m["mfu"] > 0 for m in records)
    model, _ = load_bundle(tmp_path / "run" / "final")
    assert model.embed.weight.dtype == torch.float32  # autocast computes in bf16; the weights stay fp32
