"""Checkpoints: atomic writes, keep-last-N + best pruning, run-folder resolution, no unpickling."""

import json
import pickle

import pytest
import torch

from apertis_core import ApertisModel
from apertis_core.bundle import BundleError, load_bundle
from apertis_core.tokenizer import Tokenizer
from apertis_core.training import best_checkpoint, latest_checkpoint, list_checkpoints
from apertis_core.training import checkpoint as ckpt

from conftest import tiny_config


@pytest.fixture(scope="module")
def parts():
    tokenizer = Tokenizer.byte_level()
    return ApertisModel(tiny_config("transformer-nano", vocab_size=tokenizer.vocab_size)), tokenizer


def save(run_dir, step, parts, **meta):
    model, tokenizer = parts
    return ckpt.save_checkpoint(run_dir, step, model, tokenizer, {"step": step, "rng": torch.get_rng_state()}, meta)


def test_checkpoint_holds_a_loadable_model_and_the_trainer_state(tmp_path, parts):
    path = save(tmp_path, 7, parts, val_loss=2.5)
    assert path == tmp_path / "checkpoints" / "step_0000007"
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "meta.json",
        "model.safetensors",
        "tokenizer.json",
        "trainer_state.pt",
    ]
    assert json.loads((path / "meta.json").read_text()) == {"step": 7, "val_loss": 2.5}
    assert ckpt.load_trainer_state(path)["step"] == 7
    model, _ = load_bundle(path)  # a checkpoint loads like a bundle (export, chat)
    assert torch.equal(model.embed.weight, parts[0].embed.weight)


def test_failure_mid_write_leaves_the_previous_checkpoint_intact(tmp_path, parts, monkeypatch):
    save(tmp_path, 1, parts)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "step_0000001").iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)  # weights and config already written, state not
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2, parts)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000001"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "step_0000001").iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000001"]


def test_keep_last_n_plus_best(tmp_path, parts):
    for step, val in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, 2.2)]:
        save(tmp_path, step, parts)
        ckpt.mark_best_if_better(tmp_path, step, val)
        ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000002", "step_0000004", "step_0000005"]
    assert best_checkpoint(tmp_path).name == "step_0000002"
    assert latest_checkpoint(tmp_path).name == "step_0000005"


def test_prune_removes_leftovers_of_crashed_writes(tmp_path, parts):
    save(tmp_path, 1, parts)
    (tmp_path / "checkpoints" / ".step_0000002.tmp-abc").mkdir()
    ckpt.prune_checkpoints(tmp_path, keep_last=3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000001"]


def test_resume_path_may_be_a_checkpoint_or_a_run_folder(tmp_path, parts):
    save(tmp_path, 3, parts)
    save(tmp_path, 10, parts)
    assert ckpt.resolve_checkpoint(tmp_path).name == "step_0000010"  # numeric order, not text order
    assert ckpt.resolve_checkpoint(tmp_path / "checkpoints" / "step_0000003").name == "step_0000003"
    with pytest.raises(BundleError, match="neither a checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "empty")


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_trainer_state_is_never_unpickled(tmp_path, parts, capsys):
    path = save(tmp_path, 1, parts)
    (path / "trainer_state.pt").write_bytes(pickle.dumps({"step": Payload()}, protocol=2))
    with pytest.raises(BundleError, match="damaged or not a trainer state"):
        ckpt.load_trainer_state(path)
    assert "must never run" not in capsys.readouterr().out


def test_unfinished_atomic_writes_are_cleared_and_a_half_swapped_folder_restored(tmp_path):
    (tmp_path / "checkpoints" / ".step_0000004.tmp-ab12").mkdir(parents=True)  # killed while writing a checkpoint
    (tmp_path / "checkpoints" / ".best.json.x1y2.tmp").write_text("{")
    (tmp_path / ".run.yaml.q9.tmp").write_text("model:")
    (tmp_path / ".final.old-cd34" / "final").mkdir(parents=True)  # killed between the two renames
    (tmp_path / ".final.old-cd34" / "final" / "config.json").write_text("{}")
    (tmp_path / "run.yaml").write_text("kept")
    (tmp_path / ".hidden-notes").write_text("not ours: kept")
    ckpt.remove_unfinished_writes(tmp_path)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == [".hidden-notes", "checkpoints", "final", "final/config.json", "run.yaml"]
