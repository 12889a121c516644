"""generate(): sampling controls, stop ids, and agreement with the model's own greedy argmax."""

import torch

from apertis_core import ApertisModel
from apertis_core.generation import GenerationConfig, generate, sample_next

from conftest import tiny_config


def test_greedy_generation_matches_argmax_of_full_forward():
    model = ApertisModel(tiny_config("apertis-hybrid-nano")).eval()
    prompt = [3, 14, 15, 92, 65]
    tokens = list(generate(model, prompt, GenerationConfig(max_new_tokens=12, temperature=0, repetition_penalty=1.0)))
    assert len(tokens) == 12
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        expected = model(ids).logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()
    assert tokens == expected


def test_stop_ids_end_generation():
    model = ApertisModel(tiny_config("transformer-nano")).eval()
    greedy = GenerationConfig(max_new_tokens=10, temperature=0, repetition_penalty=1.0)
    first = next(iter(generate(model, [1, 2, 3], greedy)))
    greedy.stop_ids = [first]
    assert list(generate(model, [1, 2, 3], greedy)) == []


def test_seeded_sampling_is_reproducible():
    model = ApertisModel(tiny_config("apertis-nano")).eval()
    config = GenerationConfig(max_new_tokens=15, temperature=1.0, seed=7)
    assert list(generate(model, [5, 6], config)) == list(generate(model, [5, 6], config))


def test_top_k_one_is_greedy_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    seen = torch.zeros(1, 4, dtype=torch.bool)
    for _ in range(20):
        assert (
            sample_next(logits, seen, GenerationConfig(top_k=1, temperature=1.0, repetition_penalty=1.0), None).item()
            == 1
        )
        token = sample_next(
            logits, seen, GenerationConfig(top_k=0, top_p=0.5, temperature=1.0, repetition_penalty=1.0), None
        ).item()
        assert token in (1, 3)


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([[2.0, 1.9]])
    seen = torch.tensor([[True, False]])
    config = GenerationConfig(temperature=0, repetition_penalty=1.5)
    assert sample_next(logits, seen, config, None).item() == 1


def test_empty_prompt_is_a_clear_error():
    model = ApertisModel(tiny_config("apertis-nano"))
    try:
        next(generate(model, []))
    except ValueError as error:
        assert "prompt is empty" in str(error)
    else:
        raise AssertionError("an empty prompt must be refused")
