"""Context-length curriculum: the stage lengths, the schedule, the batch cut, and a run that uses it."""

import json
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_training import tiny_run

from apertis_core import ConfigError
from apertis_core.model import ApertisModel
from apertis_core.training import TrainConfig, read_metrics, train
from apertis_core.training.curriculum import cut_batch, length_at, stage_lengths

from conftest import studio_form


def test_stages_halve_from_the_full_length_down_to_the_start():
    assert stage_lengths(256, 32) == [32, 64, 128, 256]
    assert stage_lengths(256, 48) == [64, 128, 256]  # the first halving at or above the start
    assert stage_lengths(96, 10) == [12, 24, 48, 96]
    assert stage_lengths(256, 0) == [256]  # off
    assert stage_lengths(255, 16) == [255]  # an odd length cannot be cut into equal pieces


def test_shorter_stages_share_the_warmup_then_full_length():
    lengths = [length_at(step, 100, 256, 32, 0.3) for step in range(100)]
    assert lengths == [32] * 10 + [64] * 10 + [128] * 10 + [256] * 70
    assert all(length_at(step, 100, 256, 0, 0.3) == 256 for step in range(100))


@given(
    rows=st.integers(1, 4),
    pieces=st.sampled_from([1, 2, 4, 8]),
    piece_len=st.integers(1, 6),
    padded_from=st.integers(0, 48),
)
def test_cut_keeps_every_target_in_order_and_drops_only_padding(rows, pieces, piece_len, padded_from):
    full = pieces * piece_len
    input_ids = torch.arange(rows * full).reshape(rows, full)
    labels = input_ids + 1000
    labels[:, min(padded_from, full) :] = -100
    cut_ids, cut_labels = cut_batch(input_ids, labels, piece_len)
    assert cut_ids.shape[1] == piece_len
    kept_targets = cut_labels[cut_labels != -100]
    assert torch.equal(kept_targets, labels[labels != -100])  # same targets, same order
    assert torch.equal(cut_labels[cut_labels != -100] - 1000, cut_ids[cut_labels != -100])  # still aligned
    if padded_from >= piece_len:
        assert bool((cut_labels != -100).any(dim=1).all())  # no row without a target survives


def test_a_batch_cut_to_its_longest_sample_is_padded_back_to_whole_pieces():
    input_ids = torch.arange(24).reshape(2, 12)  # the loader cut 16-wide windows to 12
    labels = input_ids + 1000
    cut_ids, cut_labels = cut_batch(input_ids, labels, 8)
    assert cut_ids.shape == (4, 8)
    assert torch.equal(cut_labels[cut_labels != -100], labels.flatten())  # every target, in order
    assert bool((cut_labels[[1, 3], 4:] == -100).all())  # the added tail takes no loss


def test_bad_settings_name_the_field():
    with pytest.raises(ConfigError, match="seq_len_warmup"):
        TrainConfig(seq_len_start=8, seq_len_warmup=1.5)


@pytest.fixture
def seen_lengths(monkeypatch) -> list[int]:
    """The width of every training forward pass, in order."""
    seen = []
    forward = ApertisModel.forward

    def recording_forward(self, input_ids, *args, **kwargs):
        if self.training:
            seen.append(input_ids.shape[1])
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(ApertisModel, "forward", recording_forward)
    return seen


def test_a_curriculum_run_trains_on_short_windows_first(tmp_path, seen_lengths):
    run = tiny_run(tmp_path, max_steps=12, seq_len_start=8, seq_len_warmup=0.5)
    result = train(run)
    assert seen_lengths == [8] * 3 + [16] * 3 + [32] * 6  # 2 short stages share the first half of 12 steps
    records = [r for r in read_metrics(f"{result.out_dir}/metrics.jsonl") if "train/seq_len" in r]
    assert records[0]["train/seq_len"] == 8 and records[-1]["train/seq_len"] == 32
    assert records[-1]["progress/tokens"] == 12 * 4 * 32  # the cut keeps every step's tokens


def test_chats_cut_to_their_longest_sample_still_train_in_curriculum_pieces(tmp_path, seen_lengths):
    chats = tmp_path / "chats.jsonl"  # about 150 tokens each: batches are cut from 256 to 192 columns
    rng = random.Random(0)
    noise = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(90)) for _ in range(2)]
    turns = [{"role": "user", "content": noise[0]}, {"role": "assistant", "content": noise[1]}]
    chats.write_text("\n".join(json.dumps({"messages": turns}) for _ in range(40)))
    run = tiny_run(tmp_path, max_steps=6, seq_len_start=128, seq_len_warmup=0.5)
    run = run.override([f"data.path={chats}", "data.seq_len=256", "model.max_seq_len=256", "data.val_fraction=0"])
    train(run)
    assert seen_lengths == [128] * 3 + [192] * 3  # 192 columns padded to two 128 pieces, then kept whole


def test_the_studio_extra_settings_box_turns_it_on(services):
    from studio import run_config
    from studio.tabs import dataset

    data_id = dataset.add_demo(services, "text")[1]
    extra = "train.seq_len_start=16\ntrain.seq_len_warmup=0.5"
    mapping = run_config.run_mapping(services, data_id, "apertis-nano", studio_form(extra=extra))
    assert (mapping["train"]["seq_len_start"], mapping["train"]["seq_len_warmup"]) == (16, 0.5)
    with pytest.raises(ConfigError, match="seq_len_warmup"):
        run_config.run_mapping(services, data_id, "apertis-nano", studio_form(extra="train.seq_len_warmup=2"))
