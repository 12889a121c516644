"""Batched generation: prompts of different lengths sharing decode steps get what each gets alone."""

import time

import pytest
import torch

from apertis_core import ApertisModel
from apertis_core.generation import DecodeBatch, GenerationConfig, generate, generate_many

from conftest import HANG_GUARD_S, tiny_config

PROMPTS = [[5], [3, 14, 15, 92, 65, 35, 89, 79, 32], [7, 7, 2], list(range(11, 24))]
GREEDY = GenerationConfig(max_new_tokens=10, temperature=0, repetition_penalty=1.1)
MODELS = [
    ("apertis-nano", {}),
    ("transformer-nano", {}),
    ("apertis-hybrid-nano", {}),
    ("transformer-nano", {"sliding_window": 6}),  # caches trimmed to the window, prompts longer than it
]


def one_at_a_time(model, prompts, configs):
    return [list(generate(model, p, c)) for p, c in zip(prompts, configs, strict=True)]


def wait_until(condition) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        assert time.monotonic() < deadline, "waited too long"
        time.sleep(0.01)


def run_batch(batch: DecodeBatch, keys: list[int]) -> list[list[int]]:
    out: dict[int, list[int]] = {key: [] for key in keys}
    while len(batch):
        for key, token in batch.step().items():
            if token is not None:
                out[key].append(token)
    return [out[key] for key in keys]


@pytest.mark.parametrize(("preset", "extra"), MODELS)
def test_batched_greedy_equals_one_at_a_time(preset, extra):
    model = ApertisModel(tiny_config(preset, **extra)).eval()
    batched = [[] for _ in PROMPTS]
    for index, token in generate_many(model, PROMPTS, GREEDY):
        batched[index].append(token)
    assert batched == one_at_a_time(model, PROMPTS, [GREEDY] * len(PROMPTS))
    assert all(len(tokens) == GREEDY.max_new_tokens for tokens in batched)


@pytest.mark.parametrize(("preset", "extra"), MODELS)
def test_batched_logits_match_single_prompt_logits(preset, extra):
    """Stronger than equal argmaxes: every row's next-token logits are the single prompt's, step after step."""
    model = ApertisModel(tiny_config(preset, **extra)).eval()
    config = GenerationConfig(max_new_tokens=6, temperature=0, repetition_penalty=1.0)
    batch = DecodeBatch(model)
    keys = [batch.add(p, config) for p in PROMPTS]
    singles = [DecodeBatch(model) for _ in PROMPTS]
    for single, prompt in zip(singles, PROMPTS, strict=True):
        single.add(prompt, config)
    for _ in range(config.max_new_tokens - 1):
        torch.testing.assert_close(batch.logits, torch.cat([s.logits for s in singles]), atol=1e-5, rtol=1e-4)
        stepped = batch.step()
        assert [stepped[k] for k in keys] == [s.step()[0] for s in singles]


def test_each_prompt_has_its_own_stop_ids_and_length():
    model = ApertisModel(tiny_config("apertis-hybrid-nano")).eval()
    free = [list(generate(model, p, GREEDY)) for p in PROMPTS]
    configs = [
        GenerationConfig(max_new_tokens=10, temperature=0, stop_ids=[free[0][3]]),  # ends at its 4th token
        GenerationConfig(max_new_tokens=2, temperature=0),  # ends after 2 tokens
        GenerationConfig(max_new_tokens=0, temperature=0),  # nothing at all
        GenerationConfig(max_new_tokens=10, temperature=0, stop_ids=[free[3][0]]),  # ends at once
    ]
    batch = DecodeBatch(model)
    keys = [batch.add(p, c) for p, c in zip(PROMPTS, configs, strict=True)]
    got = run_batch(batch, keys)
    assert got == one_at_a_time(model, PROMPTS, configs)
    assert [len(tokens) for tokens in got] == [len(free[0][: free[0].index(free[0][3])]), 2, 0, 0]


def test_prompts_join_and_leave_a_running_batch():
    """The studio's case: a request arrives while others decode, another is cancelled mid-reply."""
    model = ApertisModel(tiny_config("transformer-nano")).eval()
    expected = one_at_a_time(model, PROMPTS, [GREEDY] * len(PROMPTS))
    batch = DecodeBatch(model)
    first, cancelled = batch.add(PROMPTS[1], GREEDY), batch.add(PROMPTS[0], GREEDY)
    out = {first: [batch.step()[first] for _ in range(5)]}
    batch.remove(cancelled)
    late = batch.add(PROMPTS[3], GREEDY)  # a longer prompt than the cache so far: the batch's rows are re-padded
    rest = run_batch(batch, [first, late])
    assert out[first] + rest[0] == expected[1]
    assert rest[1] == expected[3]
    assert len(batch) == 0 and batch.state is None


def test_seeded_sampling_in_a_batch_equals_alone():
    model = ApertisModel(tiny_config("apertis-nano")).eval()
    configs = [GenerationConfig(max_new_tokens=10, temperature=1.0, seed=s) for s in (1, 2, 3, 4)]
    batch = DecodeBatch(model)
    keys = [batch.add(p, c) for p, c in zip(PROMPTS, configs, strict=True)]
    assert run_batch(batch, keys) == one_at_a_time(model, PROMPTS, configs)


def test_generate_many_caps_the_batch_and_keeps_order_per_prompt(monkeypatch):
    model = ApertisModel(tiny_config("apertis-nano")).eval()
    prompts = PROMPTS * 2
    sizes, original = [], DecodeBatch.step

    def step(self):
        sizes.append(len(self))
        return original(self)

    monkeypatch.setattr(DecodeBatch, "step", step)
    got = [[] for _ in prompts]
    for index, token in generate_many(model, prompts, GREEDY, max_batch=3):
        got[index].append(token)
    assert max(sizes) == 3
    assert got == one_at_a_time(model, prompts, [GREEDY] * len(prompts))


def test_bad_requests_are_refused_clearly():
    model = ApertisModel(tiny_config("apertis-nano")).eval()
    with pytest.raises(ValueError, match="prompt is empty"):
        DecodeBatch(model).add([])
    with pytest.raises(ValueError, match="max_batch"):
        next(generate_many(model, PROMPTS, GREEDY, max_batch=0))


def test_concurrent_requests_to_one_model_share_steps_and_get_their_own_replies(monkeypatch):
    """The studio's scheduler: chats from several threads merge into one batch; a reader that stops early
    (Stop) leaves, and the others still get exactly their one-at-a-time replies."""
    import threading

    from studio.model_cache import BatchScheduler

    model = ApertisModel(tiny_config("apertis-hybrid-nano")).eval()
    expected = one_at_a_time(model, PROMPTS, [GREEDY] * len(PROMPTS))
    scheduler = BatchScheduler(model)
    sizes, original = [], DecodeBatch.step

    def step(self):  # the first step waits until every request has arrived, so they all join the batch
        if not sizes:
            wait_until(lambda: len(self) + len(scheduler._pending) == len(PROMPTS))
        sizes.append(len(self))
        return original(self)

    monkeypatch.setattr(DecodeBatch, "step", step)
    replies: dict[int, list[int]] = {}

    def chat(index: int) -> None:
        stream = scheduler.generate(PROMPTS[index], GREEDY)
        limit = 3 if index == 2 else None  # this reader stops after 3 tokens
        replies[index] = [token for _, token in zip(range(limit or 10**6), stream, strict=False)]
        stream.close()

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_GUARD_S)
    assert max(sizes) == len(PROMPTS)
    assert replies[2] == expected[2][:3]
    assert [replies[i] for i in (0, 1, 3)] == [expected[i] for i in (0, 1, 3)]
