"""Records -> windows (packing, label masks, splits) and BatchLoader (epoch order, exact resume, DDP shards)."""

import json
from pathlib import Path

import pytest
import torch

from apertis_core import ConfigError
from apertis_core.configio import from_dict
from apertis_core.data import BatchLoader, DataConfig, Record, build_datasets, load_dataset
from apertis_core.data.dataset import tail_split
from apertis_core.tokenizer import Tokenizer

from conftest import SHAKESPEARE

TOK = Tokenizer.byte_level()  # ASCII is one token per character, which keeps the arithmetic below readable


def text(s: str) -> Record:
    return Record("text", s, None)


def chat(*turns: tuple[str, str]) -> Record:
    return Record("chat", None, [{"role": r, "content": c} for r, c in turns])


def build(records, **cfg):
    return build_datasets(records, TOK, DataConfig(**{"val_fraction": 0.0, **cfg}))


def targets(item) -> list[int]:
    return [t for t in item["labels"].tolist() if t != -100]


def test_plain_text_is_packed_into_shifted_windows_with_eot_between_documents():
    train, val = build([text("abcdefghij"), text("KLMNO")], seq_len=4)
    stream = TOK.encode("abcdefghij") + [TOK.eot_id] + TOK.encode("KLMNO") + [TOK.eot_id]
    assert len(val) == 0 and len(train) == 4 and train.tokens == len(stream) - 1
    for k in range(len(train)):
        item = train[k]
        assert item["input_ids"].tolist() == stream[4 * k : 4 * k + 4]
        assert item["labels"].tolist() == stream[4 * k + 1 : 4 * k + 5]  # next-token targets, shifted here
        assert item["images"] == []


def test_a_short_last_window_is_padded_without_loss():
    train, _ = build([text("abcdef")], seq_len=4)  # 7 tokens with <|eot|>: windows start at 0 and 4
    last = train[1]
    assert last["input_ids"].tolist() == TOK.encode("ef") + [TOK.pad_id] * 2
    assert last["labels"].tolist() == TOK.encode("f") + [TOK.eot_id, -100, -100]


def test_chat_samples_take_loss_only_on_assistant_replies():
    train, _ = build(
        [chat(("system", "S"), ("user", "Hi"), ("assistant", "Yo"), ("user", "Q"), ("assistant", "A"))], seq_len=32
    )
    item = train[0]
    assert TOK.decode(targets(item), skip_special=False) == "Yo<|eot|>A<|eot|>"
    assert train.tokens == len(targets(item)) == 5  # Y o <|eot|> A <|eot|>
    assert item["input_ids"][0] == TOK.system_id and item["input_ids"][-1] == TOK.pad_id


def test_long_chats_are_truncated_and_ones_left_without_targets_are_dropped():
    long_reply = chat(("user", "Hi"), ("assistant", "a long answer"))
    long_question = chat(("user", "x" * 40), ("assistant", "ok"))
    train, _ = build([long_reply, long_question], seq_len=8)
    assert len(train) == 1
    # the window keeps 9 tokens: <|user|> H i <|eot|> <|assistant|> a ' ' l o
    assert TOK.decode(targets(train[0])) == "a lo"
    with pytest.raises(ConfigError, match="too little data"):
        build([long_question], seq_len=8)


def test_caption_samples_keep_their_images_and_skip_placeholder_loss():
    image = Path("cat.png")
    records = [Record("text", "See <image>\nA cat.", None, [image]), text("plain words here")]
    train, _ = build_datasets(records, TOK, DataConfig(seq_len=24, val_fraction=0.0), image_tokens=lambda _: 3)
    samples = [train[k] for k in range(len(train))]
    caption = next(s for s in samples if s["images"])
    assert caption["images"] == [image]
    assert caption["input_ids"][4:7].tolist() == [TOK.image_id] * 3  # one position per patch
    assert caption["input_ids"][7] != TOK.image_id
    assert TOK.decode(targets(caption), skip_special=False) == "ee \nA cat.<|eot|>"
    batch = next(BatchLoader(train, batch_size=len(train)))
    assert sorted(map(len, batch.images)) == [0, 1]


def test_image_positions_never_receive_a_loss():
    images = [Path("a.png"), Path("b.png")]
    vqa = Record("chat", None, [
        {"role": "user", "content": "<image>\nWhich colour? <image>"},
        {"role": "assistant", "content": "red"},
    ], images)  # fmt: skip
    caption = Record("text", "<image>\n<image>\nTwo squares.", None, images)
    train, _ = build_datasets([vqa, caption], TOK, DataConfig(seq_len=64, val_fraction=0.0), lambda p: len(p.stem) + 4)
    for k in range(len(train)):
        item = train[k]
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        assert ids.count(TOK.image_id) == 2 * 5  # both images, 5 positions each
        targets_image = [t for t in labels if t == TOK.image_id]
        assert not targets_image, "an image position was a training target"
        assert targets(item)  # ...while the text still trains


