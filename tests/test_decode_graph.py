"""Graphed decode steps (decode_graph.py): the fixed-buffer step matches model.step, models that cannot be
graphed say why, and with APERTIS_CUDA_GRAPH=1 generation gives the same tokens (captured on CUDA only)."""

import pytest
import torch

from apertis_core import ApertisModel
from apertis_core.decode_graph import ENV_VAR, GraphedStep, _clone, _leaves, graph_unfit
from apertis_core.generation import GenerationConfig, generate

from conftest import tiny_config


def prefilled(preset="apertis-nano", batch=1, **overrides):
    torch.manual_seed(0)
    model = ApertisModel(tiny_config(preset, **overrides)).eval()
    with torch.inference_mode():
        state = model(torch.randint(0, 97, (batch, 6)), state=model.init_state(batch)).state
    return model, state


def by_path(tree, path=()) -> dict:
    """A model state's tensors by their keys (a step may build its dicts in another order)."""
    if isinstance(tree, torch.Tensor):
        return {path: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    return {found: t for key, value in items for found, t in by_path(value, (*path, key)).items()}


def test_fixed_buffer_step_matches_model_step_and_keeps_its_buffers():
    """The buffer discipline a captured graph needs, run eagerly: every state tensor keeps its address
    (steps that replace a tensor, like the conv window, are copied back) and nothing else changes."""
    model, state = prefilled(batch=2)
    plain = _clone(state)
    addresses = [t.data_ptr() for t in _leaves(state)]
    step = GraphedStep(model, state, capture=False)
    with torch.inference_mode():
        for token in ([3, 4], [5, 6], [7, 8]):
            tokens = torch.tensor(token)
            logits, returned = step(tokens, state)
            expected, plain = model.step(tokens, plain)
            assert returned is state and torch.allclose(logits, expected, atol=1e-6)
    assert [t.data_ptr() for t in _leaves(state)] == addresses
    plain = by_path(plain)
    assert all(torch.allclose(tensor, plain[path], atol=1e-6) for path, tensor in by_path(state).items())
    with pytest.raises(ValueError, match="advances the state it was built with"):
        step(torch.tensor([1, 2]), plain)


@pytest.mark.parametrize(
    "preset, batch, overrides, reason",
    [
        ("apertis-nano", 1, {}, "CUDA graphs need a CUDA device"),
        ("apertis-hybrid-nano", 1, {}, "state grows with every token"),
        ("apertis-nano", 3, {}, "at batch size 3 the expert layers read expert ids on the host"),
        ("apertis-nano", 1, {"max_loops": 2}, "looped depth decides on the host"),
    ],
)
def test_models_that_cannot_be_graphed_say_why(preset, batch, overrides, reason):
    model, state = prefilled(preset, batch, **overrides)
    assert reason in graph_unfit(model, state)


def test_asking_for_graphs_on_a_cpu_warns_and_generates_the_same(monkeypatch):
    model, _ = prefilled()
    config = GenerationConfig(max_new_tokens=6, seed=1)
    expected = list(generate(model, [1, 2, 3], config))
    monkeypatch.setenv(ENV_VAR, "1")
    with pytest.warns(UserWarning, match="cannot be a CUDA graph: CUDA graphs need a CUDA device"):
        assert list(generate(model, [1, 2, 3], config)) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_decode_graph_generates_the_same_tokens(monkeypatch):
    model, _ = prefilled()
    model.cuda()
    config = GenerationConfig(max_new_tokens=12, temperature=0)
    expected = list(generate(model, [1, 2, 3], config))
    monkeypatch.setenv(ENV_VAR, "1")
    assert list(generate(model, [1, 2, 3], config)) == expected