def test_truncation_never_keeps_part_of_an_image():
    images = [Path("a.png"), Path("b.png")]
    record = Record("text", "ab<image>cd<image>efgh", None, images)
    train, _ = build_datasets([record], TOK, DataConfig(seq_len=10, val_fraction=0.0), image_tokens=lambda _: 4)
    (item,) = [train[k] for k in range(len(train))]
    # a b [4 slots] c d fill 8 positions; the second image's 4 would end at 12 > 10 + 1: cut before it.
    assert item["images"] == [images[0]]
    assert item["input_ids"].tolist().count(TOK.image_id) == 4
    assert TOK.decode(targets(item), skip_special=False) == "bcd"


def test_images_without_an_image_encoder_are_a_clear_error():
    record = Record("text", "<image>\nA cat.", None, [Path("cat.png")])
    with pytest.raises(ConfigError, match="image_encoder"):
        build([record], seq_len=16)


def test_random_split_is_seeded_disjoint_and_complete():
    records = [text(f"document number {i:03d}.") for i in range(40)]

    def as_tuples(ds):
        return [tuple(ds[k]["input_ids"].tolist()) for k in range(len(ds))]

    def windows(seed):
        train, val = build_datasets(records, TOK, DataConfig(seq_len=16, val_fraction=0.25, seed=seed))
        return as_tuples(train), as_tuples(val)

    train, val = windows(0)
    everything, _ = build(records, seq_len=16)
    assert windows(0) == (train, val)
    assert windows(1)[1] != val
    assert len(val) == round(len(everything) * 0.25)
    assert sorted(train + val) == sorted(as_tuples(everything))


def test_tail_split_holds_out_the_last_fraction_of_characters():
    records = [text("a" * 50), chat(("user", "q" * 10), ("assistant", "r" * 10)), text("b" * 20)]
    # 90 characters in all: the texts hold 0..50 and 70..90, the chat 50..70
    train, val = tail_split(records, 0.2)  # cut at 72, inside the last text: it is cut in two
    assert [r.text for r in train if r.kind == "text"] == ["a" * 50, "b" * 2]
    assert [r.text for r in val] == ["b" * 18]
    train, val = tail_split(records, 0.25)  # cut at 67: 17 of the chat's 20 characters come before it
    assert [r.kind for r in train] == ["text", "chat"] and [r.text for r in val] == ["b" * 20]
    train, val = tail_split(records, 0.4)  # cut at 54: the chat is mostly after it
    assert [r.kind for r in train] == ["text"] and [r.kind for r in val] == ["chat", "text"]


def test_tail_split_matches_nanogpt_on_tinyshakespeare(tmp_path):
    data = SHAKESPEARE.read_text(encoding="utf-8")[:5001]  # 5001 * 0.9 is not whole: int() must floor
    (tmp_path / "shakespeare.txt").write_text(data, encoding="utf-8")
    records, _ = load_dataset(tmp_path / "shakespeare.txt")
    train, val = build_datasets(records, TOK, DataConfig(seq_len=64, split="tail", val_fraction=0.1))
    n = int(len(data) * 0.9)  # nanoGPT: train_data = data[:int(n*0.9)]
    assert train.tokens == n and val.tokens == len(data) - n  # every character predicted once, + <|eot|>, - the first
    assert TOK.decode(val[0]["input_ids"].tolist()) == data[n : n + 64]


class Numbered:
    """A dataset whose sample k is just the number k, so batches show which samples they hold."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, k):
        return {"input_ids": torch.tensor([k]), "labels": torch.tensor([k]), "images": []}


def ids(batch) -> list[int]:
    return batch.input_ids[:, 0].tolist()


def test_each_epoch_is_a_seeded_permutation():
    loader = BatchLoader(Numbered(10), batch_size=5, seed=7)
    epoch0 = ids(next(loader)) + ids(next(loader))
    assert loader.epoch == 1.0
    epoch1 = ids(next(loader)) + ids(next(loader))
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1
    again = BatchLoader(Numbered(10), batch_size=5, seed=7)
    assert ids(next(again)) == epoch0[:5]
    assert ids(next(BatchLoader(Numbered(10), batch_size=5, seed=8))) != epoch0[:5]


def test_restored_state_continues_with_exactly_the_same_batches():
    loader = BatchLoader(Numbered(10), batch_size=3, seed=1)
    for _ in range(4):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))  # checkpoints store it as plain data
    expected = [ids(next(loader)) for _ in range(5)]  # crosses epoch boundaries
    resumed = BatchLoader(Numbered(10), batch_size=3, seed=1)
    resumed.load_state_dict(state)
    assert [ids(next(resumed)) for _ in range(5)] == expected


def test_resume_refuses_changed_data_or_seed():
    state = BatchLoader(Numbered(10), batch_size=2).state_dict()
    with pytest.raises(ConfigError, match="dataset_size 10 -> 11"):
        BatchLoader(Numbered(11), batch_size=2).load_state_dict(state)
    with pytest.raises(ConfigError, match="seed 0 -> 5"):
        BatchLoader(Numbered(10), batch_size=2, seed=5).load_state_dict(state)


def test_ddp_ranks_split_the_global_batch_disjointly():
    for size in (12, 13):  # 13: global batches also wrap across epoch boundaries
        single = BatchLoader(Numbered(size), batch_size=6, seed=2)
        ranks = [BatchLoader(Numbered(size), batch_size=2, seed=2, rank=r, world_size=3) for r in range(3)]
        for _ in range(6):
            shards = [ids(next(loader)) for loader in ranks]
            assert sum(shards, []) == ids(next(single))
            if size == 12:  # each global batch lies inside one epoch, so no sample appears twice
                assert len(set(sum(shards, []))) == 6


class Lengthed:
    """Sample k holds the number k at each of its lengths[k] real positions, then padding (-1) to `width`."""

    group_by_length = True

    def __init__(self, lengths, width=256):
        self.lengths, self.width = lengths, width

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, k):
        row = torch.full((self.width,), -1)
        row[: self.lengths[k]] = k
        return {"input_ids": row, "labels": row.clone(), "images": []}


def test_length_grouping_batches_like_lengths_together_and_cuts_only_padding():
    data = Lengthed([20, 200] * 200)  # short captions beside long chats
    plain = BatchLoader(Numbered(400), batch_size=4, seed=3)
    grouped = BatchLoader(data, batch_size=4, seed=3)
    span = 25  # global batches regrouped at a time: a quarter of the data (GROUP_BATCHES is larger)
    batches = [next(grouped) for _ in range(span)]
    # The same samples as the plain stream's first `span` batches, in another order.
    assert sorted(sum((ids(b) for b in batches), [])) == sorted(sum((ids(next(plain)) for _ in range(span)), []))
    for batch in batches:
        lengths = [data.lengths[k] for k in ids(batch)]
        assert batch.input_ids.shape[1] == (64 if max(lengths) == 20 else 256)  # the longest, rounded up to 64
        assert int((batch.input_ids >= 0).sum()) == sum(lengths)  # every real position is still there
    mixed = sum(len({data.lengths[k] for k in ids(b)}) > 1 for b in batches)
    assert mixed <= 1  # at most the one batch where the sorted lengths change
    assert BatchLoader(Lengthed([20, 200] * 200), batch_size=4, seed=3).state_dict()["group_by_length"]


def test_length_grouped_stream_resumes_exactly_and_splits_across_ranks():
    lengths = [5 + (k * 37) % 250 for k in range(203)]
    loader = BatchLoader(Lengthed(lengths), batch_size=3, seed=1)
    for _ in range(40):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))
    expected = [ids(next(loader)) for _ in range(30)]  # crosses regrouped runs and an epoch boundary
    resumed = BatchLoader(Lengthed(lengths), batch_size=3, seed=1)
    resumed.load_state_dict(state)
    assert [ids(next(resumed)) for _ in range(30)] == expected
    single = BatchLoader(Lengthed(lengths), batch_size=6, seed=2)
    ranks = [BatchLoader(Lengthed(lengths), batch_size=2, seed=2, rank=r, world_size=3) for r in range(3)]
    for _ in range(20):
        assert sum((ids(next(loader)) for loader in ranks), []) == ids(next(single))
    with pytest.raises(ConfigError, match="group_by_length True -> False"):
        BatchLoader(Numbered(203), batch_size=3, seed=1).load_state_dict(state)


def test_data_too_small_to_regroup_keeps_its_order_and_is_still_cut():
    lengths = [10, 90, 10, 90, 10, 90, 10, 90, 10, 90]
    grouped = BatchLoader(Lengthed(lengths), batch_size=5, seed=7)
    plain = BatchLoader(Numbered(10), batch_size=5, seed=7)
    for _ in range(4):
        batch = next(grouped)
        assert ids(batch) == ids(next(plain))
        assert batch.input_ids.shape[1] == (64 if max(lengths[k] for k in ids(batch)) <= 64 else 128)


def test_chat_batches_are_cut_to_their_longest_sample_and_grouped_on_request():
    records = [chat(("user", "hi"), ("assistant", "yo"))] * 40 + [chat(("user", "x" * 150), ("assistant", "ok"))] * 40
    train, _ = build(records, seq_len=256)
    assert not train.group_by_length  # the default: random order, each batch only cut
    loader = BatchLoader(train, batch_size=4)
    for _ in range(20):
        batch = next(loader)
        longest = int((batch.labels != -100).nonzero()[:, 1].max()) + 1
        assert batch.input_ids.shape[1] == -(-longest // 64) * 64
    grouped, _ = build(records, seq_len=256, group_by_length=True)
    loader = BatchLoader(grouped, batch_size=4)
    assert {next(loader).input_ids.shape[1] for _ in range(20)} == {64, 192}


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="val_fraction"):
        from_dict(DataConfig, {"val_fraction": 1.5})
    with pytest.raises(ConfigError, match="split"):
        from_dict(DataConfig, {"split": "middle"})
    with pytest.raises(ConfigError, match="apertis data validate"):
        build_datasets([], TOK, DataConfig())
    with pytest.raises(ConfigError, match="rank 2"):
        BatchLoader(Numbered(4), batch_size=1, rank=2, world_size=2)
